package waitstate

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// shedPattern gates n calls of tag and returns which were shed.
func shedPattern(c *Client, tag string, weight float64, n int) []bool {
	out := make([]bool, n)
	for i := range out {
		r := c.Gate(tag, weight)
		out[i] = r.Reason == ReasonThrottled
	}
	return out
}

// shedAlternating gates one call of each tag in turn, rounds times, and
// returns how many of each tag's calls were shed.
func shedAlternating(c *Client, rounds int, tags ...string) map[string]int {
	shed := map[string]int{}
	for range rounds {
		for _, tag := range tags {
			if c.Gate(tag, 1).Reason == ReasonThrottled {
				shed[tag]++
			}
		}
	}
	return shed
}

// TestShedEven: among the first k calls of a tag that pass the weight
// check, exactly ⌊k·p/100⌋ are shed, for every k: sheds are spread evenly,
// never in bursts.
func TestShedEven(t *testing.T) {
	for _, pct := range []float64{0, 1, 10, 12.5, 25, 33.3, 50, 66.6, 99.9, 100} {
		c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"pro": pct}})
		shed := 0
		for k, s := range shedPattern(c, "pro", 1, 2000) {
			if s {
				shed++
			}
			require.Equal(t, (k+1)*int(ppm(pct))/1_000_000, shed, "%v %%: shed of the first %d calls, ⌊k·p/100⌋", pct, k+1)
		}
	}
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"half": 50, "quarter": 25}})
	assert.Equal(t, []bool{false, true, false, true, false, true}, shedPattern(c, "half", 1, 6), "at 50 % every other call")
	assert.Equal(t, []bool{false, false, false, true, false, false, false, true}, shedPattern(c, "quarter", 1, 8), "at 25 % one in four")
}

// TestShedExactDecimal: shed turns are counted in parts per million, so
// every percent with a decimal sheds exactly ⌊k·p/100⌋ of the first k
// calls, for every k. In binary floating point 9.2 % shed 68 of 750
// instead of 69, and 148 of the 999 one-decimal percents missed by one at
// some k up to 1,000.
func TestShedExactDecimal(t *testing.T) {
	for tenths := uint64(1); tenths <= 999; tenths++ {
		p := ppm(float64(tenths) / 10)
		require.Equal(t, uint32(tenths*1000), p, "%d.%d %%", tenths/10, tenths%10)
		var shed uint64
		for k := uint64(1); k <= 1000; k++ {
			if shedTurn(k, p) {
				shed++
			}
			require.Equal(t, k*tenths/1000, shed, "%d.%d %%: shed of the first %d", tenths/10, tenths%10, k)
		}
	}
	assert.True(t, shedTurn(1<<63+7, ppm(100)), "100 % sheds every call, however many came before")
	assert.False(t, shedTurn(1<<63+7, ppm(0)))
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"pro": 9.2}})
	shed := 0
	for _, s := range shedPattern(c, "pro", 1, 750) {
		if s {
			shed++
		}
	}
	assert.Equal(t, 69, shed, "9.2 %% of 750")
}

// TestShedOwnSequenceUnderOther: a tag the policy gives a shed percent of
// its own sheds evenly even when the window counts it under OtherTag: its
// turns are its own, in the policy index. Before, two tags at 50 % past
// the window's first 1,024 shared OtherTag's sequence, and alternating
// they were shed 0 and 1,000 of 1,000.
func TestShedOwnSequenceUnderOther(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 50,
		TagShedPercents: map[string]float64{"a": 50, "b": 50}})
	for i := range MaxWindowTags {
		c.Gate(fmt.Sprint("filler-", i), 1e9) // denied by weight: no turn taken
	}
	require.Nil(t, c.win.find("a"), "the window is full: a and b go under OtherTag")
	assert.Equal(t, map[string]int{"a": 500, "b": 500}, shedAlternating(c, 1000, "a", "b"))
	require.Nil(t, c.win.find("a"))
}

// TestShedAcrossWindows: a tag's shed sequence under a shed percent of its
// own goes on from window to window while the policy stays in force. At
// 99 % with one call per window, 19 of 20 are shed; before, each window
// started the sequence again and none was.
func TestShedAcrossWindows(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"bulk": 99}})
	shed := 0
	for range 20 {
		if c.Gate("bulk", 1).Reason == ReasonThrottled {
			shed++
		}
		cutPulse(t, c, false)
	}
	assert.Equal(t, 19, shed)
}

