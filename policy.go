package waitstate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Limits on a policy. A policy beyond them is refused whole.
const (
	// MaxPolicyTags bounds the distinct tag names of TagMaxWeights and
	// TagShedPercents together.
	MaxPolicyTags = 10000
	// MaxTagNameBytes bounds a tag name, in a policy and in Gate: a longer
	// tag is counted under OtherTag.
	MaxTagNameBytes = 256
)

// MaxTagNameBytes is the wire's bound: a mismatch does not compile.
var (
	_ [MaxTagNameBytes - wire.MaxTagNameBytes]struct{}
	_ [wire.MaxTagNameBytes - MaxTagNameBytes]struct{}
)

// Policy is what the control plane decides: weight limits, and the share of
// calls to shed ("throttle to 50 %" sheds 50 %), globally and per tag. A
// Gate call is allowed when its weight is at most its tag's limit and it is
// not among the calls shed.
//
// The zero Policy has GlobalMaxWeight 0 and denies every positive weight;
// DefaultPolicy is the fail-open one. A Policy held by a Client is never
// modified; treat a Policy you share between goroutines the same way.
type Policy struct {
	// Version orders policies; a higher one is newer.
	Version int64

	// GlobalMaxWeight is the limit for a tag without an entry in
	// TagMaxWeights. math.Inf(1) means unlimited.
	GlobalMaxWeight float64

	// TagMaxWeights holds per-tag limits. An entry replaces the global
	// limit for its tag, so it may be higher as well as lower.
	TagMaxWeights map[string]float64

	// GlobalShedPercent, from 0 to 100, is the share of the calls that pass
	// the weight check to shed anyway, for a tag without an entry in
	// TagShedPercents. Shedding is even, not random: of the first k calls,
	// exactly ⌊k·p/100⌋ are shed, at 25 % one call in four, counted in
	// parts per million. Each tag a window tracks is counted on its own,
	// carried from window to window (for at most MaxWindowTags tags, those
	// of the last window first); the tags a full window counts under
	// OtherTag share one count.
	GlobalShedPercent float64

	// TagShedPercents holds per-tag shed percents; an entry replaces
	// GlobalShedPercent for its tag, whose calls are counted on their own
	// for as long as the policy is in force, across windows, whether or
	// not a window tracks the tag.
	TagShedPercents map[string]float64
}

// DefaultPolicy returns the fail-open policy: version 0, no tag limits, an
// unlimited global weight, nothing shed.
func DefaultPolicy() *Policy {
	return &Policy{GlobalMaxWeight: math.Inf(1)}
}

// Gate decides a call of weight for tag against p's weight limits. It is
// pure: no I/O, no allocation, no counting, and so no shedding, which needs
// a client's count of the tag's calls. A NaN or negative weight counts as
// 1. A nil p behaves as DefaultPolicy.
//
// It is the form of the SDK to use without a Client, for example with a
// policy loaded from a file.
func (p *Policy) Gate(tag string, weight float64) GateResult {
	if p == nil {
		return GateResult{Allowed: true, Reason: ReasonAllowed, Limit: math.Inf(1)}
	}
	l := p.limitFor(tag)
	return l.decide(normWeight(weight))
}

// tagLimit is a tag's limit and shed fraction under one policy.
type tagLimit struct {
	policy *Policy
	limit  float64
	reason Reason // the denial reason: ReasonTagMaxWeight or ReasonGlobalMaxWeight
	shed   uint32 // parts per million of the calls that pass the weight check, 0 to 1,000,000
	// turns is the shed sequence of a tag with a shed percent of its own,
	// in the policy index, for as long as the policy is in force; nil for
	// a tag under the global percent (Client.Gate picks its sequence).
	turns *atomic.Uint64
}

