package waitstate

import (
	"fmt"
	"math"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/wire"
)

func TestWindowTagCap(t *testing.T) {
	w := newWindow(42, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	for i := range MaxWindowTags + 300 {
		require.True(t, w.lookup(fmt.Sprintf("tag-%d", i), p).add(verdict(i%2 == 0)))
	}
	// A tag the window already tracks is still its own after the cap.
	require.True(t, w.lookup("tag-0", p).add(verdict(true)))
	got := w.report()
	assert.Len(t, got.tags, MaxWindowTags+1)
	assert.Equal(t, tagCount{Usage: 150, Bounced: 150}, got.tags[OtherTag])
	assert.Equal(t, tagCount{Usage: 2}, got.tags["tag-0"])
	assert.EqualValues(t, (MaxWindowTags+300)/2+1, got.usage)
	assert.EqualValues(t, (MaxWindowTags+300)/2, got.bounced)

	// Each window tracks its own first tags.
	w2 := newWindow(42, 0)
	w2.lookup("late-tag", p).add(verdict(true))
	assert.Equal(t, map[string]tagCount{"late-tag": {Usage: 1}}, w2.report().tags)
}

func TestWindowUserOtherTagIsMerged(t *testing.T) {
	w := newWindow(1, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	w.lookup(OtherTag, p).add(verdict(true))
	for i := range MaxWindowTags + 1 {
		w.lookup(fmt.Sprint(i), p).add(verdict(false))
	}
	got := w.report()
	// The user's "_other" takes none of the window's places: of the 1,025
	// other tags only the last one overflows.
	assert.Equal(t, tagCount{Usage: 1, Bounced: 1}, got.tags[OtherTag])
	assert.Len(t, got.tags, MaxWindowTags+1)
}

func TestWindowConcurrentRegistration(t *testing.T) {
	w := newWindow(7, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				w.lookup(fmt.Sprint(i), p).add(verdict(g%2 == 0))
			}
		}()
	}
	wg.Wait()
	got := w.report()
	// Eight goroutines register the same tags in the same order, so they
	// race at the cap: a duplicate insert may give its place back after
	// the window filled, and the window then tracks a tag or a few fewer.
	// Never more, and never a tag split between its counter and OtherTag.
	tracked := len(got.tags) - 1
	assert.LessOrEqual(t, tracked, MaxWindowTags)
	assert.GreaterOrEqual(t, tracked, MaxWindowTags-7)
	assert.EqualValues(t, 4*2000, got.usage)
	assert.EqualValues(t, 4*2000, got.bounced)
	for tag, tc := range got.tags {
		if tag != OtherTag {
			assert.Equal(t, tagCount{Usage: 4, Bounced: 4}, tc, tag)
		}
	}
}

// collidingTags returns n tags whose probes, under seed, all start within
// the first few slots of the table, so that together they make one run
// longer than maxProbe.
func collidingTags(seed uint64, n int) []string {
	var tags []string
	for i := 0; len(tags) < n; i++ {
		tag := fmt.Sprintf("run-%d", i)
		if tagHash(seed, tag)&(tableSize-1) < 4 {
			tags = append(tags, tag)
		}
	}
	return tags
}

