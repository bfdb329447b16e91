package controlplane

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// quantilesOf is the p50, p95 and p99 the rules read from pulses whose
// health has no histogram of the wire scheme.
func quantilesOf(hs ...*Health) (p50, p95, p99 float64) {
	var a agg
	for _, h := range hs {
		a.add(h.Requests, h, nil, whole)
	}
	return a.quantiles()
}

// TestFleetQuantileWithoutHistograms: health that comes with quantiles
// only is spread over the histogram by the piecewise-linear CDF through
// them, so a fleet's quantiles weigh each instance by its requests.
func TestFleetQuantileWithoutHistograms(t *testing.T) {
	one := &Health{Requests: 100, LatencyMs: Latency{P50: 10, P95: 80, P99: 120, Max: 300}}
	p50, p95, p99 := quantilesOf(one)
	assert.InEpsilon(t, 10, p50, 0.0625, "one instance: its own p50, within the scheme's error")
	assert.InEpsilon(t, 80, p95, 0.0625)
	assert.InEpsilon(t, 120, p99, 0.0625)

	// Nine fast instances and one slow one, same traffic: the fleet p95 lies
	// between them, well below the maximum and well above the average of p95s
	// would suggest for the tail.
	fast := &Health{Requests: 100, LatencyMs: Latency{P50: 10, P95: 20, P99: 25, Max: 30}}
	slow := &Health{Requests: 100, LatencyMs: Latency{P50: 900, P95: 1000, P99: 1100, Max: 1200}}
	hs := []*Health{slow}
	for range 9 {
		hs = append(hs, fast)
	}
	p50, p95, _ = quantilesOf(hs...)
	assert.Greater(t, p95, 500.0, "5 %% of the fleet's requests are slower than 900 ms")
	assert.Less(t, p95, 1000.0)
	assert.InDelta(t, 10, p50, 2)

	// Weighted by requests: a slow instance with few requests barely moves it.
	slowFew := &Health{Requests: 1, LatencyMs: slow.LatencyMs}
	_, p95, _ = quantilesOf(fast, fast, slowFew)
	assert.Less(t, p95, 30.0)

	// Every request lands in a bucket, whatever the quantiles say.
	for _, l := range []Latency{{}, {P50: -1, P95: -1, P99: -1, Max: -1}, {P50: 5, P95: 1, P99: 3, Max: 2},
		{P50: 1e308, P95: 1e308, P99: 1e308, Max: 1e308}, {Max: 1e-9}} {
		h := &Health{Requests: math.MaxUint64, LatencyMs: l}
		var hist *[wire.HistBuckets]uint64
		addQuantiles(&hist, h, h.Requests)
		var sum uint64
		for _, c := range hist {
			sum += c
		}
		assert.Equal(t, h.Requests, sum, "%+v", l)
	}
}

// TestQuantilesOnlyHealthIsNotKept: a pulse whose health cannot merge
// (no histogram, another scheme, a bad bucket) costs the rule window a
// histogram's fixed memory, not the pulse: 40 such pulses of 1 MiB each
// once held 159 MiB, and evaluating took longer with every pulse.
func TestQuantilesOnlyHealthIsNotKept(t *testing.T) {
	counts := map[string]uint64{}
	for i := range 50_000 {
		counts[fmt.Sprintf("x%d", i)] = 1
	}
	var a agg
	for range 40 {
		h := &Health{Requests: 1000, LatencyMs: Latency{P50: 1, P95: 2, P99: 3, Max: 4}, Histogram: &Histogram{Scheme: "other", Counts: counts}}
		a.add(1000, h, nil, whole)
	}
	assert.EqualValues(t, 40_000, a.requests)
	assert.NotNil(t, a.hist)
	var kept agg
	kept.merge(&a)
	_, p95, _ := kept.quantiles()
	assert.InEpsilon(t, 2, p95, 0.0625)
}

func TestParseRules(t *testing.T) {
	got, err := ParseRules([]byte(`[{"name":"p95","tagName":"free","metric":"latency_p95_ms","operator":"gt","threshold":200,"maxWeight":0,"cooldownSeconds":10}]`))
	require.NoError(t, err)
	assert.Equal(t, map[string][]Rule{"": {{Name: "p95", TagName: "free", Metric: MetricLatencyP95, Operator: "gt", Threshold: 200, Action: ActionCap, CooldownSeconds: 10}}}, got)

	got, err = ParseRules([]byte(`{"eu-1":[{"name":"err","metric":"error_rate","operator":"gt","threshold":0.1,"maxWeight":1}]}`))
	require.NoError(t, err)
	assert.Len(t, got["eu-1"], 1)

	for _, bad := range []string{
		`[{"name":"x","metric":"cpu","operator":"gt"}]`,
		`[{"name":"x","metric":"rps","operator":"ge"}]`,
		`[{"metric":"rps","operator":"gt"}]`,
		`[{"name":"x","metric":"rps","operator":"gt","maxWeight":-1}]`,
		`[{"name":"x","metric":"rps","operator":"gt","cooldownSeconds":-1}]`,
		`[{"name":"x","metric":"rps","operator":"gt"},{"name":"x","metric":"rps","operator":"lt"}]`,
		`"rules"`,
	} {
		_, err := ParseRules([]byte(bad))
		assert.Error(t, err, bad)
	}
}

