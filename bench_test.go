package waitstate

import (
	"fmt"
	"math"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// benchTags are the tags of the Gate benchmarks: one with its own limit,
// one unlimited, two under the global limit.
var benchTags = [4]string{"free", "pro", "enterprise", "batch"}

var benchPolicy = &Policy{
	Version:         1,
	GlobalMaxWeight: 10,
	TagMaxWeights:   map[string]float64{"free": 1, "enterprise": math.Inf(1)},
}

// benchClient is an enforcing client whose window has seen the benchmark's
// tags, as it has after the first calls of a window.
func benchClient(b *testing.B) *Client {
	c := idleClient(b, nil, benchPolicy)
	for _, tag := range benchTags {
		c.Gate(tag, 1)
	}
	return c
}

func BenchmarkGate(b *testing.B) {
	c := benchClient(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Gate(benchTags[i&3], 2)
		i++
	}
}

func BenchmarkGateParallel(b *testing.B) {
	c := benchClient(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			c.Gate(benchTags[i&3], 2)
			i++
		}
	})
}

func BenchmarkPolicyGate(b *testing.B) {
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		benchPolicy.Gate(benchTags[i&3], 2)
		i++
	}
}

// The peer: what a user would otherwise put in front of expensive work, a
// token bucket that never limits.
func BenchmarkRateAllow(b *testing.B) {
	l := rate.NewLimiter(rate.Inf, 1)
	b.ReportAllocs()
	for b.Loop() {
		l.Allow()
	}
}

func BenchmarkRateAllowParallel(b *testing.B) {
	l := rate.NewLimiter(rate.Inf, 1)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Allow()
		}
	})
}

// BenchmarkGateShed gates a tag throttled to 50 %: every other call is
// shed.
func BenchmarkGateShed(b *testing.B) {
	c := idleClient(b, nil, &Policy{Version: 1, GlobalMaxWeight: 10, TagShedPercents: map[string]float64{"pro": 50}})
	c.Gate("pro", 1)
	b.ReportAllocs()
	for b.Loop() {
		c.Gate("pro", 2)
	}
}

// floodTags are distinct tags, none of them in a full window.
var floodTags = func() []string {
	tags := make([]string, 1<<14)
	for i := range tags {
		tags[i] = fmt.Sprintf("tenant-%08d", i)
	}
	return tags
}()

// BenchmarkGateTagFlood gates a new tag on every call once the window is
// full: each is counted under OtherTag after a bounded probe.
func BenchmarkGateTagFlood(b *testing.B) {
	c := benchClient(b)
	for i := range MaxWindowTags {
		c.Gate(fmt.Sprint("resident-", i), 1)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Gate(floodTags[i&(len(floodTags)-1)], 2)
		i++
	}
}

// benchLatencies are the latencies the health benchmarks record, spread
// over several buckets.
var benchLatencies = [8]time.Duration{900 * time.Microsecond, 2 * time.Millisecond, 3 * time.Millisecond, 5 * time.Millisecond,
	8 * time.Millisecond, 13 * time.Millisecond, 21 * time.Millisecond, 340 * time.Millisecond}

func BenchmarkObserveTag(b *testing.B) {
	c := benchClient(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.ObserveTag(benchTags[i&3], benchLatencies[i&7], i&15 == 0)
		i++
	}
}

func BenchmarkObserveTagParallel(b *testing.B) {
	c := benchClient(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			c.ObserveTag(benchTags[i&3], benchLatencies[i&7], i&15 == 0)
			i++
		}
	})
}

func BenchmarkRecord(b *testing.B) {
	c := benchClient(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Record(benchTags[i&3], "queue_depth", float64(i&31))
		i++
	}
}
