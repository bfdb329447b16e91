package waitstate

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestModeAndReasonNames(t *testing.T) {
	assert.Equal(t, "fail_open", ModeFailOpen.String())
	assert.Equal(t, "enforcing", ModeEnforcing.String())
	assert.Equal(t, "safe_mode", ModeSafeMode.String())
	assert.Equal(t, "unknown", Mode(9).String())
	want := []string{"allowed", "fail_open", "global_max_weight", "tag_max_weight", "throttled", "safe_mode", "safe_mode_limit"}
	for i, name := range want {
		assert.Equal(t, name, Reason(i).String())
		text, err := Reason(i).MarshalText()
		assert.NoError(t, err)
		assert.Equal(t, name, string(text))
	}
	assert.Equal(t, "unknown", Reason(200).String())
	_, err := Reason(200).MarshalText()
	assert.Error(t, err, "no wire name to marshal")

	for i, name := range []string{"fixed_rps", "last_policy", "open", "local_rules"} {
		s := SafeModeStrategy(i)
		assert.Equal(t, name, s.String())
		var back SafeModeStrategy
		text, err := s.MarshalText()
		require.NoError(t, err)
		require.NoError(t, back.UnmarshalText(text))
		assert.Equal(t, s, back)
	}
	var s SafeModeStrategy
	assert.Error(t, s.UnmarshalText([]byte("closed")))

	// Stats marshals to readable JSON: the mode by its wire name.
	b, err := json.Marshal(Stats{Mode: ModeSafeMode})
	require.NoError(t, err)
	assert.Contains(t, string(b), `"Mode":"safe_mode"`)

	var m Mode
	assert.EqualError(t, m.UnmarshalText([]byte("closed")), `waitstate: unknown mode "closed" (want fail_open, enforcing, safe_mode)`)
	var r Reason
	assert.ErrorContains(t, r.UnmarshalText([]byte("Allowed")), "unknown reason")
}

// TestJSONReadsBack: GateResult marshals in every mode, an infinite Limit
// included (encoding/json refuses +Inf, so slog's JSON handler logged an
// error in fail-open and safe mode), and GateResult and Stats read back
// from their JSON.
func TestJSONReadsBack(t *testing.T) {
	for _, r := range []GateResult{failOpen, {false, true, ReasonTagMaxWeight, 2.5}, {true, false, ReasonSafeMode, math.Inf(1)}} {
		b, err := json.Marshal(r)
		require.NoError(t, err, "%+v", r)
		var back GateResult
		require.NoError(t, json.Unmarshal(b, &back), string(b))
		assert.Equal(t, r, back, string(b))
	}
	b, err := json.Marshal(failOpen)
	require.NoError(t, err)
	assert.JSONEq(t, `{"Allowed": true, "Shadowed": false, "Reason": "fail_open", "Limit": "Infinity"}`, string(b))

	var logged strings.Builder
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("gate", "result", failOpen)
	assert.Contains(t, logged.String(), `"result":{"Allowed":true,"Shadowed":false,"Reason":"fail_open","Limit":"Infinity"}`)

	c := idleClient(t, nil, &Policy{Version: 4, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"pro": 50}})
	c.Gate("pro", 1)
	c.Gate("pro", 1)
	c.Gate("free", 9)
	cutPulse(t, c, false)
	c.Gate("free", 1)
	st := c.Stats()
	require.Len(t, st.Decisions, 3)
	b, err = json.Marshal(st)
	require.NoError(t, err)
	var back Stats
	require.NoError(t, json.Unmarshal(b, &back), string(b))
	assert.Equal(t, st, back)
}

// TestGateAllocatesNothing is the allocation guard of the hot path: once a
// window has seen a tag, Gate allocates nothing in any mode.
func TestGateAllocatesNothing(t *testing.T) {
	c := idleClient(t, nil, nil)
	gateAll := func() {
		for _, tag := range benchTags {
			c.Gate(tag, 2)
		}
		c.Gate("free", math.NaN())
	}
	gateAll()
	assert.Zero(t, testing.AllocsPerRun(500, gateAll), "fail_open")

	c.applyLease(leaseAnswer{policy: benchPolicy, ttl: time.Hour}, false, 0)
	assert.Zero(t, testing.AllocsPerRun(500, gateAll), "enforcing")

	c.mu.Lock()
	c.mode = ModeSafeMode
	c.publish()
	c.mu.Unlock()
	assert.Zero(t, testing.AllocsPerRun(500, gateAll), "safe_mode")

	// Health and metric samples of a tag already seen in the window.
	observe := func() {
		for i, tag := range benchTags {
			c.ObserveTag(tag, time.Duration(i)*time.Millisecond, i == 0)
			c.Record(tag, "queue_depth", float64(i))
		}
		c.Observe(time.Millisecond, false)
		c.Record("", "pool_wait_ms", 1)
		c.StartTimer("free").Stop(false)
	}
	observe()
	assert.Zero(t, testing.AllocsPerRun(500, observe), "ObserveTag, Record, Timer")

	// Past the tag cap, unseen tags allocate nothing once the table is full.
	for i := range 2 * tableSize {
		c.Gate(fmt.Sprint("flood-", i), 1)
	}
	tags := make([]string, 100)
	for i := range tags {
		tags[i] = fmt.Sprint("more-", i)
	}
	assert.Zero(t, testing.AllocsPerRun(100, func() {
		for _, tag := range tags {
			c.Gate(tag, 1)
			c.ObserveTag(tag, time.Millisecond, false)
		}
	}), "tag flood")
}

