package waitstate

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// wideTag is the i-th of a window's tags at the size limit, every byte a
// control character that JSON spells in six.
func wideTag(i int) string {
	return fmt.Sprintf("%04d", i) + strings.Repeat("\x01", MaxTagNameBytes-4)
}

// TestPulseAlwaysFits: a window at every per-window limit — MaxWindowTags
// tags of MaxTagNameBytes bytes that JSON escapes, each with health over a
// wide latency spread and MaxMetricsPerTag metrics — encodes to far more
// than the control plane accepts. The pulse sheds detail instead of being
// refused, and the control plane counts every call.
func TestPulseAlwaysFits(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour // one window: the final pulse
	c, logs := startClient(t, opts)
	waitReady(t, c)

	var calls, denied uint64
	for i := range MaxWindowTags {
		tag := wideTag(i)
		for k := range i%5 + 1 {
			if !c.Gate(tag, float64(1+4*k)).Allowed { // weight 9 and up is denied
				denied++
			}
			calls++
		}
		for k := range 24 { // 24 buckets from 1 µs to about 8 s
			c.ObserveTag(tag, time.Duration(1)<<k*time.Microsecond, k%3 == 0)
		}
		for m := range MaxMetricsPerTag {
			c.Record(tag, fmt.Sprintf("metric_%d_%s", m, strings.Repeat("x", MaxMetricNameBytes-9)), float64(i))
		}
	}
	require.Positive(t, denied)
	names := MaxWindowTags * len(marshalPulse(wideTag(0)))
	t.Logf("the tag names alone: %d bytes (the limit: %d)", names, wire.MaxBody)
	require.Greater(t, names, wire.MaxBody, "the test window must not fit as it is")

	finalPulse(t, cp, c)
	s := c.Stats()
	assert.Zero(t, s.PulsesDropped, "the pulse was not refused")
	assert.EqualValues(t, 1, s.PulsesTrimmed)
	totals := cp.Totals("")
	assert.Equal(t, calls-denied, totals.Usage, "every allowed call counted")
	assert.Equal(t, denied, totals.Bounced, "every denied call counted")
	assert.Contains(t, logs.String(), "shed detail to fit")
}

// TestEncodePulseSheds: each step of shedding is taken only when the one
// before was not enough, tags with the fewest calls fold first, and the
// calls of the pulse and of each tag (folded ones under OtherTag) add up
// as before.
func TestEncodePulseSheds(t *testing.T) {
	build := func() *pulseJSON {
		b := &pulseJSON{InstanceID: "i", Tags: map[string]tagCount{}}
		for i := range 200 {
			tc := tagCount{Usage: uint64(i + 1), Bounced: uint64(i % 3)}
			tc.Health = &wire.Health{Requests: 10, Histogram: &wire.Histogram{Scheme: wire.HistogramScheme, Counts: map[string]uint64{}}}
			for k := range 40 {
				tc.Health.Histogram.Counts[wire.BucketKey(k*8)] = 1
			}
			tc.Metrics = map[string]wire.Metric{"queue_depth_with_a_long_name": {Count: 1, Sum: 1, Min: 1, Max: 1}}
			b.Tags[wideTag(i)] = tc
			b.UsageDelta += tc.Usage
			b.BouncedDelta += tc.Bounced
		}
		b.Tags[OtherTag] = tagCount{Usage: 7}
		b.UsageDelta += 7
		return b
	}
	full := len(marshalPulse(build()))
	noHist := build()
	for tag, tc := range noHist.Tags {
		if tc.Health != nil {
			tc.Health.Histogram = nil
			noHist.Tags[tag] = tc
		}
	}
	noMetrics := len(marshalPulse(func() *pulseJSON {
		for tag, tc := range noHist.Tags {
			tc.Metrics = nil
			noHist.Tags[tag] = tc
		}
		noHist.Trimmed = &wire.Trimmed{Histograms: 200, Metrics: 200}
		return noHist
	}()))

	b := build()
	assert.Equal(t, marshalPulse(b), encodePulse(b, full), "a pulse that fits is sent whole")
	assert.Nil(t, b.Trimmed)

	b = build()
	data := encodePulse(b, full-1)
	assert.LessOrEqual(t, len(data), full-1)
	assert.Equal(t, &wire.Trimmed{Histograms: 200}, b.Trimmed, "histograms alone were enough")
	assert.NotNil(t, b.Tags[wideTag(5)].Metrics)

	b = build()
	data = encodePulse(b, noMetrics)
	assert.LessOrEqual(t, len(data), noMetrics)
	assert.Equal(t, &wire.Trimmed{Histograms: 200, Metrics: 200}, b.Trimmed)
	assert.Len(t, b.Tags, 201)

	for _, limit := range []int{noMetrics - 1, noMetrics / 2, 1000} {
		b = build()
		data = encodePulse(b, limit)
		assert.LessOrEqual(t, len(data), limit)
		var got pulseJSON
		require.NoError(t, json.Unmarshal(data, &got))
		folded := int(got.Trimmed.Tags)
		require.Positive(t, folded)
		assert.Len(t, got.Tags, 201-folded)
		var usage, bounced uint64
		for tag, tc := range got.Tags {
			usage += tc.Usage
			bounced += tc.Bounced
			if tag != OtherTag {
				assert.GreaterOrEqual(t, tc.Usage, uint64(folded), "the tags with the fewest calls fold first: %q", tag[:4])
			}
		}
		assert.Equal(t, got.UsageDelta, usage, "no call is lost at limit %d", limit)
		assert.Equal(t, got.BouncedDelta, bounced)
	}
}

