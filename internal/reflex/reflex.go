// Package reflex is the one rule engine of WaitState: the schema of reflex
// rules, their validation, their evaluation over a window of figures with
// cooldown, and the overlay of fired rules on a base policy. The reference
// control plane runs it over its fleet's merged pulses; a client runs it
// over its own samples when the control plane is away. Neither has rules
// of its own.
package reflex

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Metric names what a rule watches, computed over a rule window, for the
// whole site or for one tag's traffic (Rule.MetricTag).
type Metric string

// The metrics a rule can watch; a custom metric is "metric:<name>" (its mean
// over the window's samples) or "metric:<name>:max" (their maximum).
const (
	// MetricLatencyP50 is the median latency in ms.
	MetricLatencyP50 Metric = "latency_p50_ms"
	// MetricLatencyP95 is the 95th percentile latency in ms.
	MetricLatencyP95 Metric = "latency_p95_ms"
	// MetricLatencyP99 is the 99th percentile latency in ms.
	MetricLatencyP99 Metric = "latency_p99_ms"
	// MetricErrorRate is failed samples over all samples, 0 to 1.
	MetricErrorRate Metric = "error_rate"
	// MetricRPS is the offered rate: Gate calls per second, allowed and
	// denied, across the site's instances. Denied calls count, so shedding
	// does not by itself make a rule on rps clear. One instance cannot see
	// it, so a client does not evaluate it on its own.
	MetricRPS Metric = "rps"
)

// Custom splits "metric:<name>" and "metric:<name>:max"; ok is false for
// any other metric or a bad name.
func (m Metric) Custom() (name string, useMax, ok bool) {
	rest, ok := strings.CutPrefix(string(m), "metric:")
	if !ok {
		return "", false, false
	}
	name, useMax = strings.CutSuffix(rest, ":max")
	return name, useMax, wire.ValidMetricName(name)
}

// Known reports whether m is a metric of the schema.
func (m Metric) Known() bool {
	_, _, custom := m.Custom()
	return custom || slices.Contains([]Metric{MetricLatencyP50, MetricLatencyP95, MetricLatencyP99, MetricErrorRate, MetricRPS}, m)
}

// Action is what a fired rule does to its tag.
type Action string

// The actions.
const (
	// ActionBlock sheds every call of the tag (100 %).
	ActionBlock Action = "block"
	// ActionThrottle admits AdmitPercent % of the tag's calls and sheds
	// the rest.
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
	AdmitPercent    float64 `json:"percent,omitempty"`   // ActionThrottle: the share admitted, above 0, at most 100; not the share shed
	MaxWeight       float64 `json:"maxWeight,omitempty"` // ActionCap: the weight limit
	CooldownSeconds float64 `json:"cooldownSeconds"`
}

// ruleKeys are the keys of a rule's JSON form, as written; "admitPercent"
// is read as another spelling of "percent".
var ruleKeys = []string{"name", "metricTag", "metric", "operator", "threshold", "tagName",
	"action", "percent", "admitPercent", "maxWeight", "cooldownSeconds"}

// UnmarshalJSON reads a rule strictly, as from a user's rule file. It
// refuses keys the schema does not have, naming them (a misspelled
// "metricTag" would otherwise watch the whole site), a rule that says
// neither what to do (an action) nor a weight limit (a cap), a throttle
// without the share it admits, and a cap without a weight limit. The
// share a throttle admits is "percent" or "admitPercent", not both;
// MarshalJSON writes "percent". A rule with a maxWeight and no action
// reads as a cap, said in full, so that Validate can tell it from a rule
// built with no action.
func (r *Rule) UnmarshalJSON(data []byte) error { return r.decode(data, true) }

// DecodeLenient reads a rule as a control plane's answers carry it: as
// UnmarshalJSON does, except that keys the schema does not have (a newer
// control plane's) are skipped, and what is missing is left for Validate
// to explain.
func DecodeLenient(data []byte) (Rule, error) {
	var r Rule
	err := r.decode(data, false)
	return r, err
}

