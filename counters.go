package waitstate

import (
	"runtime"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// tagCount is one tag's part of a pulse.
type tagCount = wire.TagCount

// Per-window tag tracking.
const (
	// MaxWindowTags is how many distinct tags one window tracks; further
	// tags are counted under OtherTag.
	MaxWindowTags = 1024

	// OtherTag is the reserved tag under which a window counts the tags
	// beyond its first MaxWindowTags, and every tag longer than
	// MaxTagNameBytes or not valid UTF-8.
	OtherTag = "_other"
)

// The tag table is open-addressed with linear probing. It has twice as many
// slots as a window tracks tags, so its counters fill at most half of it
// (overflow markers, made only while inserts race the window filling up,
// take slots beyond that). While the window has places left, a tag probes
// until it finds itself or an empty slot, so every one of a window's first
// MaxWindowTags tags gets a place however long its run. Once the window is
// full, a lookup reads at most max(maxProbe, reach) slots, reach being the
// longest probe any of the window's tags took: a flood of new tags then
// costs that many slot reads each, never a scan of the table. With a seeded
// hash, reach exceeds maxProbe in about 3 windows in 1,000 that hold 1,024
// tags.
const (
	tableSize = 2 * MaxWindowTags // a power of two
	maxProbe  = 32
)

// How a window counts without a lock. Gate, ObserveTag and Record write; the
// pulse goroutine cuts. Each line below is kept by the code named in it.
//
//  1. Slots are written once: a slot goes from nil to a tag's counter or to
//     sealedSlot by one compare-and-swap and never changes again
//     (window.lookup, window.sweep). So a tag found once is found again, at
//     the same place.
//  2. A tag's place is settled once per window, and every call of the tag
//     in the window is counted there, its own counter or OtherTag's. A tag
//     that is invalid or spelled OtherTag is never stored. A valid tag is
//     settled by the compare-and-swap that puts its entry in the table: a
//     counter holding a place, or, when the window is full while other
//     inserts are in flight, an overflow marker (window.entry). "Full" is
//     sticky and an insert counts itself in flight before it asks for a
//     place, so once the window is full and nothing is in flight the table
//     cannot gain a counter, and a tag not found in it is settled under
//     OtherTag without a marker (window.settle). Every place is taken at
//     the first empty slot of the tag's probe and slots never empty
//     (invariant 1), so a lookup that reaches an empty slot has seen every
//     entry the tag can have. A lookup stops before one only when it has
//     read every slot, or when the window is full and nothing is in flight
//     and it has read max(maxProbe, reach) slots: an insert raises reach to
//     cover its slot before the compare-and-swap that stores it and ends
//     its flight after it, so reach is final by then and no counter lies
//     beyond it (window.stopped). Two inserts of one tag that race may both
//     hold a place until the loser gives its back; if the window fills
//     meanwhile it tracks one tag fewer than MaxWindowTags.
//  3. Publish before seal: the cut publishes the view of the new window
//     before it seals anything of the old one (Client.cut). A writer that
//     finds the old window sealed reloads the view and finds the new one.
//  4. One seal per window, by the cut that replaces it; a Stats peek never
//     seals.
//  5. Counters receive adds of +1 only, and sealing sets their top bit
//     (tagCounter.seal). An add that returns a value with the bit set counted
//     nothing; the caller counts again in the window of the current view. The
//     count below the bit cannot carry into it (2^63 adds).
//  6. The sweep fills every empty slot with sealedSlot (window.sweep): a tag
//     registered after the sweep cannot be, so no count lands in a slot the
//     sweep did not read.
//  7. Health and metric samples are written under a reservation
//     (window.enter/exit): begun is incremented before the first write of the
//     sample and ended after its last. The cut seals begun and waits until
//     ended has caught up with the count begun had (window.drain) before it
//     reads any health or metric, or sweeps. A sample whose reservation is
//     refused reloads the view. So a sample lands whole in exactly one
//     window: its latency, its error and its tag together, never counted
//     twice or lost.
//  8. A sample's writes are plain adds and compare-and-swaps on memory the
//     window owns; none waits for another writer, and the cut waits only for
//     reservations already taken, which never wait themselves.
//  9. Shed turns are not sealed with the counts. A tag's sequence is the
//     policy index's own for a tag with a shed percent of its own (for the
//     policy's life), else the turns of the tag's counter, which start
//     where the tag's turns ended in the windows before (carryTurns), else
//     the index's rest (policyIndex.turnsFor). A Gate takes its turn, then
//     counts; one whose count finds the window sealed counts in the next
//     window with the decision its turn gave. So each sequence sheds
//     exactly ⌊k·p⌋ of its first k turns, but a window's count of one tag
//     can hold turns of the window before and miss turns counted in the
//     next: its sheds s among its n calls that passed the weight check
//     keep |s − n·p| < 1 + g, g being the Gates of the tag that were
//     between their turn and their count at the window's two cuts. The
//     cut reads where a window's turns ended once its report is read: a
//     turn taken in it after that, or a counter registered in the next
//     window before that, takes again a place of the sequence already
//     taken, which keeps the same bound.
const sealBit = 1 << 63

// window counts Gate calls, health samples and metric samples between two
// pulses. Lookups and counting never allocate; a tag is registered the
// first time the window sees it (its counter and a copy of its name), and
// its health and metrics are allocated on their first sample.
type window struct {
	seed  uint64
	start time.Duration // client clock when the window opened
	// all holds every health sample of the window, tagged or not, while a
	// local rule reads the whole site (see local.go); nil otherwise.
	all      atomic.Pointer[health]
	slots    [tableSize]atomic.Pointer[tagCounter]
	n        atomic.Int32 // places taken, at most MaxWindowTags
	full     atomic.Bool  // a tag was refused a place: no more are given
	inflight atomic.Int32 // inserts holding a place, not yet in a slot or given back
	reach    atomic.Int32 // the longest probe an entry took, counting its slot, once past maxProbe
	other    tagCounter   // OtherTag
	site     tagCounter   // samples with no tag of their own: Observe, Record("")
	// shedFrom is where the shed sequences of tags ended in the windows
	// before this one (carryTurns); a tag's counter starts its turns there.
	shedFrom atomic.Pointer[map[string]uint64]

	writers [writerStripes]writerStripe
}

func newWindow(seed uint64, start time.Duration) *window {
	return &window{seed: seed, start: start, other: tagCounter{tag: OtherTag}}
}

// tagCounter counts the calls of one tag in one window, caches the tag's
// limit under a policy so that Gate resolves tag → (limit, counter) with a
// single lookup, and holds the tag's health and metrics once it has some.
type tagCounter struct {
	// Read by every Gate of the tag: kept off the written cache lines.
	tag      string
	hash     uint64
	lim      atomic.Pointer[tagLimit] // nil for OtherTag, whose tags vary
	lim0     tagLimit                 // the first lim, allocated with the counter
	health   atomic.Pointer[health]
	metrics  atomic.Pointer[metricSet]
	overflow bool // a marker: the tag came when the window was full; it counts under OtherTag
	own      bool // the counter of one tag that holds a place: not OtherTag's, the site's or a marker
	_        [6]byte

	turns atomic.Uint64 // calls that passed the weight check: the shedding sequence
	_     [56]byte

	// Written by every Gate of the tag: striped, so that Gates running on
	// different cores seldom write the same cache line.
	stripes [counterStripes]stripe
}

// counterStripes is how many cache lines a tag's counts are spread over.
const counterStripes = 8 // 1 << 3, as stripeHint assumes

// stripe counts calls by the Reason Gate gave: allowed and denied, and
// why, in one cache line.
type stripe struct {
	byReason [numReasons]atomic.Uint64
	_        [64 - 8*numReasons]byte
}

// numReasons is how many Reasons there are.
const numReasons = len(reasonNames)

// reasonCounts are calls counted by Reason.
type reasonCounts [numReasons]uint64

// split returns the calls allowed and denied.
func (rc *reasonCounts) split() (usage, bounced uint64) {
	for r, n := range rc {
		if Reason(r).allows() {
			usage += n
		} else {
			bounced += n
		}
	}
	return usage, bounced
}

// addAll adds o's counts to rc.
func (rc *reasonCounts) addAll(o *reasonCounts) {
	for r, n := range o {
		rc[r] += n
	}
}

// stripeHint picks a stripe for the calling goroutine from the address of
// its stack: goroutines have different stacks, so concurrent writers mostly
// touch different cache lines, at the cost of a shift and a multiply. It is
// only a hint: any stripe counts correctly.
//
//go:nosplit
func stripeHint() uintptr {
	var b byte
	// Fibonacci hashing of the address above the frame offset: stacks of
	// any size and alignment spread over all stripes.
	return uintptr(uint64(uintptr(unsafe.Pointer(&b))>>10) * 0x9E3779B97F4A7C15 >> (64 - 3))
}

// add counts one call that Gate answered for reason. It reports false when
// the window had already been cut, in which case nothing was counted here.
func (t *tagCounter) add(reason Reason) bool {
	return t.stripes[stripeHint()].byReason[reason].Add(1)&sealBit == 0
}

// seal freezes the counter and returns its final counts.
func (t *tagCounter) seal() reasonCounts {
	var rc reasonCounts
	for i := range t.stripes {
		for r := range rc {
			rc[r] += t.stripes[i].byReason[r].Or(sealBit) &^ sealBit
		}
	}
	return rc
}

// peek returns the counts so far without freezing them.
func (t *tagCounter) peek() reasonCounts {
	var rc reasonCounts
	for i := range t.stripes {
		for r := range rc {
			rc[r] += t.stripes[i].byReason[r].Load() &^ sealBit
		}
	}
	return rc
}

// lookup returns the counter to count tag in: its own, registered on first
// sight, or OtherTag's when the tag gets no place (invariant 2). It returns
// nil when the window was swept before the tag could be registered; the
// caller then counts in the next window. A new counter caches the tag's
// limit under p.
func (w *window) lookup(tag string, x *policyIndex) *tagCounter {
	h, ok := hashTag(w.seed, tag)
	return w.lookupHashed(tag, h, ok, x)
}

// hashTag hashes a tag that can be stored; a tag longer than
// MaxTagNameBytes never is, and is not hashed (ok is false).
func hashTag(seed uint64, tag string) (h uint64, ok bool) {
	if len(tag) > MaxTagNameBytes {
		return 0, false
	}
	return tagHash(seed, tag), true
}

// lookupHashed is lookup given hashTag's answer for tag.
func (w *window) lookupHashed(tag string, h uint64, hashed bool, x *policyIndex) *tagCounter {
	if !hashed {
		return &w.other // never stored
	}
	i := h & (tableSize - 1)
	var fresh *tagCounter
	for probe := 0; probe < maxProbe || !w.stopped(probe); probe++ {
		c := w.slots[i].Load()
		if c == nil {
			if fresh == nil {
				var settled bool
				if fresh, settled = w.entry(tag, h, x); fresh == nil {
					if settled {
						return &w.other
					}
					return w.settle(tag, h, i, probe)
				}
			}
			if probe >= maxProbe {
				w.reached(probe)
			}
			if w.slots[i].CompareAndSwap(nil, fresh) {
				w.inserted(fresh)
				return w.resolve(fresh)
			}
			c = w.slots[i].Load() // another writer took the slot first
		}
		if c == sealedSlot {
			w.discard(fresh)
			return nil // swept: tag is not in this window
		}
		if c.hash == h && c.tag == tag {
			w.discard(fresh) // it registered the same tag
			return w.resolve(c)
		}
		i = (i + 1) & (tableSize - 1)
	}
	w.discard(fresh)
	return &w.other
}

// stopped reports whether a lookup that has read probe slots, none empty,
// may stop: when it has read them all, or when the window is full, no
// insert is in flight and no entry lies further along a probe than this
// (invariant 2). Only runs longer than maxProbe ask.
func (w *window) stopped(probe int) bool {
	return probe >= tableSize ||
		w.full.Load() && w.inflight.Load() == 0 && probe >= int(w.reach.Load())
}

// reached raises reach to cover an entry about to be stored at the probe-th
// slot of its probe, past maxProbe (invariant 2).
func (w *window) reached(probe int) {
	for r := w.reach.Load(); int(r) <= probe && !w.reach.CompareAndSwap(r, int32(probe+1)); {
		r = w.reach.Load()
	}
}

// find returns tag's own counter in w, or nil when w does not track it
// (not seen yet, counted under OtherTag, or never stored). It registers
// nothing: a reader off the Gate path uses it.
func (w *window) find(tag string) *tagCounter {
	h, ok := hashTag(w.seed, tag)
	if !ok {
		return nil
	}
	i := h & (tableSize - 1)
	for probe := 0; probe < maxProbe || !w.stopped(probe); probe++ {
		c := w.slots[i].Load()
		switch {
		case c == nil || c == sealedSlot:
			return nil
		case c.hash == h && c.tag == tag:
			if c.overflow {
				return nil
			}
			return c
		}
		i = (i + 1) & (tableSize - 1)
	}
	return nil
}

// entry makes the table entry for a tag not found in it. It returns a
// counter holding one of the window's places, or an overflow marker that
// settles the tag under OtherTag, or nil: settled is true when the tag can
// never be stored (invalid, or spelled OtherTag), false when the window is
// full and no insert is in flight, so settle can decide without a marker.
//
// A marker is needed only while inserts are in flight: one of them may be
// the same tag, about to take the slot this call found empty, and only a
// compare-and-swap on that slot can settle which of the two the tag is.
func (w *window) entry(tag string, h uint64, x *policyIndex) (c *tagCounter, settled bool) {
	if w.full.Load() && w.inflight.Load() == 0 {
		// The common case of a flood: nothing will be stored, so nothing
		// is written and the tag need not be checked (an invalid one is
		// not in the table for settle to find).
		return nil, false
	}
	if tag == OtherTag || !utf8.ValidString(tag) {
		return nil, true
	}
	if w.full.Load() {
		return &tagCounter{tag: strings.Clone(tag), hash: h, overflow: true}, false
	}
	w.inflight.Add(1) // before reserve: settle must see us (invariant 2)
	if w.reserve() {
		c = &tagCounter{tag: strings.Clone(tag), hash: h, own: true}
		if m := w.shedFrom.Load(); m != nil {
			c.turns.Store((*m)[tag]) // the tag's sequence goes on (invariant 9)
		}
		c.lim0 = x.limitFor(tag, h, true)
		c.lim.Store(&c.lim0)
		return c, false
	}
	w.inflight.Add(-1)
	if w.inflight.Load() == 0 {
		return nil, false
	}
	return &tagCounter{tag: strings.Clone(tag), hash: h, overflow: true}, false
}

// carryTurns tells next, the window that replaced old, where the shed
// sequences of old's tags ended, and of the tags before old that old did
// not see: at most MaxWindowTags tags, old's first, then as many of those
// old was told of as there is room for, in no particular order. Only the
// cut calls it, once old's report is read; next starts with the map old
// had, so a tag registered in next before this call starts one window
// behind.
func carryTurns(old, next *window) {
	m := make(map[string]uint64)
	for i := range old.slots {
		c := old.slots[i].Load()
		if !c.tracked() {
			continue
		}
		if n := c.turns.Load(); n > 0 {
			m[c.tag] = n
		}
	}
	if prior := old.shedFrom.Load(); prior != nil {
		for tag, n := range *prior {
			if len(m) >= MaxWindowTags {
				break
			}
			if _, ok := m[tag]; !ok {
				m[tag] = n
			}
		}
	}
	if len(m) == 0 {
		next.shedFrom.Store(nil) // nothing sheds by the global percent
		return
	}
	next.shedFrom.Store(&m)
}

// reserve takes one of the window's MaxWindowTags places; a refusal makes
// the window full for good.
func (w *window) reserve() bool {
	for !w.full.Load() {
		n := w.n.Load()
		if n >= MaxWindowTags {
			w.full.Store(true)
			return false
		}
		if w.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
	return false
}

// settle finds where a tag goes once the window is full and no insert is
// in flight: no tag can get a place any more, so the table holds all it
// will ever hold. The tag is counted where it is found, else under OtherTag.
// The probe goes on from slot i, its probe-th, found empty by lookup: the
// slots before it were taken by other tags and never change (invariant 1).
func (w *window) settle(tag string, h uint64, i uint64, probe int) *tagCounter {
	for ; probe < maxProbe || !w.stopped(probe); probe++ {
		c := w.slots[i].Load()
		switch {
		case c == nil:
			return &w.other
		case c == sealedSlot:
			return nil
		case c.hash == h && c.tag == tag:
			return w.resolve(c)
		}
		i = (i + 1) & (tableSize - 1)
	}
	return &w.other
}

// inserted ends the insert of an entry that took its slot.
func (w *window) inserted(c *tagCounter) {
	if !c.overflow {
		w.inflight.Add(-1)
	}
}

// discard ends the insert of an entry that was never stored, giving back
// its place.
func (w *window) discard(c *tagCounter) {
	if c != nil && !c.overflow {
		w.n.Add(-1)
		w.inflight.Add(-1)
	}
}

// resolve is where an entry's calls are counted.
func (w *window) resolve(c *tagCounter) *tagCounter {
	if c.overflow {
		return &w.other
	}
	return c
}

// sealedSlot fills the empty slots of a swept window, so that no tag can be
// registered in it once its counters have been read.
var sealedSlot = new(tagCounter)

// tracked reports whether a slot holds a tag's own counter: not empty, not
// sealed, not an overflow marker.
func (t *tagCounter) tracked() bool {
	return t != nil && t != sealedSlot && !t.overflow
}

// relimit caches every registered tag's limit under x's policy, so that
// Gate keeps a single lookup after a policy change. Gate checks the cached
// policy, so a stale or missing entry costs a second lookup, never a wrong
// answer.
func (w *window) relimit(x *policyIndex) {
	for i := range w.slots {
		if c := w.slots[i].Load(); c.tracked() {
			l := x.limitFor(c.tag, c.hash, true)
			c.lim.Store(&l)
		}
	}
}

// counters returns every counter of the window: its tags', OtherTag's and
// the site's. With seal set it first fills the empty slots (invariant 6).
func (w *window) counters(seal bool) []*tagCounter {
	out := make([]*tagCounter, 0, w.n.Load()+2)
	for i := range w.slots {
		c := w.slots[i].Load()
		if c == nil && seal {
			if w.slots[i].CompareAndSwap(nil, sealedSlot) {
				continue
			}
			c = w.slots[i].Load() // a Gate registered a tag just now
		}
		if c.tracked() {
			out = append(out, c)
		}
	}
	return append(out, &w.other, &w.site)
}

// writerStripes spreads the reservations of health and metric samples over
// cache lines, as counterStripes does for counts.
const writerStripes = 8

type writerStripe struct {
	begun atomic.Uint64 // reservations taken; sealBit once the window is cut
	ended atomic.Uint64 // reservations whose sample is written
	_     [48]byte
}

// enter reserves the right to write one sample into w (invariant 7). It
// returns nil when w has been cut: the caller reloads the view.
func (w *window) enter() *writerStripe {
	s := &w.writers[stripeHint()]
	if s.begun.Add(1)&sealBit != 0 {
		return nil
	}
	return s
}

// exit ends a reservation taken with enter.
func (s *writerStripe) exit() { s.ended.Add(1) }

// drain refuses new reservations and waits for those taken to end
// (invariant 7). Only the cut calls it, once per window.
func (w *window) drain() {
	for i := range w.writers {
		s := &w.writers[i]
		n := s.begun.Or(sealBit) &^ sealBit
		for spins := 0; s.ended.Load() < n; spins++ {
			// A writer holds a reservation briefly and never waits; if it
			// was descheduled inside them, let it run.
			if spins < 100 {
				runtime.Gosched()
			} else {
				time.Sleep(50 * time.Microsecond)
			}
		}
	}
}

// extra returns where a sample for tag goes: the site's own counter for tag
// "" (it has no health or metrics of its own), else the tag's counter,
// registered if new. Call it only under a reservation: the window cannot be
// swept meanwhile, so it never returns nil.
func (w *window) extra(tag string, x *policyIndex) *tagCounter {
	if tag == "" {
		return &w.site
	}
	return w.lookup(tag, x)
}

// windowCounts is what a window counted.
type windowCounts struct {
	usage, bounced uint64
	reasons        reasonCounts
	tags           map[string]tagCount
}

// peek reads every counter without freezing them, for Stats; the cut
// reads and freezes them in report. Only tags with calls are listed.
func (w *window) peek() windowCounts {
	wc := windowCounts{tags: make(map[string]tagCount, w.n.Load()+1)}
	for _, c := range w.counters(false) {
		if c == &w.site {
			continue // samples only: Gate never counts here
		}
		rc := c.peek()
		var tc tagCount
		if tc.Usage, tc.Bounced = rc.split(); tc.Usage == 0 && tc.Bounced == 0 {
			continue
		}
		wc.reasons.addAll(&rc)
		wc.usage += tc.Usage
		wc.bounced += tc.Bounced
		wc.tags[c.tag] = tc
	}
	return wc
}

// windowReport is a cut window as a pulse carries it.
type windowReport struct {
	windowCounts
	health  *wire.Health           // every sample; nil without samples
	metrics map[string]wire.Metric // the site's own; nil without samples
}

// report closes the window for good: it waits for the samples being
// written (invariant 7), sweeps and seals the counters (invariants 4–6),
// and reads every count, health and metric. Only the cut calls it, after
// publishing the next window (invariant 3).
func (w *window) report() windowReport {
	w.drain()
	r := windowReport{windowCounts: windowCounts{tags: make(map[string]tagCount, w.n.Load()+1)}}
	var site, one healthSum
	for _, c := range w.counters(true) {
		rc := c.seal()
		var tc tagCount
		tc.Usage, tc.Bounced = rc.split()
		r.reasons.addAll(&rc)
		if h := c.health.Load(); h != nil {
			one = healthSum{}
			one.add(h)
			site.merge(&one)
			if c != &w.site {
				tc.Health = one.wire()
			}
		}
		if c == &w.site {
			r.metrics = c.metrics.Load().wire()
			continue
		}
		tc.Metrics = c.metrics.Load().wire()
		if tc.Usage == 0 && tc.Bounced == 0 && tc.Health == nil && tc.Metrics == nil {
			continue
		}
		r.usage += tc.Usage
		r.bounced += tc.Bounced
		r.tags[c.tag] = tc
	}
	r.health = site.wire()
	return r
}