func TestGateEnforcesPolicy(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 4, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("pro", 5))
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 5}, c.Gate("pro", 6))

	// A new policy mid-window: cached limits follow it.
	c.applyLease(leaseAnswer{policy: &Policy{Version: 5, GlobalMaxWeight: 1, TagMaxWeights: map[string]float64{"pro": 10}}, ttl: time.Hour}, false, 0)
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 1}, c.Gate("free", 1))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 10}, c.Gate("pro", 6))
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 1}, c.Gate("new", 2))
	s := c.Stats()
	assert.EqualValues(t, 3, s.Usage)
	assert.EqualValues(t, 3, s.Bounced)
	assert.EqualValues(t, 5, s.PolicyVersion)
}

// TestCountExactAcrossCuts gates from 8 goroutines while windows are cut,
// each cut once the gaters made some calls since the last, so that cuts
// land among calls whatever GOMAXPROCS: every call lands in exactly one
// window. Before, at GOMAXPROCS=1 the 200 cuts were done before any gater
// ran, and the test failed 7 of 20 runs.
func TestCountExactAcrossCuts(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	tags := []string{"free", "pro", "ent", "batch", "x"}
	var stop atomic.Bool
	var calls atomic.Uint64
	var wg sync.WaitGroup
	local := make([]map[string]tagCount, 8)
	for g := range local {
		local[g] = map[string]tagCount{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				if calls.Add(1)%64 == 0 {
					runtime.Gosched() // let the cutter in: at GOMAXPROCS=1 it waits for a time slice otherwise
				}
				tag := tags[(i+g)%len(tags)]
				r := c.Gate(tag, float64(i%8))
				tc := local[g][tag]
				if r.Allowed {
					tc.Usage++
				} else {
					tc.Bounced++
				}
				local[g][tag] = tc
			}
		}()
	}
	var pulses []pulseJSON
	cutOne := func(final bool) {
		var p pulseJSON
		require.NoError(t, json.Unmarshal(c.cut(final).body, &p))
		pulses = append(pulses, p)
	}
	for range 200 {
		awaitCalls(t, &calls, 50)
		cutOne(false)
	}
	stop.Store(true)
	wg.Wait()
	cutOne(true)
	carried := 0
	for _, p := range pulses {
		if p.UsageDelta+p.BouncedDelta > 0 {
			carried++
		}
	}
	assert.Greater(t, carried, 150, "cuts landed among the calls")

	want := map[string]tagCount{}
	var wantUsage, wantBounced uint64
	for _, m := range local {
		for tag, tc := range m {
			w := want[tag]
			want[tag] = tagCount{Usage: w.Usage + tc.Usage, Bounced: w.Bounced + tc.Bounced}
			wantUsage += tc.Usage
			wantBounced += tc.Bounced
		}
	}
	got := map[string]tagCount{}
	var usage, bounced uint64
	for i, p := range pulses {
		assert.EqualValues(t, i+1, p.Seq)
		usage += p.UsageDelta
		bounced += p.BouncedDelta
		assert.Equal(t, usage, p.UsageTotal)
		assert.Equal(t, bounced, p.BouncedTotal)
		for tag, tc := range p.Tags {
			g := got[tag]
			got[tag] = tagCount{Usage: g.Usage + tc.Usage, Bounced: g.Bounced + tc.Bounced}
		}
	}
	assert.Equal(t, want, got)
	assert.Equal(t, wantUsage, usage)
	assert.Equal(t, wantBounced, bounced)
	assert.Greater(t, wantUsage+wantBounced, uint64(1000), "the goroutines ran")

	// After the final cut Gate answers and counts nothing.
	assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
	assert.Equal(t, wantUsage, c.Stats().Usage)
	assert.Equal(t, wantBounced, c.Stats().Bounced)
}

