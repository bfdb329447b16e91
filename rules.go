package waitstate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
)

// Rule is a reflex rule of the control plane, as its answers carry it with
// the policy: while Metric, measured on MetricTag's traffic ("" is the
// whole site) over the rule window, is on the wrong side of Threshold,
// Action applies to TagName ("" is every tag, through the policy's global
// fields). A fired rule clears once its metric has stayed on the good side
// for CooldownSeconds. Of several fired rules on one tag the strictest wins
// (the lowest weight limit, the highest shed), and a tag rule never
// loosens a global one. A metric without data counts as on the good side.
//
// Client.Rules returns the rules the control plane last sent; with
// SafeModeLocalRules the client runs them itself while the control plane
// is away. Its JSON form is the control plane's schema:
//
//	{"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
//	 "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30}
type Rule struct {
	// Name names the rule, in at most MaxTagNameBytes bytes; a site's rules
	// have distinct names.
	Name string `json:"name"`
	// MetricTag is whose traffic Metric is measured on: "" the whole site,
	// else that tag's health or custom metrics.
	MetricTag string `json:"metricTag,omitempty"`
	// Metric is "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
	// "error_rate" (errors / requests, 0 to 1), "rps" (offered calls per
	// second across the fleet: never evaluated by one client on its own),
	// or "metric:<name>" (a custom metric's mean over the window) or
	// "metric:<name>:max" (its maximum).
	Metric string `json:"metric"`
	// Operator is ">", ">=", "<" or "<=" (also "gt", "gte", "lt", "lte").
	Operator string `json:"operator"`
	// Threshold is what Metric is compared with.
	Threshold float64 `json:"threshold"`
	// TagName is the tag the action applies to; "" is every tag.
	TagName string `json:"tagName"`
	// Action is "block" (shed every call), "throttle" (admit AdmitPercent %
	// of the calls, shed the rest) or "cap" (lower the weight limit to
	// MaxWeight). "" with a MaxWeight above 0 is a cap.
	Action string `json:"action,omitempty"`
	// AdmitPercent is the share of calls a throttle admits, above 0 and at
	// most 100. It is not a shed percent: a throttle admitting 20 puts 80
	// in the policy's TagShedPercents. Its JSON key is "percent".
	AdmitPercent float64 `json:"percent,omitempty"`
	// MaxWeight is a cap's weight limit.
	MaxWeight float64 `json:"maxWeight,omitempty"`
	// CooldownSeconds is how long the metric must stay on the good side
	// before a fired rule clears.
	CooldownSeconds float64 `json:"cooldownSeconds"`
}

// Validate reports what is wrong with r, if anything: an unknown metric,
// operator or action, no action and no MaxWeight, a throttle's AdmitPercent
// outside (0, 100], a negative weight limit or cooldown, no name.
func (r Rule) Validate() error {
	if err := r.internal().Validate(); err != nil {
		return fmt.Errorf("waitstate: %w", err)
	}
	return nil
}

// MarshalJSON writes r in the control plane's schema: a cap's maxWeight
// and a throttle's percent always, even when 0.
func (r Rule) MarshalJSON() ([]byte, error) { return json.Marshal(r.internal()) }

// UnmarshalJSON reads r as the control plane's answers carry it. It is
// lenient where a user's rule file is not: keys it does not know (a newer
// control plane's) are skipped, and a rule the client cannot evaluate is
// kept for Validate to explain. As the schema says, a rule with a
// maxWeight and no action is a cap, and "admitPercent" is another spelling
// of "percent".
func (r *Rule) UnmarshalJSON(data []byte) error {
	rr, err := reflex.DecodeLenient(data)
	if err != nil {
		return err
	}
	*r = Rule{Name: rr.Name, MetricTag: rr.MetricTag, Metric: string(rr.Metric), Operator: rr.Operator, Threshold: rr.Threshold,
		TagName: rr.TagName, Action: string(rr.Action), AdmitPercent: rr.AdmitPercent, MaxWeight: rr.MaxWeight,
		CooldownSeconds: rr.CooldownSeconds}
	return nil
}