// limitFor resolves tag's limit and shed fraction: its own entries, else
// the global ones. It names no shed sequence: the policy index does.
func (p *Policy) limitFor(tag string) tagLimit {
	if p == nil {
		return tagLimit{limit: math.Inf(1), reason: ReasonGlobalMaxWeight}
	}
	l := tagLimit{policy: p, limit: p.GlobalMaxWeight, reason: ReasonGlobalMaxWeight, shed: ppm(p.GlobalShedPercent)}
	if len(p.TagMaxWeights) != 0 {
		if w, ok := p.TagMaxWeights[tag]; ok {
			l.limit, l.reason = w, ReasonTagMaxWeight
		}
	}
	if len(p.TagShedPercents) != 0 {
		if s, ok := p.TagShedPercents[tag]; ok {
			l.shed = ppm(s)
		}
	}
	return l
}

// ppm is a shed percent in parts per million, the unit shedTurn counts
// in: exact for every percent with up to four decimals.
func ppm(percent float64) uint32 {
	return uint32(math.Round(min(max(percent, 0), 100) * 10_000))
}

// decide holds a normalised weight against the limit.
func (l *tagLimit) decide(weight float64) GateResult {
	if weight <= l.limit {
		return GateResult{Allowed: true, Reason: ReasonAllowed, Limit: l.limit}
	}
	return GateResult{Allowed: false, Reason: l.reason, Limit: l.limit}
}

// shedTurn reports whether the k-th call (from 1) of a shed sequence is
// shed at ppm parts per million. Exactly ⌊k·ppm/10⁶⌋ of the first k calls
// are shed, for every k, so sheds are spread evenly: at 25 % the 4th, 8th,
// 12th... In integers, so a decimal percent such as 9.2 sheds 69 of 750
// and 33.3 sheds 333 of 1,000: the k-th call is shed when the k-th step
// of ppm carries past a multiple of 10⁶, that is when (k·ppm mod 10⁶) <
// ppm, computed as ((k mod 10⁶)·ppm) mod 10⁶ so that nothing overflows.
func shedTurn(k uint64, ppm uint32) bool {
	const whole = 1_000_000
	return (k%whole)*uint64(ppm)%whole < uint64(ppm)
}

// normWeight maps NaN and negative weights to 1.
func normWeight(w float64) float64 {
	if w >= 0 {
		return w
	}
	return 1 // negative or NaN
}

// Clone returns a deep copy of p.
func (p *Policy) Clone() *Policy {
	if p == nil {
		return nil
	}
	q := *p
	q.TagMaxWeights = maps.Clone(p.TagMaxWeights)
	q.TagShedPercents = maps.Clone(p.TagShedPercents)
	return &q
}

// equal reports whether p and q decide alike: same version, limits and shed
// percents.
func (p *Policy) equal(q *Policy) bool {
	return p.Version == q.Version && p.GlobalMaxWeight == q.GlobalMaxWeight &&
		p.GlobalShedPercent == q.GlobalShedPercent &&
		maps.Equal(p.TagMaxWeights, q.TagMaxWeights) && maps.Equal(p.TagShedPercents, q.TagShedPercents)
}

// Validate reports what makes p unusable, as an error wrapping
// ErrBadPolicy: a negative version, a weight that is NaN or negative, a
// shed percent outside [0, 100], more than MaxPolicyTags distinct tags, or
// a tag name longer than MaxTagNameBytes. The control plane's policies are
// held to the same rules.
func (p *Policy) Validate() error {
	if p == nil {
		return fmt.Errorf("%w: nil", ErrBadPolicy)
	}
	if p.Version < 0 {
		return fmt.Errorf("%w: version %d is negative", ErrBadPolicy, p.Version)
	}
	if !(p.GlobalMaxWeight >= 0) {
		return fmt.Errorf("%w: globalMaxWeight %v is not a number >= 0", ErrBadPolicy, p.GlobalMaxWeight)
	}
	if !validPercent(p.GlobalShedPercent) {
		return fmt.Errorf("%w: globalShedPercent %v is not in [0, 100]", ErrBadPolicy, p.GlobalShedPercent)
	}
	tags := len(p.TagMaxWeights)
	for tag, w := range p.TagMaxWeights {
		if len(tag) > MaxTagNameBytes {
			return fmt.Errorf("%w: a tag name of %d bytes, more than %d", ErrBadPolicy, len(tag), MaxTagNameBytes)
		}
		if !(w >= 0) {
			return fmt.Errorf("%w: weight %v of tag %q is not a number >= 0", ErrBadPolicy, w, tag)
		}
	}
	for tag, s := range p.TagShedPercents {
		if len(tag) > MaxTagNameBytes {
			return fmt.Errorf("%w: a tag name of %d bytes, more than %d", ErrBadPolicy, len(tag), MaxTagNameBytes)
		}
		if !validPercent(s) {
			return fmt.Errorf("%w: shed percent %v of tag %q is not in [0, 100]", ErrBadPolicy, s, tag)
		}
		if _, ok := p.TagMaxWeights[tag]; !ok {
			tags++
		}
	}
	if tags > MaxPolicyTags {
		return fmt.Errorf("%w: %d tags, more than %d", ErrBadPolicy, tags, MaxPolicyTags)
	}
	return nil
}

