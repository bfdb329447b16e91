package waitstate

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/sync/errgroup"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Version is the SDK's version, sent in pulses and the User-Agent header.
const Version = "0.3.0"

// UserAgent is the User-Agent header of every request.
const UserAgent = "waitstate-go/" + Version

// closeTimeout bounds the final flush of Close.
const closeTimeout = 5 * time.Second

// Client gates work against the policy of a WaitState control plane. Create
// one with New, share it, and call Shutdown or Close when done. A Client is
// safe for concurrent use by multiple goroutines.
type Client struct {
	opts      Options // with defaults applied
	base      *url.URL
	http      *http.Client
	transport *http.Transport // ours, when Options.HTTPClient was nil
	log       *slog.Logger
	jwtParser *jwt.Parser
	seed      uint64 // of the tag tables' hash
	// incarnation names this process's seq stream: 128 random bits drawn
	// in New, so that two processes sharing an InstanceID, or one process
	// restarted, are counted apart.
	incarnation string
	clock       func() time.Duration // monotonic time since New
	wall        func() time.Time     // the wall clock

	// The hot path: Gate reads view once, and safe only in safe mode.
	view atomic.Pointer[view]
	safe limiter

	// The intervals in force: Options' until a control plane sets others.
	pulseEvery atomic.Int64
	syncEvery  atomic.Int64

	retryAfter atomic.Pointer[retryAfterHeader] // the middleware's last Retry-After values

	// mu guards the state below and every store to view. Gate never takes it.
	mu             sync.Mutex
	mode           Mode
	policy         *Policy      // the last applied policy (or InitialPolicy); nil before the first
	index          *policyIndex // of policy, or of fallback while policy is nil
	initial        bool         // policy is Options.InitialPolicy: no lease, any version replaces it
	restored       bool         // policy came from the PolicyStore: any version replaces it
	fallback       *Policy      // DefaultPolicy, in force until then
	win            *window      // the live window; nil after the final cut
	leaseDeadline  time.Duration
	leaseTimer     *time.Timer
	pulseGen       uint64        // bumped when a pulse response applies a policy
	epoch          string        // the control plane's state the policy held came from, as its answers name it
	epochSeen      time.Duration // client clock when an answer of that epoch was last applied
	isReady        bool          // ready is closed
	closed         bool
	usageTotal     uint64 // counted in windows already cut
	bouncedTotal   uint64
	reasonTotals   reasonCounts // the same, by Gate's reason
	healthRequests uint64       // health samples in windows already cut
	healthErrors   uint64
	tagTotals      map[string]TagStats // by tag, in windows already cut: at most MaxWindowTags
	promised       map[string]bool     // tags of the live window that TagStats showed before they had a total
	reflex         *reflexBlock        // the last verified reflex block; nil: no rules
	reflexErr      string              // the last refused block's error, logged once
	local          localState          // the rules' own run, with SafeModeLocalRules
	events         []event             // callbacks to run, in order
	saves          chan *pendingSave   // to the store goroutine, latest only; nil without a PolicyStore
	saved          savedState          // what the store holds, as far as the client knows

	// Owned by the pulse goroutine, then by Shutdown once it has joined it.
	seq      uint64
	pending  *pulse
	trimming bool // the last pulse cut shed detail to fit

	// Owned by New, then by the store goroutine, then by Shutdown.
	storeBusy    chan struct{} // closed when the store's last call returns; nil before the first
	storeFailing bool          // the last save failed

	pulsesSent     atomic.Uint64
	pulsesFailed   atomic.Uint64
	pulsesDropped  atomic.Uint64
	pulsesTrimmed  atomic.Uint64
	policyErrors   atomic.Uint64
	syncsFailed    atomic.Uint64
	metricsDropped atomic.Uint64
	storeErrors    atomic.Uint64
	lastErr        atomic.Pointer[string]

	callbacks chan struct{} // held while callbacks run: one at a time

	ready    chan struct{} // closed when the first policy is applied
	done     chan struct{} // closed by Shutdown
	cancel   context.CancelFunc
	group    *errgroup.Group // nil when offline
	shutdown atomic.Bool
}

// New validates opts, starts the client's two background goroutines and
// returns at once: it never waits on the network. Until a policy is
// applied the client is in ModeFailOpen (or enforces Options.InitialPolicy).
// Invalid options give an error wrapping ErrInvalidOptions.
func New(opts Options) (*Client, error) {
	start := time.Now()
	return newClient(opts, func() time.Duration { return time.Since(start) }, time.Now)
}

