package waitstate

import (
	"math"
	"testing"

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