func validPercent(p float64) bool { return p >= 0 && p <= 100 }

// policyJSON is the wire form of a Policy; numbers stay raw so that every
// accepted form can be parsed and every other one refused.
type policyJSON struct {
	Version           json.RawMessage            `json:"version"`
	GlobalMaxWeight   json.RawMessage            `json:"globalMaxWeight"`
	TagMaxWeights     map[string]json.RawMessage `json:"tagMaxWeights"`
	GlobalShedPercent json.RawMessage            `json:"globalShedPercent"`
	TagShedPercents   map[string]json.RawMessage `json:"tagShedPercents"`
}

// MarshalJSON encodes p in its wire form, with an infinite weight as the
// string "Infinity" and tags in sorted order. A policy that Validate
// refuses does not encode.
func (p *Policy) MarshalJSON() ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p.toWire().MarshalJSON()
}

// toWire is p as the wire and the rule engine hold a policy; its maps are
// shared with p.
func (p *Policy) toWire() wire.Policy {
	return wire.Policy{Version: p.Version, GlobalMaxWeight: p.GlobalMaxWeight, TagMaxWeights: p.TagMaxWeights,
		GlobalShedPercent: p.GlobalShedPercent, TagShedPercents: p.TagShedPercents}
}

// policyFromWire is w as a Policy; its maps are shared with w.
func policyFromWire(w wire.Policy) *Policy {
	return &Policy{Version: w.Version, GlobalMaxWeight: w.GlobalMaxWeight, TagMaxWeights: w.TagMaxWeights,
		GlobalShedPercent: w.GlobalShedPercent, TagShedPercents: w.TagShedPercents}
}

// UnmarshalJSON decodes the wire form. A weight is a JSON number >= 0 (one
// too large for a float64 is +Inf), null (+Inf), or one of the strings
// "Infinity", "+Infinity", "inf" and "+Inf" in any case; an absent
// globalMaxWeight is +Inf. A shed percent is a JSON number in [0, 100]; an
// absent globalShedPercent is 0. The version is a non-negative JSON
// integer. Anything else — a negative weight, NaN, another string, a
// missing version, more than MaxPolicyTags tags, a tag name longer than
// MaxTagNameBytes — refuses the whole policy: an error wrapping
// ErrBadPolicy, and p unchanged.
func (p *Policy) UnmarshalJSON(data []byte) error {
	q, err := parsePolicy(data)
	if err != nil {
		return err
	}
	*p = *q
	return nil
}

// parsePolicy parses a policy object; it returns a new Policy or an error
// wrapping ErrBadPolicy.
func parsePolicy(data []byte) (*Policy, error) {
	data = bytes.TrimSpace(data)
	if len(data) == 0 || data[0] != '{' {
		return nil, fmt.Errorf("%w: not a JSON object", ErrBadPolicy)
	}
	var raw policyJSON
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPolicy, err)
	}
	version, err := parseVersion(raw.Version)
	if err != nil {
		return nil, err
	}
	p := &Policy{Version: version, GlobalMaxWeight: math.Inf(1)}
	if raw.GlobalMaxWeight != nil {
		if p.GlobalMaxWeight, err = parseWeight(raw.GlobalMaxWeight); err != nil {
			return nil, fmt.Errorf("%w (globalMaxWeight)", err)
		}
	}
	if raw.GlobalShedPercent != nil {
		if p.GlobalShedPercent, err = parsePercent(raw.GlobalShedPercent); err != nil {
			return nil, fmt.Errorf("%w (globalShedPercent)", err)
		}
	}
	if n := distinctTags(raw.TagMaxWeights, raw.TagShedPercents); n > MaxPolicyTags {
		return nil, fmt.Errorf("%w: %d tags, more than %d", ErrBadPolicy, n, MaxPolicyTags)
	}
	if p.TagMaxWeights, err = parseTagMap(raw.TagMaxWeights, parseWeight, "tag"); err != nil {
		return nil, err
	}
	if p.TagShedPercents, err = parseTagMap(raw.TagShedPercents, parsePercent, "shed percent of tag"); err != nil {
		return nil, err
	}
	return p, nil
}