// TestPulseWorstCaseFits: with every tag folded, what is left of a pulse
// at every other limit — the IDs, a full site histogram, the site's
// metrics, MaxRules fired rule names, all spelled as long as JSON can —
// still fits, so shedding always ends with a pulse the control plane
// accepts.
func TestPulseWorstCaseFits(t *testing.T) {
	ctl := strings.Repeat("\x01", wire.MaxIDBytes)
	b := &pulseJSON{InstanceID: ctl, SiteID: ctl, Incarnation: strings.Repeat("f", 32), SDK: UserAgent,
		Seq: math.MaxUint64, WindowEndMs: math.MinInt64, WindowMs: math.MinInt64, Mode: "fail_open", PolicyVersion: math.MinInt64,
		Shadow: true, Restored: true, UsageDelta: math.MaxUint64, BouncedDelta: math.MaxUint64, UsageTotal: math.MaxUint64, BouncedTotal: math.MaxUint64,
		Tags: map[string]tagCount{}, Metrics: map[string]wire.Metric{}}
	for i := range reflex.MaxRules {
		b.LocalRules = append(b.LocalRules, fmt.Sprintf("%03d", i)+strings.Repeat("\x01", reflex.MaxNameBytes-3))
	}
	b.Health = &wire.Health{Requests: math.MaxUint64, Errors: math.MaxUint64, LatencyMs: wire.Latency{P50: -math.MaxFloat64, P95: -math.MaxFloat64, P99: -math.MaxFloat64, Max: -math.MaxFloat64},
		Histogram: &wire.Histogram{Scheme: wire.HistogramScheme, Counts: map[string]uint64{}}}
	for i := range wire.HistBuckets {
		b.Health.Histogram.Counts[wire.BucketKey(i)] = math.MaxUint64
	}
	for m := range MaxMetricsPerTag {
		b.Metrics[fmt.Sprintf("%d%s", m, strings.Repeat("_", MaxMetricNameBytes-1))] = wire.Metric{Count: math.MaxUint64, Sum: -math.MaxFloat64, Min: -math.MaxFloat64, Max: -math.MaxFloat64}
	}
	for i := range MaxWindowTags {
		b.Tags[wideTag(i)] = tagCount{Usage: math.MaxUint64 / MaxWindowTags, Bounced: math.MaxUint64 / MaxWindowTags}
	}
	data := encodePulse(b, maxPulseBytes)
	t.Logf("%d bytes, %d tags folded", len(data), b.Trimmed.Tags)
	assert.LessOrEqual(t, len(data), maxPulseBytes)

	b.Tags = map[string]tagCount{OtherTag: {Usage: math.MaxUint64, Bounced: math.MaxUint64}}
	b.Trimmed = &wire.Trimmed{Histograms: math.MaxUint64, Metrics: math.MaxUint64, Tags: math.MaxUint64}
	rest := len(marshalPulse(b))
	t.Logf("every tag folded: %d bytes", rest)
	assert.Less(t, rest, maxPulseBytes*3/4, "room to spare")
}

// TestWindowMsRoundsUp: a pulse's windowMs is its window rounded up to the
// millisecond, so a window shorter than one (a Close right after a cut)
// still reports a duration. Before, it said 0.
func TestWindowMsRoundsUp(t *testing.T) {
	var clk fakeClock
	c := idleClient(t, clk.read, DefaultPolicy())
	for _, tt := range []struct {
		window time.Duration
		want   int64
	}{{300 * time.Microsecond, 1}, {time.Millisecond, 1}, {1200 * time.Microsecond, 2}, {0, 0}, {20 * time.Second, 20_000}} {
		clk.advance(tt.window)
		assert.Equal(t, tt.want, cutPulse(t, c, false).WindowMs, "a window of %v", tt.window)
	}
}