// instanceHealth is one instance's pulse health for latencies in µs, built
// as the SDK builds it: exact counts, quantiles, and the wire histogram.
func instanceHealth(us []uint64) *Health {
	sorted := slices.Sorted(slices.Values(us))
	q := func(p float64) float64 { return float64(sorted[int(math.Ceil(p*float64(len(sorted))))-1]) / 1000 }
	counts := map[string]uint64{}
	for _, v := range us {
		counts[wire.BucketKey(wire.HistIndex(v))]++
	}
	return &Health{Requests: uint64(len(us)), LatencyMs: Latency{P50: q(0.5), P95: q(0.95), P99: q(0.99), Max: q(1)},
		Histogram: &Histogram{Scheme: wire.HistogramScheme, Counts: counts}}
}

// TestFleetQuantilesFromHistograms: the p95 and p99 the rules act on are
// those of the pooled requests of a heterogeneous fleet, within the
// scheme's 6.25 %, read off the merged histograms.
func TestFleetQuantilesFromHistograms(t *testing.T) {
	// Log-normal latencies: skewed, with a tail, as services' are.
	logNormal := func(r *rand.Rand, n int, medianUs, sigma float64) []uint64 {
		out := make([]uint64, n)
		for i := range out {
			out[i] = uint64(medianUs * math.Exp(sigma*r.NormFloat64()))
		}
		return out
	}
	fleets := map[string]struct{ fastRequests, slowRequests int }{
		"9 fast instances and 1 slow one":                {1000, 1000},
		"the slow instance carries most of the requests": {100, 5000},
	}
	for name, f := range fleets {
		t.Run(name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			var pooled []uint64
			var pulses []*Pulse
			var stripped []*Pulse
			for i := range 10 {
				us := logNormal(r, f.fastRequests, 10_000, 0.6) // median 10 ms
				if i == 9 {
					us = logNormal(r, f.slowRequests, 250_000, 0.8) // median 250 ms
				}
				pooled = append(pooled, us...)
				h := instanceHealth(us)
				bare := *h
				bare.Histogram = nil
				stripped = append(stripped, &Pulse{PulseBody: wire.PulseBody{InstanceID: fmt.Sprint(i), Health: &bare}})
				pulses = append(pulses, &Pulse{PulseBody: wire.PulseBody{InstanceID: fmt.Sprint(i), Health: h}})
			}
			slices.Sort(pooled)
			want := func(q float64) float64 { return float64(pooled[int(math.Ceil(q*float64(len(pooled))))-1]) / 1000 }
			m := windowOf(pulses).metrics(testNow, time.Second, "")
			assert.InEpsilon(t, want(0.95), m.LatencyP95Ms, 0.0625, "p95")
			assert.InEpsilon(t, want(0.99), m.LatencyP99Ms, 0.0625, "p99")

			old := windowOf(stripped).metrics(testNow, time.Second, "").LatencyP95Ms
			t.Logf("pooled p95 %.1f ms; from merged histograms %.1f ms (%+.1f %%); from instance quantiles %.1f ms (%+.1f %%)",
				want(0.95), m.LatencyP95Ms, 100*(m.LatencyP95Ms/want(0.95)-1), old, 100*(old/want(0.95)-1))
		})
	}
}

