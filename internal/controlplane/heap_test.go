package controlplane

import (
	"bytes"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// TestHeapBounded: a control plane left running keeps a heap bounded by its
// keys, sites, instances and tags. 1,000,000 pulses from 1,000 instances
// (each with 10 tags carrying health and histograms, one of them watched by
// a rule) leave the heap within 2× of what the first 10,000 left, with the
// logs at their defaults and with them off. Before, every pulse added
// 132 B for good to the dedupe map, and the logs kept 200,000 entries.
//
// A million pulses take about a minute without the race detector and far
// longer with it, so it runs without: .ci/run runs it on its own, and
// WAITSTATE_HEAP_PULSES sets another count.
func TestHeapBounded(t *testing.T) {
	if raceEnabled {
		t.Skip("a million pulses under the race detector take too long; .ci/run runs this test without it")
	}
	total := 1_000_000
	if n, err := strconv.Atoi(os.Getenv("WAITSTATE_HEAP_PULSES")); err == nil {
		total = n
	} else if testing.Short() {
		total = 100_000
	}
	for _, logs := range []bool{true, false} {
		name := map[bool]string{true: "logs at their defaults", false: "logs off"}[logs]
		t.Run(name, func(t *testing.T) {
			base := heapInUse()
			s := NewUnstarted()
			defer s.Close()
			s.AddKey("pk", "sk")
			if !logs {
				s.SetLogLimit(0)
			}
			s.SetPolicy("", Policy{Version: 1, GlobalMaxWeight: 10})
			require.NoError(t, s.SetRules("", Rule{Name: "protect", MetricTag: "tenant-0", Metric: MetricLatencyP95, Operator: ">", Threshold: 1e6,
				TagName: "tenant-1", Action: ActionBlock}))
			f := newFleet(1000, 10)
			f.send(t, s, 10_000)
			first := heapInUse() - base
			f.send(t, s, total-10_000)
			last := heapInUse() - base
			assert.Equal(t, total, s.Totals("").Pulses)
			t.Logf("%s: heap after 10,000 pulses %.1f MiB, after %d pulses %.1f MiB (%.2f×)", name,
				float64(first)/(1<<20), total, float64(last)/(1<<20), float64(last)/float64(first))
			assert.LessOrEqual(t, last, 2*first)
		})
	}
}

// heapInUse is the live heap after a full collection.
func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// fleet sends pulses from many instances, each resending its body with the
// next seq.
type fleet struct {
	bodies [][]byte
	seqs   []uint64
	next   int
}

func newFleet(instances, tags int) *fleet {
	r := rand.New(rand.NewPCG(5, 6))
	f := &fleet{seqs: make([]uint64, instances)}
	for i := range instances {
		f.bodies = append(f.bodies, fleetPulse(r, i, 1, tags))
	}
	return f
}

// send sends n pulses, round robin over the instances, from two goroutines.
func (f *fleet) send(t *testing.T, s *Server, n int) {
	h := s.Handler()
	jobs := make(chan *http.Request, 64)
	var wg sync.WaitGroup
	failed := make(chan int, 1)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for req := range jobs {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					select {
					case failed <- rec.Code:
					default:
					}
				}
			}
		}()
	}
	for range n {
		i := f.next % len(f.bodies)
		f.next++
		f.seqs[i]++
		body := bytes.Replace(f.bodies[i], []byte(`"seq":1,`), []byte(`"seq":`+strconv.FormatUint(f.seqs[i], 10)+`,`), 1)
		jobs <- signed(http.MethodPost, wire.PathPulse, "sk", wire.Identity{PublishKey: "pk", InstanceID: "i" + strconv.Itoa(i)}, body)
	}
	close(jobs)
	wg.Wait()
	select {
	case code := <-failed:
		t.Fatalf("a pulse was answered %d", code)
	default:
	}
}
