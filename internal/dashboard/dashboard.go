// Package dashboard is the reference control plane's live page: one HTML
// page, embedded, that polls a JSON view of each site every second and
// draws the last five minutes with package chart.
//
// It reads what the control plane counts, through its Observer: each
// counted pulse of the primary key adds to the current second of its site;
// once a second the seconds are turned into samples (per-tag rates and
// p95, instances by mode). It never sees a key: the control plane hands it
// pulses and site names, and neither the page nor its JSON holds more.
//
// Its memory is bounded whatever the traffic: maxSites sites, maxTags
// tags a site (more are drawn as "_other"), maxInstances instances a site
// (silent ones forgotten after instanceTTL), history samples and
// maxEvents events a site.
package dashboard

import (
	"context"
	_ "embed"
	"encoding/json"
	"math"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/waitstate/waitstate-go/internal/chart"
	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// Bounds of what the dashboard keeps.
const (
	history      = 300 // samples a site: five minutes, one a second
	smoothMax    = 10  // seconds a rate or p95 is taken over, at most
	maxSites     = 64
	maxTags      = 32
	maxInstances = 10_000
	maxEvents    = 200
	instanceTTL  = 30 * time.Second // an instance silent this long is no longer counted
	otherTag     = "_other"
)

//go:embed index.html
var page []byte

// Dashboard observes one control plane and serves its page.
type Dashboard struct {
	cp  *controlplane.Server
	now func() time.Time

	mu    sync.Mutex
	sites map[string]*site
}

// site is what the dashboard keeps of one site.
type site struct {
	cur       second   // the second being counted
	recent    []second // the last smoothMax seconds, oldest first
	samples   []sample // the last history samples, oldest first
	tags      []string // the tags tracked, in order of arrival
	instances map[string]seen
	events    []controlplane.Event // oldest first
	interval  time.Duration        // the pulse interval the last answer set; 0: the clients' own
}

// second is what the pulses of one second brought.
type second struct {
	tags     map[string]*tagSecond
	pulses   int
	windowMs int64
}

type tagSecond struct {
	allowed, denied uint64
	hist            *[wire.HistBuckets]uint64
}

// seen is what an instance's last pulse said of it, and when that came.
type seen struct {
	mode       string
	localRules []string // the rules it holds fired itself, in safe mode
	restored   bool     // its policy came from its policy store
	at         time.Time
}

// sample is one second of the chart: per tag, calls allowed and denied a
// second and p95 in ms (NaN without samples).
type sample struct {
	At   time.Time
	Tags map[string]TagFigures
}

// TagFigures are a tag's figures over the last seconds.
type TagFigures struct {
	Tag           string  `json:"tag"`
	AllowedPerSec float64 `json:"allowedPerSec"`
	DeniedPerSec  float64 `json:"deniedPerSec"`
	P95Ms         float64 `json:"-"` // NaN without samples
}

// MarshalJSON writes P95Ms as p95Ms, null without samples.
func (f TagFigures) MarshalJSON() ([]byte, error) {
	type plain TagFigures
	var p95 *float64
	if !math.IsNaN(f.P95Ms) {
		v := math.Round(f.P95Ms*10) / 10
		p95 = &v
	}
	return json.Marshal(struct {
		plain
		P95Ms *float64 `json:"p95Ms"`
	}{plain(f), p95})
}

// New returns a dashboard of cp and sets itself as cp's observer. Run
// samples it; Handler serves the page.
func New(cp *controlplane.Server) *Dashboard {
	d := &Dashboard{cp: cp, now: time.Now, sites: map[string]*site{}}
	cp.SetObserver(d.observe)
	return d
}

// Run samples the sites once a second until ctx ends.
func (d *Dashboard) Run(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.Tick()
		}
	}
}

// observe adds a counted pulse to its site's current second.
func (d *Dashboard) observe(name string, p *controlplane.Pulse, events []controlplane.Event, pulseEvery time.Duration) {
	now := d.now()
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.sites[name]
	if st == nil {
		if len(d.sites) >= maxSites {
			return
		}
		st = &site{instances: map[string]seen{}}
		d.sites[name] = st
	}
	st.interval = pulseEvery
	st.cur.pulses++
	st.cur.windowMs += max(p.WindowMs, 0)
	if _, ok := st.instances[p.InstanceID]; ok || len(st.instances) < maxInstances {
		st.instances[p.InstanceID] = seen{mode: p.Mode, localRules: slices.Clone(p.LocalRules), restored: p.Restored, at: now}
	}
	if st.cur.tags == nil {
		st.cur.tags = map[string]*tagSecond{}
	}
	for tag, tc := range p.Tags {
		if !slices.Contains(st.tags, tag) {
			if len(st.tags) >= maxTags {
				tag = otherTag
			}
			if !slices.Contains(st.tags, tag) {
				st.tags = append(st.tags, tag)
			}
		}
		ts := st.cur.tags[tag]
		if ts == nil {
			ts = &tagSecond{}
			st.cur.tags[tag] = ts
		}
		ts.allowed += tc.Usage
		ts.denied += tc.Bounced
		controlplane.AddHistogram(&ts.hist, tc.Health)
	}
	st.events = append(st.events, events...)
	if n := len(st.events) - maxEvents; n > 0 {
		st.events = slices.Delete(st.events, 0, n)
	}
}

