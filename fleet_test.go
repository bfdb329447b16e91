//go:build fleet

package waitstate

// The fleet simulation: 1,000 clients in one process against one control
// plane. It takes about a minute and most of the machine, so it is behind a
// build tag:
//
//	go test -tags fleet -run TestFleetSimulation -v -timeout 10m .

import (
	"context"
	"math/rand/v2"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestFleetSimulation(t *testing.T) {
	const (
		clients  = 1000
		interval = time.Second
		runFor   = 20 * time.Second
		workers  = 8
	)
	cp := newPlane(t)
	cp.SetLogLimit(100_000) // every pulse of the run, to check each client's counts
	cp.SetLogBytes(1 << 30)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"t0": 0}})

	fleet := make([]*Client, clients)
	byInstance := map[string]int{}
	for i := range fleet {
		c, err := New(Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: cp.URL,
			PulseInterval: interval, SyncInterval: 5 * interval})
		require.NoError(t, err)
		fleet[i] = c
		byInstance[c.opts.InstanceID] = i
	}
	t.Logf("%d clients started together", clients)

	type tally struct{ usage, bounced uint64 }
	local := make([]tally, clients)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for i := w; i < clients; i += workers {
					tag := [...]string{"t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"}[rand.IntN(10)]
					if fleet[i].Gate(tag, float64(rand.IntN(8))).Allowed {
						local[i].usage++
					} else {
						local[i].bounced++
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	start, cpu0 := time.Now(), cpuTime()
	time.Sleep(runFor)
	cpu := cpuTime() - cpu0
	close(stop)
	wg.Wait()

	var sg sync.WaitGroup
	for _, c := range fleet {
		sg.Add(1)
		go func() {
			defer sg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			assert.NoError(t, c.Shutdown(ctx))
		}()
	}
	sg.Wait()

	// Every client's counts, exact.
	got := make([]tally, clients)
	for _, p := range cp.Pulses() {
		i := byInstance[p.InstanceID]
		got[i].usage += p.UsageDelta
		got[i].bounced += p.BouncedDelta
	}
	exact := 0
	for i := range fleet {
		if got[i] == local[i] {
			exact++
		}
	}
	assert.Equal(t, clients, exact, "clients whose counts the control plane has exactly")

	// How the pulses spread over the interval, once the start-up burst (every
	// client's first sync runs at once) has passed: by when each window was
	// cut (windowEndMs), which is what the
	// client's timing decides; arrival times would also show the loaded
	// server's queueing and GC pauses.
	const buckets = 10
	var arrivals []time.Time
	for _, p := range cp.Pulses() {
		at := time.UnixMilli(p.WindowEndMs)
		if at.After(start.Add(5*interval)) && at.Before(start.Add(runFor-interval)) {
			arrivals = append(arrivals, at)
		}
	}
	var handler time.Duration
	var bodyBytes, pulses int
	for _, r := range cp.Requests() {
		if r.Method != http.MethodPost || r.Path != wire.PathPulse || r.At.Before(start) || r.At.After(start.Add(runFor)) {
			continue
		}
		pulses++
		handler += r.Duration
		bodyBytes += len(r.Body)
	}
	width := interval / buckets
	count := map[int64]int{}
	for _, at := range arrivals {
		count[at.Sub(start).Nanoseconds()/width.Nanoseconds()]++
	}
	most := 0
	for _, n := range count {
		most = max(most, n)
	}
	if testing.Verbose() {
		var row []int
		for b := int64(50); b < 190; b++ {
			row = append(row, count[b])
		}
		t.Logf("per bucket: %v", row)
	}
	slots := int((runFor - 6*interval) / width)
	expected := float64(len(arrivals)) / float64(slots)
	t.Logf("pulses in the steady %v: %d; per %v bucket: expected %.0f, most %d (%.2f×)",
		runFor-6*interval, len(arrivals), width, expected, most, float64(most)/expected)
	t.Logf("process CPU during the run (1,000 clients, 8 gating workers and the control plane): %v for %d pulses, %.0f µs per pulse",
		cpu.Round(time.Millisecond), pulses, float64(cpu.Microseconds())/float64(pulses))
	t.Logf("control plane handler time per pulse: %v (wall, under a loaded machine)", handler/time.Duration(pulses))
	t.Logf("pulse body with up to 10 tags: %d bytes on average", bodyBytes/pulses)
	assert.LessOrEqual(t, float64(most), 2*expected, "jitter keeps the fleet from pulsing together")
}
