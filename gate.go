package waitstate

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"
)

// Mode is how a Client answers Gate.
type Mode int32

// The modes, in the order a client normally passes through them.
const (
	// ModeFailOpen allows everything: no policy has been applied yet, or
	// the control plane has never answered usefully.
	ModeFailOpen Mode = iota
	// ModeEnforcing answers with the policy in force, whose lease is valid.
	ModeEnforcing
	// ModeSafeMode answers as Options.SafeMode says: the lease of the last
	// policy expired without renewal.
	ModeSafeMode
)

var modeNames = [...]string{ModeFailOpen: "fail_open", ModeEnforcing: "enforcing", ModeSafeMode: "safe_mode"}

// String returns "fail_open", "enforcing" or "safe_mode", the names used on
// the wire.
func (m Mode) String() string { return enumName(modeNames[:], int(m)) }

// MarshalText returns the mode's wire name, so that Stats marshals to
// readable JSON.
func (m Mode) MarshalText() ([]byte, error) { return marshalEnum(modeNames[:], int(m), "mode") }

// UnmarshalText accepts a mode's wire name, so that Stats' JSON reads back.
func (m *Mode) UnmarshalText(text []byte) error {
	i, err := unmarshalEnum(modeNames[:], text, "mode")
	*m = Mode(i)
	return err
}

// Reason says why Gate answered as it did.
type Reason uint8

// The reasons.
const (
	ReasonAllowed         Reason = iota // allowed by the policy in force
	ReasonFailOpen                      // allowed: fail-open mode
	ReasonGlobalMaxWeight               // denied: weight above GlobalMaxWeight
	ReasonTagMaxWeight                  // denied: weight above the tag's limit
	ReasonThrottled                     // denied: within the limit, but among the calls shed
	ReasonSafeMode                      // allowed in safe mode
	ReasonSafeModeLimit                 // denied: safe-mode rate exhausted
)

var reasonNames = [...]string{
	ReasonAllowed:         "allowed",
	ReasonFailOpen:        "fail_open",
	ReasonGlobalMaxWeight: "global_max_weight",
	ReasonTagMaxWeight:    "tag_max_weight",
	ReasonThrottled:       "throttled",
	ReasonSafeMode:        "safe_mode",
	ReasonSafeModeLimit:   "safe_mode_limit",
}

// allows reports whether Gate allows a call for this reason (outside
// shadow mode).
func (r Reason) allows() bool {
	return r == ReasonAllowed || r == ReasonFailOpen || r == ReasonSafeMode
}

// String returns the reason's wire name, such as "tag_max_weight".
func (r Reason) String() string { return enumName(reasonNames[:], int(r)) }

// MarshalText returns the reason's wire name.
func (r Reason) MarshalText() ([]byte, error) { return marshalEnum(reasonNames[:], int(r), "reason") }

// UnmarshalText accepts a reason's wire name, so that Stats' JSON, whose
// Decisions are keyed by reason, reads back.
func (r *Reason) UnmarshalText(text []byte) error {
	i, err := unmarshalEnum(reasonNames[:], text, "reason")
	*r = Reason(i)
	return err
}

// SafeModeStrategy says how Gate answers in safe mode, once a lease has
// expired without renewal: the control plane has been unreachable, or its
// answers refused, for longer than the lease.
type SafeModeStrategy int

// The safe-mode strategies.
const (
	// SafeModeFixedRPS admits Options.SafeModeMaxRPS calls per second, with
	// a burst of one second's worth, whatever the tag or weight: reasons
	// safe_mode and safe_mode_limit. It is the zero value.
	SafeModeFixedRPS SafeModeStrategy = iota
	// SafeModeLastPolicy keeps answering with the last policy, shedding
	// included, as if its lease had not expired.
	SafeModeLastPolicy
	// SafeModeOpen allows every call, with reason safe_mode.
	SafeModeOpen
	// SafeModeLocalRules runs the control plane's reflex rules on the
	// client's own traffic: Gate answers with the last base policy the
	// control plane sent, overlaid with the rules that the client's own
	// samples fire (reasons as when enforcing). The rules the control plane
	// reported fired start fired. Rules on "rps", a fleet figure, are not
	// run. Without rules from the control plane it is SafeModeLastPolicy.
	SafeModeLocalRules
)

