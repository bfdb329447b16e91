// Package controlplane is a WaitState control plane that speaks the whole
// protocol on loopback: it verifies every signature and token,
// signs every 2xx answer, counts each (instance, seq) once, serves policies
// per key and site, runs reflex rules, and can be told to fail in every way
// the SDK must survive. Left running, its memory stays bounded by its keys,
// sites, instances and tags (see the invariants in state.go).
//
// It imports nothing of the SDK, so the SDK's own tests can use it; the
// public waitstatetest package wraps it for users.
package controlplane

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// Policy is a policy as the control plane serves it: weight limits and shed
// percents. An infinite weight is sent as "Infinity".
type Policy = wire.Policy

// The parts of a pulse, as the protocol defines them.
type (
	TagCount  = wire.TagCount
	Health    = wire.Health
	Latency   = wire.Latency
	Histogram = wire.Histogram
	MetricAgg = wire.Metric
)

// Pulse is a pulse as received.
type Pulse struct {
	wire.PulseBody

	// Raw is the body as it arrived; Site the X-WaitState-Site header.
	Raw  []byte `json:"-"`
	Site string `json:"-"`
}

// Request is what the control plane saw of one request.
type Request struct {
	Method   string
	Path     string
	Header   http.Header
	Body     []byte
	Status   int           // the status it answered
	At       time.Time     // when it arrived
	Duration time.Duration // how long the handler took
}

// Totals are a site's counts over every pulse counted.
type Totals struct {
	Usage, Bounced uint64
	Pulses         int // pulses counted
	Instances      int // distinct instance IDs that sent them and are remembered
	Tags           map[string]TagCount
}

// TokenFault makes /v1/token issue a token that the SDK must refuse.
type TokenFault int

// The bad tokens /v1/token can issue.
const (
	TokenOK           TokenFault = iota
	TokenWrongKey                // signed with another secret
	TokenAlgNone                 // "alg": "none", no signature
	TokenHS512                   // signed with the right secret, wrong algorithm
	TokenExpired                 // exp two minutes ago (beyond the leeway)
	TokenNoExpiry                // no exp claim
	TokenWrongSubject            // sub is another key
	TokenWrongIssuer             // iss is not "waitstate"
	TokenWrongSite               // site is not the requesting site
	TokenGarbage                 // not a JWT at all
)

// Faults script how the control plane misbehaves. The zero value is a
// healthy control plane.
type Faults struct {
	Down          bool          // answer every request 503
	RetryAfter    time.Duration // with Down or a 429/503 status: the Retry-After header
	Hang          bool          // never answer, until the client gives up or Close
	Delay         time.Duration // answer every request this late
	PulseStatus   int           // answer pulses with this status, not counting them
	PolicyStatus  int           // answer GET /v1/policy with this status
	TokenStatus   int           // answer /v1/token with this status
	CountThenHang bool          // count a pulse, then never answer: a lost acknowledgement
	Garbage       bool          // 2xx answers have a body that is not JSON, correctly signed
	ForgeSig      bool          // 2xx answers carry a wrong signature
	NoSig         bool          // 2xx answers carry no signature
	Replay        bool          // 2xx answers replay an earlier answer to the same path (or are bound to another nonce)
	Oversize      bool          // 2xx answers have a body over 1 MiB, correctly signed
	BadToken      TokenFault    // /v1/token issues this kind of bad token
	NullPolicy    bool          // answers carry "policy": null
	AnswerFields  string        // raw JSON members added to every lease answer, such as `"pulseIntervalMs": null`
	OtherIdentity bool          // 2xx answers are signed for another instance and site, as if relayed from them
}

