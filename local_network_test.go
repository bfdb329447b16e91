package waitstate

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// outagePlane is a control plane whose site "" blocks free while
// enterprise's p95 is over 300 ms, with a cooldown, and whose leases are
// short, so that an outage puts a client in safe mode within a second.
func outagePlane(t *testing.T, cooldown time.Duration) *controlplane.Server {
	t.Helper()
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Second)
	cp.SetRuleWindow(time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	require.NoError(t, cp.SetRules("", controlplane.Rule{Name: "protect-enterprise", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: controlplane.ActionBlock, CooldownSeconds: cooldown.Seconds()}))
	return cp
}

// localOptions are options for cp with a 1 s pulse interval and
// SafeModeLocalRules.
func localOptions(cp *controlplane.Server) Options {
	opts := testOptions(cp)
	opts.PulseInterval, opts.SyncInterval = time.Second, time.Second
	opts.SafeMode = SafeModeLocalRules
	return opts
}

// traffic observes enterprise samples of the latency it is set to, and
// gates enterprise, from its own goroutine until stop; it counts the
// enterprise calls denied.
type traffic struct {
	latency atomic.Int64
	denied  atomic.Int64
	calls   atomic.Int64
	wg      sync.WaitGroup
	stop    chan struct{}
}

func startTraffic(c *Client, latency time.Duration) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	tr.latency.Store(int64(latency))
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		for {
			select {
			case <-tr.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if d := time.Duration(tr.latency.Load()); d > 0 {
				c.ObserveTag("enterprise", d, false)
			}
			tr.calls.Add(1)
			if !c.Gate("enterprise", 1).Allowed {
				tr.denied.Add(1)
			}
		}
	}()
	return tr
}

func (tr *traffic) end() { close(tr.stop); tr.wg.Wait() }

// TestLocalRulesInAnOutage: the control plane goes away and enterprise
// slows down; the client, in safe mode with SafeModeLocalRules, blocks
// free on its own within 2 s of enterprise's p95 crossing 300 ms, never
// denies enterprise, and admits free again once enterprise has been fast
// for the rule's cooldown.
func TestLocalRulesInAnOutage(t *testing.T) {
	const cooldown = time.Second
	cp := outagePlane(t, cooldown)
	c, logs := startClient(t, localOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return c.Rules() != nil }, "the rules arrive")
	tr := startTraffic(c, 20*time.Millisecond)
	defer tr.end()

	cp.SetFaults(controlplane.Faults{Down: true})
	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the lease runs out")
	assert.True(t, c.Gate("free", 1).Allowed, "enterprise is fast: free passes")

	slow := time.Now()
	tr.latency.Store(int64(600 * time.Millisecond))
	eventually(t, func() bool { return !c.Gate("free", 1).Allowed }, "free blocked locally")
	reaction := time.Since(slow)
	t.Logf("from the first slow sample to free denied: %v", reaction)
	assert.Less(t, reaction, 2*time.Second)
	assert.Equal(t, []string{"protect-enterprise"}, c.Stats().LocalRulesFired)
	assert.Equal(t, ReasonThrottled, c.Gate("free", 1).Reason)
	assert.Equal(t, ModeSafeMode, c.Mode())

	fast := time.Now()
	tr.latency.Store(int64(20 * time.Millisecond))
	eventually(t, func() bool { return c.Gate("free", 1).Allowed }, "free admitted again")
	assert.GreaterOrEqual(t, time.Since(fast), cooldown, "not before the cooldown")
	assert.Empty(t, c.Stats().LocalRulesFired)
	assert.Zero(t, tr.denied.Load(), "enterprise admitted throughout")
	assert.Positive(t, tr.calls.Load())
	assert.Contains(t, logs.String(), "local rule fired")
	assert.Contains(t, logs.String(), "local rule cleared")

	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return c.Mode() == ModeEnforcing }, "back to the control plane")
	assert.Empty(t, c.Stats().LocalRulesFired)
}

// TestLocalRulesKeepWhatTheControlPlaneFired: a rule fired at the control
// plane when the outage starts stays fired on the instance until its
// metric has been good for its cooldown, counted from entering safe mode.
func TestLocalRulesKeepWhatTheControlPlaneFired(t *testing.T) {
	const cooldown = 2 * time.Second
	cp := outagePlane(t, cooldown)
	var mu sync.Mutex
	var entered time.Time
	opts := localOptions(cp)
	opts.OnModeChange = func(from, to Mode) {
		if to == ModeSafeMode {
			mu.Lock()
			entered = time.Now()
			mu.Unlock()
		}
	}
	c, _ := startClient(t, opts)
	waitReady(t, c)
	tr := startTraffic(c, 600*time.Millisecond)
	eventually(t, func() bool { return !c.Gate("free", 1).Allowed }, "the control plane blocks free")
	eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.reflex != nil && len(c.reflex.fired) == 1
	}, "the client knows the rule fired")
	tr.latency.Store(0) // no more samples: the metric is on the good side from here

	cp.SetFaults(controlplane.Faults{Down: true})
	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the lease runs out")
	assert.Equal(t, []string{"protect-enterprise"}, c.Stats().LocalRulesFired, "fired at the control plane: fired here")
	assert.False(t, c.Gate("free", 1).Allowed, "free still blocked")
	eventually(t, func() bool { return c.Gate("free", 1).Allowed }, "cleared after the cooldown")
	mu.Lock()
	since := time.Since(entered)
	mu.Unlock()
	assert.GreaterOrEqual(t, since, cooldown, "the cooldown counts from entering safe mode")
	tr.end()
	assert.Zero(t, tr.denied.Load())
}