var strategyNames = [...]string{SafeModeFixedRPS: "fixed_rps", SafeModeLastPolicy: "last_policy", SafeModeOpen: "open",
	SafeModeLocalRules: "local_rules"}

// String returns "fixed_rps", "last_policy", "open" or "local_rules".
func (s SafeModeStrategy) String() string { return enumName(strategyNames[:], int(s)) }

// MarshalText returns the strategy's name.
func (s SafeModeStrategy) MarshalText() ([]byte, error) {
	return marshalEnum(strategyNames[:], int(s), "safe-mode strategy")
}

// UnmarshalText accepts "fixed_rps", "last_policy", "open" or
// "local_rules".
func (s *SafeModeStrategy) UnmarshalText(text []byte) error {
	i, err := unmarshalEnum(strategyNames[:], text, "safe-mode strategy")
	*s = SafeModeStrategy(i)
	return err
}

func enumName(names []string, i int) string {
	if i >= 0 && i < len(names) {
		return names[i]
	}
	return "unknown"
}

func marshalEnum(names []string, i int, what string) ([]byte, error) {
	if i < 0 || i >= len(names) {
		return nil, fmt.Errorf("waitstate: no %s numbered %d", what, i)
	}
	return []byte(names[i]), nil
}

// unmarshalEnum is the index of text among names; on error, an unknown
// name, it is 0 and the error lists the names.
func unmarshalEnum(names []string, text []byte, what string) (int, error) {
	for i, name := range names {
		if string(text) == name {
			return i, nil
		}
	}
	return 0, fmt.Errorf("waitstate: unknown %s %.32q (want %s)", what, text, strings.Join(names, ", "))
}

// GateResult is a Gate decision.
type GateResult struct {
	// Allowed reports whether the work may proceed.
	Allowed bool
	// Shadowed is set in shadow mode (Options.Shadow) on a call that was
	// allowed only because of it: Reason says why it would have been
	// denied.
	Shadowed bool
	// Reason says why.
	Reason Reason
	// Limit is the weight limit the call was held against: +Inf when there
	// was none (fail-open and safe mode).
	Limit float64
}

