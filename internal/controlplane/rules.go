package controlplane

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Metric names what a reflex rule watches, computed over a site's recent
// pulses (its rule window), for the whole site or for one tag's traffic
// (Rule.MetricTag).
type Metric string

// The metrics a rule can watch; a custom metric is "metric:<name>" (its mean
// over the window's samples) or "metric:<name>:max" (their maximum).
const (
	// MetricLatencyP50 is the fleet's median latency in ms.
	MetricLatencyP50 Metric = "latency_p50_ms"
	// MetricLatencyP95 is the fleet's 95th percentile latency in ms.
	MetricLatencyP95 Metric = "latency_p95_ms"
	// MetricLatencyP99 is the fleet's 99th percentile latency in ms.
	MetricLatencyP99 Metric = "latency_p99_ms"
	// MetricErrorRate is failed samples over all samples, 0 to 1.
	MetricErrorRate Metric = "error_rate"
	// MetricRPS is the offered rate: Gate calls per second, allowed and
	// denied, across the site's instances. Denied calls count, so shedding
	// does not by itself make a rule on rps clear.
	MetricRPS Metric = "rps"
)

// customMetric splits "metric:<name>" and "metric:<name>:max".
func (m Metric) customMetric() (name string, useMax, ok bool) {
	rest, ok := strings.CutPrefix(string(m), "metric:")
	if !ok {
		return "", false, false
	}
	name, useMax = strings.CutSuffix(rest, ":max")
	return name, useMax, wire.ValidMetricName(name)
}

// Action is what a fired rule does to its tag.
type Action string

// The actions.
const (
	// ActionBlock sheds every call of the tag (100 %).
	ActionBlock Action = "block"
	// ActionThrottle admits Percent % of the tag's calls and sheds the rest.
	ActionThrottle Action = "throttle"
	// ActionCap lowers the tag's weight limit to MaxWeight. A rule with no
	// action is a cap.
	ActionCap Action = "cap"
)

// Rule is a reflex rule: while Metric, measured on MetricTag's traffic
// ("" is the whole site), is on the wrong side of Threshold, Action applies
// to TagName ("" is every tag, through the policy's global fields). Once it
// has fired it clears only after the metric has stayed on the good side
// for CooldownSeconds: hysteresis, so it does not flap at the threshold. Of
// several fired rules on one tag the strictest wins — the lowest weight
// limit, the highest shed — and a tag rule never loosens a global one.
type Rule struct {
	Name            string  `json:"name"`
	MetricTag       string  `json:"metricTag,omitempty"`
	Metric          Metric  `json:"metric"`
	Operator        string  `json:"operator"` // ">", ">=", "<", "<=" or "gt", "gte", "lt", "lte"
	Threshold       float64 `json:"threshold"`
	TagName         string  `json:"tagName"`
	Action          Action  `json:"action,omitempty"`    // "" is ActionCap
	Percent         float64 `json:"percent,omitempty"`   // ActionThrottle: the share admitted, 0 to 100
	MaxWeight       float64 `json:"maxWeight,omitempty"` // ActionCap: the weight limit
	CooldownSeconds float64 `json:"cooldownSeconds"`
}

