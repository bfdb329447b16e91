package reflex

import (
	"encoding/json"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/wire"
)

func TestRuleHysteresis(t *testing.T) {
	r := Rule{Name: "p95", Metric: MetricLatencyP95, Operator: "gt", Threshold: 200, MaxWeight: 0, CooldownSeconds: 5}
	at := func(p95 float64) Figures { return Figures{LatencyP95Ms: p95} }
	t0 := time.Unix(1000, 0)
	var st State

	changed, _ := st.Step(r, at(150), t0)
	assert.False(t, changed || st.Fired)
	changed, v := st.Step(r, at(250), t0.Add(time.Second))
	assert.True(t, changed && st.Fired)
	assert.Equal(t, 250.0, v)

	// Good for 4 s, bad again, then good: the cooldown starts over.
	st.Step(r, at(100), t0.Add(2*time.Second))
	changed, _ = st.Step(r, at(100), t0.Add(6*time.Second))
	assert.False(t, changed, "4 s of good is less than the cooldown")
	st.Step(r, at(201), t0.Add(7*time.Second))
	st.Step(r, at(199), t0.Add(8*time.Second))
	changed, _ = st.Step(r, at(199), t0.Add(12*time.Second))
	assert.False(t, changed)
	assert.True(t, st.Fired)
	changed, _ = st.Step(r, at(199), t0.Add(13*time.Second))
	assert.True(t, changed, "5 s of good clears it")
	assert.False(t, st.Fired)

	// Without data a latency rule is on the good side.
	st = State{}
	st.Step(r, at(900), t0)
	st.Step(r, at(math.NaN()), t0.Add(time.Second))
	changed, _ = st.Step(r, at(math.NaN()), t0.Add(6*time.Second))
	assert.True(t, changed)

	lt := Rule{Name: "quiet", Metric: MetricRPS, Operator: "lt", Threshold: 10, MaxWeight: 1}
	st = State{}
	changed, _ = st.Step(lt, Figures{RPS: 5}, t0)
	assert.True(t, changed && st.Fired)
	changed, _ = st.Step(lt, Figures{RPS: 10}, t0)
	assert.True(t, changed, "no cooldown: clears at once")
}

func TestOverlayStrictestWins(t *testing.T) {
	base := wire.Policy{Version: 3, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"enterprise": math.Inf(1), "pro": 8}}
	rules := []Rule{
		{Name: "a", TagName: "pro", MaxWeight: 5},
		{Name: "b", TagName: "pro", MaxWeight: 2},
		{Name: "c", TagName: "free", MaxWeight: 7},
		{Name: "d", TagName: "", MaxWeight: 4},
		{Name: "e", TagName: "batch", MaxWeight: 9},
		{Name: "off", TagName: "enterprise", MaxWeight: 0},
	}
	firing := map[string]*State{"a": {Fired: true}, "b": {Fired: true}, "c": {Fired: true}, "d": {Fired: true}, "e": {Fired: true}, "off": {}}
	p := Overlay(base, rules, FiredIn(firing))
	assert.Equal(t, 4.0, p.GlobalMaxWeight)
	assert.Equal(t, 2.0, p.TagMaxWeights["pro"], "strictest of two rules")
	assert.Equal(t, 4.0, p.TagMaxWeights["free"], "a tag rule never lifts a tag above the lowered global limit")
	assert.Equal(t, 4.0, p.TagMaxWeights["batch"])
	assert.True(t, math.IsInf(p.TagMaxWeights["enterprise"], 1), "a rule that is not firing changes nothing")
	assert.Equal(t, 8.0, base.TagMaxWeights["pro"], "the base is not modified")
}

