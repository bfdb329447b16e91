package controlplane

import (
	"encoding/json"
	"math"
	"math/bits"
	"strconv"
	"sync"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// The control plane's memory is bounded by keys × sites × instances × tags,
// never by the number of requests or pulses:
//
//  1. State lives per publish key, then per site (tenant, siteState): a key
//     can never read or change another key's counts, rule state or policy,
//     whatever site or instance IDs it claims.
//  2. Each process of a site (instance and incarnation) keeps a fixed-size
//     dedupe record, an instance at most maxIncarnations of them, and an
//     idle one is forgotten (dedupe.go). A site left with no process and
//     no fired rule is forgotten too, Totals and all, by a sweep of its
//     key's sites at most once per sweepEvery of the key's requests
//     (forgetIdle); requests make at most maxSites sites per key.
//  3. A site's Totals track at most MaxSiteTags tags; later ones add to
//     "_other".
//  4. The rules read fixed aggregates: a ring of windowSlots slots over the
//     rule window, each holding the sums of the pulses that arrived in it,
//     for the whole site and for each tag a rule watches. A pulse adds to
//     one slot; an evaluation merges windowSlots of them.
//  5. The request, pulse and event logs keep their newest entries within a
//     count and a byte budget (log.go).
//  6. Token nonces are remembered for the skew window only, in per-minute
//     buckets that are dropped whole (nonce.go).
//  7. Request bodies are read only once the key is known, and at most
//     wire.MaxBody of them; a request is counted in flight (MaxInFlight)
//     only once authenticated, for at most maxLoops loops.

// tenant is what the control plane holds for one publish key.
type tenant struct {
	mu    sync.Mutex
	sites map[string]*siteState // at most maxSites made by requests
	swept time.Time             // when idle sites were last looked for
	floor int64                 // the bumps a new site starts with: the most a forgotten one reached
}

// maxSites bounds the sites of one key that requests make; a request for
// another site is refused until an idle one is forgotten.
const maxSites = 1024

// blank is the state of a site of t that nothing has asked for before
// now. Call with t.mu held.
func (t *tenant) blank(now time.Time) *siteState {
	return &siteState{firing: map[string]*reflex.State{}, instances: map[string]*instance{}, bumps: t.floor, asked: now}
}

// newSite makes the state of a site of t. Call with t.mu held.
func (t *tenant) newSite(name string, now time.Time) *siteState {
	st := t.blank(now)
	t.sites[name] = st
	return st
}

// peek returns the state of one site of the key, or an empty one, not
// kept, when the key has none: for the Server's readers, which make no
// site.
func (t *tenant) peek(name string) *siteState {
	t.mu.Lock()
	defer t.mu.Unlock()
	if st := t.sites[name]; st != nil {
		return st
	}
	return t.blank(time.Time{})
}

// lockSite returns the state of a site of key for a request, locked,
// making it unless the key holds maxSites sites already (false). At most
// once per sweepEvery it first forgets the key's idle sites.
func (s *Server) lockSite(key, name string, now time.Time) (*siteState, bool) {
	t := s.tenant(key)
	for {
		t.mu.Lock()
		if now.Sub(t.swept) >= sweepEvery {
			t.swept = now
			s.forgetIdle(t, now)
		}
		st := t.sites[name]
		if st == nil && len(t.sites) < maxSites {
			st = t.newSite(name, now)
		}
		t.mu.Unlock()
		if st == nil {
			return nil, false
		}
		st.mu.Lock()
		if !st.gone {
			if now.After(st.asked) {
				st.asked = now
			}
			return st, true
		}
		st.mu.Unlock() // forgotten since it was looked up: look again
	}
}

// forgetIdle forgets each site of t that no request asked for within
// idleAfter, has no process left once its idle ones are (sweep), and no
// fired rule: its Totals, rule state and window go with it. Such a site
// serves the base policy, and one made again for the name starts with the
// bumps the forgotten one reached, so that it serves the same policy at
// the same version, never an older version. A site whose lock is held is
// busy, not idle, and is not waited for. Call with t.mu held.
func (s *Server) forgetIdle(t *tenant, now time.Time) {
	for name, st := range t.sites {
		cfg := s.resolve(name)
		if !st.mu.TryLock() {
			continue
		}
		st.sweep(cfg, now)
		if len(st.instances) == 0 && !st.anyFiring(cfg) && now.Sub(st.asked) > idleAfter(cfg, &incarnation{}) {
			st.gone = true
			t.floor = max(t.floor, st.bumps)
			delete(t.sites, name)
		}
		st.mu.Unlock()
	}
}

// siteState is what one key holds for one site. Its mutex guards every
// field; no pulse of another site waits on it.
type siteState struct {
	mu        sync.Mutex
	bumps     int64                    // policy changes made by its rules: one per evaluation step that changed any
	firing    map[string]*reflex.State // by rule name
	evaluated time.Time                // when its rules were last stepped
	window    aggWindow                // what its rules read
	totals    Totals                   // over every pulse counted
	instances map[string]*instance     // by instance ID: which seqs each of its processes had counted
	swept     time.Time                // when idle processes were last looked for
	order     uint64                   // pulses deduped, resends included
	builds    int                      // times the cached answer parts were built
	normal    time.Duration            // the clients' own pulse interval when the last incident began; 0 once told (pulseInterval)
	cleared   time.Time                // when the last incident cleared
	asked     time.Time                // when a request last asked for it, or it was made
	gone      bool                     // forgotten by its tenant (forgetIdle): a request looks it up again

	// The policy JSON served and the reflex block, built once per change
	// of the policy or the rules (gen) or of what the rules fired (bumps).
	cached struct {
		gen, bumps int64
		json       json.RawMessage
		reflex     json.RawMessage // nil: the site has no rules
		version    int64
		ok         bool
	}
}

// windowSlots is how many slots a rule window is cut into: the rules see
// the pulses of the last window to within one slot.
const windowSlots = 20

// maxCustomMetrics bounds the custom metric names a scope keeps per slot.
const maxCustomMetrics = 64

// aggWindow is a ring of slots covering one rule window.
type aggWindow struct {
	width time.Duration
	ring  [windowSlots]slot
}

// slot sums the pulses that arrived within one slot's time.
type slot struct {
	n         int64 // the slot's index since the epoch; live while within the window
	pulses    int
	windowMs  int64                     // sum of the windowMs of the pulses whose window is an interval
	windows   int                       // how many pulses those are
	own       int64                     // the shortest own pulse interval a pulse declared, in ms; 0: none did
	processes map[*incarnation]struct{} // the processes that pulsed in it
	site      agg
	tags      map[string]*agg // the tags the rules watch
}

// agg sums one scope's traffic: the whole site or one tag.
type agg struct {
	calls    uint64 // offered Gate calls, allowed and denied
	requests uint64 // health samples
	errors   uint64
	hist     *[wire.HistBuckets]uint64 // the merged latency histograms
	custom   map[string]MetricAgg
}

// reset empties the window and sets its slot width.
func (w *aggWindow) reset(width time.Duration) {
	*w = aggWindow{width: max(width, time.Millisecond)}
}

// slot returns the slot for now, emptied if it held an older one.
func (w *aggWindow) slot(now time.Time) *slot {
	n := now.UnixNano() / int64(w.width)
	s := &w.ring[n%windowSlots]
	if s.n != n {
		*s = slot{n: n}
	}
	return s
}

// add adds a pulse of the process inc to the slot of now: its site-wide
// figures and those of the watched tags. A process is known by its
// record: one whose record was forgotten while it lived (past
// maxIncarnations) and made again counts twice within the window.
//
// A pulse counts by its window, not by when it arrived: one whose window
// is longer than the rule window (the first after an outage covers all of
// it) adds only the share of its counts that the rule window holds,
// windowMs being the time they were spread over. Its windowMs counts
// towards the estimate of the clients' own interval (meanWindow) only when
// it is no longer than twice the time since the process's previous pulse
// arrived: a window that spans an outage, or a stalled answer, is not an
// interval. Its declared own interval counts as it is (ownInterval).
func (w *aggWindow) add(p *Pulse, inc *incarnation, now time.Time, watched []string) {
	s := w.slot(now)
	s.pulses++
	s.own = minDeclared(s.own, p.OwnIntervalMs)
	if inc.gap > 0 && p.WindowMs > 0 && time.Duration(p.WindowMs)*time.Millisecond <= 2*inc.gap {
		s.windowMs += p.WindowMs
		s.windows++
	}
	f := whole
	if rule := (w.width * windowSlots).Milliseconds(); p.WindowMs > rule {
		f = share{num: uint64(rule), den: uint64(p.WindowMs)}
	}
	if s.processes == nil {
		s.processes = map[*incarnation]struct{}{}
	}
	s.processes[inc] = struct{}{}
	s.site.add(p.UsageDelta+p.BouncedDelta, p.Health, p.Metrics, f)
	for _, tag := range watched {
		tc, ok := p.Tags[tag]
		if !ok {
			continue
		}
		if s.tags == nil {
			s.tags = map[string]*agg{}
		}
		a := s.tags[tag]
		if a == nil {
			a = &agg{}
			s.tags[tag] = a
		}
		a.add(tc.Usage+tc.Bounced, tc.Health, tc.Metrics, f)
	}
}

// share is the part num/den of a pulse's counts that a rule window holds.
type share struct{ num, den uint64 }

// whole is a pulse's every count.
var whole = share{1, 1}

// of is ⌊c × num/den⌋, exactly, for num ≤ den.
func (f share) of(c uint64) uint64 {
	if f.num >= f.den {
		return c
	}
	hi, lo := bits.Mul64(c, f.num)
	q, _ := bits.Div64(hi, lo, f.den) // hi < den: num < den
	return q
}

// add adds f of one pulse's figures for the scope: its calls, requests,
// errors, latency buckets and custom metric counts and sums.
func (a *agg) add(calls uint64, h *Health, custom map[string]MetricAgg, f share) {
	a.calls += f.of(calls)
	if h != nil && h.Requests > 0 {
		n := f.of(h.Requests)
		a.requests += n
		a.errors += f.of(min(h.Errors, h.Requests))
		if !addHistogram(&a.hist, h, f) {
			addQuantiles(&a.hist, h, n)
		}
	}
	for name, m := range custom {
		if m.Count = f.of(m.Count); m.Count == 0 {
			continue
		}
		if f != whole {
			m.Sum = m.Sum * float64(f.num) / float64(f.den)
		}
		a.addMetric(name, m)
	}
}

// addMetric adds m to the scope's sums of the custom metric name; beyond
// maxCustomMetrics names, a new name is dropped.
func (a *agg) addMetric(name string, m MetricAgg) {
	if a.custom == nil {
		a.custom = map[string]MetricAgg{}
	}
	sum, ok := a.custom[name]
	if !ok {
		if len(a.custom) >= maxCustomMetrics {
			return
		}
		sum = MetricAgg{Min: math.Inf(1), Max: math.Inf(-1)}
	}
	a.custom[name] = MetricAgg{Count: sum.Count + m.Count, Sum: sum.Sum + m.Sum, Min: min(sum.Min, m.Min), Max: max(sum.Max, m.Max)}
}

// AddHistogram adds a health's histogram to *dst, made on first use, and
// reports whether it did. It adds nothing without one, for another scheme,
// or for one with a bucket that does not parse: such a health counts
// through its quantiles alone (addQuantiles).
func AddHistogram(dst **[wire.HistBuckets]uint64, h *Health) bool { return addHistogram(dst, h, whole) }

// addHistogram is AddHistogram of f of each bucket's count.
func addHistogram(dst **[wire.HistBuckets]uint64, h *Health, f share) bool {
	if h == nil || h.Histogram == nil || h.Histogram.Scheme != wire.HistogramScheme {
		return false
	}
	for key := range h.Histogram.Counts {
		if _, ok := bucketOf(key); !ok {
			return false
		}
	}
	if *dst == nil {
		*dst = new([wire.HistBuckets]uint64)
	}
	for key, c := range h.Histogram.Counts {
		i, _ := bucketOf(key)
		(*dst)[i] += f.of(c)
	}
	return true
}

// bucketOf reads a histogram's bucket index.
func bucketOf(key string) (int, bool) {
	i, err := strconv.Atoi(key)
	return i, err == nil && i >= 0 && i < wire.HistBuckets
}

// live calls f for each slot within the window ending at now.
func (w *aggWindow) live(now time.Time, f func(*slot)) {
	if w.width == 0 {
		return
	}
	n := now.UnixNano() / int64(w.width)
	for i := range w.ring {
		if s := &w.ring[i]; s.n > n-windowSlots && s.n <= n {
			f(s)
		}
	}
}

// metrics computes the figures of tag's traffic ("" is the whole site) over
// the window ending at now, which is window long.
func (w *aggWindow) metrics(now time.Time, window time.Duration, tag string) Metrics {
	m := Metrics{Figures: reflex.NoData()}
	var total agg
	processes := map[*incarnation]struct{}{}
	w.live(now, func(s *slot) {
		m.Pulses += s.pulses
		for id := range s.processes {
			processes[id] = struct{}{}
		}
		a := &s.site
		if tag != "" {
			if a = s.tags[tag]; a == nil {
				return
			}
		}
		total.merge(a)
	})
	m.Instances = len(processes)
	m.RPS = float64(total.calls) / window.Seconds()
	m.Custom = total.custom
	if m.Custom == nil {
		m.Custom = map[string]MetricAgg{}
	}
	if total.requests > 0 {
		m.Requests = total.requests
		m.ErrorRate = float64(total.errors) / float64(total.requests)
		m.LatencyP50Ms, m.LatencyP95Ms, m.LatencyP99Ms = total.quantiles()
	}
	return m
}

// merge adds b's sums to a.
func (a *agg) merge(b *agg) {
	a.calls += b.calls
	a.requests += b.requests
	a.errors += b.errors
	if b.hist != nil {
		if a.hist == nil {
			a.hist = new([wire.HistBuckets]uint64)
		}
		for i, c := range b.hist {
			a.hist[i] += c
		}
	}
	for name, m := range b.custom {
		a.addMetric(name, m)
	}
}

// quantiles returns the scope's p50, p95 and p99 in ms, read off the
// merged histograms: the quantiles of the pooled requests to within the
// wire scheme's error.
func (a *agg) quantiles() (p50, p95, p99 float64) {
	if a.hist == nil {
		return math.NaN(), math.NaN(), math.NaN()
	}
	return wire.HistQuantile(a.hist, 0.50), wire.HistQuantile(a.hist, 0.95), wire.HistQuantile(a.hist, 0.99)
}

// ownInterval is the shortest own pulse interval the window's pulses
// declared, 0 if none did: the clients' configured cadence, exact, where
// meanWindow can only estimate it from the windows they sent.
func (w *aggWindow) ownInterval(now time.Time) time.Duration {
	var own int64
	w.live(now, func(s *slot) { own = minDeclared(own, s.own) })
	return time.Duration(own) * time.Millisecond
}

// minDeclared is the shorter of two declared intervals, 0 standing for
// none declared.
func minDeclared(a, b int64) int64 {
	switch {
	case a <= 0:
		return max(b, 0)
	case b <= 0:
		return a
	}
	return min(a, b)
}

// meanWindow is the mean windowMs of the pulses within the window whose
// window is an interval (add): an estimate of the pulse interval of the
// site's clients that do not declare theirs; 0 when there are none.
func (w *aggWindow) meanWindow(now time.Time) time.Duration {
	var sum int64
	var n int
	w.live(now, func(s *slot) { sum, n = sum+s.windowMs, n+s.windows })
	if n == 0 {
		return 0
	}
	return time.Duration(sum/int64(n)) * time.Millisecond
}