// Server is a control plane on loopback. Its methods are safe for
// concurrent use.
type Server struct {
	// URL is the base URL, such as http://127.0.0.1:50123.
	URL string

	srv  *httptest.Server
	quit chan struct{}
	// epoch names this control plane's state in every answer: a server
	// made anew, its policies' versions begun again, has another, so that
	// clients follow it at once.
	epoch string

	// mu guards the configuration and the maps of keys and tenants; no
	// pulse holds it while it counts or evaluates rules.
	mu         sync.Mutex
	keys       map[string]string  // publish key → secret key
	primary    string             // the first key added: the one Totals, Metrics and Policy read
	tenants    map[string]*tenant // by publish key
	config     map[string]*siteConfig
	resolved   map[string]*resolved // by site, for the current gen
	gen        int64                // bumped by every configuration change
	ruleWindow time.Duration
	leaseTTL   time.Duration
	pulseEvery time.Duration // pulseIntervalMs of every answer; 0 leaves it out
	syncEvery  time.Duration // syncIntervalMs of every answer; 0 leaves it out
	tokenTTL   time.Duration
	tokenGen   int64 // tokens of an earlier generation are revoked
	faults     Faults
	inflight   map[string]int // by known key's instance and loop
	maxFlight  map[string]int
	lastReply  map[string]reply // by path

	nonces nonceMemory

	// now reads the clock by which pulses are counted into the rule
	// windows and sites and processes go idle: time.Now, or a test's.
	now func() time.Time

	logger   atomic.Pointer[slog.Logger] // what the operator should know; nil discards
	observer atomic.Pointer[Observer]    // told of the primary key's counted pulses; nil: none

	logMu    sync.Mutex
	logLimit int
	logBytes int
	requests boundedLog[Request]
	pulses   boundedLog[Pulse]
	events   boundedLog[Event]

	closeOnce sync.Once
}

type reply struct {
	body []byte
	sig  string
}

// siteConfig is what the operator set for one site name, for every key.
type siteConfig struct {
	base     *Policy         // its own policy; nil: the default site's
	raw      json.RawMessage // a policy served as it is, rules or not
	rules    []Rule          // its own rules; nil: the default site's
	incident time.Duration   // its incident pulse interval; 0: the default site's, else derived
}

// resolved is a site's configuration with the defaults filled in, as one
// request reads it. It is never changed once built.
type resolved struct {
	gen        int64
	base       *Policy
	raw        json.RawMessage
	rules      []Rule
	watched    []string // the tags the rules measure
	incident   time.Duration
	window     time.Duration
	leaseTTL   time.Duration
	pulseEvery time.Duration
	syncEvery  time.Duration
}

// DefaultRuleWindow is how far back the rules look unless SetRuleWindow
// says otherwise.
const DefaultRuleWindow = 5 * time.Second

// Timeouts are the HTTP server's limits on a slow or idle client.
type Timeouts struct {
	ReadHeader time.Duration // to read a request's headers
	Read       time.Duration // to read a whole request, body included
	Write      time.Duration // from the end of the headers to the end of the answer
	Idle       time.Duration // a keep-alive connection waiting for its next request
}

// DefaultTimeouts are those of New: generous for a client on loopback,
// short enough that a slow or idle connection does not stay open.
var DefaultTimeouts = Timeouts{ReadHeader: 5 * time.Second, Read: 10 * time.Second, Write: 20 * time.Second, Idle: 15 * time.Second}

// maxHeaderBytes bounds a request's headers; the protocol's are short.
const maxHeaderBytes = 64 << 10

// Apply sets the timeouts, and a bound on request headers, on srv.
func (t Timeouts) Apply(srv *http.Server) {
	srv.ReadHeaderTimeout, srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout = t.ReadHeader, t.Read, t.Write, t.Idle
	srv.MaxHeaderBytes = maxHeaderBytes
}

// New starts a control plane on loopback, with DefaultTimeouts, that knows
// no keys and has no policy. Close it when done.
func New() *Server { return NewWithTimeouts(DefaultTimeouts) }

// NewWithTimeouts is New with other timeouts.
func NewWithTimeouts(t Timeouts) *Server {
	s := NewUnstarted()
	s.srv = httptest.NewUnstartedServer(s.Handler())
	t.Apply(s.srv.Config)
	s.srv.Start()
	s.URL = s.srv.URL
	return s
}

// NewUnstarted returns a control plane that serves nothing until its
// Handler is mounted on a server of the caller's (see Timeouts.Apply);
// Close still releases hung requests.
func NewUnstarted() *Server {
	return &Server{
		epoch:      wire.RandomHex(),
		now:        time.Now,
		quit:       make(chan struct{}),
		keys:       map[string]string{},
		tenants:    map[string]*tenant{},
		config:     map[string]*siteConfig{},
		resolved:   map[string]*resolved{},
		ruleWindow: DefaultRuleWindow,
		logLimit:   DefaultLogLimit,
		logBytes:   DefaultLogBytes,
		tokenTTL:   time.Hour,
		inflight:   map[string]int{},
		maxFlight:  map[string]int{},
		lastReply:  map[string]reply{},
	}
}

// String describes the server by its URL; it holds secret keys and never
// shows them.
func (s *Server) String() string { return fmt.Sprintf("controlplane.Server{URL:%q}", s.URL) }