// MarshalJSON writes r as encoding/json writes its fields, except that an
// infinite Limit, which encoding/json refuses, is the string "Infinity", as
// the wire writes an infinite weight: a GateResult logs with slog's JSON
// handler in every mode.
func (r GateResult) MarshalJSON() ([]byte, error) {
	type plain GateResult
	if !math.IsInf(r.Limit, 1) {
		return json.Marshal(plain(r))
	}
	return json.Marshal(struct {
		plain
		Limit string
	}{plain(r), "Infinity"})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (r *GateResult) UnmarshalJSON(data []byte) error {
	type plain GateResult
	var v struct {
		plain
		Limit json.RawMessage
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*r = GateResult(v.plain)
	switch {
	case string(v.Limit) == `"Infinity"`:
		r.Limit = math.Inf(1)
	case len(v.Limit) > 0:
		return json.Unmarshal(v.Limit, &r.Limit)
	}
	return nil
}

// answer is how a view answers Gate.
type answer uint8

const (
	answerFailOpen answer = iota // allow, ReasonFailOpen
	answerPolicy                 // the policy: enforcing, or safe mode with SafeModeLastPolicy
	answerSafeRate               // safe mode with SafeModeFixedRPS
	answerSafeOpen               // safe mode with SafeModeOpen
)

// view is an immutable snapshot of everything Gate needs. The client
// replaces it whole, so Gate reads it with one atomic load.
type view struct {
	mode   Mode
	answer answer
	policy *Policy      // in force: DefaultPolicy until one is applied
	index  *policyIndex // of policy
	win    *window      // nil once the client is shut down: nothing is counted
}

var failOpen = GateResult{Allowed: true, Reason: ReasonFailOpen, Limit: math.Inf(1)}

// Gate decides whether work of weight for tag may proceed, and counts the
// call once: into usage when allowed, into bounced when denied, globally
// and under its tag. It never blocks, takes no lock, does no I/O and
// allocates nothing, except once per window for a tag the window has not
// yet seen. A NaN or negative weight counts as 1. A tag longer than
// MaxTagNameBytes or not valid UTF-8 is counted under OtherTag.
//
// In shadow mode (Options.Shadow) Gate decides and counts as usual but
// always allows: a call it would have denied has Shadowed set.
//
// After Shutdown, Gate keeps answering from the last state and counts
// nothing.
func (c *Client) Gate(tag string, weight float64) GateResult {
	h, hashed := hashTag(c.seed, tag)
	v := c.view.Load()
	var ctr *tagCounter
	if v.win != nil {
		if ctr = v.win.lookupHashed(tag, h, hashed, v.index); ctr == nil {
			v, ctr = c.liveCounter(tag, h, hashed) // swept before the tag got a place
		}
	}
	var r GateResult
	switch v.answer {
	case answerPolicy:
		var l tagLimit
		if cached := ctr.cachedLimit(v.policy); cached != nil {
			l = *cached // the single-lookup path
		} else {
			l = v.index.limitFor(tag, h, hashed)
		}
		r = l.decide(normWeight(weight))
		if r.Allowed && l.shed > 0 && shedTurn(v.index.turnsFor(&l, ctr).Add(1), l.shed) {
			r = GateResult{Allowed: false, Reason: ReasonThrottled, Limit: l.limit}
		}
	case answerSafeRate:
		r = c.safe.gate(c.clock())
	case answerSafeOpen:
		r = GateResult{Allowed: true, Reason: ReasonSafeMode, Limit: math.Inf(1)}
	default:
		r = failOpen
	}
	for ctr != nil && !ctr.add(r.Reason) {
		// The window was cut between the load and the add: count in the
		// window that replaced it. Rare, and bounded by the cut rate.
		_, ctr = c.liveCounter(tag, h, hashed)
	}
	if !r.Allowed && c.opts.Shadow {
		r.Allowed, r.Shadowed = true, true
	}
	return r
}

// liveCounter returns the view in force and the counter of tag in its
// window, given hashTag's answer; the counter is nil once the client is
// shut down. A window swept before the tag got a place sends it to the
// next one, whose view is already published (invariant 3). Gate makes its
// first lookup inline and comes here only when that one missed.
func (c *Client) liveCounter(tag string, h uint64, hashed bool) (*view, *tagCounter) {
	for {
		v := c.view.Load()
		if v.win == nil {
			return v, nil
		}
		if ctr := v.win.lookupHashed(tag, h, hashed, v.index); ctr != nil {
			return v, ctr
		}
	}
}

// cachedLimit is the counter's limit under p, if it has it cached; nil for
// a nil counter, OtherTag's (whose tags vary), or a stale entry.
func (t *tagCounter) cachedLimit(p *Policy) *tagLimit {
	if t == nil {
		return nil
	}
	if l := t.lim.Load(); l != nil && l.policy == p {
		return l
	}
	return nil
}

// limiter is the lock-free GCRA limiter of safe mode: rate admissions per
// second with a burst of one second's worth. Times are the client's clock.
type limiter struct {
	interval time.Duration // between two admissions at the steady rate
	tat      atomic.Int64  // theoretical arrival time
}

func newLimiter(rps uint64) limiter {
	return limiter{interval: max(time.Second/time.Duration(min(rps, uint64(time.Second))), 1)}
}

// reset gives a full burst from now on.
func (l *limiter) reset(now time.Duration) { l.tat.Store(int64(now)) }

func (l *limiter) gate(now time.Duration) GateResult {
	for {
		tat := l.tat.Load()
		next := max(tat, int64(now)) + int64(l.interval)
		if next-int64(now) > int64(time.Second) {
			return GateResult{Allowed: false, Reason: ReasonSafeModeLimit, Limit: math.Inf(1)}
		}
		if l.tat.CompareAndSwap(tat, next) {
			return GateResult{Allowed: true, Reason: ReasonSafeMode, Limit: math.Inf(1)}
		}
	}
}
