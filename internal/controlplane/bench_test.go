package controlplane

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// BenchmarkPulse is the control plane's CPU per pulse: verify the request's
// signature, parse, count once, keep the sample for the rules, and sign the
// answer. No network: the handler is called directly. Rule evaluation, which
// runs at most 20 times per rule window, is BenchmarkEvaluate.
func BenchmarkPulse(b *testing.B) {
	for _, tags := range []int{10, 1000} {
		b.Run(fmt.Sprintf("tags=%d", tags), func(b *testing.B) {
			s := NewUnstarted()
			defer s.Close()
			s.AddKey("pk", "sk")
			s.SetLogLimit(0)
			s.SetPolicy("", Policy{Version: 1, GlobalMaxWeight: 5})
			h := s.Handler()
			var tagJSON bytes.Buffer
			for i := range tags {
				if i > 0 {
					tagJSON.WriteByte(',')
				}
				fmt.Fprintf(&tagJSON, `"tenant-%d":{"usage":%d,"bounced":%d}`, i, i, i%3)
			}
			b.ReportAllocs()
			seq := 0
			for b.Loop() {
				seq++
				body := []byte(`{"instanceId":"i1","sdk":"waitstate-go/0.1.0","seq":` + strconv.Itoa(seq) +
					`,"windowEndMs":1764230400000,"windowMs":20000,"mode":"enforcing","policyVersion":1,` +
					`"usageDelta":100,"bouncedDelta":5,"usageTotal":1000,"bouncedTotal":50,"tags":{` + tagJSON.String() + `},` +
					`"health":{"requests":100,"errors":2,"latencyMs":{"p50":12.5,"p95":80,"p99":120,"max":300}}}`)
				req := httptest.NewRequest(http.MethodPost, wire.PathPulse, bytes.NewReader(body))
				ts, nonce := strconv.FormatInt(time.Now().Unix(), 10), wire.RandomHex()
				req.Header.Set(wire.HeaderKey, "pk")
				req.Header.Set(wire.HeaderInstance, "i1")
				req.Header.Set(wire.HeaderNonce, nonce)
				req.Header.Set(wire.HeaderTimestamp, ts)
				req.Header.Set(wire.HeaderSignature, wire.Sign("sk", wire.RequestCanonical(http.MethodPost, wire.PathPulse, ts, nonce, wire.Identity{PublishKey: "pk", InstanceID: req.Header.Get(wire.HeaderInstance)}, body)))
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatalf("status %d: %s", rec.Code, rec.Body)
				}
			}
		})
	}
}

// BenchmarkEvaluate is one evaluation of a site's rules over a window of
// 1,000 pulses with health and histograms (a fleet of 1,000 instances
// pulsing once per window), the latency quantiles included.
func BenchmarkEvaluate(b *testing.B) {
	var pulses []*Pulse
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 1000 {
		us := make([]uint64, 50+i%100)
		for j := range us {
			us[j] = uint64(10_000 * math.Exp(0.6*r.NormFloat64()))
		}
		pulses = append(pulses, &Pulse{PulseBody: wire.PulseBody{InstanceID: strconv.Itoa(i), UsageDelta: 100, Health: instanceHealth(us)}})
	}
	w := windowOf(pulses)
	rule := Rule{Name: "p95", TagName: "free", Metric: MetricLatencyP95, Operator: "gt", Threshold: 200, CooldownSeconds: 5}
	var st ruleState
	b.ReportAllocs()
	for b.Loop() {
		st.step(rule, w.metrics(testNow, time.Second, ""), testNow)
	}
}