// Format prints s as String does, whatever the verb.
func (s *Server) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(s.String())) }

// Handler serves the protocol: POST /v1/token, GET /v1/policy and
// POST /v1/pulse.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+wire.PathToken, s.handleToken)
	mux.HandleFunc("GET "+wire.PathPolicy, s.handlePolicy)
	mux.HandleFunc("POST "+wire.PathPulse, s.handlePulse)
	return s.recorder(mux)
}

// Close releases hung requests and, when New started the server, stops it.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.quit)
		if s.srv != nil {
			s.srv.CloseClientConnections()
			s.srv.Close()
		}
	})
}

// AddKey makes a key pair known. The first key added is the one Totals,
// Metrics and Policy report on; the ...Of methods take a key.
func (s *Server) AddKey(publishKey, secretKey string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys[publishKey] = secretKey
	if s.primary == "" {
		s.primary = publishKey
	}
}

// configure changes a site's configuration. Call with s.mu held.
func (s *Server) configure(site string, change func(*siteConfig)) {
	c := s.config[site]
	if c == nil {
		c = &siteConfig{}
		s.config[site] = c
	}
	change(c)
	s.changed()
}

// changed invalidates every resolved configuration. Call with s.mu held.
func (s *Server) changed() {
	s.gen++
	clear(s.resolved)
}

// resolve returns site's configuration with the defaults filled in.
func (s *Server) resolve(site string) *resolved {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.resolved[site]; r != nil {
		return r
	}
	own, def := s.config[site], s.config[""]
	if own == nil {
		own = &siteConfig{}
	}
	if def == nil {
		def = &siteConfig{}
	}
	r := &resolved{gen: s.gen, window: s.ruleWindow, leaseTTL: s.leaseTTL, pulseEvery: s.pulseEvery, syncEvery: s.syncEvery,
		rules: own.rules, incident: own.incident}
	switch {
	case own.raw != nil:
		r.raw = own.raw
	case own.base != nil:
		r.base = own.base
	default:
		r.raw, r.base = def.raw, def.base
	}
	if r.rules == nil {
		r.rules = def.rules
	}
	if r.incident == 0 {
		r.incident = def.incident
	}
	for _, rule := range r.rules {
		if rule.MetricTag != "" && !slices.Contains(r.watched, rule.MetricTag) {
			r.watched = append(r.watched, rule.MetricTag)
		}
	}
	if len(s.resolved) < maxResolved {
		s.resolved[site] = r
	}
	return r
}

// maxResolved bounds the cache of resolved configurations; sites beyond it
// are resolved per request.
const maxResolved = 10_000

// tenant returns the state of a publish key, creating it. Only keys that
// authenticated get one.
func (s *Server) tenant(key string) *tenant {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tenants[key]
	if t == nil {
		t = &tenant{sites: map[string]*siteState{}}
		s.tenants[key] = t
	}
	return t
}

// SetPolicy sets the base policy of site ("" is the default for sites
// without one of their own), for every key. The policy a key's site is
// served is the base with the actions of that site's firing rules applied;
// its version is the base's plus the number of changes the rules have made.
func (s *Server) SetPolicy(site string, p Policy) {
	p.TagMaxWeights = maps.Clone(p.TagMaxWeights)
	p.TagShedPercents = maps.Clone(p.TagShedPercents)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.configure(site, func(c *siteConfig) { c.base, c.raw = &p, nil })
}

// SetPolicyJSON sets a policy as raw JSON, served as it is and always (its
// version is not read): for policies the SDK must refuse.
func (s *Server) SetPolicyJSON(site, raw string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.configure(site, func(c *siteConfig) { c.raw = json.RawMessage(raw) })
}

// SetRules sets the reflex rules of site ("" is the default for sites
// without rules of their own). Rules that keep their name keep their
// state. A tag a rule newly measures (its MetricTag) is aggregated from
// then on: its figures fill within one rule window.
func (s *Server) SetRules(site string, rules ...Rule) error {
	if err := reflex.ValidateSet(rules); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.configure(site, func(c *siteConfig) { c.rules = slices.Clone(rules) })
	return nil
}

// Rules returns the reflex rules in force for site: its own, else the
// default site's.
func (s *Server) Rules(site string) []Rule { return slices.Clone(s.resolve(site).rules) }