// parseTagMap parses a map of tag to number with parse, refusing a tag name
// longer than MaxTagNameBytes; what names the value in an error. An empty
// map is nil.
func parseTagMap(raw map[string]json.RawMessage, parse func(json.RawMessage) (float64, error), what string) (map[string]float64, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	out := make(map[string]float64, len(raw))
	for tag, v := range raw {
		if len(tag) > MaxTagNameBytes {
			return nil, fmt.Errorf("%w: a tag name of %d bytes, more than %d", ErrBadPolicy, len(tag), MaxTagNameBytes)
		}
		var err error
		if out[tag], err = parse(v); err != nil {
			return nil, fmt.Errorf("%w (%s %q)", err, what, tag)
		}
	}
	return out, nil
}

// distinctTags counts the tag names of a and b together.
func distinctTags(a, b map[string]json.RawMessage) int {
	n := len(a)
	for tag := range b {
		if _, ok := a[tag]; !ok {
			n++
		}
	}
	return n
}

// parsePercent accepts a JSON number in [0, 100]; anything else, null and
// strings included, is refused.
func parsePercent(raw json.RawMessage) (float64, error) {
	if len(raw) == 0 || !(raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
		return 0, fmt.Errorf("%w: shed percent %.32s is not a number", ErrBadPolicy, raw)
	}
	v, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || !validPercent(v) {
		return 0, fmt.Errorf("%w: shed percent %.32s is not in [0, 100]", ErrBadPolicy, raw)
	}
	return math.Abs(v), nil // -0 becomes 0
}

// parseVersion accepts a non-negative JSON integer: digits only.
func parseVersion(raw json.RawMessage) (int64, error) {
	if raw == nil {
		return 0, fmt.Errorf("%w: version is missing", ErrBadPolicy)
	}
	s := string(raw)
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%w: version must be a non-negative integer", ErrBadPolicy)
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: version out of range", ErrBadPolicy)
	}
	return v, nil
}

// parseWeight accepts a JSON number >= 0 (+Inf when too large), null, or a
// string naming +Infinity.
func parseWeight(raw json.RawMessage) (float64, error) {
	switch {
	case string(raw) == "null":
		return math.Inf(1), nil
	case len(raw) > 0 && raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, fmt.Errorf("%w: %v", ErrBadPolicy, err)
		}
		switch strings.ToLower(s) {
		case "infinity", "+infinity", "inf", "+inf":
			return math.Inf(1), nil
		}
		return 0, fmt.Errorf("%w: weight %.32q is not a number or Infinity", ErrBadPolicy, s)
	case len(raw) > 0 && (raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9'):
		// encoding/json has already checked that raw is a JSON number.
		w, err := strconv.ParseFloat(string(raw), 64)
		if err != nil && !math.IsInf(w, 1) {
			return 0, fmt.Errorf("%w: weight %.32s is out of range", ErrBadPolicy, raw)
		}
		if raw[0] == '-' && strings.Trim(string(raw), "-0.eE+") != "" {
			// Negative, including one too small to be told from -0.
			return 0, fmt.Errorf("%w: weight %.32s is negative", ErrBadPolicy, raw)
		}
		return math.Abs(w), nil // -0 becomes 0
	}
	return 0, fmt.Errorf("%w: weight %.32s is not a number or Infinity", ErrBadPolicy, raw)
}