// Tick closes the current second of every site into a sample. Run calls
// it once a second; a test may call it itself.
func (d *Dashboard) Tick() {
	now := d.now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, st := range d.sites {
		st.recent = append(st.recent, st.cur)
		if n := len(st.recent) - smoothMax; n > 0 {
			st.recent = slices.Delete(st.recent, 0, n)
		}
		st.cur = second{}
		st.samples = append(st.samples, st.sample(now))
		if n := len(st.samples) - history; n > 0 {
			st.samples = slices.Delete(st.samples, 0, n)
		}
		for id, s := range st.instances {
			if now.Sub(s.at) > instanceTTL {
				delete(st.instances, id)
			}
		}
	}
}

// sample figures each tag over the last k seconds, k being the clients'
// pulse interval in whole seconds (1 to smoothMax): a pulse brings a whole
// interval's calls at once, and a rate over less would jump.
func (st *site) sample(now time.Time) sample {
	pulses, windowMs := st.windows()
	k := 1
	if pulses > 0 {
		k = int(math.Ceil(float64(windowMs) / float64(pulses) / 1000))
	}
	k = min(max(k, 1), len(st.recent))
	s := sample{At: now, Tags: map[string]TagFigures{}}
	for _, tag := range st.tags {
		var allowed, denied uint64
		var hist [wire.HistBuckets]uint64
		for _, sec := range st.recent[len(st.recent)-k:] {
			ts := sec.tags[tag]
			if ts == nil {
				continue
			}
			allowed, denied = allowed+ts.allowed, denied+ts.denied
			if ts.hist != nil {
				for i, c := range ts.hist {
					hist[i] += c
				}
			}
		}
		s.Tags[tag] = TagFigures{Tag: tag, AllowedPerSec: float64(allowed) / float64(k), DeniedPerSec: float64(denied) / float64(k),
			P95Ms: wire.HistQuantile(&hist, 0.95)}
	}
	return s
}

// windows is how many pulses the recent seconds brought, and the sum of
// their windows in ms.
func (st *site) windows() (pulses int, windowMs int64) {
	for _, s := range st.recent {
		pulses, windowMs = pulses+s.pulses, windowMs+s.windowMs
	}
	return pulses, windowMs
}

// State is the page's JSON: every site the control plane's primary key
// has pulsed for.
type State struct {
	At    time.Time   `json:"at"`
	Sites []SiteState `json:"sites"`
}

// SiteState is one site's view.
type SiteState struct {
	Site string `json:"site"`
	// Instances counts the instances heard from in the last 30 s: "total",
	// by mode from each one's last pulse, "local_rules" those running
	// rules themselves in safe mode, "restored" those whose policy came
	// from their policy store.
	Instances map[string]int `json:"instances"`
	// PulseIntervalMs is the interval the control plane's answers set,
	// 0 when they leave the clients' own; ClientIntervalMs is the mean
	// window of the last pulses: what the clients use.
	PulseIntervalMs  int64                `json:"pulseIntervalMs"`
	ClientIntervalMs int64                `json:"clientIntervalMs"`
	Policy           *controlplane.Policy `json:"policy"`
	Tags             []TagFigures         `json:"tags"`
	Rules            []RuleState          `json:"rules"`
}

// RuleState is a rule, whether it is fired, and its events still kept.
type RuleState struct {
	Rule  controlplane.Rule `json:"rule"`
	Fired bool              `json:"fired"` // by the control plane
	// FiredLocally is how many instances hold it fired themselves, in
	// safe mode, by their last pulse.
	FiredLocally int         `json:"firedLocally"`
	Events       []RuleEvent `json:"events"`
}

// RuleEvent is one firing or clearing.
type RuleEvent struct {
	At      time.Time `json:"at"`
	Fired   bool      `json:"fired"`
	Value   *float64  `json:"value"` // null without data
	Version int64     `json:"version"`
}

// State returns the view of every site, sorted by name.
func (d *Dashboard) State() State {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := State{At: d.now(), Sites: []SiteState{}}
	for name, st := range d.sites {
		s.Sites = append(s.Sites, d.siteState(name, st))
	}
	sort.Slice(s.Sites, func(i, j int) bool { return s.Sites[i].Site < s.Sites[j].Site })
	return s
}

