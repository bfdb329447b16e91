package controlplane

import (
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// The rules are those of the one rule engine, package reflex, which the
// SDK runs too.
type (
	// Metric names what a rule watches.
	Metric = reflex.Metric
	// Action is what a fired rule does to its tag.
	Action = reflex.Action
	// Rule is a reflex rule.
	Rule = reflex.Rule
)

// The metrics and actions of the rule schema.
const (
	MetricLatencyP50 = reflex.MetricLatencyP50
	MetricLatencyP95 = reflex.MetricLatencyP95
	MetricLatencyP99 = reflex.MetricLatencyP99
	MetricErrorRate  = reflex.MetricErrorRate
	MetricRPS        = reflex.MetricRPS
	ActionBlock      = reflex.ActionBlock
	ActionThrottle   = reflex.ActionThrottle
	ActionCap        = reflex.ActionCap
)

// ParseRules reads rules as JSON: an array of rules for the default site
// (""), or an object from site to its array of rules.
func ParseRules(data []byte) (map[string][]Rule, error) { return reflex.ParseRules(data) }

// Event is a rule firing or clearing.
type Event struct {
	Seq     uint64 // 1 for the first event, counting those dropped from the log
	At      time.Time
	Key     string // the publish key whose site it is
	Site    string
	Rule    string
	Fired   bool    // false: cleared
	Value   float64 // the metric when it happened; NaN without data
	Version int64   // the policy version it made
}

// Metrics are a site's figures over its rule window, for the whole site or
// for one tag's traffic: what the rules read, and how many pulses and
// processes gave them.
type Metrics struct {
	Pulses    int    // pulses in the window
	Instances int    // distinct processes among them: instance IDs with their incarnations
	Requests  uint64 // health samples
	reflex.Figures
}

// addQuantiles adds a health that came without a histogram of the wire
// scheme to *dst, made on first use, as if it had one. Quantiles cannot be
// averaged: averaging p95s hides one slow instance among fast ones, and
// taking the maximum lets one slow instance of a hundred trip a rule.
// Instead the health's latency distribution is rebuilt as the
// piecewise-linear CDF through its quantiles — (0, 0), (p50, .50),
// (p95, .95), (p99, .99), (max, 1) — and n requests (its own, or the share
// of them a rule window holds) are spread over the buckets by it, adding
// up to exactly n. It then merges with
// every other pulse's histogram, in fixed memory and at a fixed cost per
// pulse; its quantiles read back within the scheme's error when it is
// alone.
func addQuantiles(dst **[wire.HistBuckets]uint64, h *Health, n uint64) {
	if *dst == nil {
		*dst = new([wire.HistBuckets]uint64)
	}
	var before uint64 // requests in the buckets below i
	for i := range wire.HistBuckets {
		upTo := n // requests below the bucket's upper edge
		if i+1 < wire.HistBuckets {
			f := float64(n) * pieceCDF(h.LatencyMs, float64(wire.HistLower(i+1))/1000)
			if f < float64(n) {
				upTo = uint64(f)
			}
		}
		upTo = max(upTo, before) // the CDF does not fall; rounding must not make it
		(*dst)[i] += upTo - before
		if before = upTo; before == n {
			return
		}
	}
}

// pieceCDF is the piecewise-linear CDF through a pulse's quantiles.
func pieceCDF(l Latency, x float64) float64 {
	xs := [...]float64{0, l.P50, l.P95, l.P99, l.Max}
	fs := [...]float64{0, 0.50, 0.95, 0.99, 1}
	if x <= 0 {
		return 0
	}
	for i := 1; i < len(xs); i++ {
		if x < xs[i] {
			if xs[i] <= xs[i-1] {
				return fs[i-1]
			}
			return fs[i-1] + (fs[i]-fs[i-1])*(x-xs[i-1])/(xs[i]-xs[i-1])
		}
	}
	return 1
}
