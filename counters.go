package waitstate

import (
	"math"
	"math/bits"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Per-window tag tracking (SPEC §3).
const (
	// MaxWindowTags is how many distinct tags one window tracks; further
	// tags are counted under OtherTag.
	MaxWindowTags = 1024

	// OtherTag is the reserved tag under which a window counts the tags
	// beyond its first MaxWindowTags.
	OtherTag = "_other"
)

// tableSize is the tag table's slot count: a power of two, twice
// MaxWindowTags, so that a probe always finds an empty slot and stays short.
const tableSize = 2 * MaxWindowTags

// sealBit marks a counter whose window has been cut. A Gate whose atomic add
// returns a value with this bit set knows its add was not counted, and
// counts again in the window that replaced it: that is what makes counting
// exactly-once without a lock on the hot path.
const sealBit = 1 << 63

// tagCounter counts the calls of one tag in one window, and caches the
// tag's limit under a policy so that Gate resolves tag → (limit, counter)
// with a single lookup.
type tagCounter struct {
	// Read by every Gate of the tag: kept off the written cache line.
	tag      string
	overflow bool                     // a marker: the tag came after the window was full
	lim      atomic.Pointer[tagLimit] // nil for OtherTag, whose tags vary
	lim0     tagLimit                 // the first lim, allocated with the counter
	_        [16]byte

	// Written by every Gate of the tag: striped, so that Gates running on
	// different cores seldom write the same cache line.
	stripes [counterStripes]stripe
}

// counterStripes is how many cache lines a tag's counts are spread over.
const counterStripes = 8 // 1 << 3, as stripeHint assumes

type stripe struct {
	usage   atomic.Uint64
	bounced atomic.Uint64
	_       [48]byte
}

// stripeHint picks a stripe for the calling goroutine from the address of
// its stack: goroutines have different stacks, so concurrent Gates of one
// tag mostly write different cache lines, at the cost of a shift and a
// mask. It is only a hint: any stripe counts correctly.
//
//go:nosplit
func stripeHint() uintptr {
	var b byte
	// Fibonacci hashing of the address above the frame offset: stacks of
	// any size and alignment spread over all stripes.
	return uintptr(uint64(uintptr(unsafe.Pointer(&b))>>10) * 0x9E3779B97F4A7C15 >> (64 - 3))
}

// tagLimit is a tag's limit under one policy.
type tagLimit struct {
	policy *Policy
	limit  float64
	reason Reason // the denial reason: ReasonTagMaxWeight or ReasonGlobalMaxWeight
}

// add counts one call. It reports false when the window had already been
// cut, in which case nothing was counted here.
func (t *tagCounter) add(allowed bool) bool {
	s := &t.stripes[stripeHint()]
	var n uint64
	if allowed {
		n = s.usage.Add(1)
	} else {
		n = s.bounced.Add(1)
	}
	return n&sealBit == 0
}

// seal freezes the counter and returns its final counts.
func (t *tagCounter) seal() tagCount {
	var tc tagCount
	for i := range t.stripes {
		s := &t.stripes[i]
		tc.Usage += s.usage.Or(sealBit) &^ sealBit
		tc.Bounced += s.bounced.Or(sealBit) &^ sealBit
	}
	return tc
}

// peek returns the counts so far without freezing them.
func (t *tagCounter) peek() tagCount {
	var tc tagCount
	for i := range t.stripes {
		s := &t.stripes[i]
		tc.Usage += s.usage.Load() &^ sealBit
		tc.Bounced += s.bounced.Load() &^ sealBit
	}
	return tc
}

// tagCount is one tag's counts in a pulse.
type tagCount = wire.TagCount

// window counts Gate calls between two pulses in a lock-free open-addressing
// table: lookups and counting never allocate, and a tag is registered with
// one allocation and a compare-and-swap the first time the window sees it.
type window struct {
	seed  uint64
	slots [tableSize]atomic.Pointer[tagCounter]
	n     atomic.Int32 // registered tags, at most MaxWindowTags
	other tagCounter
	start time.Duration // client clock when the window opened
}

func newWindow(seed uint64, start time.Duration) *window {
	return &window{seed: seed, start: start, other: tagCounter{tag: OtherTag}}
}

// counter returns the counter to count tag in: its own, registered on
// first sight, or the OtherTag counter once the window tracks
// MaxWindowTags tags. It returns nil when the window has been sealed before
// the tag could be registered; the caller then counts in the next window.
// A new counter caches the tag's limit under p.
//
// Whether a tag is tracked is settled once per window by the compare-and-
// swap that puts its entry in the table, so every call of a tag in a window
// is counted in the same place, even when two goroutines race to register
// it as the window fills: the loser finds the winner's entry.
func (w *window) counter(tag string, p *Policy) *tagCounter {
	i := tagHash(w.seed, tag) & (tableSize - 1)
	var fresh *tagCounter
	for range tableSize {
		c := w.slots[i].Load()
		if c == nil {
			if fresh == nil {
				fresh = w.newCounter(tag, p)
			}
			if w.slots[i].CompareAndSwap(nil, fresh) {
				return w.resolve(fresh)
			}
			c = w.slots[i].Load() // another Gate took the slot first
		}
		if c == sealedSlot {
			return nil // the table was sealed: tag is not in it
		}
		if c.tag == tag {
			if fresh != nil && !fresh.overflow {
				w.n.Add(-1) // it registered the same tag: give back our place
			}
			return w.resolve(c)
		}
		i = (i + 1) & (tableSize - 1)
	}
	return &w.other // every slot holds another tag: none can be added
}

// newCounter makes an entry for tag: a counter when one of the window's
// MaxWindowTags places is free, else an overflow marker that sends the
// tag's calls to OtherTag.
func (w *window) newCounter(tag string, p *Policy) *tagCounter {
	c := &tagCounter{tag: strings.Clone(tag)}
	if !w.reserve() {
		c.overflow = true
		return c
	}
	c.lim0 = p.limitFor(tag)
	c.lim.Store(&c.lim0)
	return c
}

func (w *window) resolve(c *tagCounter) *tagCounter {
	if c.overflow {
		return &w.other
	}
	return c
}

// tracked reports whether a slot holds a tag's own counter: not empty, not
// sealed, not an overflow marker.
func (t *tagCounter) tracked() bool {
	return t != nil && t != sealedSlot && !t.overflow
}

// sealedSlot fills the empty slots of a sealed window, so that no tag can
// be registered in it once its counters have been read.
var sealedSlot = new(tagCounter)

// tagHash is a seeded 64-bit hash of a tag, built like wyhash from 64×64→128
// multiplications: every byte is read, and with a random seed the table's
// slots cannot be predicted from outside. It is here rather than
// hash/maphash because Gate hashes every call, and this inlines its short
// cases, which is a third of Gate's cost.
func tagHash(seed uint64, s string) uint64 {
	const (
		k0 = 0xa0761d6478bd642f
		k1 = 0xe7037ed1a0b428db
		k2 = 0x8ebc6af09c88c6e3
	)
	n := len(s)
	var a, b uint64
	switch {
	case n > 16:
		for rest := s; len(rest) > 16; rest = rest[16:] {
			seed = mix64(le64(rest)^k1, le64(rest[8:])^seed)
		}
		a, b = le64(s[n-16:]), le64(s[n-8:])
	case n >= 8:
		a, b = le64(s), le64(s[n-8:])
	case n >= 4:
		a, b = le32(s), le32(s[n-4:])
	case n > 0:
		a = uint64(s[0])<<16 | uint64(s[n>>1])<<8 | uint64(s[n-1])
	}
	return mix64(a^k1^uint64(n), mix64(b^seed, k2)^k0)
}

func mix64(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// le64 and le32 read little-endian words; the compiler turns each into a
// single load.
func le64(s string) uint64 {
	_ = s[7]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

func le32(s string) uint64 {
	_ = s[3]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24
}

// reserve takes one of the window's MaxWindowTags places.
func (w *window) reserve() bool {
	for {
		n := w.n.Load()
		if n >= MaxWindowTags {
			return false
		}
		if w.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// relimit caches every registered tag's limit under p, so that Gate keeps a
// single lookup after a policy change. Gate checks the cached policy, so a
// stale or missing entry costs a second lookup, never a wrong answer.
func (w *window) relimit(p *Policy) {
	for i := range w.slots {
		if c := w.slots[i].Load(); c.tracked() {
			l := p.limitFor(c.tag)
			c.lim.Store(&l)
		}
	}
}

// windowCounts is what a window counted.
type windowCounts struct {
	usage, bounced uint64
	tags           map[string]tagCount
}

// collect reads every counter, freezing them when seal is set (the window
// is being cut) or not (a Stats peek). Sealing also fills every empty slot,
// so a Gate that registers a tag after the sweep finds the window sealed
// and counts in the next one: no count can land where collect did not
// look. A user tag spelled like OtherTag is merged into it.
func (w *window) collect(seal bool) windowCounts {
	wc := windowCounts{tags: make(map[string]tagCount, w.n.Load()+1)}
	read := func(c *tagCounter) {
		tc := c.peek()
		if seal {
			tc = c.seal()
		}
		if tc.Usage == 0 && tc.Bounced == 0 {
			return
		}
		wc.usage += tc.Usage
		wc.bounced += tc.Bounced
		prev := wc.tags[c.tag]
		wc.tags[c.tag] = tagCount{Usage: prev.Usage + tc.Usage, Bounced: prev.Bounced + tc.Bounced}
	}
	for i := range w.slots {
		c := w.slots[i].Load()
		if c == nil && seal {
			if w.slots[i].CompareAndSwap(nil, sealedSlot) {
				continue
			}
			c = w.slots[i].Load() // a Gate registered a tag just now
		}
		if c.tracked() {
			read(c)
		}
	}
	read(&w.other)
	return wc
}

// Latency histogram: log-linear buckets, 32 per power of two of
// microseconds, so a bucket's midpoint is within 1/64 (1.6 %) of every value
// in it. Values below 32 µs have exact buckets.
const (
	histSubBits = 5
	histSub     = 1 << histSubBits
	histBuckets = (64 - histSubBits + 1) * histSub
)

// histogram is cumulative and lock-free; a window's figures are the
// difference between two snapshots, so nothing is ever reset under a writer.
type histogram struct {
	requests atomic.Uint64
	errors   atomic.Uint64
	buckets  [histBuckets]atomic.Uint64
}

func histIndex(us uint64) int {
	if us < histSub {
		return int(us)
	}
	e := bits.Len64(us) - 1 // e >= histSubBits
	sub := (us >> (e - histSubBits)) & (histSub - 1)
	return (e-histSubBits+1)<<histSubBits | int(sub)
}

// histMid is the midpoint of bucket i, in microseconds.
func histMid(i int) float64 {
	if i < histSub {
		return float64(i)
	}
	e := i>>histSubBits + histSubBits - 1
	sub := uint64(i & (histSub - 1))
	low := (histSub + sub) << (e - histSubBits)
	width := uint64(1) << (e - histSubBits)
	return float64(low) + float64(width-1)/2
}

func (h *histogram) observe(latency time.Duration, failed bool) {
	us := uint64(max(latency, 0) / time.Microsecond)
	h.buckets[histIndex(us)].Add(1)
	if failed {
		h.errors.Add(1)
	}
	h.requests.Add(1) // last, so a snapshot never has more requests than samples
}

// histSnapshot is a histogram's cumulative state at one moment.
type histSnapshot struct {
	requests, errors uint64
	buckets          [histBuckets]uint64
}

func (h *histogram) snapshot(s *histSnapshot) {
	s.requests = h.requests.Load()
	s.errors = h.errors.Load()
	for i := range h.buckets {
		s.buckets[i] = h.buckets[i].Load()
	}
}

// healthJSON is the pulse's health object.
type healthJSON = wire.Health

// healthBetween returns the health of the samples taken between prev and
// cur, or nil when there were none.
func healthBetween(prev, cur *histSnapshot) *healthJSON {
	var delta [histBuckets]uint64
	var n uint64
	top := -1
	for i := range delta {
		delta[i] = cur.buckets[i] - prev.buckets[i]
		if delta[i] != 0 {
			n += delta[i]
			top = i
		}
	}
	if n == 0 {
		return nil
	}
	quantile := func(q float64) float64 {
		rank := uint64(math.Ceil(q * float64(n)))
		var seen uint64
		for i, d := range delta {
			seen += d
			if seen >= rank {
				return histMid(i) / 1000
			}
		}
		return histMid(top) / 1000
	}
	return &healthJSON{
		Requests: cur.requests - prev.requests,
		Errors:   cur.errors - prev.errors,
		LatencyMs: wire.Latency{
			P50: quantile(0.50),
			P95: quantile(0.95),
			P99: quantile(0.99),
			Max: histMid(top) / 1000,
		},
	}
}