// Observer is told of each pulse the control plane counts for its primary
// key (the first key added): the pulse, whole (every tag's health
// included), the rule events its evaluation made, and the pulse interval
// the answer sets (0: none). It runs on the pulse's request, after the
// count, with no lock of the control plane held: keep it short. It must
// not keep p or its maps.
type Observer func(site string, p *Pulse, events []Event, pulseEvery time.Duration)

// SetObserver sets the observer of counted pulses; nil removes it.
func (s *Server) SetObserver(o Observer) {
	if o == nil {
		s.observer.Store(nil)
		return
	}
	s.observer.Store(&o)
}

// SetIncidentPulseInterval sets the pulseIntervalMs that site's answers
// carry while one of its rules is fired ("" is the default for sites
// without one of their own). Unset, it is min(normal, max(normal/4,
// 250 ms)), normal being the interval of SetIntervals or, without one, the
// site's clients' own when the incident began: the shortest their pulses
// declare (ownPulseIntervalMs), else estimated from their windows; it
// never slows a client down. After every rule has cleared, answers carry the
// normal interval again; one learned from the clients is left out again a
// lease later, so that clients that join later keep their own.
func (s *Server) SetIncidentPulseInterval(site string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.configure(site, func(c *siteConfig) { c.incident = d })
}

// SetRuleWindow sets how far back the rules look: the metrics are computed
// over the pulses received within it. A few pulse intervals is right. The
// figures gathered so far are dropped.
func (s *Server) SetRuleWindow(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ruleWindow = d
	s.changed()
}

// SetLeaseTTL sets the leaseTtlMs of every answer; 0 leaves it out.
func (s *Server) SetLeaseTTL(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leaseTTL = d
	s.changed()
}

// SetIntervals sets the pulseIntervalMs and syncIntervalMs of every answer,
// which clients adopt from their next tick; 0 leaves a field out.
func (s *Server) SetIntervals(pulse, sync time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pulseEvery, s.syncEvery = pulse, sync
	s.changed()
}

// SetTokenTTL sets the lifetime of the tokens issued from now on.
func (s *Server) SetTokenTTL(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenTTL = d
}

// SetLogger sets where the control plane says what its operator should
// know, such as two processes pulsing under one instance ID; nil (the
// default) discards it.
func (s *Server) SetLogger(l *slog.Logger) { s.logger.Store(l) }

// warn logs msg at the Warn level when a logger is set.
func (s *Server) warn(msg string, args ...any) {
	if l := s.logger.Load(); l != nil {
		l.Warn(msg, args...)
	}
}

// SetFaults replaces the faults in force; Faults{} heals the server.
func (s *Server) SetFaults(f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = f
}

// RevokeTokens makes every token issued so far invalid.
func (s *Server) RevokeTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenGen++
}

// DefaultLogLimit is how many requests, pulses and events Requests, Pulses
// and Events keep unless SetLogLimit says otherwise; DefaultLogBytes bounds
// the bytes each log holds. Totals counts every pulse regardless.
const (
	DefaultLogLimit = 10_000
	DefaultLogBytes = 32 << 20
)

// SetLogLimit sets how many requests, pulses and events the logs keep.
func (s *Server) SetLogLimit(n int) {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	s.logLimit = n
}

// SetLogBytes sets how many bytes each log may hold, by an estimate of
// what its entries keep.
func (s *Server) SetLogBytes(n int) {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	s.logBytes = n
}

// Events returns the rules' firings and clearings still in the log, in
// order; Seq tells whether any were dropped.
func (s *Server) Events() []Event {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.events.all()
}

// Pulses returns the pulses counted that are still in the log, in order of
// arrival; a repeated (instance, seq) is acknowledged but not listed again.
func (s *Server) Pulses() []Pulse {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.pulses.all()
}

// Requests returns the requests still in the log, in order of arrival.
func (s *Server) Requests() []Request {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.requests.all()
}

// primaryKey is the key that Totals, Metrics and Policy read.
func (s *Server) primaryKey() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.primary
}

// Totals adds up the pulses counted from site, under the first key added.
func (s *Server) Totals(site string) Totals { return s.TotalsOf(s.primaryKey(), site) }

// TotalsOf adds up the pulses counted from site under key.
func (s *Server) TotalsOf(key, site string) Totals {
	st := s.tenant(key).peek(site)
	st.mu.Lock()
	defer st.mu.Unlock()
	t := st.totals
	t.Tags = maps.Clone(st.totals.Tags)
	if t.Tags == nil {
		t.Tags = map[string]TagCount{}
	}
	t.Instances = len(st.instances)
	return t
}