// awaitCalls waits until calls has grown by n since it was last seen here,
// yielding to the goroutines that make them, so that whatever GOMAXPROCS
// a cut that follows lands among them.
func awaitCalls(t testing.TB, calls *atomic.Uint64, n uint64) {
	t.Helper()
	from := calls.Load()
	deadline := time.Now().Add(waitFor)
	for calls.Load() < from+n {
		require.True(t, time.Now().Before(deadline), "the gaters made no calls")
		runtime.Gosched()
	}
}

// fakeClock is a clock a test moves by hand.
type fakeClock struct{ now atomic.Int64 }

func (f *fakeClock) read() time.Duration     { return time.Duration(f.now.Load()) }
func (f *fakeClock) advance(d time.Duration) { f.now.Add(int64(d)) }

func TestSafeModeLimiter(t *testing.T) {
	var clk fakeClock
	clk.advance(time.Hour)
	l := newLimiter(50)
	l.reset(clk.read())
	allowed := 0
	for range 200 {
		if l.gate(clk.read()).Allowed {
			allowed++
		}
	}
	assert.Equal(t, 50, allowed, "a burst of one second's worth")
	assert.Equal(t, GateResult{false, false, ReasonSafeModeLimit, inf}, l.gate(clk.read()))

	// Then 50 per second: one every 20 ms.
	allowed = 0
	for range 1000 { // 10 s in 10 ms steps
		clk.advance(10 * time.Millisecond)
		if r := l.gate(clk.read()); r.Allowed {
			assert.Equal(t, GateResult{true, false, ReasonSafeMode, inf}, r)
			allowed++
		}
		l.gate(clk.read())
	}
	assert.Equal(t, 500, allowed)

	// Idle time refills at most one second's worth.
	clk.advance(time.Minute)
	allowed = 0
	for range 200 {
		if l.gate(clk.read()).Allowed {
			allowed++
		}
	}
	assert.Equal(t, 50, allowed)

	assert.Equal(t, time.Nanosecond, newLimiter(math.MaxUint64).interval, "a huge rate does not overflow")
}

func TestApplyLeaseVersionRules(t *testing.T) {
	c := idleClient(t, nil, nil)
	v := func(n int64) *Policy { return &Policy{Version: n, GlobalMaxWeight: float64(n)} }

	c.applyLease(leaseAnswer{ttl: time.Hour}, true, 0)
	assert.Equal(t, ModeFailOpen, c.Mode(), "no policy held: nothing to renew")

	c.applyLease(leaseAnswer{policy: v(3), ttl: time.Hour}, true, 0)
	assert.EqualValues(t, 3, c.Policy().Version, "a pulse can bring the first policy")
	assert.Equal(t, ModeEnforcing, c.Mode())

	c.applyLease(leaseAnswer{policy: v(3), ttl: time.Hour}, true, 0)
	c.applyLease(leaseAnswer{policy: v(2), ttl: time.Hour}, true, 0)
	assert.EqualValues(t, 3, c.Policy().Version, "a pulse brings only newer policies")

	gen := c.pulseGenNow()
	c.applyLease(leaseAnswer{policy: v(1), ttl: time.Hour}, false, gen)
	assert.EqualValues(t, 1, c.Policy().Version, "the GET is authoritative: a restarted control plane is followed")

	gen = c.pulseGenNow()
	c.applyLease(leaseAnswer{policy: v(9), ttl: time.Hour}, true, 0) // a pulse answered while the GET was in flight
	c.applyLease(leaseAnswer{policy: v(4), ttl: time.Hour}, false, gen)
	assert.EqualValues(t, 9, c.Policy().Version, "the GET never undoes a newer policy a pulse applied meanwhile")

	gen = c.pulseGenNow()
	c.applyLease(leaseAnswer{policy: v(12), ttl: time.Hour}, false, gen)
	assert.EqualValues(t, 12, c.Policy().Version)
}

