package controlplane

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Metric names what a reflex rule watches, computed over a site's recent
// pulses (its rule window).
type Metric string

// The metrics a rule can watch.
const (
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

// Rule is a reflex rule: while Metric is on the wrong side of Threshold,
// the limit for TagName ("" is the global limit) is at most MaxWeight.
// Once it has fired, it clears only after the metric has stayed on the good
// side for CooldownSeconds: hysteresis, so it does not flap at the
// threshold.
type Rule struct {
	Name            string  `json:"name"`
	TagName         string  `json:"tagName"`
	Metric          Metric  `json:"metric"`
	Operator        string  `json:"operator"` // "gt" or "lt"
	Threshold       float64 `json:"threshold"`
	MaxWeight       float64 `json:"maxWeight"`
	CooldownSeconds float64 `json:"cooldownSeconds"`
}

// Validate reports what is wrong with r, if anything.
func (r Rule) Validate() error {
	switch {
	case r.Name == "":
		return errors.New("rule has no name")
	case r.Metric != MetricLatencyP95 && r.Metric != MetricLatencyP99 && r.Metric != MetricErrorRate && r.Metric != MetricRPS:
		return fmt.Errorf("rule %q: unknown metric %q", r.Name, r.Metric)
	case r.Operator != "gt" && r.Operator != "lt":
		return fmt.Errorf("rule %q: operator must be \"gt\" or \"lt\", not %q", r.Name, r.Operator)
	case math.IsNaN(r.Threshold) || math.IsInf(r.Threshold, 0):
		return fmt.Errorf("rule %q: threshold must be a finite number", r.Name)
	case !(r.MaxWeight >= 0):
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
	At      time.Time
	Site    string
	Rule    string
	Fired   bool    // false: cleared
	Value   float64 // the metric when it happened; NaN without data
	Version int64   // the policy version it made
}

// Metrics are a site's figures over its rule window.
type Metrics struct {
	Pulses       int     // pulses in the window
	Instances    int     // distinct instances among them
	RPS          float64 // offered Gate calls per second
	Requests     uint64  // health samples
	ErrorRate    float64 // NaN without samples
	LatencyP95Ms float64 // NaN without samples
	LatencyP99Ms float64 // NaN without samples
}

// sample is what the rules keep of one pulse.
type sample struct {
	at       time.Time
	instance string
	calls    uint64 // usage + bounced
	health   *Health
}

// ruleState is one rule's state in one site.
type ruleState struct {
	firing    bool
	goodSince time.Time // while firing: when the metric went good; zero while bad
}

// metrics computes a site's figures over samples taken within window.
func metrics(samples []sample, window time.Duration) Metrics {
	m := Metrics{ErrorRate: math.NaN(), LatencyP95Ms: math.NaN(), LatencyP99Ms: math.NaN()}
	instances := map[string]bool{}
	var calls, errs uint64
	var withHealth []*Health
	for _, s := range samples {
		m.Pulses++
		instances[s.instance] = true
		calls += s.calls
		if s.health != nil && s.health.Requests > 0 {
			m.Requests += s.health.Requests
			errs += s.health.Errors
			withHealth = append(withHealth, s.health)
		}
	}
	m.Instances = len(instances)
	m.RPS = float64(calls) / window.Seconds()
	if m.Requests > 0 {
		m.ErrorRate = float64(errs) / float64(m.Requests)
		if merged, ok := mergeHistograms(withHealth); ok {
			m.LatencyP95Ms = merged.quantile(0.95)
			m.LatencyP99Ms = merged.quantile(0.99)
		} else {
			m.LatencyP95Ms = fleetQuantile(withHealth, 0.95)
			m.LatencyP99Ms = fleetQuantile(withHealth, 0.99)
		}
	}
	return m
}

// mergedHistogram is the latency histogram of many pulses, in the wire
// scheme: bucket index → count, the same as the histogram of the pooled
// requests.
type mergedHistogram struct {
	counts map[int]uint64
	n      uint64
}

// mergeHistograms adds up the pulses' histograms. ok is false when a pulse
// has none or one of another scheme, or one that does not parse: the fleet
// figure then falls back to fleetQuantile.
func mergeHistograms(hs []*Health) (mergedHistogram, bool) {
	m := mergedHistogram{counts: map[int]uint64{}}
	for _, h := range hs {
		if h.Histogram == nil || h.Histogram.Scheme != wire.HistogramScheme {
			return mergedHistogram{}, false
		}
		for key, c := range h.Histogram.Counts {
			i, err := strconv.Atoi(key)
			if err != nil || i < 0 || i >= wire.HistBuckets {
				return mergedHistogram{}, false
			}
			m.counts[i] += c
			m.n += c
		}
	}
	return m, m.n > 0
}

// quantile reads the q-quantile off the merged histogram, in ms: the
// midpoint of the bucket that holds the ⌈q·n⌉-th request, within 6.25 % of
// the pooled requests' own quantile.
func (m mergedHistogram) quantile(q float64) float64 {
	rank := uint64(math.Ceil(q * float64(m.n)))
	var seen uint64
	for _, i := range slices.Sorted(maps.Keys(m.counts)) {
		if seen += m.counts[i]; seen >= rank {
			return wire.HistMid(i) / 1000
		}
	}
	return math.NaN() // unreachable: rank <= n
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
	case MetricLatencyP95:
		v = m.LatencyP95Ms
	case MetricLatencyP99:
		v = m.LatencyP99Ms
	case MetricErrorRate:
		v = m.ErrorRate
	case MetricRPS:
		v = m.RPS
	}
	return v, !math.IsNaN(v)
}

// step advances a rule's state to now given the metrics, and reports
// whether it fired or cleared. A metric without data (no health samples in
// the window) is on the good side: the load it measured is gone.
func (st *ruleState) step(r Rule, m Metrics, now time.Time) (changed bool, value float64) {
	v, ok := m.value(r.Metric)
	bad := ok && (r.Operator == "gt" && v > r.Threshold || r.Operator == "lt" && v < r.Threshold)
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

// overlay returns base with the limits of the firing rules applied: a
// rule's tag (or the global limit) gets at most its maxWeight, so of several
// rules on one tag the strictest wins.
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
	// Global rules first, so that a tag rule on a tag without an entry of
	// its own starts from the lowered global limit.
	for _, r := range active {
		if r.TagName == "" {
			p.GlobalMaxWeight = min(p.GlobalMaxWeight, r.MaxWeight)
		}
	}
	for _, r := range active {
		if r.TagName == "" {
			continue
		}
		limit, ok := p.TagMaxWeights[r.TagName]
		if !ok {
			limit = p.GlobalMaxWeight
		}
		p.TagMaxWeights[r.TagName] = min(limit, r.MaxWeight)
	}
	return p
}