// Sites returns the sites that pulsed under the first key added, sorted.
func (s *Server) Sites() []string {
	t := s.tenant(s.primaryKey())
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Sorted(maps.Keys(t.sites))
}

// Metrics returns site's figures over the rule window, under the first key
// added.
func (s *Server) Metrics(site string) Metrics { return s.MetricsOf(s.primaryKey(), site, "") }

// MetricsOf returns the figures of site under key over the rule window, for
// the whole site (tag "") or for a tag that one of the site's rules
// measures.
func (s *Server) MetricsOf(key, site, tag string) Metrics {
	cfg := s.resolve(site)
	st := s.tenant(key).peek(site)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.fit(cfg)
	return st.window.metrics(s.now(), cfg.window, tag)
}

// Policy returns the policy served to site now under the first key added,
// rules applied; ok is false when there is none or it was set as raw JSON.
func (s *Server) Policy(site string) (Policy, bool) { return s.PolicyOf(s.primaryKey(), site) }

// PolicyOf returns the policy served to site under key now.
func (s *Server) PolicyOf(key, site string) (Policy, bool) {
	cfg := s.resolve(site)
	if cfg.raw != nil || cfg.base == nil {
		return Policy{}, false
	}
	st := s.tenant(key).peek(site)
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.effective(cfg), true
}

// AnswerBuilds returns how many times the policy JSON and reflex block of
// site under key were built: once per change of the policy, the rules or
// what they fired, however many answers carried them.
func (s *Server) AnswerBuilds(key, site string) int {
	st := s.tenant(key).peek(site)
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.builds
}

// MaxInFlight returns, for each instance and loop ("<instance> pulse" or
// "<instance> sync"), the most authenticated requests it ever had in flight
// at once. It holds at most 10,000 loops: beyond, a new loop takes the
// place of one that never had two requests at once and has none in flight.
func (s *Server) MaxInFlight() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.maxFlight)
}

// MaxSiteTags is how many distinct tags a site's Totals track; the counts
// of further tags go to "_other".
const MaxSiteTags = 10_000

// fit empties the site's aggregates when the rule window changed. Call with
// st.mu held.
func (st *siteState) fit(cfg *resolved) {
	if width := max(cfg.window/windowSlots, time.Millisecond); st.window.width != width {
		st.window.reset(width)
	}
}

// count counts a pulse once: its totals and its rule aggregates. It
// reports false for a pulse already counted, and shared as dedupe does.
// Call with st.mu held.
func (st *siteState) count(p *Pulse, cfg *resolved, now time.Time) (counted, shared bool) {
	inc, fresh, shared := st.dedupe(p, cfg, now)
	if !fresh {
		return false, shared
	}
	if st.totals.Tags == nil {
		st.totals.Tags = map[string]TagCount{}
	}
	st.totals.Pulses++
	st.totals.Usage += p.UsageDelta
	st.totals.Bounced += p.BouncedDelta
	for tag, c := range p.Tags {
		if _, ok := st.totals.Tags[tag]; !ok && len(st.totals.Tags) >= MaxSiteTags {
			tag = "_other" // a tag flood must not grow the control plane without bound either
		}
		prev := st.totals.Tags[tag]
		st.totals.Tags[tag] = TagCount{Usage: prev.Usage + c.Usage, Bounced: prev.Bounced + c.Bounced}
	}
	st.fit(cfg)
	st.window.add(p, inc, now, cfg.watched)
	return true, shared
}

// evaluate steps the site's rules, at most once per slot of the rule window
// (and at least every 100 ms of pulses), and returns the firings and
// clearings. Call with st.mu held.
func (st *siteState) evaluate(cfg *resolved, now time.Time) []Event {
	if len(cfg.rules) == 0 || now.Sub(st.evaluated) < min(cfg.window/windowSlots, 100*time.Millisecond) {
		return nil
	}
	st.evaluated = now
	wasFiring := st.anyFiring(cfg)
	changes := reflex.Evaluate(cfg.rules, st.firing, func(tag string) reflex.Figures {
		return st.window.metrics(now, cfg.window, tag).Figures
	}, now)
	events := make([]Event, 0, len(changes))
	for _, c := range changes {
		events = append(events, Event{At: now, Rule: c.Rule, Fired: c.Fired, Value: c.Value})
	}
	if len(events) > 0 {
		st.bumps++ // one policy change per step, however many rules changed in it
	}
	for i := range events {
		events[i].Version = st.version(cfg)
	}
	switch firing := st.anyFiring(cfg); {
	case !wasFiring && firing:
		// The clients' own interval, learned afresh for each incident: the
		// shortest they declare, so that the incident's never slows one
		// down, else estimated from the windows of clients that declare
		// none.
		normal := st.window.ownInterval(now)
		if normal == 0 {
			normal = st.window.meanWindow(now).Round(10 * time.Millisecond)
		}
		if normal > 0 {
			st.normal = normal
		}
	case wasFiring && !firing:
		st.cleared = now
	}
	return events
}

