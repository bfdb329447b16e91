package waitstate

import (
	"math"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Observe records one health sample of the site as a whole: how long a unit
// of work took and whether it failed. It is ObserveTag with tag "".
func (c *Client) Observe(latency time.Duration, failed bool) {
	c.ObserveTag("", latency, failed)
}

// ObserveTag records one health sample of tag's traffic: how long a unit of
// work took and whether it failed. The sample counts in the site-wide health
// and in tag's own (tag "" has none of its own), in the same window, latency
// and failure together. Health follows the window's tags: beyond its first
// MaxWindowTags, and for invalid tags, samples go to OtherTag.
//
// For a tag already seen in the window it takes no lock and allocates
// nothing. After Shutdown it records nothing.
func (c *Client) ObserveTag(tag string, latency time.Duration, failed bool) {
	v, r := c.reserve()
	if r == nil {
		return // shut down
	}
	v.win.extra(tag, v.index).healthOf().observe(latency, failed)
	if all := v.win.all.Load(); all != nil {
		all.observe(latency, failed)
	}
	r.exit()
}

// reserve takes a reservation to write one sample into the live window
// (invariant 7) and returns the view it belongs to; r is nil once the
// client is shut down. A window cut under it sends it to the next one,
// whose view is already published.
func (c *Client) reserve() (v *view, r *writerStripe) {
	for {
		v = c.view.Load()
		if v.win == nil {
			return v, nil
		}
		if r = v.win.enter(); r != nil {
			return v, r
		}
	}
}

// Timer measures one unit of work of a tag; Stop records it. It is a small
// value: keep it on the stack. The zero Timer records nothing.
type Timer struct {
	c     *Client
	tag   string
	start time.Time
}

// StartTimer starts timing a unit of work of tag's traffic.
//
//	t := client.StartTimer("search")
//	err := search(ctx, q)
//	t.Stop(err != nil)
func (c *Client) StartTimer(tag string) Timer {
	return Timer{c: c, tag: tag, start: time.Now()}
}

// Stop records the time since StartTimer as one health sample of the
// timer's tag (ObserveTag), failed as given, and returns it. A zero Timer
// records nothing and returns 0.
func (t Timer) Stop(failed bool) time.Duration {
	if t.c == nil {
		return 0
	}
	d := time.Since(t.start)
	t.c.ObserveTag(t.tag, d, failed)
	return d
}

// Record records one sample of a custom metric, a gauge such as a queue
// depth or a pool wait, for tag ("" is the site as a whole). Each window
// keeps, per tag and metric, the count, sum, minimum and maximum of the
// samples, for at most MaxMetricsPerTag names per tag. A name must be 1 to
// MaxMetricNameBytes bytes of [a-z0-9_.]. A sample with a bad name, a NaN
// or infinite value, or a name beyond the tag's MaxMetricsPerTag is dropped
// and counted in Stats().MetricsDropped.
//
// For a tag and name already seen in the window it takes no lock and
// allocates nothing. After Shutdown it records nothing.
func (c *Client) Record(tag, metric string, value float64) {
	if !wire.ValidMetricName(metric) || math.IsNaN(value) || math.IsInf(value, 0) {
		if c.view.Load().win != nil { // after Shutdown nothing is counted, drops neither
			c.metricsDropped.Add(1)
		}
		return
	}
	v, r := c.reserve()
	if r == nil {
		return // shut down
	}
	ok := v.win.extra(tag, v.index).metricsOf().record(metric, value)
	r.exit()
	if !ok {
		c.metricsDropped.Add(1)
	}
}
