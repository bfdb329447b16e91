package waitstate

import (
	"context"
	"math"
	"slices"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// Running the control plane's reflex rules on the client's own traffic
// (SafeModeLocalRules).
//
// The rules read, for each scope a local rule measures (the whole site, or
// a tag), the last rule window of samples: latency histogram, requests,
// errors, custom metrics. Windows are cut only when a pulse is
// acknowledged, so in an outage one window can last minutes; the client
// therefore samples on its own:
//
//  1. A sample reads each scope's running sums in the live window and keeps
//     the difference from its previous reading of that window (sample).
//  2. A cut hands the sampler what the old window gained since its last
//     reading, read after the window was sealed and drained, so nothing
//     between two samples is lost to a cut (retire); readings of the new
//     window start from zero.
//  3. The figures of a scope are the sum of the samples taken within the
//     last rule window (figures).
//  4. All of it runs under c.mu, on the background goroutines: Gate,
//     ObserveTag and Record never wait on it. A reading may see a sample's
//     latency before its error; the next reading of the same window sees
//     both, so the difference is never lost, only late by one sample.
//  5. While a local rule reads the whole site, each window also keeps all
//     its health samples in one histogram (window.all), so that a reading
//     of the site reads one histogram, not one per tag. It is made with
//     the window, or, for the live window, before the sampler's first
//     reading of the site in it, and never removed: every reading of the
//     site in one window reads the same histogram.
//
// The client samples while it holds rules it can run, whatever the mode,
// so that entering safe mode finds the last rule window already measured.

// localEpoch turns the client's monotonic clock into the times the rule
// engine reads; only differences matter.
var localEpoch = time.Unix(1<<30, 0)

// localState is the client's own run of the rules. Guarded by c.mu.
type localState struct {
	block   *reflexBlock           // what the scopes were set up for; nil: not sampling
	scopes  []string               // the scopes the local rules measure; "" is the whole site
	site    bool                   // scopes holds ""
	win     *window                // the window that last holds the readings of
	last    map[string]*scopeSums  // by scope: the last reading of win
	scratch *scopeSums             // a reading being taken
	carry   map[string]*scopeDelta // by scope: what retired windows gained since the last sample
	ring    []localSample          // oldest first, within the rule window and one sample

	// In safe mode only.
	states map[string]*reflex.State // by rule name
	fired  []string                 // sorted
	policy *Policy                  // base with the fired rules' overlay; nil outside
	index  *policyIndex
}

// scopeSums is a reading of one scope's running sums in one window.
type scopeSums struct {
	errors  uint64
	buckets [fineBuckets]uint64
	metrics map[string]metricSums
}

// metricSums is a reading of one custom metric's running sums.
type metricSums struct {
	count    uint64
	sum, max float64
}

// scopeDelta is what one scope gained between two readings.
type scopeDelta struct {
	errors  uint64
	hist    map[int]uint64 // wire bucket → samples
	metrics map[string]wire.Metric
}

// localSample is what each scope gained up to at.
type localSample struct {
	at     time.Duration
	scopes map[string]*scopeDelta
}

// localRules returns the block whose rules the client runs on its own, or
// nil when it runs none. Call with c.mu held.
func (c *Client) localRules() *reflexBlock {
	if c.opts.SafeMode != SafeModeLocalRules || c.reflex == nil || len(c.reflex.local) == 0 {
		return nil
	}
	return c.reflex
}

// resetSampler sets the sampler up for the block in force: the scopes its
// local rules measure, with readings of the live window as their
// baseline. Scopes it keeps keep their samples. Call with c.mu held.
func (c *Client) resetSampler() {
	ls := &c.local
	b := c.localRules()
	ls.block = b
	if b == nil {
		*ls = localState{states: ls.states, fired: ls.fired, policy: ls.policy, index: ls.index}
		return
	}
	var scopes []string
	for _, r := range b.local {
		if !slices.Contains(scopes, r.MetricTag) {
			scopes = append(scopes, r.MetricTag)
		}
	}
	slices.Sort(scopes)
	if slices.Equal(scopes, ls.scopes) {
		return
	}
	ls.site = slices.Contains(scopes, "")
	if c.win != nil {
		c.keepAll(c.win) // before the first reading below (invariant 5)
	}
	ls.scopes, ls.win, ls.ring = scopes, c.win, nil
	ls.last, ls.carry = map[string]*scopeSums{}, map[string]*scopeDelta{}
	for _, scope := range scopes {
		s := new(scopeSums)
		if c.win != nil {
			s.read(c.win, scope)
		}
		ls.last[scope] = s
	}
}

// keepAll gives w a histogram of all its samples when a local rule reads
// the whole site (invariant 5). Call with c.mu held.
func (c *Client) keepAll(w *window) {
	if c.local.block != nil && c.local.site && w.all.Load() == nil {
		w.all.Store(new(health))
	}
}

// reading returns the scratch reading, allocated on first use.
func (ls *localState) reading() *scopeSums {
	if ls.scratch == nil {
		ls.scratch = new(scopeSums)
	}
	return ls.scratch
}

// read takes a reading of scope in w: a tag's own sums, or for "" the
// whole site's health (every counter's) and its untagged metrics.
func (s *scopeSums) read(w *window, scope string) {
	s.errors, s.metrics = 0, nil
	clear(s.buckets[:])
	if scope == "" {
		s.addMetrics(w.site.metrics.Load())
		if all := w.all.Load(); all != nil { // invariant 5
			s.addHealth(all)
			return
		}
		for i := range w.slots {
			if t := w.slots[i].Load(); t.tracked() {
				s.addHealth(t.health.Load())
			}
		}
		s.addHealth(w.other.health.Load())
		s.addHealth(w.site.health.Load())
		return
	}
	if t := w.find(scope); t != nil {
		s.addHealth(t.health.Load())
		s.addMetrics(t.metrics.Load())
	}
}

func (s *scopeSums) addHealth(h *health) {
	if h != nil {
		h.addTo(&s.errors, &s.buckets)
	}
}

func (s *scopeSums) addMetrics(m *metricSet) {
	if m == nil {
		return
	}
	for i := range m.slots {
		a := m.slots[i].Load()
		if a == nil {
			break
		}
		if s.metrics == nil {
			s.metrics = map[string]metricSums{}
		}
		s.metrics[a.name] = metricSums{count: a.count.Load(), sum: math.Float64frombits(a.sum.Load()), max: math.Float64frombits(a.max.Load())}
	}
}

// add adds what cur gained over last (a reading of the same window, or
// nil for none) to d. A metric's maximum over the gain is the running
// maximum when it rose; when it did not, the gain's mean stands for it (a
// lower bound: the running sums cannot say more).
func (d *scopeDelta) add(cur, last *scopeSums) {
	var lastErrors uint64
	if last != nil {
		lastErrors = last.errors
	}
	d.errors += cur.errors - min(lastErrors, cur.errors)
	for i, n := range cur.buckets {
		if last != nil {
			n -= min(last.buckets[i], n)
		}
		if n > 0 {
			if d.hist == nil {
				d.hist = map[int]uint64{}
			}
			d.hist[wire.HistIndex(fineLower(i))] += n
		}
	}
	for name, m := range cur.metrics {
		var prev metricSums
		if last != nil {
			prev = last.metrics[name]
		}
		if m.count <= prev.count {
			continue
		}
		gain := wire.Metric{Count: m.count - prev.count, Sum: m.sum - prev.sum}
		gain.Max = gain.Sum / float64(gain.Count)
		if prev.count == 0 || m.max > prev.max {
			gain.Max = m.max
		}
		if d.metrics == nil {
			d.metrics = map[string]wire.Metric{}
		}
		old, ok := d.metrics[name]
		if ok {
			gain = wire.Metric{Count: old.Count + gain.Count, Sum: old.Sum + gain.Sum, Max: max(old.Max, gain.Max)}
		}
		d.metrics[name] = gain
	}
}

// sample takes one sample at now (invariant 1) and drops the samples the
// rule window no longer holds. Call with c.mu held.
func (c *Client) sample(now time.Duration) {
	ls := &c.local
	if ls.block == nil {
		return
	}
	s := localSample{at: now, scopes: make(map[string]*scopeDelta, len(ls.scopes))}
	for _, scope := range ls.scopes {
		d := ls.carry[scope]
		if d == nil {
			d = &scopeDelta{}
		}
		if c.win != nil && c.win == ls.win {
			cur := ls.reading()
			cur.read(c.win, scope)
			d.add(cur, ls.last[scope])
			// The reading becomes the last; the last one is reused.
			ls.last[scope], ls.scratch = cur, ls.last[scope]
		}
		s.scopes[scope] = d
	}
	clear(ls.carry)
	ls.ring = append(ls.ring, s)
	keep := 0
	for keep < len(ls.ring)-1 && ls.ring[keep].at <= now-ls.block.window {
		keep++
	}
	ls.ring = slices.Delete(ls.ring, 0, keep)
}

// retire hands the sampler what old gained since its last reading, now
// that the cut has sealed and drained it, and makes next the window
// readings are of (invariant 2). Call with c.mu held.
func (c *Client) retire(old, next *window) {
	ls := &c.local
	if ls.block != nil && old == ls.win && old != nil {
		cur := ls.reading()
		for _, scope := range ls.scopes {
			cur.read(old, scope)
			d := ls.carry[scope]
			if d == nil {
				d = &scopeDelta{}
				ls.carry[scope] = d
			}
			d.add(cur, ls.last[scope])
		}
	}
	ls.win = next
	for _, s := range ls.last {
		*s = scopeSums{}
	}
}

// figures returns the figures of a scope over the rule window ending at
// now (invariant 3): quantiles off the merged histogram, in the wire's
// buckets as a control plane reads them.
func (ls *localState) figures(now time.Duration) func(scope string) reflex.Figures {
	return func(scope string) reflex.Figures {
		f := reflex.NoData()
		var hist [wire.HistBuckets]uint64
		var requests, errors uint64
		for _, s := range ls.ring {
			d := s.scopes[scope]
			if s.at <= now-ls.block.window || d == nil {
				continue
			}
			errors += d.errors
			for i, n := range d.hist {
				hist[i] += n
				requests += n
			}
			for name, m := range d.metrics {
				if old, ok := f.Custom[name]; ok {
					m = wire.Metric{Count: old.Count + m.Count, Sum: old.Sum + m.Sum, Max: max(old.Max, m.Max)}
				}
				f.Custom[name] = m
			}
		}
		if requests > 0 {
			f.ErrorRate = float64(min(errors, requests)) / float64(requests)
			f.LatencyP50Ms, f.LatencyP95Ms, f.LatencyP99Ms = wire.HistQuantile(&hist, 0.50), wire.HistQuantile(&hist, 0.95), wire.HistQuantile(&hist, 0.99)
		}
		return f
	}
}

// enterLocalRules starts the rules' own run as the client enters safe
// mode: the rules the control plane reported fired start fired, their
// cooldown counting from now. Call with c.mu held.
func (c *Client) enterLocalRules(now time.Duration) {
	c.leaveLocalRules()
	ls := &c.local
	b := c.localRules()
	if b == nil {
		return // with no rules: as SafeModeLastPolicy
	}
	ls.states = map[string]*reflex.State{}
	for _, name := range b.fired {
		ls.states[name] = &reflex.State{Fired: true, GoodSince: localEpoch.Add(now)}
	}
	c.evaluateLocal(now, true)
}

// leaveLocalRules ends the rules' own run: the window's tags cache their
// limits under the control plane's policy again. Call with c.mu held.
func (c *Client) leaveLocalRules() {
	ls := &c.local
	if ls.policy != nil && c.win != nil && c.policy != nil {
		c.win.relimit(c.index)
	}
	ls.states, ls.fired, ls.policy, ls.index = nil, nil, nil, nil
}

// evaluateLocal samples, then, in safe mode with rules to run, steps them
// and puts the base policy with their overlay in force when what they
// fired changed (or always, with force). It reports whether it did. Call
// with c.mu held, then publish.
func (c *Client) evaluateLocal(now time.Duration, force bool) bool {
	c.sample(now)
	ls := &c.local
	b := ls.block
	if b == nil || ls.states == nil || c.mode != ModeSafeMode {
		return false
	}
	changes := reflex.Evaluate(b.local, ls.states, ls.figures(now), localEpoch.Add(now))
	if len(changes) == 0 && !force {
		return false
	}
	var fired []string
	for _, r := range b.local {
		if st := ls.states[r.Name]; st != nil && st.Fired {
			fired = append(fired, r.Name)
		}
	}
	slices.Sort(fired)
	p := policyFromWire(reflex.Overlay(b.base.toWire(), b.local, reflex.FiredIn(ls.states)))
	p.Version = c.policy.Version
	ls.fired, ls.policy, ls.index = fired, p, newPolicyIndex(p, c.seed)
	if c.win != nil {
		c.win.relimit(ls.index)
	}
	for _, ch := range changes {
		c.log.Warn("waitstate: local rule "+map[bool]string{true: "fired", false: "cleared"}[ch.Fired], "rule", ch.Rule, "value", ch.Value)
	}
	c.log.Info("waitstate: local rules set the policy", "fired", fired, "version", p.Version)
	if c.opts.OnPolicyApplied != nil {
		c.events = append(c.events, event{policy: p.Clone()})
	}
	return true
}

// localTick evaluates the rules on the client's own samples (in safe mode)
// or only samples (otherwise).
func (c *Client) localTick() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	if c.evaluateLocal(c.clock(), false) {
		c.publish()
	}
	c.mu.Unlock()
	c.runCallbacks(false)
}

// localLoop samples, and in safe mode runs the rules, at least once a
// second and four times per rule window, until ctx ends.
func (c *Client) localLoop(ctx context.Context) error {
	t := time.NewTimer(c.localEvery())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		c.localTick()
		t.Reset(c.localEvery())
	}
}

// localEvery is how often localLoop runs.
func (c *Client) localEvery() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b := c.local.block; b != nil {
		return min(time.Second, max(b.window/4, 25*time.Millisecond))
	}
	return time.Second
}