// newClient is New with the clocks the client reads: clock, monotonic time
// since New, for leases, the safe-mode rate and token refresh; wall, the
// wall clock, for what is sent on the wire (timestamps, windowEndMs) and
// token expiry. Tests give their own.
func newClient(opts Options, clock func() time.Duration, wall func() time.Time) (*Client, error) {
	o, base, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	c := &Client{
		opts:        o,
		base:        base,
		log:         o.Logger,
		jwtParser:   newJWTParser(o.PublishKey, wall),
		seed:        rand.Uint64(),
		incarnation: wire.RandomHex(),
		clock:       clock,
		wall:        wall,
		safe:        newLimiter(o.SafeModeMaxRPS),
		fallback:    DefaultPolicy(),
		callbacks:   make(chan struct{}, 1),
		ready:       make(chan struct{}),
		done:        make(chan struct{}),
	}
	c.pulseEvery.Store(int64(o.PulseInterval))
	c.syncEvery.Store(int64(o.SyncInterval))
	if o.HTTPClient != nil {
		hc := *o.HTTPClient
		c.http = &hc
	} else {
		c.transport = http.DefaultTransport.(*http.Transport).Clone()
		c.http = &http.Client{Transport: c.transport}
	}
	// A redirect would send a signed request somewhere else and could not
	// be verified: a 3xx is an answer like any other, and retried.
	c.http.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	c.win = newWindow(c.seed, c.clock())
	c.index = newPolicyIndex(c.fallback, c.seed)
	if o.InitialPolicy != nil {
		c.policy, c.initial, c.mode = o.InitialPolicy, true, ModeEnforcing
		c.index = newPolicyIndex(c.policy, c.seed)
	}
	if o.InitialPolicy != nil || o.Offline {
		c.isReady = true
		close(c.ready)
	}
	c.publish()
	if o.Offline {
		c.cancel = func() {}
		return c, nil
	}
	if o.PolicyStore != nil {
		c.saves = make(chan *pendingSave, 1)
		c.restore()
	}

	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.group, ctx = errgroup.WithContext(ctx)
	c.group.Go(func() error { return c.pulseLoop(ctx) })
	c.group.Go(func() error { return c.syncLoop(ctx) })
	if o.SafeMode == SafeModeLocalRules {
		c.group.Go(func() error { return c.localLoop(ctx) })
	}
	if o.PolicyStore != nil {
		c.group.Go(func() error { return c.storeLoop(ctx) })
	}
	return c, nil
}

// publish stores a new view built from the state under mu.
func (c *Client) publish() {
	p := c.policy
	if p == nil {
		p = c.fallback
	}
	v := &view{mode: c.mode, policy: p, index: c.index, win: c.win}
	switch {
	case c.mode == ModeEnforcing, c.mode == ModeSafeMode && c.opts.SafeMode == SafeModeLastPolicy:
		v.answer = answerPolicy
	case c.mode == ModeSafeMode && c.opts.SafeMode == SafeModeLocalRules:
		v.answer = answerPolicy // with no rules to run: the last policy
		if c.local.policy != nil {
			v.policy, v.index = c.local.policy, c.local.index
		}
	case c.mode == ModeSafeMode && c.opts.SafeMode == SafeModeOpen:
		v.answer = answerSafeOpen
	case c.mode == ModeSafeMode:
		v.answer = answerSafeRate
	}
	c.view.Store(v)
}

// setMode changes the mode and queues OnModeChange. Call with mu held, then
// publish, then runCallbacks once mu is released.
func (c *Client) setMode(m Mode) {
	if c.mode == m {
		return
	}
	if c.opts.OnModeChange != nil {
		c.events = append(c.events, event{from: c.mode, to: m})
	}
	c.mode = m
}