func (r *Rule) decode(data []byte, strict bool) error {
	type plain Rule
	var raw struct {
		plain
		Percent      *float64 `json:"percent"`
		AdmitPercent *float64 `json:"admitPercent"`
		MaxWeight    *float64 `json:"maxWeight"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	admit := cmp.Or(raw.Percent, raw.AdmitPercent)
	if strict {
		if err := strictChecks(data, raw.Name, raw.Action, raw.Percent, raw.AdmitPercent, raw.MaxWeight); err != nil {
			return err
		}
	}
	*r = Rule(raw.plain)
	if admit != nil {
		r.AdmitPercent = *admit
	}
	if raw.MaxWeight != nil {
		r.MaxWeight = *raw.MaxWeight
		if r.Action == "" {
			r.Action = ActionCap
		}
	}
	return nil
}

// strictChecks are what UnmarshalJSON refuses and DecodeLenient lets
// through: unknown keys, both spellings of the share admitted, and an
// action without the value it needs.
func strictChecks(data []byte, name string, action Action, percent, admitPercent, maxWeight *float64) error {
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(data, &keys); err != nil {
		return err
	}
	var unknown []string
	for k := range keys {
		if !slices.Contains(ruleKeys, k) {
			unknown = append(unknown, strconv.Quote(k))
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		return fmt.Errorf("rule %q: unknown keys %s (a rule's keys are %s)", name,
			strings.Join(unknown, ", "), strings.Join(ruleKeys, ", "))
	}
	switch {
	case percent != nil && admitPercent != nil:
		return fmt.Errorf("rule %q: percent and admitPercent are one key: give one", name)
	case action == "" && maxWeight == nil:
		return fmt.Errorf("rule %q: no action and no maxWeight", name)
	case action == ActionThrottle && percent == nil && admitPercent == nil:
		return fmt.Errorf("rule %q: throttle without a percent", name)
	case action == ActionCap && maxWeight == nil:
		return fmt.Errorf("rule %q: cap without a maxWeight", name)
	}
	return nil
}

// MarshalJSON writes a rule in the schema that UnmarshalJSON reads: a
// cap's maxWeight and a throttle's percent always, even when 0.
func (r Rule) MarshalJSON() ([]byte, error) {
	type plain Rule
	out := struct {
		plain
		Percent   *float64 `json:"percent,omitempty"`
		MaxWeight *float64 `json:"maxWeight,omitempty"`
	}{plain: plain(r)}
	switch r.Action {
	case ActionThrottle:
		out.Percent = &r.AdmitPercent
	case "", ActionCap:
		out.MaxWeight = &r.MaxWeight
	default:
		if r.AdmitPercent != 0 {
			out.Percent = &r.AdmitPercent
		}
		if r.MaxWeight != 0 {
			out.MaxWeight = &r.MaxWeight
		}
	}
	return json.Marshal(out)
}

// operators maps every spelling of an operator to its comparison.
var operators = map[string]func(v, threshold float64) bool{
	">": func(v, t float64) bool { return v > t }, "gt": func(v, t float64) bool { return v > t },
	">=": func(v, t float64) bool { return v >= t }, "gte": func(v, t float64) bool { return v >= t },
	"<": func(v, t float64) bool { return v < t }, "lt": func(v, t float64) bool { return v < t },
	"<=": func(v, t float64) bool { return v <= t }, "lte": func(v, t float64) bool { return v <= t },
}

// Compare applies operator op: whether v is on its side of threshold. An
// unknown operator is false.
func Compare(op string, v, threshold float64) bool {
	f := operators[op]
	return f != nil && f(v, threshold)
}

// Validate reports what is wrong with r, if anything.
func (r Rule) Validate() error {
	switch {
	case r.Name == "":
		return errors.New("rule has no name")
	case len(r.Name) > MaxNameBytes:
		return fmt.Errorf("rule name of %d bytes: at most %d", len(r.Name), MaxNameBytes)
	case !r.Metric.Known():
		return fmt.Errorf("rule %q: unknown metric %q", r.Name, r.Metric)
	case operators[r.Operator] == nil:
		return fmt.Errorf("rule %q: operator must be >, >=, <, <= (or gt, gte, lt, lte), not %q", r.Name, r.Operator)
	case math.IsNaN(r.Threshold) || math.IsInf(r.Threshold, 0):
		return fmt.Errorf("rule %q: threshold must be a finite number", r.Name)
	case r.Action != "" && r.Action != ActionBlock && r.Action != ActionThrottle && r.Action != ActionCap:
		return fmt.Errorf("rule %q: action must be block, throttle or cap, not %q", r.Name, r.Action)
	case r.Action == ActionThrottle && !(r.AdmitPercent > 0 && r.AdmitPercent <= 100):
		return fmt.Errorf("rule %q: a throttle admits more than 0 and at most 100 percent, not %v (one that admits nothing is a block)", r.Name, r.AdmitPercent)
	case r.Action == "" && r.MaxWeight == 0:
		return fmt.Errorf("rule %q: no action and no maxWeight: say block, throttle, or cap with a maxWeight", r.Name)
	case (r.Action == "" || r.Action == ActionCap) && !(r.MaxWeight >= 0):
		return fmt.Errorf("rule %q: maxWeight must be >= 0", r.Name)
	case !(r.CooldownSeconds >= 0):
		return fmt.Errorf("rule %q: cooldownSeconds must be >= 0", r.Name)
	}
	return nil
}

// MaxRules bounds the rules of one site.
const MaxRules = 256

// MaxNameBytes bounds a rule's name, as wire.MaxTagNameBytes bounds a tag's:
// the names of the rules an instance fired travel in its pulses.
const MaxNameBytes = wire.MaxTagNameBytes

// ValidateSet reports what is wrong with a site's rules, if anything: a
// rule that does not validate, two rules of one name, more than MaxRules.
func ValidateSet(rules []Rule) error {
	if len(rules) > MaxRules {
		return fmt.Errorf("%d rules: at most %d", len(rules), MaxRules)
	}
	seen := make(map[string]bool, len(rules))
	for _, r := range rules {
		if err := r.Validate(); err != nil {
			return err
		}
		if seen[r.Name] {
			return fmt.Errorf("two rules named %q", r.Name)
		}
		seen[r.Name] = true
	}
	return nil
}

// ParseRules reads rules as JSON: an array of rules for the default site
// (""), or an object from site to its array of rules.
func ParseRules(data []byte) (map[string][]Rule, error) {
	bySite := map[string][]Rule{}
	switch trimmed := bytes.TrimLeft(data, " \t\r\n"); {
	case len(trimmed) > 0 && trimmed[0] == '[':
		var list []Rule
		if err := json.Unmarshal(data, &list); err != nil {
			return nil, fmt.Errorf("rules: %w", err)
		}
		bySite[""] = list
	case len(trimmed) > 0 && trimmed[0] == '{':
		if err := json.Unmarshal(data, &bySite); err != nil {
			return nil, fmt.Errorf("rules: %w", err)
		}
	default:
		return nil, errors.New("rules: want an array of rules or an object of site to rules")
	}
	for site, rules := range bySite {
		if err := ValidateSet(rules); err != nil {
			return nil, fmt.Errorf("site %q: %w", site, err)
		}
	}
	return bySite, nil
}

// Figures are what the rules read of one scope (the whole site or one
// tag's traffic) over a rule window.
type Figures struct {
	RPS          float64                // offered Gate calls per second
	ErrorRate    float64                // NaN without samples
	LatencyP50Ms float64                // NaN without samples
	LatencyP95Ms float64                // NaN without samples
	LatencyP99Ms float64                // NaN without samples
	Custom       map[string]wire.Metric // custom metrics, added up over the window
}

// NoData is the figures of a scope without samples: every health figure
// NaN, nothing offered.
func NoData() Figures {
	nan := math.NaN()
	return Figures{ErrorRate: nan, LatencyP50Ms: nan, LatencyP95Ms: nan, LatencyP99Ms: nan, Custom: map[string]wire.Metric{}}
}

// Value returns the metric a rule watches; ok is false without data.
func (f Figures) Value(metric Metric) (float64, bool) {
	var v float64
	switch metric {
	case MetricLatencyP50:
		v = f.LatencyP50Ms
	case MetricLatencyP95:
		v = f.LatencyP95Ms
	case MetricLatencyP99:
		v = f.LatencyP99Ms
	case MetricErrorRate:
		v = f.ErrorRate
	case MetricRPS:
		v = f.RPS
	default:
		name, useMax, _ := metric.Custom()
		agg, ok := f.Custom[name]
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

// State is one rule's state in one site.
type State struct {
	Fired     bool
	GoodSince time.Time // while fired: when the metric went good; zero while bad
}

// Step advances a rule's state to now given the figures of its scope, and
// reports whether it fired or cleared. A metric without data (no samples
// in the window) is on the good side: the load it measured is gone.
func (st *State) Step(r Rule, f Figures, now time.Time) (changed bool, value float64) {
	v, ok := f.Value(r.Metric)
	bad := ok && Compare(r.Operator, v, r.Threshold)
	switch {
	case !st.Fired && bad:
		st.Fired, st.GoodSince = true, time.Time{}
		return true, v
	case st.Fired && bad:
		st.GoodSince = time.Time{}
	case st.Fired && st.GoodSince.IsZero():
		st.GoodSince = now
		fallthrough
	case st.Fired:
		if now.Sub(st.GoodSince) >= time.Duration(r.CooldownSeconds*float64(time.Second)) {
			st.Fired = false
			return true, v
		}
	}
	return false, v
}

// Change is a rule that fired or cleared in one evaluation.
type Change struct {
	Rule  string
	Fired bool    // false: cleared
	Value float64 // the metric then; NaN without data
}

// Evaluate steps each rule whose state states holds or can make, creating
// the states it lacks, over the figures of its scope: figures(metricTag)
// is called once per scope. It returns the rules that fired or cleared,
// in the order of rules.
func Evaluate(rules []Rule, states map[string]*State, figures func(metricTag string) Figures, now time.Time) []Change {
	var changes []Change
	scopes := map[string]Figures{}
	for _, r := range rules {
		st := states[r.Name]
		if st == nil {
			st = &State{}
			states[r.Name] = st
		}
		f, ok := scopes[r.MetricTag]
		if !ok {
			f = figures(r.MetricTag)
			scopes[r.MetricTag] = f
		}
		if changed, v := st.Step(r, f, now); changed {
			changes = append(changes, Change{Rule: r.Name, Fired: st.Fired, Value: v})
		}
	}
	return changes
}

// shed is the percent a rule sheds, and whether it sheds at all.
func (r Rule) shed() (float64, bool) {
	switch r.Action {
	case ActionBlock:
		return 100, true
	case ActionThrottle:
		return 100 - r.AdmitPercent, true
	}
	return 0, false
}

// Overlay returns base with the actions of the fired rules applied; base
// is not changed. Global rules (TagName "") first: a cap lowers
// GlobalMaxWeight, a block or throttle raises GlobalShedPercent. Then tag
// rules, each starting from what the tag has after the global rules — its
// own entry, else the global value — so a tag rule never loosens a global
// one. Of several rules on one tag the strictest wins: the lowest limit,
// the highest shed.
func Overlay(base wire.Policy, rules []Rule, fired func(name string) bool) wire.Policy {
	p := base
	p.TagMaxWeights = make(map[string]float64, len(base.TagMaxWeights))
	maps.Copy(p.TagMaxWeights, base.TagMaxWeights)
	p.TagShedPercents = maps.Clone(base.TagShedPercents)
	var active []Rule
	for _, r := range rules {
		if fired(r.Name) {
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

// FiredIn returns the fired test of Overlay for the states of a site.
func FiredIn(states map[string]*State) func(string) bool {
	return func(name string) bool {
		st := states[name]
		return st != nil && st.Fired
	}
}

// Block is the reflex block a control plane's answers carry while the
// answer's site has rules: the policy before any rule acted, the rules,
// the names of those fired now, and the rule window. A client that runs
// the rules itself when the control plane is away starts from it.
type Block struct {
	Base         wire.Policy `json:"base"`
	Rules        []Rule      `json:"rules"`
	Fired        []string    `json:"fired"`
	RuleWindowMs int64       `json:"ruleWindowMs"`
}
