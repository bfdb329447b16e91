// Package reflexcases is the one table of rule cases that every runner of
// the rule engine must pass: the engine on figures computed here, the
// control plane over pulses, a client over its own samples. Each case is a
// base policy, rules, and steps of traffic, each step seen alone (the rule
// window holds one step), with the rules fired and the policy in force
// after it.
//
// Timing is written so that a slow machine cannot change an outcome: a
// rule expected to stay fired has a cooldown far beyond the test, and one
// expected to clear does so after a gap that delays can only lengthen.
package reflexcases

import (
	"math"
	"slices"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// Window is the rule window of every case: one step's traffic.
const Window = 100 * time.Millisecond

// Gap is the time between two steps: longer than Window, so that a step
// sees only its own traffic.
const Gap = 150 * time.Millisecond

// Traffic is one tag's samples in a step ("" is untagged: site-wide only).
type Traffic struct {
	LatencyMs []float64            // one health sample each
	Errors    int                  // how many of them failed (the first ones)
	Calls     uint64               // offered Gate calls
	Metrics   map[string][]float64 // custom metric samples by name
}

// Step is what one rule window holds, and what must hold after it.
type Step struct {
	Traffic map[string]Traffic // by tag
	Fired   []string           // the rules fired after it, sorted
	Want    wire.Policy        // the policy in force after it; Version is not compared
}

// Case is one table row.
type Case struct {
	Name  string
	Base  wire.Policy
	Rules []reflex.Rule
	Steps []Step // one every Gap
}

// Samples returns n samples of ms each.
func Samples(n int, ms float64) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = ms
	}
	return out
}

var inf = math.Inf(1)

// base is the policy the cases start from.
var base = wire.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"enterprise": inf}}

// with returns base with the given shed percents and tag limits added.
func with(shed map[string]float64, limits map[string]float64) wire.Policy {
	p := base
	p.TagMaxWeights = map[string]float64{"enterprise": inf}
	for tag, w := range limits {
		p.TagMaxWeights[tag] = w
	}
	p.TagShedPercents = shed
	return p
}

