package waitstate

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// Chaos tests: the control plane misbehaves for seconds at a time while the
// client is under load, and the figures must still be exact.

// allowedTransitions are the only mode changes a client makes.
var allowedTransitions = map[[2]Mode]bool{
	{ModeFailOpen, ModeEnforcing}:  true,
	{ModeEnforcing, ModeSafeMode}:  true,
	{ModeSafeMode, ModeEnforcing}:  true,
	{ModeFailOpen, ModeFailOpen}:   true,
	{ModeEnforcing, ModeEnforcing}: true,
	{ModeSafeMode, ModeSafeMode}:   true,
}

// watchModes records every change of c's mode it sees until stop closes.
func watchModes(c *Client, stop <-chan struct{}) func() []Mode {
	var seen []Mode
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := Mode(-1)
		for {
			if m := c.Mode(); m != last {
				seen = append(seen, m)
				last = m
			}
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Microsecond):
			}
		}
	}()
	return func() []Mode { <-done; return seen }
}

func TestChaosFlappingControlPlane(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(150 * time.Millisecond)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 1}})
	c, _ := startClient(t, testOptions(cp))
	stop := make(chan struct{})
	modes := watchModes(c, stop)
	results := gateFor(c, stop)
	waitReady(t, c)

	// Down for 50-250 ms, up for 50-150 ms, for 10 s: some outages outlast
	// the 150 ms lease, some do not.
	end := time.Now().Add(10 * time.Second)
	for time.Now().Before(end) {
		cp.SetFaults(controlplane.Faults{Down: true})
		time.Sleep(time.Duration(50+rand.IntN(200)) * time.Millisecond)
		cp.SetFaults(controlplane.Faults{})
		time.Sleep(time.Duration(50+rand.IntN(100)) * time.Millisecond)
	}
	cp.SetFaults(controlplane.Faults{})
	n := len(cp.Pulses())
	eventually(t, func() bool { return len(cp.Pulses()) >= n+3 }, "pulses after the flapping")
	close(stop)
	usage, bounced, tags := results()
	seen := modes()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))

	got := cp.Totals("")
	assert.Equal(t, usage, got.Usage)
	assert.Equal(t, bounced, got.Bounced)
	assert.Equal(t, tags, got.Tags)
	for i := 1; i < len(seen); i++ {
		assert.True(t, allowedTransitions[[2]Mode{seen[i-1], seen[i]}], "transition %v → %v", seen[i-1], seen[i])
	}
	s := c.Stats()
	t.Logf("flapping 10 s: %d calls, %d mode changes seen, %d pulses acknowledged, %d attempts failed", usage+bounced, len(seen)-1, s.PulsesSent, s.PulsesFailed)
	assert.Positive(t, s.PulsesFailed, "the flapping was felt")
	assert.Contains(t, seen, ModeSafeMode, "some outages outlasted the lease")
}

// TestChaosSlowControlPlane: a control plane slower than the pulse interval
// still acknowledges pulses (a request has a floor of its own), one
// request at a time, and the goroutines do not pile up.
func TestChaosSlowControlPlane(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	before := runtime.NumGoroutine()
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	// Every answer takes 4 pulse intervals, and less than the requests'
	// floor: each waits for its answer, one at a time, and none fails.
	sent, failed := c.Stats().PulsesSent, c.Stats().PulsesFailed
	cp.SetFaults(controlplane.Faults{Delay: 200 * time.Millisecond})
	most := 0
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		most = max(most, runtime.NumGoroutine())
	}
	for loop, n := range cp.MaxInFlight() {
		assert.Equal(t, 1, n, "%s had %d requests in flight", loop, n)
	}
	s := c.Stats()
	assert.GreaterOrEqual(t, s.PulsesSent, sent+3, "pulses slower than their interval still get through")
	assert.Equal(t, failed, s.PulsesFailed, "none timed out")
	// The client's two loops, the transport's connection goroutines and the
	// server's handlers of requests being abandoned: a few dozen at most,
	// however long it lasts.
	assert.Less(t, most-before, 40, "goroutines did not pile up (%d before, %d at most)", before, most)
	t.Logf("slow control plane 3 s: %d goroutines before, %d at most; %d pulses acknowledged", before, most, s.PulsesSent-sent)
	cp.SetFaults(controlplane.Faults{})
}