// siteState is the view of one site. Call with d.mu held.
func (d *Dashboard) siteState(name string, st *site) SiteState {
	v := SiteState{Site: name, Instances: map[string]int{"total": len(st.instances), "enforcing": 0, "safe_mode": 0, "fail_open": 0,
		"local_rules": 0, "restored": 0}, PulseIntervalMs: st.interval.Milliseconds(), Tags: []TagFigures{}, Rules: []RuleState{}}
	local := map[string]int{} // instances holding each rule fired themselves
	for _, in := range st.instances {
		v.Instances[in.mode]++
		if in.restored {
			v.Instances["restored"]++
		}
		if len(in.localRules) > 0 {
			v.Instances["local_rules"]++
		}
		for _, r := range in.localRules {
			local[r]++
		}
	}
	if pulses, windowMs := st.windows(); pulses > 0 {
		v.ClientIntervalMs = windowMs / int64(pulses)
	}
	if p, ok := d.cp.Policy(name); ok {
		v.Policy = &p
	}
	if len(st.samples) > 0 {
		last := st.samples[len(st.samples)-1]
		for _, tag := range st.tags {
			v.Tags = append(v.Tags, last.Tags[tag])
		}
	}
	for _, r := range d.cp.Rules(name) {
		rs := RuleState{Rule: r, FiredLocally: local[r.Name], Events: []RuleEvent{}}
		for _, e := range st.events {
			if e.Rule != r.Name {
				continue
			}
			ev := RuleEvent{At: e.At, Fired: e.Fired, Version: e.Version}
			if !math.IsNaN(e.Value) && !math.IsInf(e.Value, 0) {
				val := e.Value
				ev.Value = &val
			}
			rs.Events = append(rs.Events, ev)
			rs.Fired = e.Fired
		}
		v.Rules = append(v.Rules, rs)
	}
	return v
}

// Chart is the chart of one site's last five minutes: calls allowed and
// denied a second per tag, p95 per tag with the latency rules'
// thresholds, and a band for each span a rule was fired.
func (d *Dashboard) Chart(name string) (*chart.Chart, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.sites[name]
	if st == nil {
		return nil, false
	}
	now := d.now()
	c := &chart.Chart{Title: "site " + strconv.Quote(name) + ": the last five minutes", From: now.Add(-history * time.Second), To: now, Ago: true}
	rates := chart.Panel{Title: "calls a second: allowed (solid), denied (dashed)"}
	p95 := chart.Panel{Title: "p95 latency, ms"}
	for i, tag := range st.tags {
		color := chart.Palette[i%len(chart.Palette)]
		allowed := chart.Series{Name: tag, Color: color}
		denied := chart.Series{Name: tag + " denied", Color: color, Dashed: true}
		lat := chart.Series{Name: tag, Color: color}
		for _, s := range st.samples {
			f, ok := s.Tags[tag]
			if !ok {
				f = TagFigures{P95Ms: math.NaN()}
			}
			allowed.Points = append(allowed.Points, chart.Point{T: s.At, V: f.AllowedPerSec})
			denied.Points = append(denied.Points, chart.Point{T: s.At, V: f.DeniedPerSec})
			lat.Points = append(lat.Points, chart.Point{T: s.At, V: f.P95Ms})
		}
		rates.Series = append(rates.Series, allowed, denied)
		p95.Series = append(p95.Series, lat)
	}
	for _, r := range d.cp.Rules(name) {
		if r.Metric == "latency_p95_ms" {
			scope := r.MetricTag
			if scope == "" {
				scope = "site"
			}
			p95.Lines = append(p95.Lines, chart.Line{Label: r.Name + ": " + scope + " " + r.Operator + " " + strconv.FormatFloat(r.Threshold, 'g', -1, 64) + " ms", V: r.Threshold})
		}
	}
	c.Panels = []chart.Panel{rates, p95}
	c.Bands = FiredBands(st.events, now)
	return c, true
}

// FiredBands are the spans each rule was fired, from its events, oldest
// first; a rule still fired is drawn up to now.
func FiredBands(events []controlplane.Event, now time.Time) []chart.Band {
	var bands []chart.Band
	open := map[string]time.Time{}
	var order []string
	for _, e := range events {
		switch {
		case e.Fired:
			if _, ok := open[e.Rule]; !ok {
				open[e.Rule] = e.At
				order = append(order, e.Rule)
			}
		default:
			if from, ok := open[e.Rule]; ok {
				bands = append(bands, chart.Band{Label: e.Rule + " fired", From: from, To: e.At, Color: "#d62728"})
				delete(open, e.Rule)
			}
		}
	}
	for _, rule := range order {
		if from, ok := open[rule]; ok {
			bands = append(bands, chart.Band{Label: rule + " fired", From: from, To: now, Color: "#d62728"})
		}
	}
	return bands
}

// Handler serves the page at /, its JSON at /state.json and each site's
// chart at /chart.svg?site=NAME.
func (d *Dashboard) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		header(w, "text/html; charset=utf-8")
		_, _ = w.Write(page)
	})
	mux.HandleFunc("GET /state.json", func(w http.ResponseWriter, r *http.Request) {
		header(w, "application/json")
		_ = json.NewEncoder(w).Encode(d.State())
	})
	mux.HandleFunc("GET /chart.svg", func(w http.ResponseWriter, r *http.Request) {
		c, ok := d.Chart(r.URL.Query().Get("site"))
		if !ok {
			http.NotFound(w, r)
			return
		}
		header(w, "image/svg+xml")
		_, _ = w.Write(c.SVG())
	})
	return mux
}

// header sets the content type and keeps the page to its own origin.
func header(w http.ResponseWriter, contentType string) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:")
}
