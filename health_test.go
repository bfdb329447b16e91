package waitstate

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// cutPulse cuts c's window and decodes the pulse.
func cutPulse(t testing.TB, c *Client, final bool) pulseJSON {
	t.Helper()
	var p pulseJSON
	require.NoError(t, json.Unmarshal(c.cut(final).body, &p))
	return p
}

// sampleCount is what a test expects of a tag's health.
type sampleCount struct{ requests, errors uint64 }

// TestHealthExactAcrossCuts observes from 6 goroutines while windows are
// cut as fast as they can be: in every pulse errors <= requests, site-wide
// and per tag, the histogram holds every request, and over all pulses each
// sample is counted once — none lost, none doubled.
func TestHealthExactAcrossCuts(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	tags := []string{"", "free", "pro", "enterprise", "batch"}
	var stop atomic.Bool
	var wg sync.WaitGroup
	local := make([]map[string]sampleCount, 6)
	for g := range local {
		local[g] = map[string]sampleCount{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for i := 0; !stop.Load(); i++ {
				if i%32 == 0 {
					time.Sleep(20 * time.Microsecond) // leave the cutter some CPU
				}
				tag := tags[r.IntN(len(tags))]
				failed := r.IntN(3) == 0
				c.ObserveTag(tag, time.Duration(r.IntN(5000))*time.Microsecond, failed)
				sc := local[g][tag]
				sc.requests++
				if failed {
					sc.errors++
				}
				local[g][tag] = sc
			}
		}()
	}
	// Cut as fast as possible until 100 windows have carried samples: the
	// observers must run between cuts, however loaded the machine.
	var pulses []pulseJSON
	withSamples := 0
	for deadline := time.Now().Add(waitFor); withSamples < 100 && time.Now().Before(deadline); {
		p := cutPulse(t, c, false)
		if p.Health != nil {
			withSamples++
		}
		pulses = append(pulses, p)
	}
	stop.Store(true)
	wg.Wait()
	pulses = append(pulses, cutPulse(t, c, true))

	want := map[string]sampleCount{}
	var all sampleCount
	for _, m := range local {
		for tag, sc := range m {
			w := want[tag]
			want[tag] = sampleCount{w.requests + sc.requests, w.errors + sc.errors}
			all = sampleCount{all.requests + sc.requests, all.errors + sc.errors}
		}
	}
	got := map[string]sampleCount{}
	var site sampleCount
	windowsWithSamples := 0
	for i, p := range pulses {
		if p.Health == nil {
			continue
		}
		windowsWithSamples++
		h := p.Health
		require.LessOrEqual(t, h.Errors, h.Requests, "pulse %d: site-wide errors <= requests", i)
		require.Equal(t, h.Requests, histogramTotal(h.Histogram.Counts), "pulse %d: the histogram holds every request", i)
		site = sampleCount{site.requests + h.Requests, site.errors + h.Errors}
		tagged := sampleCount{}
		for tag, tc := range p.Tags {
			if tc.Health == nil {
				continue
			}
			require.LessOrEqual(t, tc.Health.Errors, tc.Health.Requests, "pulse %d, tag %q", i, tag)
			g := got[tag]
			got[tag] = sampleCount{g.requests + tc.Health.Requests, g.errors + tc.Health.Errors}
			tagged = sampleCount{tagged.requests + tc.Health.Requests, tagged.errors + tc.Health.Errors}
		}
		require.LessOrEqual(t, tagged.requests, h.Requests, "pulse %d: the site covers every tagged sample", i)
	}
	untagged := want[""]
	delete(want, "")
	assert.Equal(t, want, got, "per tag, over all pulses")
	assert.Equal(t, all, site, "site-wide, over all pulses")
	assert.Equal(t, all.requests-untagged.requests, sumRequests(got))
	assert.GreaterOrEqual(t, windowsWithSamples, 100, "the samples spanned many windows")
	t.Logf("%d samples (%d errors) over %d windows with samples", all.requests, all.errors, windowsWithSamples)
}