// TestChaosTagExplosion sends a million distinct tags: the heap stays
// bounded by the per-window tag cap and every call is counted.
func TestChaosTagExplosion(t *testing.T) {
	if testing.Short() {
		t.Skip("a million calls")
	}
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	cp.SetLogLimit(2) // the control plane shares the heap: keep its logs out of the figure
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)

	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak uint64
	const calls = 1_000_000
	buf := make([]byte, 0, 32)
	for i := range calls {
		if i > 0 && i%250_000 == 0 {
			// However fast the machine, the attack spans several windows.
			sent := c.Stats().PulsesSent
			eventually(t, func() bool { return c.Stats().PulsesSent > sent }, "a pulse during the attack")
		}
		buf = strconv.AppendInt(append(buf[:0], "attacker-"...), int64(i), 10)
		c.Gate(string(buf), float64(i%10))
		if i%100_000 == 0 {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	peak = max(peak, ms.HeapAlloc)
	growth := int64(peak) - int64(base)
	t.Logf("1,000,000 distinct tags: heap %.1f MiB before, %.1f MiB at most after GC (growth %.1f MiB)",
		float64(base)/(1<<20), float64(peak)/(1<<20), float64(growth)/(1<<20))
	assert.Less(t, growth, int64(8<<20), "heap growth is bounded by the tag cap, not the number of tags")

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
	got := cp.Totals("")
	assert.EqualValues(t, calls, got.Usage+got.Bounced)
	assert.EqualValues(t, calls/10*6, got.Usage, "weights 0..5 pass")
	for _, p := range cp.Pulses() {
		assert.LessOrEqual(t, len(p.Tags), MaxWindowTags+1)
	}
	assert.Greater(t, got.Pulses, 3, "the attack spanned several windows")
}

// TestChaosWallClockJumps: the lease runs on the monotonic clock, so the
// wall clock jumping an hour either way moves neither its expiry nor its
// renewal.
func TestChaosWallClockJumps(t *testing.T) {
	var mono fakeClock
	var wallOffset atomic.Int64
	wall := func() time.Time { return time.Now().Add(time.Duration(wallOffset.Load())) }
	c := idleClientWall(t, mono.read, wall, nil)
	c.applyLease(leaseAnswer{policy: &Policy{Version: 1, GlobalMaxWeight: 1}, ttl: 10 * time.Second}, false, 0)

	step := func(advance time.Duration, jump time.Duration, want Mode) {
		t.Helper()
		mono.advance(advance)
		wallOffset.Add(int64(jump))
		c.leaseExpired() // as the lease timer would, whenever it fires
		assert.Equal(t, want, c.Mode(), "after %v of monotonic time and a wall jump of %v", mono.read(), jump)
	}
	step(5*time.Second, time.Hour, ModeEnforcing)             // wall clock leaps ahead past the lease
	step(4*time.Second, -2*time.Hour, ModeEnforcing)          // and back before it was granted
	step(999*time.Millisecond, 0, ModeEnforcing)              // 1 ms before expiry
	step(time.Millisecond, -time.Hour, ModeSafeMode)          // expiry on the monotonic clock
	c.applyLease(leaseAnswer{ttl: 10 * time.Second}, true, 0) // renewed
	step(9*time.Second, 24*time.Hour, ModeEnforcing)          // a day's wall jump does not expire it
	step(time.Second, -48*time.Hour, ModeSafeMode)
}

// TestChaosCallbackPanics: middleware callbacks that panic do not corrupt
// the counts or stop the client. A panic in Tag or Weight comes before the
// Gate call, so that request is not counted; one in Denied comes after it,
// so it is (the decision was made). net/http recovers each.
func TestChaosCallbackPanics(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)

	h := c.HTTPMiddleware(MiddlewareOptions{
		Tag: func(r *http.Request) string {
			if r.URL.Query().Get("panic") == "tag" {
				panic("tag callback bug")
			}
			return r.URL.Query().Get("tag")
		},
		Weight: func(r *http.Request) float64 {
			if r.URL.Query().Get("panic") == "weight" {
				panic("weight callback bug")
			}
			w, _ := strconv.ParseFloat(r.URL.Query().Get("w"), 64)
			return w
		},
		Denied: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Query().Get("panic") == "denied" {
				panic("denied handler bug")
			}
			w.WriteHeader(http.StatusTooManyRequests)
		}),
	})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = newDiscardLogger()
	srv.Start()
	defer srv.Close()

	var wantUsage, wantBounced uint64
	var wg sync.WaitGroup
	var mu sync.Mutex
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := srv.Client()
			for i := range 150 {
				kind := []string{"", "tag", "weight", "denied", ""}[(i+g)%5]
				weight := (i * 7) % 10
				// POST: the transport never retries it, so each request
				// reaches the handler once.
				resp, err := client.Post(fmt.Sprintf("%s/?panic=%s&tag=t%d&w=%d", srv.URL, kind, i%4, weight), "text/plain", nil)
				if err == nil {
					resp.Body.Close()
				}
				mu.Lock()
				switch {
				case kind == "tag" || kind == "weight":
				case weight <= 5:
					wantUsage++
				default:
					wantBounced++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	s := c.Stats()
	assert.Equal(t, wantUsage, s.Usage)
	assert.Equal(t, wantBounced, s.Bounced)
	n := len(cp.Pulses())
	eventually(t, func() bool { return len(cp.Pulses()) >= n+2 }, "the client's loops still run")
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
	assert.Equal(t, wantUsage, cp.Totals("").Usage)
	assert.Equal(t, wantBounced, cp.Totals("").Bounced)
}
