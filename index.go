package waitstate

import "math/bits"

// policyIndex answers a tag's limit under one policy without a map lookup
// for the tags the policy does not name, which is most tags counted under
// OtherTag during a flood. A Bloom filter of the named tags' hashes says
// "not named" for certain; "maybe named" falls back to the maps. It is
// built once per policy applied, never on the Gate path.
type policyIndex struct {
	policy *Policy
	global tagLimit // the answer for a tag the policy does not name
	bits   []uint64 // nil when the policy names no tag
	mask   uint64   // of a bit position
}

// filterBitsPerTag sizes the filter: with two bits set per tag the false
// positive rate is about 1.4 %.
const filterBitsPerTag = 16

func newPolicyIndex(p *Policy, seed uint64) *policyIndex {
	x := &policyIndex{policy: p, global: tagLimit{policy: p, limit: p.GlobalMaxWeight, reason: ReasonGlobalMaxWeight, shed: p.GlobalShedPercent}}
	n := len(p.TagMaxWeights) + len(p.TagShedPercents)
	if n == 0 {
		return x
	}
	size := uint64(1) << bits.Len64(uint64(max(64, n*filterBitsPerTag)-1))
	x.bits, x.mask = make([]uint64, size/64), size-1
	for _, m := range []map[string]float64{p.TagMaxWeights, p.TagShedPercents} {
		for tag := range m {
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

// limitFor is x.policy.limitFor(tag), given the tag's hash; named is false
// for a tag too long to be named in a policy (its hash is not computed).
func (x *policyIndex) limitFor(tag string, h uint64, hashed bool) tagLimit {
	if x.bits == nil || !hashed {
		return x.global
	}
	for _, b := range x.filterBits(h) {
		if x.bits[b/64]&(1<<(b%64)) == 0 {
			return x.global
		}
	}
	return x.policy.limitFor(tag)
}
