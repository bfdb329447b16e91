package dashboard

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// fleetOf is a dashboard whose one site has heard from instances
// instances, each pulsing tags tags with latency histograms, every second
// for the five minutes the charts show, and a rule on one tag.
func fleetOf(tb testing.TB, instances, tags int) *Dashboard {
	tb.Helper()
	cp := controlplane.NewUnstarted()
	tb.Cleanup(cp.Close)
	cp.AddKey("pk", "sk_bench_secret_of_enough_length")
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 100})
	if err := cp.SetRules("", controlplane.Rule{Name: "protect", MetricTag: "tag-0", Metric: controlplane.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "tag-1", Action: controlplane.ActionBlock, CooldownSeconds: 30}); err != nil {
		tb.Fatal(err)
	}
	clock := time.Unix(1_800_000_000, 0)
	d := &Dashboard{cp: cp, now: func() time.Time { return clock }, sites: map[string]*site{}}
	p := controlplane.Pulse{}
	p.WindowMs, p.Mode, p.Tags = 1000, "enforcing", map[string]wire.TagCount{}
	for t := range tags {
		p.Tags["tag-"+strconv.Itoa(t)] = wire.TagCount{Usage: 90, Bounced: 10, Health: &wire.Health{Requests: 50,
			Histogram: &wire.Histogram{Scheme: wire.HistogramScheme, Counts: map[string]uint64{"200": 25, "230": 20, "260": 5}}}}
	}
	ids := make([]string, instances)
	for i := range ids {
		ids[i] = fmt.Sprintf("instance-%04d", i)
	}
	for range history {
		for _, id := range ids {
			p.InstanceID = id
			d.observe("", &p, nil, 0)
		}
		clock = clock.Add(time.Second)
		d.Tick()
	}
	return d
}

// BenchmarkPoll is what one poll of the page costs the control plane with
// 1,000 instances of 10 tags each: the JSON view, and the chart.
func BenchmarkPoll(b *testing.B) {
	d := fleetOf(b, 1000, 10)
	b.Run("state.json", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			data, err := json.Marshal(d.State())
			if err != nil {
				b.Fatal(err)
			}
			n = len(data)
		}
		b.ReportMetric(float64(n), "bytes/poll")
	})
	b.Run("chart.svg", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			c, _ := d.Chart("")
			svg := c.SVG()
			n = len(svg)
			_, _ = io.Discard.Write(svg)
		}
		b.ReportMetric(float64(n), "bytes/poll")
	})
}

// BenchmarkObserve is what the dashboard adds to each pulse the control
// plane counts: one pulse of 10 tags with histograms.
func BenchmarkObserve(b *testing.B) {
	d := fleetOf(b, 1000, 10)
	p := controlplane.Pulse{}
	p.InstanceID, p.WindowMs, p.Mode, p.Tags = "instance-0001", 1000, "enforcing", map[string]wire.TagCount{}
	for t := range 10 {
		p.Tags["tag-"+strconv.Itoa(t)] = wire.TagCount{Usage: 90, Bounced: 10, Health: &wire.Health{Requests: 50,
			Histogram: &wire.Histogram{Scheme: wire.HistogramScheme, Counts: map[string]uint64{"200": 25, "230": 20, "260": 5}}}}
	}
	b.ReportAllocs()
	for b.Loop() {
		d.observe("", &p, nil, 0)
	}
}

// BenchmarkTick is the once-a-second sampling of a site of 1,000
// instances and 10 tags.
func BenchmarkTick(b *testing.B) {
	d := fleetOf(b, 1000, 10)
	b.ReportAllocs()
	for b.Loop() {
		d.Tick()
	}
}
