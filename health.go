package waitstate

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// A window's latency histograms have 16 buckets per power of two of
// microseconds, so a bucket's midpoint is within 1/32 (3.1 %) of every value
// in it: the quantiles a pulse reports are that close. Each bucket lies
// inside one bucket of the wire scheme (8 per power of two), so the
// histogram a pulse sends is exact, not re-estimated. Latencies of 2^32 µs
// (71 minutes) and more are recorded in the last bucket.
const (
	fineSubBits = 4
	fineSub     = 1 << fineSubBits
	fineMaxUs   = 1<<32 - 1
	fineBuckets = (32-fineSubBits)*fineSub + fineSub // 464
	fineWords   = (fineBuckets + 63) / 64            // of a bitmap of the buckets
)

func fineIndex(us uint64) int {
	us = min(us, fineMaxUs)
	if us < fineSub {
		return int(us)
	}
	e := bits.Len64(us) - 1 // e >= fineSubBits
	return (e-fineSubBits+1)<<fineSubBits | int((us>>(e-fineSubBits))&(fineSub-1))
}

// fineLower is the smallest latency of bucket i, in microseconds.
func fineLower(i int) uint64 {
	if i < fineSub {
		return uint64(i)
	}
	e := i>>fineSubBits + fineSubBits - 1
	return uint64(fineSub+i&(fineSub-1)) << (e - fineSubBits)
}

// fineMid is the midpoint of bucket i, in microseconds.
func fineMid(i int) float64 {
	if i < 2*fineSub {
		return float64(fineLower(i)) // buckets of a single microsecond
	}
	return (float64(fineLower(i)) + float64(fineLower(i+1)-1)) / 2
}

// health is one tag's samples in one window. Its request count is the sum
// of its buckets, so a sample is one add, plus one for an error, both under
// the sample's reservation.
//
// used marks the buckets that hold samples, so that a reader visits only
// those (a window's samples fall in a few dozen of its 464 buckets): a
// bucket's bit is set before its first add, so every bucket a reader can
// see a sample in has its bit set by then. Once set, a bit is only loaded:
// every sample reads used, and it comes first, on a cache line of its own
// (a health is allocated in a 4 KiB size class, so it starts on a line),
// where no counter's add takes the line away from the readers.
type health struct {
	used    [fineWords]atomic.Uint64
	errors  atomic.Uint64
	buckets [fineBuckets]atomic.Uint64
}

func (h *health) observe(latency time.Duration, failed bool) {
	i := fineIndex(uint64(max(latency, 0) / time.Microsecond))
	if w, bit := &h.used[i>>6], uint64(1)<<(i&63); w.Load()&bit == 0 {
		w.Or(bit)
	}
	h.buckets[i].Add(1)
	if failed {
		h.errors.Add(1)
	}
}

// addTo adds h's errors and buckets to errors and buckets, loading only
// the buckets used.
func (h *health) addTo(errors *uint64, buckets *[fineBuckets]uint64) {
	*errors += h.errors.Load()
	for w := range h.used {
		for word := h.used[w].Load(); word != 0; word &= word - 1 {
			i := w<<6 | bits.TrailingZeros64(word)
			buckets[i] += h.buckets[i].Load()
		}
	}
}

// healthOf returns t's health, allocating it on the tag's first sample in
// the window.
func (t *tagCounter) healthOf() *health { return loadOrNew(&t.health) }

// loadOrNew returns *p, first storing a new T there if it is nil; of
// writers racing to store, one wins and all return its T.
func loadOrNew[T any](p *atomic.Pointer[T]) *T {
	if v := p.Load(); v != nil {
		return v
	}
	fresh := new(T)
	if p.CompareAndSwap(nil, fresh) {
		return fresh
	}
	return p.Load()
}

// healthSum adds up histograms: the site-wide health of a window is the sum
// of its tags' and its untagged samples.
type healthSum struct {
	errors  uint64
	buckets [fineBuckets]uint64
}

func (s *healthSum) merge(o *healthSum) {
	s.errors += o.errors
	for i := range o.buckets {
		s.buckets[i] += o.buckets[i]
	}
}

func (s *healthSum) add(h *health) { h.addTo(&s.errors, &s.buckets) }

// wire returns the pulse's health object, or nil without samples.
func (s *healthSum) wire() *wire.Health {
	var n uint64
	top := -1
	counts := map[string]uint64{}
	for i, c := range s.buckets {
		if c == 0 {
			continue
		}
		n += c
		top = i
		counts[wire.BucketKey(wire.HistIndex(fineLower(i)))] += c
	}
	if n == 0 {
		return nil
	}
	quantile := func(q float64) float64 {
		rank := uint64(math.Ceil(q * float64(n)))
		var seen uint64
		for i, c := range s.buckets {
			if seen += c; seen >= rank {
				return fineMid(i) / 1000
			}
		}
		return fineMid(top) / 1000
	}
	return &wire.Health{
		Requests: n,
		Errors:   s.errors,
		LatencyMs: wire.Latency{
			P50: quantile(0.50),
			P95: quantile(0.95),
			P99: quantile(0.99),
			Max: fineMid(top) / 1000,
		},
		Histogram: &wire.Histogram{Scheme: wire.HistogramScheme, Counts: counts},
	}
}