// Ready waits until the first policy is applied and returns nil, or returns
// ctx.Err() when ctx ends first, or ErrClosed when the client is shut down
// first. Gate does not need it: until then it fails open. With an
// InitialPolicy, or Offline, it returns nil at once.
func (c *Client) Ready(ctx context.Context) error {
	select {
	case <-c.ready:
		return nil
	default:
	}
	select {
	case <-c.ready:
		return nil
	case <-c.done:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Mode returns the mode Gate is answering in.
func (c *Client) Mode() Mode { return c.view.Load().mode }

// Policy returns a copy of the policy in force: DefaultPolicy (version 0)
// until a policy is applied, then the last applied one, in safe mode too.
func (c *Client) Policy() *Policy { return c.view.Load().policy.Clone() }

// Stats is a snapshot of a Client's counters. It marshals to readable JSON.
type Stats struct {
	Usage          uint64        // Gate calls allowed since New (in shadow mode: not denied)
	Bounced        uint64        // Gate calls denied since New (in shadow mode: would have been)
	PulsesSent     uint64        // pulses the control plane acknowledged
	PulsesFailed   uint64        // pulse attempts that failed or had no known outcome; each is resent
	PulsesDropped  uint64        // pulses the control plane refused with a 4xx; their counts stay in Usage and Bounced
	PulsesTrimmed  uint64        // pulses that left out per-tag detail to fit the control plane's 1 MiB limit; their counts are whole
	PolicyErrors   uint64        // verified responses whose body or policy was refused
	SyncsFailed    uint64        // policy syncs that failed
	MetricsDropped uint64        // custom-metric samples refused: bad name or value, or a name beyond the tag's limit
	PolicyVersion  int64         // version of the policy in force; 0 before the first
	Mode           Mode          // the mode Gate is answering in
	LeaseRemaining time.Duration // until the lease expires; 0 without one or once expired
	PulseInterval  time.Duration // in force: Options' or the control plane's
	SyncInterval   time.Duration // in force
	LastError      string        // the last error, with no secret in it; "" if none

	// Decisions counts Gate calls since New by the Reason Gate gave (in
	// shadow mode: the reason it would have given). Its allowed reasons add
	// up to Usage, its denied ones to Bounced.
	Decisions map[Reason]uint64
	// Shadow reports whether the client decides in shadow mode
	// (Options.Shadow): every call allowed, Bounced counting those the
	// policy would have denied.
	Shadow bool
	// HealthRequests and HealthErrors count the health samples (Observe,
	// ObserveTag, timers, the middleware) in the windows already cut (sent,
	// or waiting to be), and those of them that failed.
	HealthRequests, HealthErrors uint64
	// LocalRulesFired names the reflex rules fired by the client's own
	// evaluation (SafeModeLocalRules, in safe mode), sorted; empty
	// otherwise.
	LocalRulesFired []string
	// Restored reports whether the policy in force came from the
	// PolicyStore: true from New until the control plane's first policy.
	Restored bool
	// StoreErrors counts the PolicyStore's failed loads and saves.
	StoreErrors uint64
}

// TagStats are one tag's counts since New.
type TagStats struct {
	Usage   uint64 // calls allowed (in shadow mode: not denied)
	Bounced uint64 // calls denied (in shadow mode: that would have been)
}

// TagStats returns tag's counts since New, the live window's included, as
// Stats' totals are. The client keeps the totals of the first
// MaxWindowTags tags it counts; later tags add to OtherTag's, from the cut
// of the window that counted them. Counts never go down: a tag whose live
// calls TagStats has shown keeps a total of its own.
func (c *Client) TagStats(tag string) TagStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	ts, known := c.tagTotals[tag]
	if c.win == nil {
		return ts
	}
	var live *tagCounter
	switch {
	case tag == OtherTag:
		live = &c.win.other
	case known || c.promised[tag]:
		live = c.win.find(tag)
	case len(c.tagTotals)+len(c.promised) < MaxWindowTags:
		// Shown now, so promised a total at the cut.
		if live = c.win.find(tag); live != nil {
			if c.promised == nil {
				c.promised = make(map[string]bool)
			}
			c.promised[tag] = true
		}
	}
	if live != nil {
		rc := live.peek()
		usage, bounced := rc.split()
		ts.Usage += usage
		ts.Bounced += bounced
	}
	return ts
}

// addTagTotals adds a cut window's tag counts to the totals, the tags
// TagStats promised a total first. Call with c.mu held.
func (c *Client) addTagTotals(tags map[string]tagCount) {
	if c.tagTotals == nil {
		c.tagTotals = make(map[string]TagStats)
	}
	for tag := range c.promised {
		if tc, ok := tags[tag]; ok {
			c.addTagTotal(tag, tc)
		}
	}
	for tag, tc := range tags {
		if !c.promised[tag] {
			c.addTagTotal(tag, tc)
		}
	}
	clear(c.promised)
}

// addTagTotal adds one tag's counts to its total, or to OtherTag's when
// the totals are full. Call with c.mu held.
func (c *Client) addTagTotal(tag string, tc tagCount) {
	if _, ok := c.tagTotals[tag]; !ok && len(c.tagTotals) >= MaxWindowTags {
		tag = OtherTag
	}
	t := c.tagTotals[tag]
	c.tagTotals[tag] = TagStats{Usage: t.Usage + tc.Usage, Bounced: t.Bounced + tc.Bounced}
}

// Stats returns the client's counters.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	usage, bounced, reasons := c.usageTotal, c.bouncedTotal, c.reasonTotals
	healthRequests, healthErrors := c.healthRequests, c.healthErrors
	if c.win != nil {
		live := c.win.peek()
		usage += live.usage
		bounced += live.bounced
		reasons.addAll(&live.reasons)
	}
	var lease time.Duration
	if c.policy != nil && !c.initial && c.mode == ModeEnforcing {
		lease = max(c.leaseDeadline-c.clock(), 0)
	}
	localFired := slices.Clone(c.local.fired)
	restored := c.restored
	c.mu.Unlock()
	v := c.view.Load()
	s := Stats{
		Usage:           usage,
		Bounced:         bounced,
		PulsesSent:      c.pulsesSent.Load(),
		PulsesFailed:    c.pulsesFailed.Load(),
		PulsesDropped:   c.pulsesDropped.Load(),
		PulsesTrimmed:   c.pulsesTrimmed.Load(),
		PolicyErrors:    c.policyErrors.Load(),
		SyncsFailed:     c.syncsFailed.Load(),
		MetricsDropped:  c.metricsDropped.Load(),
		PolicyVersion:   v.policy.Version,
		Mode:            v.mode,
		LeaseRemaining:  lease,
		PulseInterval:   c.pulseInterval(),
		SyncInterval:    c.syncInterval(),
		Decisions:       make(map[Reason]uint64, numReasons),
		Shadow:          c.opts.Shadow,
		HealthRequests:  healthRequests,
		HealthErrors:    healthErrors,
		LocalRulesFired: localFired,
		Restored:        restored,
		StoreErrors:     c.storeErrors.Load(),
	}
	for r, n := range reasons {
		if n > 0 {
			s.Decisions[Reason(r)] = n
		}
	}
	if e := c.lastErr.Load(); e != nil {
		s.LastError = *e
	}
	return s
}

