package waitstate

import (
	"math"
	"strings"
	"sync/atomic"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Limits of custom metrics.
const (
	// MaxMetricsPerTag is how many distinct metric names one tag (or the
	// site) records in one window; samples of further names are dropped.
	MaxMetricsPerTag = 8

	// MaxMetricNameBytes bounds a metric name.
	MaxMetricNameBytes = 64
)

// The bounds above are the wire's: a mismatch does not compile.
var (
	_ [MaxMetricNameBytes - wire.MaxMetricNameBytes]struct{}
	_ [wire.MaxMetricNameBytes - MaxMetricNameBytes]struct{}
)

// metricSet is one tag's custom metrics in one window: up to
// MaxMetricsPerTag names, each settled by the compare-and-swap that puts it
// in its slot; slots are written once, like the tag table's.
type metricSet struct {
	slots [MaxMetricsPerTag]atomic.Pointer[metricAgg]
}

// metricAgg aggregates one metric's samples. Floats are stored as their
// bits so that they can be updated with compare-and-swap.
type metricAgg struct {
	name  string
	count atomic.Uint64
	sum   atomic.Uint64
	min   atomic.Uint64
	max   atomic.Uint64
}

// metricsOf returns t's metric set, allocating it on the tag's first sample
// in the window.
func (t *tagCounter) metricsOf() *metricSet { return loadOrNew(&t.metrics) }

// record adds one sample of metric name; it reports false when the set
// already holds MaxMetricsPerTag other names and the sample was dropped.
func (m *metricSet) record(name string, v float64) bool {
	var fresh *metricAgg
	for i := range m.slots {
		a := m.slots[i].Load()
		if a == nil {
			if fresh == nil {
				fresh = &metricAgg{name: strings.Clone(name)} // a name of the caller's may share a large buffer
				fresh.min.Store(math.Float64bits(math.Inf(1)))
				fresh.max.Store(math.Float64bits(math.Inf(-1)))
			}
			if m.slots[i].CompareAndSwap(nil, fresh) {
				a = fresh
			} else {
				a = m.slots[i].Load()
			}
		}
		if a.name == name {
			a.add(v)
			return true
		}
	}
	return false
}

func (a *metricAgg) add(v float64) {
	a.count.Add(1)
	for {
		old := a.sum.Load()
		if a.sum.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			break
		}
	}
	for {
		old := a.min.Load()
		if v >= math.Float64frombits(old) || a.min.CompareAndSwap(old, math.Float64bits(v)) {
			break
		}
	}
	for {
		old := a.max.Load()
		if v <= math.Float64frombits(old) || a.max.CompareAndSwap(old, math.Float64bits(v)) {
			break
		}
	}
}

// wire returns the pulse's metrics object, or nil when m is.
func (m *metricSet) wire() map[string]wire.Metric {
	if m == nil {
		return nil
	}
	out := map[string]wire.Metric{}
	for i := range m.slots {
		a := m.slots[i].Load()
		if a == nil {
			break
		}
		out[a.name] = wire.Metric{
			Count: a.count.Load(),
			// Finite samples can still add up past the float range; JSON
			// has no infinity, so the sum saturates.
			Sum: max(-math.MaxFloat64, min(math.MaxFloat64, math.Float64frombits(a.sum.Load()))),
			Min: math.Float64frombits(a.min.Load()),
			Max: math.Float64frombits(a.max.Load()),
		}
	}
	return out
}