// TestGlobalShedAcrossWindows: a tag under the global shed percent keeps
// its sequence across windows too, windows without it included, and each
// tag has its own. Before, each window restarted it: one call a window at
// 99 % was never shed.
func TestGlobalShedAcrossWindows(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 99})
	shed := map[string]int{}
	for i := range 40 {
		// "steady" calls once a window; "sparse" every third window.
		for _, tag := range []string{"steady", "sparse"} {
			if (tag == "steady" || i%3 == 0) && c.Gate(tag, 1).Reason == ReasonThrottled {
				shed[tag]++
			}
		}
		cutPulse(t, c, false)
	}
	assert.Equal(t, map[string]int{"steady": 39, "sparse": 13}, shed, "⌊40·0.99⌋ and ⌊14·0.99⌋")

	// At 50 %, two tags that alternate windows still shed every other
	// call each.
	c = idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 50})
	shed = map[string]int{}
	for i := range 40 {
		tag := []string{"a", "b"}[i%2]
		if c.Gate(tag, 1).Reason == ReasonThrottled {
			shed[tag]++
		}
		cutPulse(t, c, false)
	}
	assert.Equal(t, map[string]int{"a": 10, "b": 10}, shed)
}

// TestShedCarryBounded: the turns carried across windows are those of at
// most MaxWindowTags tags, the most recent first: a flood of tags does not
// grow them, and a tag seen in the last window keeps its sequence.
func TestShedCarryBounded(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 50})
	c.Gate("kept", 1) // turn 1: allowed
	for w := range 3 {
		for i := range MaxWindowTags - 1 {
			c.Gate(fmt.Sprintf("flood-%d-%d", w, i), 1)
		}
		c.Gate("kept", 1)
		cutPulse(t, c, false)
		m := c.win.shedFrom.Load()
		require.NotNil(t, m)
		assert.LessOrEqual(t, len(*m), MaxWindowTags)
		assert.Contains(t, *m, "kept")
	}
	assert.EqualValues(t, 4, (*c.win.shedFrom.Load())["kept"], "its four turns")
}

// TestShedAfterShutdown: Gate keeps answering from the last state after
// Shutdown, shedding included, and counts nothing. Before, a tag shed at
// 100 % was then allowed, and one at 50 % shed none of 100.
func TestShedAfterShutdown(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 50,
		TagShedPercents: map[string]float64{"blocked": 100, "half": 50}})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	_ = c.Shutdown(ctx) // nothing listens: the flush fails at once
	before := c.Stats()
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 5}, c.Gate("blocked", 1))
	assert.Equal(t, map[string]int{"half": 50, "unnamed": 50}, shedAlternating(c, 100, "half", "unnamed"))
	after := c.Stats()
	assert.Equal(t, before.Usage, after.Usage, "nothing counted")
	assert.Equal(t, before.Bounced, after.Bounced)
}

func TestShedDecisions(t *testing.T) {
	p := &Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 1},
		GlobalShedPercent: 100, TagShedPercents: map[string]float64{"ent": 0}}
	c := idleClient(t, nil, p)
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 5}, c.Gate("pro", 2), "the global percent; Limit is the weight limit passed")
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 1}, c.Gate("free", 1))
	assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 1}, c.Gate("free", 2), "a weight denial comes first")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("ent", 2), "a tag's entry replaces the global percent")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, p.Gate("pro", 2), "the pure Gate checks weight only")
	s := c.Stats()
	assert.EqualValues(t, 1, s.Usage)
	assert.EqualValues(t, 3, s.Bounced, "a shed call is bounced")
}

// TestShedConcurrent: with concurrent callers the count stays exact and the
// share shed is ⌊n·p⌋ or ⌈n·p⌉ of the n calls that passed.
func TestShedConcurrent(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, GlobalShedPercent: 30})
	var shed, passed atomic.Uint64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20000 {
				r := c.Gate("pro", 1)
				passed.Add(1)
				if r.Reason == ReasonThrottled {
					shed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	exact := float64(passed.Load()) * 0.3
	assert.True(t, float64(shed.Load()) == math.Floor(exact) || float64(shed.Load()) == math.Ceil(exact), "%d shed of %d", shed.Load(), passed.Load())
	assert.Equal(t, shed.Load(), c.Stats().Bounced)
}

// enterSafeMode expires c's lease on its fake clock.
func enterSafeMode(t testing.TB, c *Client, clock *fakeClock) {
	t.Helper()
	clock.advance(2 * time.Hour)
	c.leaseExpired()
	require.Equal(t, ModeSafeMode, c.Mode())
}

func TestSafeModeStrategies(t *testing.T) {
	policy := &Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}, TagShedPercents: map[string]float64{"pro": 50}}
	inf := math.Inf(1)

	t.Run("fixed_rps", func(t *testing.T) {
		var clock fakeClock
		c := idleClientOpts(t, Options{SafeModeMaxRPS: 3}, clock.read, nil, policy)
		enterSafeMode(t, c, &clock)
		var got []GateResult
		for _, tag := range []string{"free", "ent", "pro", "x"} {
			got = append(got, c.Gate(tag, 1e9))
		}
		assert.Equal(t, []GateResult{{true, false, ReasonSafeMode, inf}, {true, false, ReasonSafeMode, inf}, {true, false, ReasonSafeMode, inf},
			{false, false, ReasonSafeModeLimit, inf}}, got, "a burst of one second's worth, whatever the tag or weight")
		clock.advance(time.Second / 3)
		assert.True(t, c.Gate("free", 1).Allowed, "then the rate")
	})
	t.Run("last_policy", func(t *testing.T) {
		var clock fakeClock
		c := idleClientOpts(t, Options{SafeMode: SafeModeLastPolicy}, clock.read, nil, policy)
		enterSafeMode(t, c, &clock)
		assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
		assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("ent", 5))
		assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 5}, c.Gate("ent", 6))
		assert.Equal(t, []bool{false, true, false, true}, shedPattern(c, "pro", 1, 4), "shedding included")
		for range 1000 {
			require.True(t, c.Gate("ent", 1).Allowed, "no rate cap")
		}
	})
	t.Run("open", func(t *testing.T) {
		var clock fakeClock
		c := idleClientOpts(t, Options{SafeMode: SafeModeOpen}, clock.read, nil, policy)
		enterSafeMode(t, c, &clock)
		for _, tag := range []string{"free", "pro", "x"} {
			for range 100 {
				require.Equal(t, GateResult{true, false, ReasonSafeMode, inf}, c.Gate(tag, 1e9))
			}
		}
		assert.EqualValues(t, 3, c.Policy().Version, "Policy is still the last one")
	})
}