func histogramTotal(counts map[string]uint64) uint64 {
	var n uint64
	for _, c := range counts {
		n += c
	}
	return n
}

func sumRequests(m map[string]sampleCount) uint64 {
	var n uint64
	for _, sc := range m {
		n += sc.requests
	}
	return n
}

// TestHealthTagHasCountsOfItsOwn: a tag with samples but no Gate calls is
// in the pulse with zero counts and its health; tag "" has none of its own.
func TestHealthTagHasCountsOfItsOwn(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	c.ObserveTag("search", 20*time.Millisecond, true)
	c.ObserveTag("", 10*time.Millisecond, false)
	c.Observe(10*time.Millisecond, false)
	tm := c.StartTimer("export")
	assert.Positive(t, tm.Stop(false), "Stop returns the latency it recorded")
	assert.Zero(t, Timer{}.Stop(true), "a zero Timer records nothing")
	p := cutPulse(t, c, false)
	require.Contains(t, p.Tags, "search")
	assert.Zero(t, p.Tags["search"].Usage+p.Tags["search"].Bounced)
	assert.EqualValues(t, 1, p.Tags["search"].Health.Requests)
	assert.EqualValues(t, 1, p.Tags["search"].Health.Errors)
	assert.EqualValues(t, 1, p.Tags["export"].Health.Requests)
	assert.NotContains(t, p.Tags, "", "tag \"\" has no health of its own")
	assert.EqualValues(t, 4, p.Health.Requests)
	assert.EqualValues(t, 1, p.Health.Errors)
}

func TestRecordMetrics(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	for _, v := range []float64{2, 6, 4} {
		c.Record("free", "queue_depth", v)
	}
	c.Record("", "db.pool_wait_ms", 1.5)
	c.Record("", "db.pool_wait_ms", -0.5)
	for i := range MaxMetricsPerTag + 2 {
		c.Record("pro", fmt.Sprintf("m%d", i), float64(i))
	}
	bad := []struct {
		name  string
		value float64
	}{
		{"", 1}, {"Upper", 1}, {"a b", 1}, {"dash-ed", 1}, {strings.Repeat("x", MaxMetricNameBytes+1), 1},
		{"ok", math.NaN()}, {"ok", math.Inf(1)}, {"ok", math.Inf(-1)},
	}
	for _, b := range bad {
		c.Record("free", b.name, b.value)
	}
	c.Record("free", strings.Repeat("x", MaxMetricNameBytes), 1) // the longest name allowed
	assert.EqualValues(t, len(bad)+2, c.Stats().MetricsDropped, "bad samples and the names past the tag's limit")

	p := cutPulse(t, c, false)
	assert.Equal(t, map[string]float64{"count": 3, "sum": 12, "min": 2, "max": 6}, metricMap(p.Tags["free"].Metrics["queue_depth"]))
	assert.Len(t, p.Tags["free"].Metrics, 2)
	assert.Len(t, p.Tags["pro"].Metrics, MaxMetricsPerTag)
	assert.NotContains(t, p.Tags["pro"].Metrics, fmt.Sprintf("m%d", MaxMetricsPerTag))
	assert.Equal(t, map[string]float64{"count": 2, "sum": 1, "min": -0.5, "max": 1.5}, metricMap(p.Metrics["db.pool_wait_ms"]), "site-wide")
	assert.NotContains(t, p.Tags, "", "Record(\"\", …) is site-wide")
	assert.Nil(t, p.Health, "metrics are not health samples")

	// The next window has its own names.
	c.Record("pro", "fresh", 1)
	p = cutPulse(t, c, false)
	assert.Equal(t, 1.0, metricMap(p.Tags["pro"].Metrics["fresh"])["count"])

	// Sums past the float range saturate: a pulse still encodes.
	c.Record("free", "huge", math.MaxFloat64)
	c.Record("free", "huge", math.MaxFloat64)
	p = cutPulse(t, c, false)
	assert.Equal(t, math.MaxFloat64, p.Tags["free"].Metrics["huge"].Sum)
}

