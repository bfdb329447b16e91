package wire

import (
	"math"
	"math/bits"
	"strconv"
)

// HistogramScheme names the bucket scheme of every histogram sent:
// latency in whole microseconds us; for us < 8 the bucket is us; otherwise,
// with e = floor(log2(us)), it is (e-2)*8 + ((us >> (e-3)) & 7). Eight
// buckets per power of two: a bucket's midpoint is within 6.25 % of every
// value in it. Control planes merge histograms of the same scheme exactly.
const HistogramScheme = "loglinear-us-8"

// Histogram is a window's latency distribution, sparse: Counts maps a
// bucket index, as a decimal string, to its count.
type Histogram struct {
	Scheme string            `json:"scheme"`
	Counts map[string]uint64 `json:"counts"`
}

// HistBuckets is one more than the largest bucket index: that of 2^64-1 µs.
const HistBuckets = (63-2)*8 + 8

// HistIndex is the bucket of a latency of us microseconds.
func HistIndex(us uint64) int {
	if us < 8 {
		return int(us)
	}
	e := bits.Len64(us) - 1
	return (e-2)*8 + int((us>>(e-3))&7)
}

// HistLower is the smallest latency, in microseconds, of bucket i; bucket i
// holds [HistLower(i), HistLower(i+1)).
func HistLower(i int) uint64 {
	if i < 8 {
		return uint64(i)
	}
	e := i/8 + 2
	return uint64(8+i%8) << (e - 3)
}

// HistMid is the midpoint of bucket i, in microseconds.
func HistMid(i int) float64 {
	lo := HistLower(i)
	if i < 16 {
		return float64(lo) // buckets of a single microsecond
	}
	return (float64(lo) + float64(HistLower(i+1)-1)) / 2
}

// BucketKey is the JSON key of bucket i.
func BucketKey(i int) string { return strconv.Itoa(i) }

// HistQuantile reads the q-quantile off a histogram, in ms: the midpoint of
// the bucket that holds the ⌈q·n⌉-th request, within 6.25 % of the pooled
// requests' own quantile. NaN when it is empty.
func HistQuantile(h *[HistBuckets]uint64, q float64) float64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	if n == 0 {
		return math.NaN()
	}
	rank := max(uint64(math.Ceil(q*float64(n))), 1)
	var seen uint64
	for i, c := range h {
		if seen += c; seen >= rank {
			return HistMid(i) / 1000
		}
	}
	return math.NaN() // unreachable: rank <= n
}
