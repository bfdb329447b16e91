package waitstate

import (
	"math/bits"
	"sync/atomic"
)

// policyIndex answers a tag's limit under one policy without a map lookup
// for the tags the policy does not name, which is most tags counted under
// OtherTag during a flood. A Bloom filter of the named tags' hashes says
// "not named" for certain; "maybe named" falls back to a map. It is built
// once per policy put in force, never on the Gate path, with every limit
// in it resolved, shed percents in parts per million included.
//
// It also holds the shed sequences that outlive a window: one for each tag
// the policy gives a shed percent of its own, so that such a tag sheds
// evenly whether its window tracks it or counts it under OtherTag, and
// across windows; and one, rest, for the calls under the global percent
// that have no sequence of their own in a window (those counted under
// OtherTag, and every call after Shutdown, when there is no window).
type policyIndex struct {
	policy *Policy
	global tagLimit             // the answer for a tag the policy does not name
	named  map[string]*namedTag // nil when the policy names no tag
	bits   []uint64             // nil when the policy names no tag
	mask   uint64               // of a bit position
	rest   atomic.Uint64        // the global percent's shed sequence for calls with none of their own
}

// namedTag is a tag the policy names: its resolved limit and, when it has
// a shed percent of its own, its shed sequence (the limit's turns).
type namedTag struct {
	limit tagLimit
	turns atomic.Uint64
}

// filterBitsPerTag sizes the filter: with two bits set per tag the false
// positive rate is about 1.4 %.
const filterBitsPerTag = 16

func newPolicyIndex(p *Policy, seed uint64) *policyIndex {
	x := &policyIndex{policy: p, global: tagLimit{policy: p, limit: p.GlobalMaxWeight, reason: ReasonGlobalMaxWeight, shed: ppm(p.GlobalShedPercent)}}
	n := len(p.TagMaxWeights) + len(p.TagShedPercents)
	if n == 0 {
		return x
	}
	size := uint64(1) << bits.Len64(uint64(max(64, n*filterBitsPerTag)-1))
	x.bits, x.mask = make([]uint64, size/64), size-1
	x.named = make(map[string]*namedTag, n)
	for _, m := range []map[string]float64{p.TagMaxWeights, p.TagShedPercents} {
		for tag := range m {
			if x.named[tag] != nil {
				continue
			}
			nt := &namedTag{limit: p.limitFor(tag)}
			if _, own := p.TagShedPercents[tag]; own {
				nt.limit.turns = &nt.turns
			}
			x.named[tag] = nt
			h := tagHash(seed, tag)
			for _, b := range x.filterBits(h) {
				x.bits[b/64] |= 1 << (b % 64)
			}
		}
	}
	return x
}

// filterBits are the two filter positions of a tag hash: from its high
// bits, which the tag table's index does not use.
func (x *policyIndex) filterBits(h uint64) [2]uint64 {
	return [2]uint64{(h >> 40) & x.mask, (h >> 20) & x.mask}
}

// limitFor is tag's limit under x.policy, given hashTag's answer for it (a
// tag too long to be named in a policy is not hashed).
func (x *policyIndex) limitFor(tag string, h uint64, hashed bool) tagLimit {
	if x.bits == nil || !hashed {
		return x.global
	}
	for _, b := range x.filterBits(h) {
		if x.bits[b/64]&(1<<(b%64)) == 0 {
			return x.global
		}
	}
	if nt := x.named[tag]; nt != nil {
		return nt.limit
	}
	return x.global
}

// turnsFor is the shed sequence a call of a tag under limit l takes its
// turn from: the tag's own in the index when the policy gives it a shed
// percent; else the tag's own in the window (ctr) when the window tracks
// it, fair to each tag under the global percent; else rest.
func (x *policyIndex) turnsFor(l *tagLimit, ctr *tagCounter) *atomic.Uint64 {
	switch {
	case l.turns != nil:
		return l.turns
	case ctr != nil && ctr.own:
		return &ctr.turns
	default:
		return &x.rest
	}
}
