package controlplane

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// fleetPulse is the body of a pulse of instance i with tags tags, each
// carrying health with a histogram, as the SDK sends them.
func fleetPulse(r *rand.Rand, i int, seq uint64, tags int) []byte {
	health := func(n int) *Health {
		us := make([]uint64, n)
		for j := range us {
			us[j] = uint64(20_000 * math.Exp(0.7*r.NormFloat64()))
		}
		return instanceHealth(us)
	}
	body := wire.PulseBody{InstanceID: "i" + strconv.Itoa(i), SDK: "waitstate-go/0.2.0", Seq: seq, WindowEndMs: time.Now().UnixMilli() + int64(seq),
		WindowMs: 1000, Mode: "enforcing", PolicyVersion: 1, UsageDelta: 100, BouncedDelta: 5, UsageTotal: 100 * seq, BouncedTotal: 5 * seq,
		Tags: map[string]TagCount{}, Health: health(100)}
	for t := range tags {
		body.Tags["tenant-"+strconv.Itoa(t)] = TagCount{Usage: 10, Bounced: uint64(t % 2), Health: health(10)}
	}
	data, err := json.Marshal(body)
	if err != nil {
		panic(err)
	}
	return data
}

// BenchmarkPulse is the control plane's CPU per pulse from a fleet of 1,000
// instances: verify the request's signature, parse, count once, add to the
// rule aggregates (one rule watches a tag), evaluate the rules when due, and
// sign the answer. Each pulse has tags tags, each with health and a
// histogram, and site-wide health. The requests are built and signed
// outside the timer; the handler is called directly, with no network.
// With logs off, as a long-running control plane would be; logged, every
// pulse is decoded whole and kept, and every request is copied.
func BenchmarkPulse(b *testing.B) {
	for _, c := range []struct {
		tags int
		logs bool
	}{{10, false}, {100, false}, {10, true}} {
		name := fmt.Sprintf("tags=%d", c.tags)
		if c.logs {
			name += "/logged"
		}
		tags := c.tags
		b.Run(name, func(b *testing.B) {
			s := NewUnstarted()
			defer s.Close()
			s.AddKey("pk", "sk")
			if !c.logs {
				s.SetLogLimit(0)
			}
			s.SetPolicy("", Policy{Version: 1, GlobalMaxWeight: 5})
			if err := s.SetRules("", Rule{Name: "protect", MetricTag: "tenant-0", Metric: MetricLatencyP95, Operator: ">", Threshold: 1e6,
				TagName: "tenant-1", Action: ActionBlock, CooldownSeconds: 5}); err != nil {
				b.Fatal(err)
			}
			h := s.Handler()
			r := rand.New(rand.NewPCG(1, 2))
			bodies := make([][]byte, 0, 1000) // one body per instance, resent with a new seq
			for i := range 1000 {
				bodies = append(bodies, fleetPulse(r, i, 1, tags))
			}
			seqs := make([]uint64, 1000)
			const batch = 2000
			reqs := make([]*http.Request, 0, batch)
			n := 0
			b.ReportAllocs()
			for b.Loop() {
				if len(reqs) == 0 {
					b.StopTimer()
					for range batch {
						i := n % 1000
						n++
						seqs[i]++
						body := bytes.Replace(bodies[i], []byte(`"seq":1,`), []byte(`"seq":`+strconv.FormatUint(seqs[i], 10)+`,`), 1)
						reqs = append(reqs, signed(http.MethodPost, wire.PathPulse, "sk", wire.Identity{PublishKey: "pk", InstanceID: "i" + strconv.Itoa(i)}, body))
					}
					slices.Reverse(reqs)
					b.StartTimer()
				}
				req := reqs[len(reqs)-1]
				reqs = reqs[:len(reqs)-1]
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatalf("status %d: %s", rec.Code, rec.Body)
				}
			}
		})
	}
}

// BenchmarkEvaluate is one evaluation of a site's rules over a window
// holding 1,000 or 50,000 pulses, with health and histograms, from 1,000
// instances: the aggregates the rules read are as large either way.
func BenchmarkEvaluate(b *testing.B) {
	for _, n := range []int{1000, 50_000} {
		b.Run(fmt.Sprintf("pulses=%d", n), func(b *testing.B) {
			r := rand.New(rand.NewPCG(1, 2))
			var w aggWindow
			w.reset(time.Second / windowSlots)
			processes := make([]incarnation, 1000)
			for i := range n {
				us := make([]uint64, 50+i%100)
				for j := range us {
					us[j] = uint64(10_000 * math.Exp(0.6*r.NormFloat64()))
				}
				p := &Pulse{PulseBody: wire.PulseBody{InstanceID: strconv.Itoa(i % 1000), UsageDelta: 100, Health: instanceHealth(us)}}
				w.add(p, &processes[i%1000], testNow.Add(-time.Duration(i%windowSlots)*w.width), nil)
			}
			rule := Rule{Name: "p95", TagName: "free", Metric: MetricLatencyP95, Operator: "gt", Threshold: 200, CooldownSeconds: 5}
			var st reflex.State
			b.ReportAllocs()
			for b.Loop() {
				st.Step(rule, w.metrics(testNow, time.Second, "").Figures, testNow)
			}
		})
	}
}