// UnmarshalJSON reads a rule, refusing one that says neither what to do
// (an action) nor a weight limit (a cap), and a throttle without a percent.
func (r *Rule) UnmarshalJSON(data []byte) error {
	type plain Rule
	var raw struct {
		plain
		Percent   *float64 `json:"percent"`
		MaxWeight *float64 `json:"maxWeight"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	switch {
	case raw.Action == "" && raw.MaxWeight == nil:
		return fmt.Errorf("rule %q: no action and no maxWeight", raw.Name)
	case raw.Action == ActionThrottle && raw.Percent == nil:
		return fmt.Errorf("rule %q: throttle without a percent", raw.Name)
	case raw.Action == ActionCap && raw.MaxWeight == nil:
		return fmt.Errorf("rule %q: cap without a maxWeight", raw.Name)
	}
	*r = Rule(raw.plain)
	if raw.Percent != nil {
		r.Percent = *raw.Percent
	}
	if raw.MaxWeight != nil {
		r.MaxWeight = *raw.MaxWeight
	}
	return nil
}

// operators maps every spelling of an operator to its comparison.
var operators = map[string]func(v, threshold float64) bool{
	">": func(v, t float64) bool { return v > t }, "gt": func(v, t float64) bool { return v > t },
	">=": func(v, t float64) bool { return v >= t }, "gte": func(v, t float64) bool { return v >= t },
	"<": func(v, t float64) bool { return v < t }, "lt": func(v, t float64) bool { return v < t },
	"<=": func(v, t float64) bool { return v <= t }, "lte": func(v, t float64) bool { return v <= t },
}

// Validate reports what is wrong with r, if anything.
func (r Rule) Validate() error {
	_, _, custom := r.Metric.customMetric()
	switch {
	case r.Name == "":
		return errors.New("rule has no name")
	case !custom && !slices.Contains([]Metric{MetricLatencyP50, MetricLatencyP95, MetricLatencyP99, MetricErrorRate, MetricRPS}, r.Metric):
		return fmt.Errorf("rule %q: unknown metric %q", r.Name, r.Metric)
	case operators[r.Operator] == nil:
		return fmt.Errorf("rule %q: operator must be >, >=, <, <= (or gt, gte, lt, lte), not %q", r.Name, r.Operator)
	case math.IsNaN(r.Threshold) || math.IsInf(r.Threshold, 0):
		return fmt.Errorf("rule %q: threshold must be a finite number", r.Name)
	case r.Action != "" && r.Action != ActionBlock && r.Action != ActionThrottle && r.Action != ActionCap:
		return fmt.Errorf("rule %q: action must be block, throttle or cap, not %q", r.Name, r.Action)
	case r.Action == ActionThrottle && !(r.Percent >= 0 && r.Percent <= 100):
		return fmt.Errorf("rule %q: percent must be in [0, 100]", r.Name)
	case (r.Action == "" || r.Action == ActionCap) && !(r.MaxWeight >= 0):
		return fmt.Errorf("rule %q: maxWeight must be >= 0", r.Name)
	case !(r.CooldownSeconds >= 0):
		return fmt.Errorf("rule %q: cooldownSeconds must be >= 0", r.Name)
	}
	return nil
}

// ParseRules reads rules as JSON: an array of rules for the default site
// (""), or an object from site to its array of rules.
func ParseRules(data []byte) (map[string][]Rule, error) {
	var list []Rule
	bySite := map[string][]Rule{}
	if err := json.Unmarshal(data, &list); err == nil {
		bySite[""] = list
	} else if err := json.Unmarshal(data, &bySite); err != nil {
		return nil, fmt.Errorf("rules: want an array of rules or an object of site to rules: %w", err)
	}
	for site, rules := range bySite {
		seen := map[string]bool{}
		for _, r := range rules {
			if err := r.Validate(); err != nil {
				return nil, fmt.Errorf("site %q: %w", site, err)
			}
			if seen[r.Name] {
				return nil, fmt.Errorf("site %q: two rules named %q", site, r.Name)
			}
			seen[r.Name] = true
		}
	}
	return bySite, nil
}

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
// for one tag's traffic.
type Metrics struct {
	Pulses       int                  // pulses in the window
	Instances    int                  // distinct processes among them: instance IDs with their incarnations
	RPS          float64              // offered Gate calls per second
	Requests     uint64               // health samples
	ErrorRate    float64              // NaN without samples
	LatencyP50Ms float64              // NaN without samples
	LatencyP95Ms float64              // NaN without samples
	LatencyP99Ms float64              // NaN without samples
	Custom       map[string]MetricAgg // custom metrics, added up over the window
}

// ruleState is one rule's state in one site.
type ruleState struct {
	firing    bool
	goodSince time.Time // while firing: when the metric went good; zero while bad
}

// fleetQuantile combines the latency quantiles of several pulses into one
// fleet figure, for pulses without a histogram. Quantiles cannot be averaged: averaging p95s hides one slow
// instance among fast ones, and taking the maximum lets one slow instance of
// a hundred trip a rule. Instead each pulse's latency distribution is
// rebuilt as a piecewise-linear CDF through its quantiles — (0, 0),
// (p50, .50), (p95, .95), (p99, .99), (max, 1) — the fleet's distribution
// is their mixture weighted by request count, and the fleet quantile is
// found on it by bisection. It is exact at the points each pulse reports
// when the fleet is one instance, and close otherwise.
func fleetQuantile(hs []*Health, q float64) float64 {
	var total, hi float64
	for _, h := range hs {
		total += float64(h.Requests)
		hi = max(hi, h.LatencyMs.Max, h.LatencyMs.P99, h.LatencyMs.P95, h.LatencyMs.P50)
	}
	cdf := func(x float64) float64 {
		var f float64
		for _, h := range hs {
			f += float64(h.Requests) * pieceCDF(h.LatencyMs, x)
		}
		return f / total
	}
	lo := 0.0
	for range 64 {
		mid := (lo + hi) / 2
		if cdf(mid) >= q {
			hi = mid
		} else {
			lo = mid
		}
	}
	return hi
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

// value returns the metric a rule watches; ok is false without data.
func (m Metrics) value(metric Metric) (float64, bool) {
	var v float64
	switch metric {
	case MetricLatencyP50:
		v = m.LatencyP50Ms
	case MetricLatencyP95:
		v = m.LatencyP95Ms
	case MetricLatencyP99:
		v = m.LatencyP99Ms
	case MetricErrorRate:
		v = m.ErrorRate
	case MetricRPS:
		v = m.RPS
	default:
		name, useMax, _ := metric.customMetric()
		agg, ok := m.Custom[name]
		switch {
		case !ok || agg.Count == 0:
			v = math.NaN()
		case useMax:
			v = agg.Max
		default:
			v = agg.Sum / float64(agg.Count)
		}
	}
	return v, !math.IsNaN(v)
}

// step advances a rule's state to now given the metrics of its scope, and
// reports whether it fired or cleared. A metric without data (no samples
// in the window) is on the good side: the load it measured is gone.
func (st *ruleState) step(r Rule, m Metrics, now time.Time) (changed bool, value float64) {
	v, ok := m.value(r.Metric)
	bad := ok && operators[r.Operator](v, r.Threshold)
	switch {
	case !st.firing && bad:
		st.firing, st.goodSince = true, time.Time{}
		return true, v
	case st.firing && bad:
		st.goodSince = time.Time{}
	case st.firing && st.goodSince.IsZero():
		st.goodSince = now
		fallthrough
	case st.firing:
		if now.Sub(st.goodSince) >= time.Duration(r.CooldownSeconds*float64(time.Second)) {
			st.firing = false
			return true, v
		}
	}
	return false, v
}

// shed is the percent a rule sheds, and whether it sheds at all.
func (r Rule) shed() (float64, bool) {
	switch r.Action {
	case ActionBlock:
		return 100, true
	case ActionThrottle:
		return 100 - r.Percent, true
	}
	return 0, false
}

// overlay returns base with the actions of the firing rules applied. Global
// rules (TagName "") first: a cap lowers GlobalMaxWeight, a block or
// throttle raises GlobalShedPercent. Then tag rules, each starting from
// what the tag has after the global rules — its own entry, else the global
// value — so a tag rule never loosens a global one. Of several rules on one
// tag the strictest wins: the lowest limit, the highest shed.
func overlay(base Policy, rules []Rule, firing map[string]*ruleState) Policy {
	p := base
	p.TagMaxWeights = make(map[string]float64, len(base.TagMaxWeights))
	maps.Copy(p.TagMaxWeights, base.TagMaxWeights)
	p.TagShedPercents = maps.Clone(base.TagShedPercents)
	var active []Rule
	for _, r := range rules {
		if st := firing[r.Name]; st != nil && st.firing {
			active = append(active, r)
		}
	}
	for _, r := range active {
		if r.TagName != "" {
			continue
		}
		if pct, ok := r.shed(); ok {
			p.GlobalShedPercent = max(p.GlobalShedPercent, pct)
		} else {
			p.GlobalMaxWeight = min(p.GlobalMaxWeight, r.MaxWeight)
		}
	}
	for _, r := range active {
		if r.TagName == "" {
			continue
		}
		if pct, ok := r.shed(); ok {
			cur, has := p.TagShedPercents[r.TagName]
			if !has {
				cur = p.GlobalShedPercent
			}
			if p.TagShedPercents == nil {
				p.TagShedPercents = map[string]float64{}
			}
			p.TagShedPercents[r.TagName] = max(cur, pct)
			continue
		}
		limit, has := p.TagMaxWeights[r.TagName]
		if !has {
			limit = p.GlobalMaxWeight
		}
		p.TagMaxWeights[r.TagName] = min(limit, r.MaxWeight)
	}
	return p
}
