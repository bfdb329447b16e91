package main

import (
	"os"
	"time"

	"github.com/waitstate/waitstate-go/internal/chart"
)

// recording is what -svg draws: one frame a second of the fleet's
// decisions per tag and enterprise's p95, and spans of time (bands) for
// the states the story goes through.
type recording struct {
	frames []frame
	bands  []chart.Band
	open   map[string]time.Time // bands begun, by label
	order  []string             // their labels, in the order they began
}

// frame is one second of the run.
type frame struct {
	at     time.Time
	counts map[string]counts // per tag, fleet sums
	p95    float64           // enterprise's, in ms, as its callers saw it; NaN without calls
}

// The bands, in the order of the legend, and their colours.
const (
	bandDown     = "control plane down"
	bandFired    = "rules fired by the control plane"
	bandSafe     = "safe mode"
	bandLocal    = "rules in force locally"
	bandRestored = "instance 3 restored"
)

var bandColors = map[string]string{bandDown: "#7f7f7f", bandFired: "#d62728", bandSafe: "#ff7f0e", bandLocal: "#9467bd", bandRestored: "#2ca02c"}

func newRecording() *recording { return &recording{open: map[string]time.Time{}} }

// mark begins or ends the band label at now; a call that changes nothing
// does nothing.
func (r *recording) mark(label string, on bool, now time.Time) {
	if r == nil {
		return
	}
	from, open := r.open[label]
	switch {
	case on && !open:
		r.open[label] = now
		r.order = append(r.order, label)
	case !on && open:
		r.bands = append(r.bands, chart.Band{Label: label, From: from, To: now, Color: bandColors[label]})
		delete(r.open, label)
	}
}

// frame records one second.
func (r *recording) frame(now time.Time, second map[string]*counts, p95 float64) {
	if r == nil {
		return
	}
	f := frame{at: now, counts: map[string]counts{}, p95: p95}
	for tag, c := range second {
		f.counts[tag] = *c
	}
	r.frames = append(r.frames, f)
}

// write draws the run from start to now into path.
func (r *recording) write(path string, start, now time.Time) error {
	for _, label := range r.order {
		r.mark(label, false, now)
	}
	admitted := chart.Panel{Title: "calls a second, summed over the fleet: admitted (solid), denied (dashed)"}
	for i, tt := range tags {
		color := chart.Palette[i%len(chart.Palette)]
		ok := chart.Series{Name: tt.name, Color: color}
		denied := chart.Series{Name: tt.name + " denied", Color: color, Dashed: true}
		for _, f := range r.frames {
			c := f.counts[tt.name]
			ok.Points = append(ok.Points, chart.Point{T: f.at, V: float64(c.allowed)})
			denied.Points = append(denied.Points, chart.Point{T: f.at, V: float64(c.denied)})
		}
		admitted.Series = append(admitted.Series, ok, denied)
	}
	p95 := chart.Series{Name: "enterprise p95", Color: chart.Palette[2]}
	for _, f := range r.frames {
		p95.Points = append(p95.Points, chart.Point{T: f.at, V: f.p95})
	}
	latency := chart.Panel{Title: "enterprise p95 latency, ms, as its callers saw it", Series: []chart.Series{p95},
		Lines: []chart.Line{{Label: "the rules' threshold: 300 ms", V: 300}}}
	c := &chart.Chart{Title: "go run ./examples/quickstart: a spike, the rules, an outage with local rules and a restart, recovery",
		From: start, To: now, Panels: []chart.Panel{admitted, latency}, Bands: r.bands, Width: 1000}
	return os.WriteFile(path, c.SVG(), 0o644)
}