func (c *Client) pulseInterval() time.Duration { return time.Duration(c.pulseEvery.Load()) }
func (c *Client) syncInterval() time.Duration  { return time.Duration(c.syncEvery.Load()) }

// Shutdown stops both goroutines and waits for them, then sends the pending
// pulse and the last window, one try each, within ctx. It returns the error
// of that final flush, if any. Any later call, even one made while the
// first is running, returns nil at once. Gate keeps answering afterwards,
// from the last state, and counts nothing.
func (c *Client) Shutdown(ctx context.Context) error {
	if !c.shutdown.CompareAndSwap(false, true) {
		return nil
	}
	c.cancel()
	if c.group != nil {
		_ = c.group.Wait() // the loops return nil; their errors are in Stats
	}
	close(c.done)
	err := c.flush(ctx)
	c.saveQueued(ctx) // an answer the flush, or the last pulse, brought

	c.mu.Lock()
	c.closed = true
	if c.leaseTimer != nil {
		c.leaseTimer.Stop()
	}
	c.mu.Unlock()
	c.runCallbacks(true) // none runs after Shutdown returns
	if c.transport != nil {
		c.transport.CloseIdleConnections()
	}
	return err
}

// Close is Shutdown with the final flush bounded by 5 seconds.
func (c *Client) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	return c.Shutdown(ctx)
}

// leaseAnswer is a verified, parsed answer of /v1/pulse or /v1/policy.
type leaseAnswer struct {
	policy     *Policy       // nil: none
	ttl        time.Duration // 0: the default lease
	pulseEvery time.Duration // 0: left out, so Options'
	syncEvery  time.Duration // 0: left out, so Options'
	epoch      string        // the control plane's state it comes from; "" if it names none
	sent       time.Duration // client clock when its request was sent; 0 for a restored answer
	reflex     *reflexBlock  // nil: the site has no rules (or the block was refused)
	reflexErr  error         // why the block was refused
	from       *signedAnswer // the answer as received, for the PolicyStore
	restored   time.Time     // non-zero: a snapshot's answer, received then
}