// Cases are the table.
var Cases = []Case{
	{
		Name: "a tag's p95 blocks another tag; the site's own p95 does not fire",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "protect-enterprise", MetricTag: "enterprise", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "free", Action: reflex.ActionBlock, CooldownSeconds: 60},
			{Name: "site-slow", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "pro", Action: reflex.ActionBlock, CooldownSeconds: 60},
		},
		Steps: []Step{
			{Traffic: map[string]Traffic{"enterprise": {LatencyMs: Samples(20, 100)}, "free": {LatencyMs: Samples(200, 10)}}, Want: base},
			{
				// 10 slow enterprise samples among 200 fast free ones: the
				// site's p95 is fast.
				Traffic: map[string]Traffic{"enterprise": {LatencyMs: Samples(10, 500)}, "free": {LatencyMs: Samples(200, 10)}},
				Fired:   []string{"protect-enterprise"},
				Want:    with(map[string]float64{"free": 100}, nil),
			},
			{
				// Good again, but the cooldown is a minute: still fired.
				Traffic: map[string]Traffic{"enterprise": {LatencyMs: Samples(20, 100)}},
				Fired:   []string{"protect-enterprise"},
				Want:    with(map[string]float64{"free": 100}, nil),
			},
		},
	},
	{
		Name: "operators, error rate, p50 and p99, throttle, cap and block",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "errors", Metric: reflex.MetricErrorRate, Operator: ">=", Threshold: 0.5, TagName: "free", Action: reflex.ActionBlock},
			{Name: "fast-p50", Metric: reflex.MetricLatencyP50, Operator: "lt", Threshold: 5, TagName: "batch", Action: reflex.ActionCap, MaxWeight: 2},
			{Name: "tail", Metric: reflex.MetricLatencyP99, Operator: "gte", Threshold: 1000, TagName: "pro", Action: reflex.ActionThrottle, AdmitPercent: 25},
			{Name: "not-below", Metric: reflex.MetricErrorRate, Operator: "<=", Threshold: 0.1, TagName: "misc", MaxWeight: 1},
		},
		Steps: []Step{
			{
				// 10 of 20 failed, p50 2 ms, p99 2 s.
				Traffic: map[string]Traffic{"": {LatencyMs: append(Samples(18, 2), 2000, 2000), Errors: 10}},
				Fired:   []string{"errors", "fast-p50", "tail"},
				Want:    with(map[string]float64{"free": 100, "pro": 75}, map[string]float64{"batch": 2}),
			},
			{
				// 1 of 20 failed, p50 50 ms, p99 60 ms: every rule with no
				// cooldown clears at once; the error rate is now low.
				Traffic: map[string]Traffic{"": {LatencyMs: Samples(20, 60), Errors: 1}},
				Fired:   []string{"not-below"},
				Want:    with(nil, map[string]float64{"misc": 1}),
			},
		},
	},
	{
		Name: "the strictest of several rules on one tag wins",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "throttle-pro", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 100, TagName: "pro", Action: reflex.ActionThrottle, AdmitPercent: 50},
			{Name: "throttle-pro-harder", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 200, TagName: "pro", Action: reflex.ActionThrottle, AdmitPercent: 20},
			{Name: "cap-batch", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 100, TagName: "batch", Action: reflex.ActionCap, MaxWeight: 3},
			{Name: "cap-batch-harder", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 200, TagName: "batch", MaxWeight: 1},
		},
		Steps: []Step{
			{
				Traffic: map[string]Traffic{"": {LatencyMs: Samples(20, 150)}},
				Fired:   []string{"cap-batch", "throttle-pro"},
				Want:    with(map[string]float64{"pro": 50}, map[string]float64{"batch": 3}),
			},
			{
				Traffic: map[string]Traffic{"": {LatencyMs: Samples(20, 400)}},
				Fired:   []string{"cap-batch", "cap-batch-harder", "throttle-pro", "throttle-pro-harder"},
				Want:    with(map[string]float64{"pro": 80}, map[string]float64{"batch": 1}),
			},
		},
	},
	{
		Name: "a tag rule never loosens a global one",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "global-throttle", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 0.2, Action: reflex.ActionThrottle, AdmitPercent: 70},
			{Name: "global-cap", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 0.2, MaxWeight: 4},
			{Name: "loose-tag", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 0.2, TagName: "misc", Action: reflex.ActionThrottle, AdmitPercent: 90},
			{Name: "loose-cap", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 0.2, TagName: "free", MaxWeight: 8},
		},
		Steps: []Step{{
			Traffic: map[string]Traffic{"": {LatencyMs: Samples(10, 5), Errors: 5}},
			Fired:   []string{"global-cap", "global-throttle", "loose-cap", "loose-tag"},
			Want: wire.Policy{GlobalMaxWeight: 4, GlobalShedPercent: 30,
				TagMaxWeights:   map[string]float64{"enterprise": inf, "free": 4},
				TagShedPercents: map[string]float64{"misc": 30}},
		}},
	},
	{
		Name: "cooldown: a fired rule clears only after its metric stayed good that long",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "short", MetricTag: "enterprise", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "free", Action: reflex.ActionBlock, CooldownSeconds: 0.1},
			{Name: "long", MetricTag: "enterprise", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "pro", Action: reflex.ActionBlock, CooldownSeconds: 60},
		},
		Steps: []Step{
			{Traffic: map[string]Traffic{"enterprise": {LatencyMs: Samples(10, 500)}}, Fired: []string{"long", "short"},
				Want: with(map[string]float64{"free": 100, "pro": 100}, nil)},
			// Good from here on: the cooldown counts from this step.
			{Traffic: map[string]Traffic{"enterprise": {LatencyMs: Samples(10, 50)}}, Fired: []string{"long", "short"},
				Want: with(map[string]float64{"free": 100, "pro": 100}, nil)},
			// No samples at all: a metric without data is on the good side.
			{Traffic: map[string]Traffic{}, Fired: []string{"long"},
				Want: with(map[string]float64{"pro": 100}, nil)},
		},
	},
	{
		Name: "custom metrics: a tag's mean and maximum, and site-wide",
		Base: base,
		Rules: []reflex.Rule{
			{Name: "queue-mean", MetricTag: "batch", Metric: "metric:queue_depth", Operator: ">", Threshold: 10, TagName: "batch", Action: reflex.ActionThrottle, AdmitPercent: 50},
			{Name: "queue-max", MetricTag: "batch", Metric: "metric:queue_depth:max", Operator: ">", Threshold: 50, TagName: "batch", Action: reflex.ActionBlock},
			{Name: "pool", Metric: "metric:pool_wait_ms", Operator: ">", Threshold: 20, TagName: "free", Action: reflex.ActionCap, MaxWeight: 0},
		},
		Steps: []Step{
			{
				// Mean 8, maximum 60; the site's pool wait 30 ms.
				Traffic: map[string]Traffic{"batch": {Metrics: map[string][]float64{"queue_depth": {2, 2, 2, 2, 60, 2, 2, 2, 2, 4}}},
					"": {Metrics: map[string][]float64{"pool_wait_ms": {30}}}},
				Fired: []string{"pool", "queue-max"},
				Want:  with(map[string]float64{"batch": 100}, map[string]float64{"free": 0}),
			},
			{
				// Mean 20, maximum 30: a batch queue elsewhere does not count.
				Traffic: map[string]Traffic{"batch": {Metrics: map[string][]float64{"queue_depth": {10, 30}}},
					"pro": {Metrics: map[string][]float64{"pool_wait_ms": {99}}}},
				Fired: []string{"queue-mean"},
				Want:  with(map[string]float64{"batch": 50}, nil),
			},
		},
	},
}

