package waitstate

import (
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWindowTagCap(t *testing.T) {
	w := newWindow(42, 0)
	p := DefaultPolicy()
	for i := range MaxWindowTags + 300 {
		require.True(t, w.counter(fmt.Sprintf("tag-%d", i), p).add(i%2 == 0))
	}
	// A tag the window already tracks is still its own after the cap.
	require.True(t, w.counter("tag-0", p).add(true))
	got := w.collect(true)
	assert.Len(t, got.tags, MaxWindowTags+1)
	assert.Equal(t, tagCount{Usage: 150, Bounced: 150}, got.tags[OtherTag])
	assert.Equal(t, tagCount{Usage: 2}, got.tags["tag-0"])
	assert.EqualValues(t, (MaxWindowTags+300)/2+1, got.usage)
	assert.EqualValues(t, (MaxWindowTags+300)/2, got.bounced)

	// Each window tracks its own first tags.
	w2 := newWindow(42, 0)
	w2.counter("late-tag", p).add(true)
	assert.Equal(t, map[string]tagCount{"late-tag": {Usage: 1}}, w2.collect(true).tags)
}

func TestWindowUserOtherTagIsMerged(t *testing.T) {
	w := newWindow(1, 0)
	p := DefaultPolicy()
	w.counter(OtherTag, p).add(true)
	for i := range MaxWindowTags + 1 {
		w.counter(fmt.Sprint(i), p).add(false)
	}
	got := w.collect(true)
	assert.Equal(t, tagCount{Usage: 1, Bounced: 2}, got.tags[OtherTag])
}

func TestWindowConcurrentRegistration(t *testing.T) {
	w := newWindow(7, 0)
	p := DefaultPolicy()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				w.counter(fmt.Sprint(i), p).add(g%2 == 0)
			}
		})
	}
	wg.Wait()
	got := w.collect(true)
	assert.Len(t, got.tags, MaxWindowTags+1)
	assert.EqualValues(t, 4*2000, got.usage)
	assert.EqualValues(t, 4*2000, got.bounced)
	for tag, tc := range got.tags {
		if tag != OtherTag {
			assert.Equal(t, tagCount{Usage: 4, Bounced: 4}, tc, tag)
		}
	}
}

func TestSealedCounterRefusesAdds(t *testing.T) {
	w := newWindow(3, 0)
	c := w.counter("a", DefaultPolicy())
	require.True(t, c.add(true))
	assert.Equal(t, tagCount{Usage: 1}, c.seal())
	assert.False(t, c.add(true), "an add after the seal must report that it did not count")
	assert.False(t, c.add(false))
}

func TestSealedWindowRefusesNewTags(t *testing.T) {
	w := newWindow(3, 0)
	p := DefaultPolicy()
	w.counter("a", p).add(true)
	w.collect(true)
	assert.Nil(t, w.counter("b", p), "a tag first seen after the seal must go to the next window")
	c := w.counter("a", p)
	require.NotNil(t, c)
	assert.False(t, c.add(true))
	assert.False(t, w.other.add(true))
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
	for _, us := range []uint64{0, 1, 31, 32, 33, 63, 64, 100, 999, 1000, 12345, 1 << 20, 123456789, 1 << 40, math.MaxUint64 >> 1} {
		i := histIndex(us)
		require.Less(t, i, histBuckets)
		mid := histMid(i)
		if us == 0 {
			assert.Zero(t, mid)
			continue
		}
		rel := math.Abs(mid-float64(us)) / float64(us)
		assert.LessOrEqual(t, rel, 0.05, "value %d µs, bucket %d, midpoint %v", us, i, mid)
	}
	// Buckets are ordered.
	prev := -1.0
	for i := range histBuckets {
		assert.Greater(t, histMid(i), prev)
		prev = histMid(i)
	}
}

func TestHealthQuantiles(t *testing.T) {
	var h histogram
	var prev, cur histSnapshot
	h.snapshot(&prev)
	assert.Nil(t, healthBetween(&prev, &prev), "no samples, no health")
	for ms := 1; ms <= 1000; ms++ {
		h.observe(time.Duration(ms)*time.Millisecond, ms%100 == 0)
	}
	h.snapshot(&cur)
	got := healthBetween(&prev, &cur)
	require.NotNil(t, got)
	assert.EqualValues(t, 1000, got.Requests)
	assert.EqualValues(t, 10, got.Errors)
	for _, q := range []struct{ got, want float64 }{
		{got.LatencyMs.P50, 500}, {got.LatencyMs.P95, 950}, {got.LatencyMs.P99, 990}, {got.LatencyMs.Max, 1000},
	} {
		assert.InEpsilon(t, q.want, q.got, 0.05)
	}

	// The next window sees only its own samples.
	prev = cur
	h.observe(2*time.Second, false)
	h.snapshot(&cur)
	got = healthBetween(&prev, &cur)
	assert.EqualValues(t, 1, got.Requests)
	assert.InEpsilon(t, 2000, got.LatencyMs.P50, 0.05)
	assert.InEpsilon(t, 2000, got.LatencyMs.Max, 0.05)
}