// applyLease acts on a verified, parsed answer of /v1/pulse (fromPulse) or
// /v1/policy: it adopts the intervals it sets, applies its policy when the
// version rules allow, then, when a policy is held, renews the lease and
// enforces it. gen is pulseGen as it was when the /v1/policy request was
// sent.
func (c *Client) applyLease(a leaseAnswer, fromPulse bool, gen uint64) {
	c.mu.Lock()
	c.applyLeaseLocked(a, fromPulse, gen)
	c.mu.Unlock()
	c.runCallbacks(false)
}

func (c *Client) applyLeaseLocked(a leaseAnswer, fromPulse bool, gen uint64) {
	if c.closed {
		return
	}
	// An answer sets the cadence it carries; one that leaves an interval
	// out returns the client to its own, so that a cadence set by a
	// control plane that restarted since, or stopped setting one, does not
	// outlive it.
	c.pulseEvery.Store(int64(cmp.Or(a.pulseEvery, c.opts.PulseInterval)))
	c.syncEvery.Store(int64(cmp.Or(a.syncEvery, c.opts.SyncInterval)))
	c.keepReflex(a)
	held, p := c.policy, a.policy
	newEpoch := held != nil && a.epoch != "" && c.epoch != "" && a.epoch != c.epoch
	if newEpoch && a.sent < c.epochSeen {
		// Another epoch's answer to a request sent before the held epoch
		// last answered: from a process since replaced, overtaken by its
		// successor's answers. Its versions are not comparable with the
		// held policy's: it applies nothing.
		p, newEpoch = nil, false
	}
	switch {
	case p == nil:
	case c.initial, c.restored:
		// The control plane's first policy replaces the initial or the
		// restored one, whatever either version.
	case newEpoch:
		// A control plane made anew, its versions begun again: its policy
		// replaces the one held at its first answer, pulse or sync,
		// whatever either version.
		c.log.Info("waitstate: the control plane restarted; its policy replaces the one held, whatever the versions",
			"held_version", held.Version, "version", p.Version)
	case fromPulse && held != nil && p.Version <= held.Version:
		p = nil // a pulse brings only newer policies
	case !fromPulse && gen != c.pulseGen && held != nil && held.Version > p.Version:
		p = nil // a pulse applied a newer policy while the GET was in flight
	case held != nil && p.equal(held):
		p = nil // a sync of the policy in force: nothing to apply
	}
	switch {
	case a.epoch == "":
	case p != nil, a.epoch == c.epoch:
		c.epoch, c.epochSeen = a.epoch, c.clock() // the epoch of the policy held
	}
	if p != nil {
		if fromPulse {
			c.pulseGen++
		}
		c.policy, c.initial, c.restored = p, false, !a.restored.IsZero()
		c.index = newPolicyIndex(p, c.seed)
		if c.win != nil {
			c.win.relimit(c.index) // before publish: Gate checks which policy a limit is for
		}
		if c.restored {
			var rules int
			if c.reflex != nil {
				rules = len(c.reflex.rules)
			}
			c.log.Info("waitstate: policy restored from the policy store", "version", p.Version,
				"received", a.restored.UTC().Format(time.RFC3339), "reflex_rules", rules)
		} else {
			c.log.Info("waitstate: policy applied", "version", p.Version,
				"tag_limits", len(p.TagMaxWeights), "tag_shed_percents", len(p.TagShedPercents))
		}
		if c.opts.OnPolicyApplied != nil {
			c.events = append(c.events, event{policy: p.Clone()})
		}
	}
	if !a.restored.IsZero() {
		c.saved = savedState{policy: c.policy, reflex: c.reflexRaw(), received: a.restored}
	} else {
		c.noteAnswer(a)
	}
	if c.policy == nil || c.initial {
		c.publish()
		return // no lease to renew
	}
	ttl := a.ttl
	if ttl <= 0 {
		ttl = c.defaultLease() // restore clears a snapshot's: its lease ran from when it was received
	}
	c.leaseDeadline = c.clock() + ttl
	if c.leaseTimer == nil {
		c.leaseTimer = time.AfterFunc(ttl, c.leaseExpired)
	} else {
		c.leaseTimer.Reset(ttl)
	}
	if c.mode == ModeSafeMode {
		c.log.Info("waitstate: lease renewed, enforcing again", "version", c.policy.Version)
		c.leaveLocalRules()
	}
	c.setMode(ModeEnforcing)
	c.publish()
	if !c.isReady {
		c.isReady = true
		close(c.ready) // after publish: Ready's caller sees the policy in force
	}
}

