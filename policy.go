package waitstate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Limits on a policy received from the control plane (SPEC §4). A policy
// beyond them is refused whole.
const (
	MaxPolicyTags   = 10000
	MaxTagNameBytes = 256
)

// Policy is what the control plane decides: a global maximum weight and
// per-tag maximum weights. A Gate call is allowed when its weight is at most
// the limit for its tag.
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
}

// DefaultPolicy returns the fail-open policy: version 0, no tag limits, and
// an unlimited global weight.
func DefaultPolicy() *Policy {
	return &Policy{GlobalMaxWeight: math.Inf(1)}
}

// Gate decides a call of weight for tag against p. It is pure: no I/O, no
// allocation, no counting. A NaN or negative weight counts as 1. A nil p
// behaves as DefaultPolicy.
//
// It is the form of the SDK to use without a Client, for example with a
// policy loaded from a file.
func (p *Policy) Gate(tag string, weight float64) GateResult {
	if p == nil {
		return GateResult{Allowed: true, Reason: ReasonAllowed, Limit: math.Inf(1)}
	}
	return p.decide(tag, normWeight(weight))
}

// decide is Gate for a weight already normalised.
func (p *Policy) decide(tag string, weight float64) GateResult {
	l := p.limitFor(tag)
	return l.decide(weight)
}

// limitFor resolves tag's limit: its own entry, else the global one.
func (p *Policy) limitFor(tag string) tagLimit {
	if p == nil {
		return tagLimit{limit: math.Inf(1), reason: ReasonGlobalMaxWeight}
	}
	if len(p.TagMaxWeights) != 0 {
		if l, ok := p.TagMaxWeights[tag]; ok {
			return tagLimit{policy: p, limit: l, reason: ReasonTagMaxWeight}
		}
	}
	return tagLimit{policy: p, limit: p.GlobalMaxWeight, reason: ReasonGlobalMaxWeight}
}

// decide holds a normalised weight against the limit.
func (l *tagLimit) decide(weight float64) GateResult {
	if weight <= l.limit {
		return GateResult{Allowed: true, Reason: ReasonAllowed, Limit: l.limit}
	}
	return GateResult{Allowed: false, Reason: l.reason, Limit: l.limit}
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
	return &q
}

// policyJSON is the wire form of a Policy; weights stay raw so that every
// accepted form can be parsed and every other one refused.
type policyJSON struct {
	Version         json.RawMessage            `json:"version"`
	GlobalMaxWeight json.RawMessage            `json:"globalMaxWeight"`
	TagMaxWeights   map[string]json.RawMessage `json:"tagMaxWeights"`
}

// MarshalJSON encodes p in the wire form of SPEC §4, with an infinite
// weight as the string "Infinity".
func (p *Policy) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(`{"version":`)
	b.WriteString(strconv.FormatInt(p.Version, 10))
	b.WriteString(`,"globalMaxWeight":`)
	if err := appendWeight(&b, p.GlobalMaxWeight); err != nil {
		return nil, err
	}
	b.WriteString(`,"tagMaxWeights":{`)
	first := true
	for _, tag := range slices.Sorted(maps.Keys(p.TagMaxWeights)) {
		if !first {
			b.WriteByte(',')
		}
		first = false
		k, _ := json.Marshal(tag)
		b.Write(k)
		b.WriteByte(':')
		if err := appendWeight(&b, p.TagMaxWeights[tag]); err != nil {
			return nil, err
		}
	}
	b.WriteString("}}")
	return b.Bytes(), nil
}

func appendWeight(b *bytes.Buffer, w float64) error {
	switch {
	case math.IsInf(w, 1):
		b.WriteString(`"Infinity"`)
	case math.IsNaN(w) || w < 0:
		return fmt.Errorf("%w: weight %v is not a number >= 0", ErrBadPolicy, w)
	default:
		b.WriteString(strconv.FormatFloat(w, 'g', -1, 64))
	}
	return nil
}

// UnmarshalJSON decodes the wire form of SPEC §4, accepting every form of
// Infinity it lists. It refuses the whole policy (an error wrapping
// ErrBadPolicy, p unchanged) for a negative or non-numeric weight, a missing
// or invalid version, more than MaxPolicyTags tags, or a tag name longer
// than MaxTagNameBytes.
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
	if len(raw.TagMaxWeights) > MaxPolicyTags {
		return nil, fmt.Errorf("%w: %d tags, more than %d", ErrBadPolicy, len(raw.TagMaxWeights), MaxPolicyTags)
	}
	if len(raw.TagMaxWeights) > 0 {
		p.TagMaxWeights = make(map[string]float64, len(raw.TagMaxWeights))
	}
	for tag, w := range raw.TagMaxWeights {
		if len(tag) > MaxTagNameBytes {
			return nil, fmt.Errorf("%w: a tag name of %d bytes, more than %d", ErrBadPolicy, len(tag), MaxTagNameBytes)
		}
		if p.TagMaxWeights[tag], err = parseWeight(w); err != nil {
			return nil, fmt.Errorf("%w (tag %q)", err, tag)
		}
	}
	return p, nil
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
		return 0, fmt.Errorf("%w: weight %q is not a number or Infinity", ErrBadPolicy, s)
	case len(raw) > 0 && (raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9'):
		// encoding/json has already checked that raw is a JSON number.
		w, err := strconv.ParseFloat(string(raw), 64)
		if err != nil && !math.IsInf(w, 1) {
			return 0, fmt.Errorf("%w: weight %s is out of range", ErrBadPolicy, raw)
		}
		if raw[0] == '-' && strings.Trim(string(raw), "-0.eE+") != "" {
			// Negative, including one too small to be told from -0.
			return 0, fmt.Errorf("%w: weight %s is negative", ErrBadPolicy, raw)
		}
		return math.Abs(w), nil // -0 becomes 0
	}
	return 0, fmt.Errorf("%w: weight %s is not a number or Infinity", ErrBadPolicy, raw)
}