// Figures computes what the rules of a step read for scope ("" the whole
// site, else a tag), as any runner must: quantiles off the wire's latency
// histogram, custom metrics of the scope's own samples (site-wide: the
// untagged ones), calls per second over Window.
func Figures(traffic map[string]Traffic, scope string) reflex.Figures {
	f := reflex.NoData()
	var hist [wire.HistBuckets]uint64
	var requests, errors, calls uint64
	for tag, tr := range traffic {
		if scope != "" && tag != scope {
			continue
		}
		calls += tr.Calls
		for _, ms := range tr.LatencyMs {
			hist[wire.HistIndex(uint64(ms*1000))]++
		}
		requests += uint64(len(tr.LatencyMs))
		errors += uint64(min(tr.Errors, len(tr.LatencyMs)))
		if tag != scope {
			continue // a tag's custom metrics are its own, not the site's
		}
		for name, vs := range tr.Metrics {
			f.Custom[name] = Aggregate(vs)
		}
	}
	f.RPS = float64(calls) / Window.Seconds()
	if requests > 0 {
		f.ErrorRate = float64(errors) / float64(requests)
		f.LatencyP50Ms, f.LatencyP95Ms, f.LatencyP99Ms = wire.HistQuantile(&hist, 0.50), wire.HistQuantile(&hist, 0.95), wire.HistQuantile(&hist, 0.99)
	}
	return f
}

// Aggregate sums samples as a window's custom metric.
func Aggregate(vs []float64) wire.Metric {
	m := wire.Metric{Count: uint64(len(vs)), Min: slices.Min(vs), Max: slices.Max(vs)}
	for _, v := range vs {
		m.Sum += v
	}
	return m
}

// Normalize makes two policies comparable as the table means them: the
// version is not compared, and an empty map is none.
func Normalize(p wire.Policy) wire.Policy {
	p.Version = 0
	if len(p.TagMaxWeights) == 0 {
		p.TagMaxWeights = nil
	}
	if len(p.TagShedPercents) == 0 {
		p.TagShedPercents = nil
	}
	return p
}