// TestRecordCopiesNames: a window keeps its own copy of a metric name, as
// of a tag, so a name the caller builds in a buffer it then reuses stays
// what it was recorded as.
func TestRecordCopiesNames(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	buf := []byte("queue_depth")
	c.Record("free", unsafe.String(&buf[0], len(buf)), 1)
	copy(buf, "xxxxx_xxxxx") // the caller reuses its buffer
	p := cutPulse(t, c, false)
	assert.Contains(t, p.Tags["free"].Metrics, "queue_depth")
	assert.NotContains(t, p.Tags["free"].Metrics, "xxxxx_xxxxx")
}

func metricMap(m interface {
}) map[string]float64 {
	b, _ := json.Marshal(m)
	var out map[string]float64
	_ = json.Unmarshal(b, &out)
	return out
}

// TestRecordExactAcrossCuts: metric samples recorded while windows are cut
// are each counted once.
func TestRecordExactAcrossCuts(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	var stop atomic.Bool
	var wg sync.WaitGroup
	var recorded [4]uint64
	for g := range recorded {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				c.Record([]string{"", "a", "b"}[recorded[g]%3], "depth", 1)
				if recorded[g]++; recorded[g]%32 == 0 {
					time.Sleep(20 * time.Microsecond)
				}
			}
		}()
	}
	var count, sum float64
	add := func(p pulseJSON) {
		for _, m := range p.Metrics {
			count += float64(m.Count)
			sum += m.Sum
		}
		for _, tc := range p.Tags {
			for _, m := range tc.Metrics {
				count += float64(m.Count)
				sum += m.Sum
			}
		}
	}
	for range 150 {
		add(cutPulse(t, c, false))
	}
	stop.Store(true)
	wg.Wait()
	add(cutPulse(t, c, true))
	total := float64(recorded[0] + recorded[1] + recorded[2] + recorded[3])
	assert.Equal(t, total, count)
	assert.Equal(t, total, sum)
	assert.Zero(t, c.Stats().MetricsDropped)
}

// TestTagHygiene: a tag over MaxTagNameBytes or not valid UTF-8 is counted
// under OtherTag, with its health and metrics, and never stored; distinct
// invalid tags do not collapse into keys of their own.
func TestTagHygiene(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5})
	long := strings.Repeat("x", MaxTagNameBytes+1)
	longest := strings.Repeat("y", MaxTagNameBytes)
	invalid := []string{"\xff", "a\xffb", "\xc3", string([]byte{0xed, 0xa0, 0x80})}
	c.Gate(long, 1)
	c.Gate(longest, 1)
	for _, tag := range invalid {
		c.Gate(tag, 1)
		c.ObserveTag(tag, time.Millisecond, true)
		c.Record(tag, "depth", 3)
	}
	c.Gate(OtherTag, 9) // a user's "_other" is the reserved tag
	c.Gate("ok-ünïcode", 1)

	w := c.view.Load().win
	for i := range w.slots {
		if e := w.slots[i].Load(); e != nil {
			assert.True(t, e.tag == longest || e.tag == "ok-ünïcode", "stored %q", e.tag)
		}
	}
	p := cutPulse(t, c, false)
	assert.Len(t, p.Tags, 3)
	other := p.Tags[OtherTag]
	assert.EqualValues(t, 1+len(invalid), other.Usage)
	assert.EqualValues(t, 1, other.Bounced)
	assert.EqualValues(t, len(invalid), other.Health.Requests)
	assert.EqualValues(t, len(invalid), other.Metrics["depth"].Count)
	assert.Contains(t, p.Tags, longest, "MaxTagNameBytes itself is allowed")
}