func TestWindowLongRunKeepsEveryTag(t *testing.T) {
	const seed = 11
	w := newWindow(seed, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	run := collidingTags(seed, 3*maxProbe)
	for _, tag := range run {
		require.True(t, w.lookup(tag, p).add(ReasonAllowed), tag)
	}
	// Fill the window with other tags: the run's tags keep their places.
	for i := 0; w.n.Load() < MaxWindowTags; i++ {
		w.lookup(fmt.Sprintf("fill-%d", i), p).add(ReasonAllowed)
	}
	require.True(t, w.lookup("one-too-many", p).add(ReasonAllowed))
	require.True(t, w.full.Load())
	assert.Greater(t, int(w.reach.Load()), 2*maxProbe, "the run reaches past maxProbe")
	for _, tag := range run {
		c := w.lookup(tag, p)
		require.True(t, c.add(ReasonAllowed), tag)
		assert.Same(t, c, w.find(tag), tag)
		assert.NotSame(t, &w.other, c, "%s, one of the window's first tags, went to %s", tag, OtherTag)
	}
	// A new tag in the full window goes to OtherTag, even one whose probe
	// starts in the run.
	late := collidingTags(seed, 3*maxProbe+1)[3*maxProbe]
	assert.Same(t, &w.other, w.lookup(late, p))
	assert.Nil(t, w.find(late))

	got := w.report()
	assert.Len(t, got.tags, MaxWindowTags+1)
	for _, tag := range run {
		assert.Equal(t, tagCount{Usage: 2}, got.tags[tag], tag)
	}
	assert.Equal(t, tagCount{Usage: 1}, got.tags[OtherTag])
}

func TestWindowLongRunsUnderRace(t *testing.T) {
	// Eight goroutines register the same tags, half of them in the
	// opposite order, while the window fills: runs longer than maxProbe
	// form as it does. Every tag is counted in one place, its own counter
	// or OtherTag's, and the window still tracks all but a few of its
	// places' worth of tags.
	const seed, gaters, calls = 5, 8, 3
	run := collidingTags(seed, 4*maxProbe)
	tags := append([]string(nil), run...)
	for i := range MaxWindowTags {
		tags = append(tags, fmt.Sprintf("fill-%d", i))
	}
	w := newWindow(seed, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	var wg sync.WaitGroup
	for g := range gaters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range calls {
				for k := range tags {
					j := k
					if g%2 == 1 {
						j = len(tags) - 1 - k
					}
					assert.True(t, w.lookup(tags[j], p).add(ReasonAllowed))
					if k%64 == c {
						runtime.Gosched()
					}
				}
			}
		}()
	}
	wg.Wait()
	got := w.report()
	var own uint64
	for tag, tc := range got.tags {
		if tag != OtherTag {
			assert.Equal(t, tagCount{Usage: gaters * calls}, tc, tag)
			own += tc.Usage
		}
	}
	assert.Equal(t, uint64(gaters*calls*len(tags)), own+got.tags[OtherTag].Usage)
	assert.LessOrEqual(t, len(got.tags)-1, MaxWindowTags)
	assert.GreaterOrEqual(t, len(got.tags)-1, MaxWindowTags-gaters+1)
}

func TestSealedCounterRefusesAdds(t *testing.T) {
	w := newWindow(3, 0)
	c := w.lookup("a", newPolicyIndex(DefaultPolicy(), 0))
	require.True(t, c.add(verdict(true)))
	assert.Equal(t, reasonCounts{ReasonAllowed: 1}, c.seal())
	assert.False(t, c.add(verdict(true)), "an add after the seal must report that it did not count")
	assert.False(t, c.add(verdict(false)))
}