func TestShadow(t *testing.T) {
	c := idleClientOpts(t, Options{Shadow: true}, nil, nil, &Policy{Version: 1, GlobalMaxWeight: 5,
		TagMaxWeights: map[string]float64{"free": 0}, TagShedPercents: map[string]float64{"pro": 100}})
	assert.Equal(t, GateResult{true, true, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
	assert.Equal(t, GateResult{true, true, ReasonThrottled, 5}, c.Gate("pro", 1))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("ent", 1), "an allowed call is not shadowed")
	s := c.Stats()
	assert.EqualValues(t, 1, s.Usage)
	assert.EqualValues(t, 2, s.Bounced, "would-be denials are counted as bounced")
	p := cutPulse(t, c, false)
	assert.True(t, p.Shadow)
	assert.EqualValues(t, 1, p.Tags["free"].Bounced)
}

func TestOffline(t *testing.T) {
	cp := newPlane(t)
	initial := &Policy{Version: 4, GlobalMaxWeight: 2}
	c, err := New(Options{Offline: true, InitialPolicy: initial, BaseURL: cp.URL})
	require.NoError(t, err, "no keys needed offline")
	assert.Nil(t, c.group, "no goroutine started")
	assert.NoError(t, c.Ready(context.Background()))
	assert.Equal(t, ModeEnforcing, c.Mode())
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 2}, c.Gate("a", 3))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 2}, c.Gate("a", 1))
	c.ObserveTag("a", time.Millisecond, false)
	c.Record("a", "depth", 1)
	initial.GlobalMaxWeight = 100 // New kept a copy
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 2}, c.Gate("a", 3))
	s := c.Stats()
	assert.EqualValues(t, 1, s.Usage)
	assert.EqualValues(t, 2, s.Bounced)
	assert.NoError(t, c.Close())
	assert.Equal(t, s.Usage, c.Stats().Usage, "counts stay in Stats after Close")
	assert.Empty(t, cp.Requests(), "nothing was sent")

	open, err := New(Options{Offline: true})
	require.NoError(t, err)
	assert.Equal(t, failOpen, open.Gate("a", 1e9), "without an initial policy: fail open")
	assert.NoError(t, open.Close())
}

// TestPolicyAppliedOncePerPolicy: a sync that brings the policy in force
// applies nothing and calls nothing; one with the same version but other
// content is applied, since a GET is authoritative (a restarted control
// plane may reuse a version).
func TestPolicyAppliedOncePerPolicy(t *testing.T) {
	var applied []float64
	c := idleClientOpts(t, Options{OnPolicyApplied: func(p *Policy) { applied = append(applied, p.GlobalMaxWeight) }}, nil, nil, nil)
	sync := func(p *Policy) {
		c.applyLease(leaseAnswer{policy: p, ttl: time.Hour}, false, c.pulseGenNow())
	}
	for range 3 {
		sync(&Policy{Version: 1, GlobalMaxWeight: 1, TagShedPercents: map[string]float64{"a": 5}})
	}
	sync(&Policy{Version: 1, GlobalMaxWeight: 2})
	sync(&Policy{Version: 1, GlobalMaxWeight: 2})
	assert.Equal(t, []float64{1, 2}, applied)
	assert.Equal(t, 2.0, c.Policy().GlobalMaxWeight)
}