func (r Rule) internal() reflex.Rule {
	return reflex.Rule{Name: r.Name, MetricTag: r.MetricTag, Metric: reflex.Metric(r.Metric), Operator: r.Operator,
		Threshold: r.Threshold, TagName: r.TagName, Action: reflex.Action(r.Action), AdmitPercent: r.AdmitPercent, MaxWeight: r.MaxWeight,
		CooldownSeconds: r.CooldownSeconds}
}

// Rules returns a copy of the reflex rules the control plane last sent with
// its policy, or nil when it sent none (the site has no rules, or no
// answer has come yet).
func (c *Client) Rules() []Rule {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reflex == nil {
		return nil
	}
	return slices.Clone(c.reflex.rules)
}

// reflexBlock is a verified answer's reflex block: what a client needs to
// run the control plane's rules on its own. It is never changed once
// parsed.
type reflexBlock struct {
	raw    []byte        // as received, to tell a change
	base   *Policy       // the site's policy before any rule acted
	rules  []Rule        // every rule, as sent
	local  []reflex.Rule // the rules this client can evaluate on its own
	skip   []string      // why each other rule is not evaluated locally
	fired  []string      // the rules fired at the control plane, sorted
	window time.Duration // the rule window
}

// reflexJSON is the shape of a reflex block on the wire.
type reflexJSON struct {
	Base         json.RawMessage   `json:"base"`
	Rules        []json.RawMessage `json:"rules"`
	Fired        []string          `json:"fired"`
	RuleWindowMs json.RawMessage   `json:"ruleWindowMs"`
}

// parseReflex reads a reflex block. A block that is not well-formed —
// wrong types, an invalid base policy, more than reflex.MaxRules rules, two
// rules of one name, a rule window that is not a positive integer — is an
// error. A well-formed rule this client cannot evaluate (an unknown metric,
// operator or action, an "rps" rule, values out of range) is kept in rules
// and left out of local, with the reason in skip.
func parseReflex(data []byte) (*reflexBlock, error) {
	var raw reflexJSON
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%w: reflex: %v", ErrBadResponse, err)
	}
	if raw.Base == nil {
		return nil, fmt.Errorf("%w: reflex: no base policy", ErrBadResponse)
	}
	base, err := parsePolicy(raw.Base)
	if err != nil {
		return nil, fmt.Errorf("reflex base: %w", err)
	}
	window, err := parseIntervalMs(raw.RuleWindowMs, "reflex ruleWindowMs")
	if err != nil || window == 0 {
		return nil, fmt.Errorf("%w: reflex: ruleWindowMs must be a positive integer", ErrBadResponse)
	}
	if len(raw.Rules) > reflex.MaxRules {
		return nil, fmt.Errorf("%w: reflex: %d rules, at most %d", ErrBadResponse, len(raw.Rules), reflex.MaxRules)
	}
	b := &reflexBlock{raw: bytes.Clone(data), base: base, window: window, rules: make([]Rule, 0, len(raw.Rules))}
	names := make(map[string]bool, len(raw.Rules))
	for _, rr := range raw.Rules {
		var r Rule
		if err := json.Unmarshal(rr, &r); err != nil {
			return nil, fmt.Errorf("%w: reflex: a rule: %v", ErrBadResponse, err)
		}
		if names[r.Name] {
			return nil, fmt.Errorf("%w: reflex: two rules named %q", ErrBadResponse, r.Name)
		}
		names[r.Name] = true
		b.rules = append(b.rules, r)
		var ir reflex.Rule
		err := json.Unmarshal(rr, &ir) // the schema's own checks: an action or a cap, a throttle's percent
		if err == nil {
			err = ir.Validate()
		}
		switch {
		case err != nil:
			b.skip = append(b.skip, err.Error())
		case ir.Metric == reflex.MetricRPS:
			b.skip = append(b.skip, fmt.Sprintf("rule %q: rps is a fleet figure one instance cannot see", r.Name))
		default:
			b.local = append(b.local, ir)
		}
	}
	for _, name := range raw.Fired {
		if names[name] {
			b.fired = append(b.fired, name)
		}
	}
	slices.Sort(b.fired)
	return b, nil
}