// keepReflex keeps the reflex block of a verified answer: a new block
// replaces the one held, an answer without one forgets it, and a refused
// block is counted and logged (once while the error stays the same) and
// changes nothing. Call with c.mu held.
func (c *Client) keepReflex(a leaseAnswer) {
	switch {
	case a.reflexErr != nil:
		c.policyErrors.Add(1)
		c.setError(a.reflexErr)
		if msg := a.reflexErr.Error(); msg != c.reflexErr {
			c.reflexErr = msg
			c.log.Warn("waitstate: reflex rules refused; the policy still applies", "error", a.reflexErr)
		}
		return
	case a.reflex == nil:
		if c.reflex != nil {
			c.log.Info("waitstate: the control plane sends no reflex rules any more")
		}
		c.reflex = nil
		c.resetSampler()
	case c.reflex == nil || !bytes.Equal(c.reflex.raw, a.reflex.raw):
		if c.reflex == nil || !slices.Equal(c.reflex.skip, a.reflex.skip) {
			for _, why := range a.reflex.skip {
				c.log.Warn("waitstate: a reflex rule will not run on this instance", "reason", why)
			}
		}
		if c.reflex == nil || !slices.Equal(c.reflex.rules, a.reflex.rules) {
			c.log.Info("waitstate: reflex rules received", "rules", len(a.reflex.rules), "local", len(a.reflex.local),
				"fired", a.reflex.fired, "rule_window", a.reflex.window)
		}
		c.reflex = a.reflex
		c.resetSampler()
	}
	c.reflexErr = ""
}

// defaultLease is the lease when an answer names none: 3 × the longer
// interval in force.
func (c *Client) defaultLease() time.Duration {
	return 3 * max(c.pulseInterval(), c.syncInterval())
}

// leaseExpired runs on the lease timer: it enters safe mode unless the lease
// was renewed meanwhile.
func (c *Client) leaseExpired() {
	c.mu.Lock()
	if c.closed || c.mode != ModeEnforcing || c.initial {
		c.mu.Unlock()
		return
	}
	now := c.clock()
	if left := c.leaseDeadline - now; left > 0 {
		c.leaseTimer.Reset(left) // renewed while the timer was firing
		c.mu.Unlock()
		return
	}
	c.log.Warn("waitstate: lease expired, entering safe mode", "version", c.policy.Version,
		"strategy", c.opts.SafeMode.String(), "max_rps", c.opts.SafeModeMaxRPS)
	c.setMode(ModeSafeMode)
	c.safe.reset(now)
	if c.opts.SafeMode == SafeModeLocalRules {
		c.enterLocalRules(now)
	}
	c.publish()
	c.mu.Unlock()
	c.runCallbacks(false)
}

// event is a callback to run: a change of mode, or a policy applied.
type event struct {
	from, to Mode
	policy   *Policy // set for OnPolicyApplied
}

// runCallbacks runs the queued callbacks in order, outside every lock, one
// at a time across the client: a goroutine that finds another running them
// leaves its events to it (wait unset) or waits its turn (wait set).
func (c *Client) runCallbacks(wait bool) {
	for {
		if wait {
			c.callbacks <- struct{}{}
		} else {
			select {
			case c.callbacks <- struct{}{}:
			default:
				return // the running goroutine will see our events
			}
		}
		c.mu.Lock()
		evs := c.events
		c.events = nil
		c.mu.Unlock()
		for _, ev := range evs {
			c.runCallback(ev)
		}
		<-c.callbacks
		c.mu.Lock()
		more := len(c.events) > 0
		c.mu.Unlock()
		if !more {
			return
		}
	}
}

func (c *Client) runCallback(ev event) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("waitstate: a callback panicked", "panic", p)
		}
	}()
	if ev.policy != nil {
		c.opts.OnPolicyApplied(ev.policy)
	} else {
		c.opts.OnModeChange(ev.from, ev.to)
	}
}

// setError records err as the last error.
func (c *Client) setError(err error) {
	msg := err.Error()
	c.lastErr.Store(&msg)
}

// isConfigError reports whether err is a 401 or 403: keys or site that the
// control plane refuses, which retrying soon will not mend.
func isConfigError(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && (se.StatusCode == http.StatusUnauthorized || se.StatusCode == http.StatusForbidden)
}

// jitter spreads d by ±10 %, so that a fleet started together does not
// pulse together.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}