func TestSealedWindowRefusesNewTags(t *testing.T) {
	w := newWindow(3, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	w.lookup("a", p).add(verdict(true))
	w.report()
	assert.Nil(t, w.lookup("b", p), "a tag first seen after the seal must go to the next window")
	c := w.lookup("a", p)
	require.NotNil(t, c)
	assert.False(t, c.add(ReasonAllowed))
	assert.False(t, w.other.add(ReasonAllowed))
}

func TestTagHashSpreads(t *testing.T) {
	// Every byte matters, at every length the hash has a case for.
	for _, n := range []int{1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100} {
		base := make([]byte, n)
		for i := range base {
			base[i] = 'a'
		}
		h0 := tagHash(99, string(base))
		for i := range n {
			b := append([]byte(nil), base...)
			b[i] = 'b'
			assert.NotEqual(t, h0, tagHash(99, string(b)), "length %d, byte %d ignored", n, i)
		}
	}
	assert.NotEqual(t, tagHash(1, "free"), tagHash(2, "free"), "the seed matters")
	assert.NotEqual(t, tagHash(1, ""), tagHash(1, "\x00"))

	// Sequential tags fill a table's slots evenly: no slot gets more than a
	// few of 1024 tags when 2048 slots are available.
	buckets := make(map[uint64]int)
	for i := range MaxWindowTags {
		buckets[tagHash(12345, fmt.Sprintf("tenant-%04d", i))&(tableSize-1)]++
	}
	worst := 0
	for _, n := range buckets {
		worst = max(worst, n)
	}
	assert.LessOrEqual(t, worst, 8)
	assert.Greater(t, len(buckets), MaxWindowTags*3/4)
}

func TestHistogramRelativeError(t *testing.T) {
	for _, us := range []uint64{0, 1, 15, 16, 31, 32, 33, 63, 64, 100, 999, 1000, 12345, 1 << 20, 123456789, fineMaxUs} {
		i := fineIndex(us)
		require.Less(t, i, fineBuckets)
		mid := fineMid(i)
		if us == 0 {
			assert.Zero(t, mid)
			continue
		}
		rel := math.Abs(mid-float64(us)) / float64(us)
		assert.LessOrEqual(t, rel, 1.0/32, "value %d µs, bucket %d, midpoint %v", us, i, mid)
	}
	assert.Equal(t, fineBuckets-1, fineIndex(math.MaxUint64), "beyond the range: the last bucket")
	prev := -1.0
	for i := range fineBuckets {
		assert.Greater(t, fineMid(i), prev, "buckets are ordered")
		prev = fineMid(i)
		// Every fine bucket lies inside one bucket of the wire scheme, so
		// the histogram a pulse sends is exact.
		lo, hi := fineLower(i), fineLower(i+1)-1
		if i == fineBuckets-1 {
			hi = fineMaxUs
		}
		assert.Equal(t, wire.HistIndex(lo), wire.HistIndex(hi), "fine bucket %d [%d, %d] spans wire buckets", i, lo, hi)
		assert.Equal(t, i, fineIndex(lo))
		assert.Equal(t, i, fineIndex(hi))
	}
}

// sampleHealth returns the pulse health of the samples in ms.
func sampleHealth(ms []int, failedEvery int) *wire.Health {
	var h health
	for i, v := range ms {
		h.observe(time.Duration(v)*time.Millisecond, failedEvery > 0 && (i+1)%failedEvery == 0)
	}
	var s healthSum
	s.add(&h)
	return s.wire()
}

func TestHealthQuantiles(t *testing.T) {
	var empty healthSum
	assert.Nil(t, empty.wire(), "no samples, no health")
	var ms []int
	for v := 1; v <= 1000; v++ {
		ms = append(ms, v)
	}
	got := sampleHealth(ms, 100)
	require.NotNil(t, got)
	assert.EqualValues(t, 1000, got.Requests)
	assert.EqualValues(t, 10, got.Errors)
	for _, q := range []struct{ got, want float64 }{
		{got.LatencyMs.P50, 500}, {got.LatencyMs.P95, 950}, {got.LatencyMs.P99, 990}, {got.LatencyMs.Max, 1000},
	} {
		assert.InEpsilon(t, q.want, q.got, 0.05)
	}
	// The histogram sent is the wire scheme's, exactly: every sample in the
	// bucket the scheme gives its latency.
	require.NotNil(t, got.Histogram)
	assert.Equal(t, "loglinear-us-8", got.Histogram.Scheme)
	want := map[string]uint64{}
	for _, v := range ms {
		want[wire.BucketKey(wire.HistIndex(uint64(v)*1000))]++
	}
	assert.Equal(t, want, got.Histogram.Counts)
}

// verdict is a Reason for an allowed or a denied call, for tests that count
// calls without caring why.
func verdict(allowed bool) Reason {
	if allowed {
		return ReasonAllowed
	}
	return ReasonTagMaxWeight
}