func TestRulesSchema(t *testing.T) {
	bySite, err := ParseRules([]byte(`[
	 {"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
	  "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30},
	 {"name": "throttle-pro", "metricTag": "enterprise", "metric": "latency_p95_ms", "operator": ">=", "threshold": 300,
	  "tagName": "pro", "action": "throttle", "percent": 50},
	 {"name": "cap-batch", "metric": "metric:queue_depth:max", "operator": "gt", "threshold": 100, "tagName": "batch",
	  "action": "cap", "maxWeight": 2},
	 {"name": "legacy", "tagName": "free", "metric": "error_rate", "operator": "lt", "threshold": 0.5, "maxWeight": 0}]`))
	require.NoError(t, err)
	rules := bySite[""]
	require.Len(t, rules, 4)
	assert.Equal(t, Rule{Name: "throttle-pro", MetricTag: "enterprise", Metric: MetricLatencyP95, Operator: ">=", Threshold: 300,
		TagName: "pro", Action: ActionThrottle, AdmitPercent: 50}, rules[1])
	assert.Equal(t, ActionCap, rules[3].Action, "a rule with maxWeight and no action is a cap")
	assert.Zero(t, rules[3].MaxWeight)

	for name, bad := range map[string]string{
		"no action, no maxWeight": `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1}]`,
		"throttle, no percent":    `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle"}]`,
		"percent over 100":        `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle", "percent": 101}]`,
		"unknown action":          `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "drop"}]`,
		"unknown operator":        `[{"name": "x", "metric": "rps", "operator": "=", "threshold": 1, "action": "block"}]`,
		"bad metric name":         `[{"name": "x", "metric": "metric:Queue", "operator": ">", "threshold": 1, "action": "block"}]`,
		"unknown metric":          `[{"name": "x", "metric": "latency_p90_ms", "operator": ">", "threshold": 1, "action": "block"}]`,
		"throttle admitting 0":    `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle", "percent": 0}]`,
		"both spellings":          `[{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle", "percent": 5, "admitPercent": 5}]`,
	} {
		_, err := ParseRules([]byte(bad))
		assert.Error(t, err, name)
	}

	// Misspelled keys are refused, by name, not left empty: this rule
	// would otherwise watch the whole site and block every tag.
	_, err = ParseRules([]byte(`[{"name": "x", "metric_tag": "enterprise", "metric": "error_rate", "operator": ">",
	  "threshold": 0.1, "tag_name": "free", "action": "block", "cooldown": 30, "MetricTag": "enterprise"}]`))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `rule "x": unknown keys "MetricTag", "cooldown", "metric_tag", "tag_name"`)

	// "admitPercent" is another spelling of "percent"; "percent" is written.
	bySite, err = ParseRules([]byte(`[{"name": "t", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle", "admitPercent": 20}]`))
	require.NoError(t, err)
	assert.Equal(t, 20.0, bySite[""][0].AdmitPercent)
	out, err := json.Marshal(bySite[""][0])
	require.NoError(t, err)
	assert.Contains(t, string(out), `"percent":20`)
}

func TestRuleOperatorsAndScopes(t *testing.T) {
	w := windowOf([]*Pulse{{PulseBody: wire.PulseBody{InstanceID: "a", UsageDelta: 10, Health: instanceHealth([]uint64{10_000}),
		Tags: map[string]TagCount{
			"enterprise": {Usage: 4, Health: instanceHealth([]uint64{400_000, 400_000})},
			"batch":      {Usage: 6, Metrics: map[string]MetricAgg{"queue_depth": {Count: 2, Sum: 30, Min: 10, Max: 20}}},
		},
		Metrics: map[string]MetricAgg{"pool_wait_ms": {Count: 1, Sum: 7, Min: 7, Max: 7}}}}}, "enterprise", "batch")
	site := w.metrics(testNow, time.Second, "")
	ent := w.metrics(testNow, time.Second, "enterprise")
	batch := w.metrics(testNow, time.Second, "batch")
	assert.InEpsilon(t, 10, site.LatencyP95Ms, 0.0625)
	assert.InEpsilon(t, 400, ent.LatencyP95Ms, 0.0625, "a tag's own health")
	assert.Equal(t, 4.0, ent.RPS, "a tag's own calls")
	v, ok := batch.Value("metric:queue_depth")
	assert.True(t, ok)
	assert.Equal(t, 15.0, v, "the mean")
	v, _ = batch.Value("metric:queue_depth:max")
	assert.Equal(t, 20.0, v)
	v, _ = site.Value("metric:pool_wait_ms")
	assert.Equal(t, 7.0, v, "site-wide custom metrics")
	_, ok = site.Value("metric:queue_depth")
	assert.False(t, ok, "no data: the good side")

}

// testNow is when windowOf adds its pulses.
var testNow = time.Unix(1_764_230_400, 0)

// windowOf is a one-second rule window holding pulses, all arrived at
// testNow, with the watched tags aggregated.
func windowOf(pulses []*Pulse, watched ...string) *aggWindow {
	var w aggWindow
	w.reset(time.Second / windowSlots)
	processes := map[[2]string]*incarnation{}
	for _, p := range pulses {
		key := [2]string{p.InstanceID, p.Incarnation}
		if processes[key] == nil {
			processes[key] = &incarnation{}
		}
		w.add(p, processes[key], testNow, watched)
	}
	return &w
}
