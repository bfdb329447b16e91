package waitstate

import (
	"math"
	"sync/atomic"
	"time"
)

// Mode is how a Client answers Gate.
type Mode int32

// The modes of SPEC §3.
const (
	// ModeFailOpen allows everything: no policy has been applied yet, or
	// the control plane has never answered usefully.
	ModeFailOpen Mode = iota
	// ModeEnforcing answers with the policy in force, whose lease is valid.
	ModeEnforcing
	// ModeSafeMode caps admissions at Options.SafeModeMaxRPS per second:
	// the lease of the last policy expired without renewal.
	ModeSafeMode
)

// String returns "fail_open", "enforcing" or "safe_mode", the names used on
// the wire.
func (m Mode) String() string {
	switch m {
	case ModeFailOpen:
		return "fail_open"
	case ModeEnforcing:
		return "enforcing"
	case ModeSafeMode:
		return "safe_mode"
	}
	return "unknown"
}

// Reason says why Gate answered as it did.
type Reason uint8

// The reasons of SPEC §2.
const (
	ReasonAllowed         Reason = iota // allowed by the policy in force
	ReasonFailOpen                      // allowed: fail-open mode
	ReasonGlobalMaxWeight               // denied: weight above GlobalMaxWeight
	ReasonTagMaxWeight                  // denied: weight above the tag's limit
	ReasonSafeMode                      // allowed: within the safe-mode rate
	ReasonSafeModeLimit                 // denied: safe-mode rate exhausted
)

var reasonNames = [...]string{
	ReasonAllowed:         "allowed",
	ReasonFailOpen:        "fail_open",
	ReasonGlobalMaxWeight: "global_max_weight",
	ReasonTagMaxWeight:    "tag_max_weight",
	ReasonSafeMode:        "safe_mode",
	ReasonSafeModeLimit:   "safe_mode_limit",
}

// String returns the reason's wire name, such as "tag_max_weight".
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// GateResult is a Gate decision.
type GateResult struct {
	// Allowed reports whether the work may proceed.
	Allowed bool
	// Reason says why.
	Reason Reason
	// Limit is the weight limit the call was held against: +Inf when there
	// was none (fail-open and safe mode).
	Limit float64
}

// view is an immutable snapshot of everything Gate needs. The client
// replaces it whole, so Gate reads it with one atomic load.
type view struct {
	mode   Mode
	policy *Policy // in force: DefaultPolicy until one is applied
	win    *window // nil once the client is shut down: nothing is counted
}

// Gate decides whether work of weight for tag may proceed, and counts the
// call once: into usage when allowed, into bounced when denied. It never
// blocks, takes no lock, does no I/O and allocates nothing, except once per
// window for a tag the window has not yet seen. A NaN or negative weight
// counts as 1.
//
// After Shutdown, Gate keeps answering from the last state and counts
// nothing.
func (c *Client) Gate(tag string, weight float64) GateResult {
	v := c.view.Load()
	var ctr *tagCounter
	if v.win != nil {
		ctr = v.win.counter(tag, v.policy)
	}
	var r GateResult
	switch v.mode {
	case ModeEnforcing:
		w := normWeight(weight)
		if ctr != nil {
			if l := ctr.lim.Load(); l != nil && l.policy == v.policy {
				r = l.decide(w) // the single-lookup path
				break
			}
		}
		r = v.policy.decide(tag, w)
	case ModeSafeMode:
		r = c.safe.gate(c.clock())
	default:
		r = GateResult{Allowed: true, Reason: ReasonFailOpen, Limit: math.Inf(1)}
	}
	for v.win != nil && (ctr == nil || !ctr.add(r.Allowed)) {
		// The window was cut between the load and the add: count in the
		// window that replaced it. Rare, and bounded by the cut rate.
		v = c.view.Load()
		if v.win != nil {
			ctr = v.win.counter(tag, v.policy)
		}
	}
	return r
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