func TestOverlayActions(t *testing.T) {
	fired := func(names ...string) func(string) bool {
		return func(name string) bool { return slices.Contains(names, name) }
	}
	base := wire.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"enterprise": math.Inf(1)}}
	rules := []Rule{
		{Name: "block-free", TagName: "free", Action: ActionBlock},
		{Name: "throttle-pro", TagName: "pro", Action: ActionThrottle, AdmitPercent: 50},
		{Name: "throttle-pro-harder", TagName: "pro", Action: ActionThrottle, AdmitPercent: 20},
		{Name: "cap-batch", TagName: "batch", Action: ActionCap, MaxWeight: 3},
		{Name: "cap-batch-legacy", TagName: "batch", MaxWeight: 5},
		{Name: "global-throttle", Action: ActionThrottle, AdmitPercent: 70},
		{Name: "global-cap", MaxWeight: 4},
		{Name: "loose-tag", TagName: "misc", Action: ActionThrottle, AdmitPercent: 90},
	}
	p := Overlay(base, rules, fired("block-free", "throttle-pro"))
	assert.Equal(t, map[string]float64{"free": 100, "pro": 50}, p.TagShedPercents)
	assert.Equal(t, base.TagMaxWeights, p.TagMaxWeights)

	p = Overlay(base, rules, fired("throttle-pro", "throttle-pro-harder", "cap-batch", "cap-batch-legacy"))
	assert.Equal(t, 80.0, p.TagShedPercents["pro"], "the strictest shed wins")
	assert.Equal(t, 3.0, p.TagMaxWeights["batch"], "the lowest limit wins")

	p = Overlay(base, rules, fired("global-throttle", "global-cap", "loose-tag"))
	assert.Equal(t, 30.0, p.GlobalShedPercent)
	assert.Equal(t, 4.0, p.GlobalMaxWeight)
	assert.Equal(t, 30.0, p.TagShedPercents["misc"], "a tag rule never loosens a global one")
	assert.True(t, math.IsInf(p.TagMaxWeights["enterprise"], 1), "a base entry replaces the global limit")
	assert.Nil(t, base.TagShedPercents, "the base is not modified")
}

func TestOperators(t *testing.T) {
	for op, want := range map[string][3]bool{">": {false, false, true}, ">=": {false, true, true}, "<": {true, false, false},
		"<=": {true, true, false}, "gt": {false, false, true}, "gte": {false, true, true}, "lt": {true, false, false}, "lte": {true, true, false}} {
		for i, v := range []float64{1, 2, 3} {
			assert.Equal(t, want[i], Compare(op, v, 2), "%v %s 2", v, op)
		}
	}
	assert.False(t, Compare("=", 2, 2), "an unknown operator never fires")
}

// TestRuleJSONRoundTrip: a rule encodes to what it decodes from, a cap at
// weight 0 and a throttle admitting 0 % included: their values are never
// left out as empty.
func TestRuleJSONRoundTrip(t *testing.T) {
	for _, r := range []Rule{
		{Name: "cap-0-explicit", Metric: MetricErrorRate, Operator: ">", Threshold: 0.5, TagName: "free", Action: ActionCap},
		{Name: "throttle-0", Metric: MetricErrorRate, Operator: ">", Threshold: 0.5, TagName: "free", Action: ActionThrottle},
		{Name: "block", MetricTag: "ent", Metric: "metric:queue_depth:max", Operator: "gte", Threshold: 9, Action: ActionBlock, CooldownSeconds: 3},
	} {
		raw, err := json.Marshal(r)
		require.NoError(t, err)
		var back Rule
		require.NoError(t, json.Unmarshal(raw, &back), string(raw))
		assert.Equal(t, r, back, string(raw))
	}

	// A rule with a weight limit and no action is a cap, and reads back
	// saying so.
	raw, err := json.Marshal(Rule{Name: "cap-3", Metric: MetricErrorRate, Operator: ">", Threshold: 0.5, MaxWeight: 3})
	require.NoError(t, err)
	var back Rule
	require.NoError(t, json.Unmarshal(raw, &back))
	assert.Equal(t, Rule{Name: "cap-3", Metric: MetricErrorRate, Operator: ">", Threshold: 0.5, Action: ActionCap, MaxWeight: 3}, back)
}