// anyFiring reports whether one of the site's rules is fired.
func (st *siteState) anyFiring(cfg *resolved) bool {
	for _, r := range cfg.rules {
		if rs := st.firing[r.Name]; rs != nil && rs.Fired {
			return true
		}
	}
	return false
}

// pulseInterval is the pulseIntervalMs of the site's answers at now: the
// incident interval while a rule is fired, else the normal one (0: none).
// Without a normal interval of SetIntervals, the normal one is the clients'
// own, learned when the incident began, and sent until one lease after
// the incident cleared: every live client has had an answer by then, and
// is back at it; later answers leave the interval out, so that clients
// that join later keep their own. Call with st.mu held.
func (st *siteState) pulseInterval(cfg *resolved, now time.Time) time.Duration {
	normal := cfg.pulseEvery
	if normal == 0 && !st.anyFiring(cfg) && st.normal > 0 && now.Sub(st.cleared) > clientLease(cfg) {
		st.normal = 0 // told to every client that was there
	}
	if normal == 0 {
		normal = st.normal
	}
	if !st.anyFiring(cfg) {
		return normal
	}
	if cfg.incident > 0 {
		return cfg.incident
	}
	if normal == 0 {
		return 0
	}
	return min(normal, max(normal/4, minIncidentInterval))
}

// clientLease is the lease the site's clients hold: the one the control
// plane sends, or the client's default without one.
func clientLease(cfg *resolved) time.Duration {
	if cfg.leaseTTL > 0 {
		return cfg.leaseTTL
	}
	return defaultClientLease
}

// minIncidentInterval is the shortest incident interval the default picks.
const minIncidentInterval = 250 * time.Millisecond

// version is the version of the policy the site is served.
func (st *siteState) version(cfg *resolved) int64 {
	if cfg.base == nil {
		return 0
	}
	return cfg.base.Version + st.bumps
}

// effective is the base policy with the site's firing rules applied. Call
// with st.mu held.
func (st *siteState) effective(cfg *resolved) Policy {
	p := reflex.Overlay(*cfg.base, cfg.rules, reflex.FiredIn(st.firing))
	p.Version = st.version(cfg)
	return p
}

// policy returns the policy JSON the site is served and its version (-1
// for a raw policy), and the reflex block its answers carry (nil without
// rules or a base policy), built once per change; ok is false when there
// is no policy. Call with st.mu held.
func (st *siteState) policy(cfg *resolved) (policy json.RawMessage, version int64, block json.RawMessage, ok bool) {
	switch {
	case cfg.raw != nil:
		return cfg.raw, -1, nil, true
	case cfg.base == nil:
		return nil, 0, nil, false
	}
	c := &st.cached
	if !c.ok || c.gen != cfg.gen || c.bumps != st.bumps {
		raw, err := json.Marshal(st.effective(cfg))
		if err != nil {
			panic(err) // a base policy is validated before it is set
		}
		c.gen, c.bumps, c.json, c.reflex, c.version, c.ok = cfg.gen, st.bumps, raw, st.reflexBlock(cfg), st.version(cfg), true
		st.builds++
	}
	return c.json, c.version, c.reflex, true
}

// reflexBlock encodes the site's reflex block: its base policy, rules,
// the rules fired now and the rule window; nil when it has no rules. Call
// with st.mu held.
func (st *siteState) reflexBlock(cfg *resolved) json.RawMessage {
	if len(cfg.rules) == 0 {
		return nil
	}
	b := reflex.Block{Base: *cfg.base, Rules: cfg.rules, Fired: []string{}, RuleWindowMs: cfg.window.Milliseconds()}
	for _, r := range cfg.rules {
		if rs := st.firing[r.Name]; rs != nil && rs.Fired {
			b.Fired = append(b.Fired, r.Name)
		}
	}
	slices.Sort(b.Fired)
	raw, err := json.Marshal(b)
	if err != nil {
		panic(err) // rules and a base policy are validated before they are set
	}
	return raw
}