// TestApplyLeaseEpochs: a policy from another epoch (a control plane made
// anew) replaces the held one whatever the versions, from a pulse answer
// too; an answer of the old epoch to a request sent before the new epoch
// last answered (overtaken in flight) applies nothing, so the client does
// not flip back.
func TestApplyLeaseEpochs(t *testing.T) {
	var clk fakeClock
	c := idleClient(t, clk.read, nil)
	v := func(n int64) *Policy { return &Policy{Version: n, GlobalMaxWeight: float64(n)} }
	at := func(d time.Duration) time.Duration { clk.now.Store(int64(d)); return d }

	c.applyLease(leaseAnswer{policy: v(7), ttl: time.Hour, epoch: "old", sent: at(time.Second)}, true, 0)
	assert.EqualValues(t, 7, c.Policy().Version)
	c.applyLease(leaseAnswer{policy: v(6), ttl: time.Hour, epoch: "old", sent: at(2 * time.Second)}, true, 0)
	assert.EqualValues(t, 7, c.Policy().Version, "within an epoch, a pulse brings only newer policies")

	sent := at(3 * time.Second) // a GET to the old process, answered late
	c.applyLease(leaseAnswer{policy: v(1), ttl: time.Hour, epoch: "new", sent: at(4 * time.Second)}, true, 0)
	assert.EqualValues(t, 1, c.Policy().Version, "the new epoch's policy, from a pulse answer")
	at(5 * time.Second)
	c.applyLease(leaseAnswer{policy: v(7), ttl: time.Hour, epoch: "old", sent: sent}, false, c.pulseGenNow())
	assert.EqualValues(t, 1, c.Policy().Version, "the old process's answer, overtaken in flight, applies nothing")

	c.applyLease(leaseAnswer{policy: v(2), ttl: time.Hour, epoch: "new", sent: at(6 * time.Second)}, true, 0)
	assert.EqualValues(t, 2, c.Policy().Version)
	c.applyLease(leaseAnswer{policy: v(5), ttl: time.Hour, epoch: "third", sent: at(7 * time.Second)}, false, c.pulseGenNow())
	assert.EqualValues(t, 5, c.Policy().Version, "and another restart after it")
}

func TestLeaseExpiryAndRenewal(t *testing.T) {
	c := idleClient(t, nil, nil)
	c.applyLease(leaseAnswer{policy: &Policy{Version: 2, GlobalMaxWeight: 0}, ttl: 50 * time.Millisecond}, false, 0)
	assert.Equal(t, ModeEnforcing, c.Mode())
	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the lease timer enters safe mode")
	assert.EqualValues(t, 2, c.Policy().Version, "Policy() is the last applied one in safe mode too")
	r := c.Gate("x", 1e9)
	assert.Equal(t, GateResult{true, false, ReasonSafeMode, inf}, r)

	c.applyLease(leaseAnswer{ttl: time.Hour}, true, 0) // a renewal without a new policy
	assert.Equal(t, ModeEnforcing, c.Mode())
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 0}, c.Gate("x", 1))
}

// TestLeaseRunsOnTheClientClock: the lease is measured on the monotonic
// clock from receipt, so a timer that fires before the clock says the lease
// is over re-arms instead of entering safe mode.
func TestLeaseRunsOnTheClientClock(t *testing.T) {
	var clk fakeClock
	c := idleClient(t, clk.read, nil)
	c.applyLease(leaseAnswer{policy: &Policy{Version: 1, GlobalMaxWeight: 1}, ttl: 20 * time.Millisecond}, false, 0)
	c.leaseExpired() // the timer fired but the clock has not moved
	assert.Equal(t, ModeEnforcing, c.Mode())
	clk.advance(20 * time.Millisecond)
	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "safe mode once the clock passes the lease")
}

// TestShedBoundPerWindow: with gaters running while windows are cut, a
// window's sheds of a tag stay within 1 + g of n·p (invariant 9; g is at
// most one Gate per gater at each of the window's two cuts), and a tag
// with a shed percent of its own sheds exactly ⌊N·p⌋ of all N calls, its
// sequence running on across windows.
func TestShedBoundPerWindow(t *testing.T) {
	const gaters = 4
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 20, TagShedPercents: map[string]float64{"pro": 30}})
	var stop atomic.Bool
	var calls atomic.Uint64
	var wg sync.WaitGroup
	for range gaters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				if calls.Add(1)%64 == 0 {
					runtime.Gosched()
				}
				c.Gate([]string{"pro", "std"}[i%2], 1)
			}
		}()
	}
	var pulses []pulseJSON
	for range 100 {
		awaitCalls(t, &calls, 200)
		pulses = append(pulses, cutPulse(t, c, false))
	}
	stop.Store(true)
	wg.Wait()
	pulses = append(pulses, cutPulse(t, c, true))
	pct := map[string]float64{"pro": 0.3, "std": 0.2}
	var proCalls, proShed uint64
	for _, p := range pulses {
		for tag, tc := range p.Tags {
			n, s := tc.Usage+tc.Bounced, tc.Bounced
			assert.Less(t, math.Abs(float64(s)-float64(n)*pct[tag]), float64(1+2*gaters), "%s: %d of %d shed in pulse %d", tag, s, n, p.Seq)
			if tag == "pro" {
				proCalls, proShed = proCalls+n, proShed+s
			}
		}
	}
	assert.Equal(t, proCalls*300_000/1_000_000, proShed, "⌊N·p⌋ of all %d calls", proCalls)
	assert.Greater(t, proCalls, uint64(5000), "the gaters ran")
}