// TestTagHygieneBoundsMemory: a thousand 64 KiB tags, as a hostile header
// could bring, keep nothing and make a small pulse.
func TestTagHygieneBoundsMemory(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	big := make([]string, MaxWindowTags)
	for i := range big {
		big[i] = fmt.Sprintf("%06d", i) + strings.Repeat("x", 64<<10)
	}
	before := heapAfterGC()
	for _, tag := range big {
		c.Gate(tag, 1)
		c.ObserveTag(tag, time.Millisecond, false)
	}
	growth := int64(heapAfterGC()) - int64(before)
	p := c.cut(false)
	runtime.KeepAlive(big)
	assert.Less(t, growth, int64(1<<20), "the tags are not kept")
	assert.Less(t, len(p.body), 4<<10, "the pulse stays small")
}

func heapAfterGC() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestWindowMemory measures a full window: MaxWindowTags tags, each with
// health and MaxMetricsPerTag metrics.
func TestWindowMemory(t *testing.T) {
	c := idleClient(t, nil, DefaultPolicy())
	tags := make([]string, MaxWindowTags)
	names := make([]string, MaxMetricsPerTag)
	for i := range tags {
		tags[i] = fmt.Sprintf("tenant-%04d", i)
	}
	for i := range names {
		names[i] = fmt.Sprintf("metric_%d", i)
	}
	before := heapAfterGC()
	for _, tag := range tags {
		c.Gate(tag, 1)
		c.ObserveTag(tag, 3*time.Millisecond, false)
		for _, name := range names {
			c.Record(tag, name, 1)
		}
	}
	growth := heapAfterGC() - before
	t.Logf("a window of %d tags, each with health and %d metrics: %.2f MiB", MaxWindowTags, MaxMetricsPerTag, float64(growth)/(1<<20))
	assert.Less(t, growth, uint64(8<<20))
	p := cutPulse(t, c, false)
	assert.Len(t, p.Tags, MaxWindowTags)
	runtime.KeepAlive(tags)
}

// TestTagFloodProbeIsBounded: once a window is full and nothing is in
// flight, a flood of new tags stores nothing more.
func TestTagFloodProbeIsBounded(t *testing.T) {
	w := newWindow(5, 0)
	p := newPolicyIndex(DefaultPolicy(), 0)
	for i := range 4 * MaxWindowTags {
		w.lookup(fmt.Sprint("flood-", i), p).add(ReasonAllowed)
	}
	used := 0
	for i := range w.slots {
		if w.slots[i].Load() != nil {
			used++
		}
	}
	assert.Equal(t, MaxWindowTags, used, "a full window with nothing in flight stores nothing more: the table stays half empty")
	assert.Zero(t, w.inflight.Load())
	r := w.report()
	assert.EqualValues(t, 4*MaxWindowTags, r.usage)
	assert.EqualValues(t, 3*MaxWindowTags, r.tags[OtherTag].Usage)
}

// TestHealthReadsUsedBuckets: a reader that visits only the buckets marked
// used sees every sample: in every bucket, and while writers are still
// adding, never more than was added and, once they are done, exactly that.
func TestHealthReadsUsedBuckets(t *testing.T) {
	var h health
	var want [fineBuckets]uint64
	for i := range fineBuckets {
		for range i%3 + 1 {
			h.observe(time.Duration(fineLower(i))*time.Microsecond, i%2 == 0)
			want[i]++
		}
	}
	var errors uint64
	var got [fineBuckets]uint64
	h.addTo(&errors, &got)
	assert.Equal(t, want, got, "every bucket, the last word's included")

	var live health
	const writers, each = 4, 20_000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for range each {
				live.observe(time.Duration(r.IntN(1<<20))*time.Microsecond, false)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	var prev uint64
	for reading := true; reading; {
		select {
		case <-done:
			reading = false
		default:
		}
		var n uint64
		var b [fineBuckets]uint64
		live.addTo(&n, &b)
		var total uint64
		for _, c := range b {
			total += c
		}
		require.GreaterOrEqual(t, total, prev, "readings only grow")
		require.LessOrEqual(t, total, uint64(writers*each))
		prev = total
	}
	var b [fineBuckets]uint64
	var n uint64
	live.addTo(&n, &b)
	var total uint64
	for _, c := range b {
		total += c
	}
	assert.EqualValues(t, writers*each, total)
}
