// Package controlplane is a WaitState control plane that speaks the whole
// protocol on loopback: it verifies every signature and token,
// signs every 2xx answer, counts each (instance, seq) once, serves policies
// per site, and can be told to fail in every way the SDK must survive.
//
// It imports nothing of the SDK, so the SDK's own tests can use it; the
// public waitstatetest package wraps it for users.
package controlplane

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

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
	Instances      int // distinct instances that sent them
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

type instanceSeq struct {
	instance string
	seq      uint64
}

// Server is a control plane on loopback. Its methods are safe for
// concurrent use.
type Server struct {
	// URL is the base URL, such as http://127.0.0.1:50123.
	URL string

	srv  *httptest.Server
	quit chan struct{}

	mu         sync.Mutex
	keys       map[string]string     // publish key → secret key
	sites      map[string]*siteState // "" is the default for sites without their own
	ruleWindow time.Duration
	logLimit   int
	events     []Event
	leaseTTL   time.Duration
	pulseEvery time.Duration // pulseIntervalMs of every answer; 0 leaves it out
	syncEvery  time.Duration // syncIntervalMs of every answer; 0 leaves it out
	tokenTTL   time.Duration
	faults     Faults
	counted    map[instanceSeq]bool
	pulses     []Pulse
	requests   []Request
	tokens     map[string]bool // issued and not revoked
	inflight   map[string]int  // by instance and loop ("pulse" or "sync")
	maxFlight  map[string]int
	lastReply  map[string]reply
	closeOnce  sync.Once
}

type reply struct {
	body []byte
	sig  string
}

// siteState is what the control plane holds for one site.
type siteState struct {
	base      *Policy               // its own policy; nil: the default site's
	raw       json.RawMessage       // a policy served as it is, rules or not
	rules     []Rule                // its own rules; nil: the default site's
	bumps     int64                 // policy changes made by its rules
	firing    map[string]*ruleState // by rule name
	samples   []sample              // its pulses within the rule window
	evaluated time.Time             // when its rules were last stepped
	totals    Totals                // over every pulse counted
	instances map[string]bool       // that ever pulsed
}

// DefaultRuleWindow is how far back the rules look unless SetRuleWindow
// says otherwise.
const DefaultRuleWindow = 5 * time.Second

// New starts a control plane on loopback that knows no keys and has no
// policy. Close it when done.
func New() *Server {
	s := NewUnstarted()
	s.srv = httptest.NewServer(s.Handler())
	s.URL = s.srv.URL
	return s
}

// NewUnstarted returns a control plane that serves nothing until its
// Handler is mounted on a server of the caller's; Close still releases
// hung requests.
func NewUnstarted() *Server {
	return &Server{
		quit:       make(chan struct{}),
		keys:       map[string]string{},
		sites:      map[string]*siteState{},
		ruleWindow: DefaultRuleWindow,
		logLimit:   DefaultLogLimit,
		tokenTTL:   time.Hour,
		counted:    map[instanceSeq]bool{},
		tokens:     map[string]bool{},
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

// site returns a site's state, creating it. Call with s.mu held.
func (s *Server) site(name string) *siteState {
	st := s.sites[name]
	if st == nil {
		st = &siteState{firing: map[string]*ruleState{}}
		s.sites[name] = st
	}
	return st
}

// AddKey makes a key pair known.
func (s *Server) AddKey(publishKey, secretKey string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys[publishKey] = secretKey
}

// SetPolicy sets the base policy of site ("" is the default for sites
// without one of their own). The policy served is the base with the limits
// of the site's firing rules applied; its version is the base's plus the
// number of changes the rules have made.
func (s *Server) SetPolicy(site string, p Policy) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.site(site)
	p.TagMaxWeights = maps.Clone(p.TagMaxWeights)
	st.base, st.raw = &p, nil
}

// SetPolicyJSON sets a policy as raw JSON, served as it is and always (its
// version is not read): for policies the SDK must refuse.
func (s *Server) SetPolicyJSON(site, raw string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.site(site).raw = json.RawMessage(raw)
}

// SetRules sets the reflex rules of site ("" is the default for sites
// without rules of their own). Rules that keep their name keep their state.
func (s *Server) SetRules(site string, rules ...Rule) error {
	seen := map[string]bool{}
	for _, r := range rules {
		if err := r.Validate(); err != nil {
			return err
		}
		if seen[r.Name] {
			return fmt.Errorf("two rules named %q", r.Name)
		}
		seen[r.Name] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.site(site).rules = slices.Clone(rules)
	return nil
}

// SetRuleWindow sets how far back the rules look: the metrics are computed
// over the pulses received within it. A few pulse intervals is right.
func (s *Server) SetRuleWindow(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ruleWindow = d
}

// Events returns the rules' firings and clearings so far, in order.
func (s *Server) Events() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.events)
}

// Metrics returns site's figures over the rule window.
func (s *Server) Metrics(site string) Metrics {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.site(site)
	st.prune(time.Now(), s.ruleWindow)
	return metrics(st.samples, s.ruleWindow)
}

// prune drops the samples older than window.
func (st *siteState) prune(now time.Time, window time.Duration) {
	i := 0
	for i < len(st.samples) && now.Sub(st.samples[i].at) > window {
		i++
	}
	st.samples = st.samples[i:]
}

// evaluate records a pulse of site and steps its rules, at most once per
// twentieth of the rule window (and at least every 100 ms of pulses): the
// metrics are computed over every pulse in the window, so a large fleet
// must not recompute them on every pulse. Call with s.mu held.
func (s *Server) evaluate(site string, p *Pulse, now time.Time) {
	st := s.site(site)
	st.samples = append(st.samples, sample{at: now, instance: p.InstanceID, calls: p.UsageDelta + p.BouncedDelta, health: p.Health,
		tags: p.Tags, metrics: p.Metrics})
	st.prune(now, s.ruleWindow)
	rules := s.rulesOf(st)
	if len(rules) == 0 || now.Sub(st.evaluated) < min(s.ruleWindow/20, 100*time.Millisecond) {
		return
	}
	st.evaluated = now
	scopes := map[string]Metrics{} // by MetricTag, computed once per step
	for _, r := range rules {
		rs := st.firing[r.Name]
		if rs == nil {
			rs = &ruleState{}
			st.firing[r.Name] = rs
		}
		m, ok := scopes[r.MetricTag]
		if !ok {
			m = scopeMetrics(st.samples, s.ruleWindow, r.MetricTag)
			scopes[r.MetricTag] = m
		}
		if changed, v := rs.step(r, m, now); changed {
			st.bumps++
			_, version, _ := s.policyLocked(site)
			s.events = append(s.events, Event{At: now, Site: site, Rule: r.Name, Fired: rs.firing, Value: v, Version: version})
		}
	}
}

// rulesOf returns a site's rules: its own, else the default site's.
func (s *Server) rulesOf(st *siteState) []Rule {
	if st.rules != nil {
		return st.rules
	}
	if def := s.sites[""]; def != nil {
		return def.rules
	}
	return nil
}

// SetLeaseTTL sets the leaseTtlMs of every answer; 0 leaves it out.
func (s *Server) SetLeaseTTL(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leaseTTL = d
}

// SetIntervals sets the pulseIntervalMs and syncIntervalMs of every answer,
// which clients adopt from their next tick; 0 leaves a field out.
func (s *Server) SetIntervals(pulse, sync time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pulseEvery, s.syncEvery = pulse, sync
}

// SetTokenTTL sets the lifetime of the tokens issued from now on.
func (s *Server) SetTokenTTL(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenTTL = d
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
	clear(s.tokens)
}

// Pulses returns the pulses counted so far (the last SetLogLimit), in order of
// arrival; a repeated (instance, seq) is acknowledged but not listed again.
func (s *Server) Pulses() []Pulse {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.pulses)
}

// Requests returns the requests received so far (the last SetLogLimit).
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// Totals adds up the pulses counted from site, since the server started.
func (s *Server) Totals(site string) Totals {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.site(site)
	t := st.totals
	t.Tags = maps.Clone(st.totals.Tags)
	if t.Tags == nil {
		t.Tags = map[string]TagCount{}
	}
	t.Instances = len(st.instances)
	return t
}

// count adds a counted pulse to its site's totals. Call with s.mu held.
func (s *Server) count(p *Pulse) {
	st := s.site(p.Site)
	if st.instances == nil {
		st.instances = map[string]bool{}
		st.totals.Tags = map[string]TagCount{}
	}
	st.instances[p.InstanceID] = true
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
}

// MaxSiteTags is how many distinct tags a site's Totals track; the counts
// of further tags go to "_other".
const MaxSiteTags = 10_000

// keep appends v to a log, dropping the oldest entries past limit.
func keep[T any](log []T, v T, limit int) []T {
	if limit <= 0 {
		return nil
	}
	if len(log) >= limit {
		log = slices.Delete(log, 0, len(log)-limit+1)
	}
	return append(log, v)
}

// DefaultLogLimit is how many requests and pulses Requests and Pulses keep
// unless SetLogLimit says otherwise; Totals counts every pulse regardless.
const DefaultLogLimit = 200_000

// SetLogLimit sets how many requests and pulses Requests and Pulses keep.
func (s *Server) SetLogLimit(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logLimit = n
}

// MaxInFlight returns, for each instance and loop ("<instance> pulse" or
// "<instance> sync"), the most requests it ever had in flight at once.
func (s *Server) MaxInFlight() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.maxFlight)
}

// recorder logs every request, its status and duration, and how many
// requests each client loop has in flight.
func (s *Server) recorder(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		at := time.Now()
		loop := r.Header.Get(wire.HeaderInstance) + " sync"
		if r.URL.Path == wire.PathPulse {
			loop = r.Header.Get(wire.HeaderInstance) + " pulse"
		}
		s.mu.Lock()
		s.inflight[loop]++
		s.maxFlight[loop] = max(s.maxFlight[loop], s.inflight[loop])
		s.mu.Unlock()

		body, _ := io.ReadAll(io.LimitReader(r.Body, 8<<20))
		r.Body = io.NopCloser(bytes.NewReader(body))
		sw := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)

		s.mu.Lock()
		s.inflight[loop]--
		s.requests = keep(s.requests, Request{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: body,
			Status: sw.status, At: at, Duration: time.Since(at)}, s.logLimit)
		s.mu.Unlock()
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

// WriteHeader records the status and passes it on.
func (w *statusRecorder) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// hang blocks until the client gives up or the server closes.
func (s *Server) hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-s.quit:
	}
}

// preamble applies the faults that come before any processing, and
// authenticates the request. It returns the key's secret and the faults in
// force, or false when it has answered.
func (s *Server) preamble(w http.ResponseWriter, r *http.Request, signed bool, body []byte) (string, Faults, bool) {
	s.mu.Lock()
	f := s.faults
	secret, known := s.keys[r.Header.Get(wire.HeaderKey)]
	s.mu.Unlock()
	if f.Delay > 0 {
		select {
		case <-time.After(f.Delay):
		case <-r.Context().Done():
			return "", f, false
		case <-s.quit:
			return "", f, false
		}
	}
	if f.Hang {
		s.hang(r)
		return "", f, false
	}
	if f.Down {
		s.fail(w, http.StatusServiceUnavailable, f.RetryAfter)
		return "", f, false
	}
	if !known {
		s.fail(w, http.StatusUnauthorized, 0)
		return "", f, false
	}
	if signed && !verifyRequest(secret, r, body) {
		s.fail(w, http.StatusUnauthorized, 0)
		return "", f, false
	}
	return secret, f, true
}

func verifyRequest(secret string, r *http.Request, body []byte) bool {
	ts := r.Header.Get(wire.HeaderTimestamp)
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return false
	}
	if skew := time.Now().Unix() - sec; skew > wire.MaxClockSkewSeconds || skew < -wire.MaxClockSkewSeconds {
		return false
	}
	canonical := wire.RequestCanonical(r.Method, r.URL.RequestURI(), ts, r.Header.Get(wire.HeaderNonce), identity(r), body)
	return wire.Verify(secret, canonical, r.Header.Get(wire.HeaderSignature))
}

// identity is who a request says it is, as its signature binds it.
func identity(r *http.Request) wire.Identity {
	return wire.Identity{
		PublishKey: r.Header.Get(wire.HeaderKey),
		InstanceID: r.Header.Get(wire.HeaderInstance),
		SiteID:     r.Header.Get(wire.HeaderSite),
	}
}

func (s *Server) fail(w http.ResponseWriter, status int, retryAfter time.Duration) {
	if retryAfter > 0 && (status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests) {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retryAfter.Seconds()))))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":%q}`, http.StatusText(status))
}

// answer sends a signed 2xx answer, bent by the response faults.
func (s *Server) answer(w http.ResponseWriter, r *http.Request, secret string, f Faults, body []byte) {
	path := r.URL.RequestURI()
	switch {
	case f.Garbage:
		body = []byte("<html>not json</html>")
	case f.Oversize:
		body = append(bytes.Repeat([]byte(" "), 1<<20), body...)
	}
	id := identity(r)
	if f.OtherIdentity {
		id.InstanceID, id.SiteID = id.InstanceID+"-other", id.SiteID+"-other"
	}
	sig := wire.Sign(secret, wire.ResponseCanonical(path, r.Header.Get(wire.HeaderNonce), id, body))
	s.mu.Lock()
	if f.Replay {
		if prev, ok := s.lastReply[path]; ok {
			body, sig = prev.body, prev.sig
		} else {
			// Nothing to replay yet: an answer bound to another request.
			sig = wire.Sign(secret, wire.ResponseCanonical(path, wire.RandomHex(), id, body))
		}
	} else {
		s.lastReply[path] = reply{body: body, sig: sig}
	}
	s.mu.Unlock()
	switch {
	case f.ForgeSig:
		sig = wire.Sign(secret+"forged", wire.ResponseCanonical(path, r.Header.Get(wire.HeaderNonce), id, body))
	case f.NoSig:
		sig = ""
	}
	if sig != "" {
		w.Header().Set(wire.HeaderSignature, sig)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	secret, f, ok := s.preamble(w, r, true, body)
	if !ok {
		return
	}
	if f.TokenStatus != 0 {
		s.fail(w, f.TokenStatus, f.RetryAfter)
		return
	}
	var req struct {
		InstanceID string `json:"instanceId"`
		SiteID     string `json:"siteId"`
	}
	if err := json.Unmarshal(body, &req); err != nil || req.InstanceID == "" || req.SiteID != r.Header.Get(wire.HeaderSite) {
		s.fail(w, http.StatusBadRequest, 0)
		return
	}
	s.mu.Lock()
	ttl := s.tokenTTL
	s.mu.Unlock()
	tok := s.issue(secret, r.Header.Get(wire.HeaderKey), req.SiteID, ttl, f.BadToken)
	s.mu.Lock()
	if f.BadToken == TokenOK {
		s.tokens[tok] = true
	}
	s.mu.Unlock()
	out, _ := json.Marshal(map[string]any{"token": tok, "expiresIn": int64(ttl / time.Second)})
	s.answer(w, r, secret, f, out)
}

// issue makes a token, good or bad as fault says.
func (s *Server) issue(secret, sub, site string, ttl time.Duration, fault TokenFault) string {
	now := time.Now()
	claims := jwt.MapClaims{
		"iss": wire.Issuer,
		"sub": sub,
		"iat": now.Unix(),
		"exp": now.Add(ttl).Unix(),
		"jti": wire.RandomHex(),
	}
	if site != "" {
		claims["site"] = site
	}
	method, key := jwt.SigningMethod(jwt.SigningMethodHS256), any([]byte(secret))
	switch fault {
	case TokenWrongKey:
		key = []byte(secret + "-not")
	case TokenAlgNone:
		method, key = jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType
	case TokenHS512:
		method = jwt.SigningMethodHS512
	case TokenExpired:
		claims["iat"] = now.Add(-time.Hour).Unix()
		claims["exp"] = now.Add(-2 * time.Minute).Unix()
	case TokenNoExpiry:
		delete(claims, "exp")
	case TokenWrongSubject:
		claims["sub"] = sub + "-other"
	case TokenWrongIssuer:
		claims["iss"] = "someone-else"
	case TokenWrongSite:
		claims["site"] = site + "-other"
	case TokenGarbage:
		return "not-a-jwt"
	}
	tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		panic(err)
	}
	return tok
}

// validToken checks a bearer token as strictly as the SDK does, and that it
// was issued here and not revoked.
func (s *Server) validToken(secret, key, site, bearer string) bool {
	s.mu.Lock()
	issued := s.tokens[bearer]
	s.mu.Unlock()
	if !issued {
		return false
	}
	claims := jwt.MapClaims{}
	_, err := jwt.NewParser(
		jwt.WithValidMethods([]string{"HS256"}),
		jwt.WithIssuer(wire.Issuer),
		jwt.WithSubject(key),
		jwt.WithExpirationRequired(),
	).ParseWithClaims(bearer, claims, func(*jwt.Token) (any, error) { return []byte(secret), nil })
	if err != nil {
		return false
	}
	got, _ := claims["site"].(string)
	return got == site
}

// policyFor returns the policy JSON served to site and its version (-1 for
// a raw policy); ok is false when there is none.
func (s *Server) policyFor(site string) (json.RawMessage, int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policyLocked(site)
}

// Policy returns the policy served to site now, rules applied; ok is false
// when there is none or it was set as raw JSON.
func (s *Server) Policy(site string) (Policy, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.effective(site)
	return p, ok
}

func (s *Server) policyLocked(site string) (json.RawMessage, int64, bool) {
	if raw := s.rawFor(site); raw != nil {
		return raw, -1, true
	}
	p, ok := s.effective(site)
	if !ok {
		return nil, 0, false
	}
	raw, err := json.Marshal(p)
	if err != nil {
		panic(err)
	}
	return raw, p.Version, true
}

// rawFor returns the raw policy that applies to site, if any.
func (s *Server) rawFor(site string) json.RawMessage {
	st, def := s.sites[site], s.sites[""]
	switch {
	case st != nil && st.raw != nil:
		return st.raw
	case st != nil && st.base != nil:
		return nil
	case def != nil:
		return def.raw
	}
	return nil
}

// effective is the site's base policy with its firing rules applied.
func (s *Server) effective(site string) (Policy, bool) {
	st, def := s.sites[site], s.sites[""]
	var base *Policy
	switch {
	case st != nil && st.base != nil:
		base = st.base
	case def != nil:
		base = def.base
	}
	if base == nil {
		return Policy{}, false
	}
	if st == nil {
		return overlay(*base, nil, nil), true
	}
	p := overlay(*base, s.rulesOf(st), st.firing)
	p.Version = base.Version + st.bumps
	return p, true
}

// leaseBody encodes an answer carrying policy (nil: null). The policy is
// written as it is, so that a policy set with SetPolicyJSON reaches the
// client even when it is not JSON.
func (s *Server) leaseBody(policy json.RawMessage, f Faults) []byte {
	s.mu.Lock()
	ttl, pulse, sync := s.leaseTTL, s.pulseEvery, s.syncEvery
	s.mu.Unlock()
	if policy == nil {
		policy = json.RawMessage("null")
	}
	var b bytes.Buffer
	b.WriteString(`{"policy":`)
	b.Write(policy)
	if ttl > 0 {
		fmt.Fprintf(&b, `,"leaseTtlMs":%d`, ttl.Milliseconds())
	}
	if pulse > 0 {
		fmt.Fprintf(&b, `,"pulseIntervalMs":%d`, pulse.Milliseconds())
	}
	if sync > 0 {
		fmt.Fprintf(&b, `,"syncIntervalMs":%d`, sync.Milliseconds())
	}
	if f.AnswerFields != "" {
		b.WriteString(",")
		b.WriteString(f.AnswerFields)
	}
	b.WriteString("}")
	return b.Bytes()
}

func (s *Server) handlePolicy(w http.ResponseWriter, r *http.Request) {
	secret, f, ok := s.preamble(w, r, false, nil)
	if !ok {
		return
	}
	if f.PolicyStatus != 0 {
		s.fail(w, f.PolicyStatus, f.RetryAfter)
		return
	}
	bearer, _ := bytes.CutPrefix([]byte(r.Header.Get("Authorization")), []byte("Bearer "))
	site := r.Header.Get(wire.HeaderSite)
	if !s.validToken(secret, r.Header.Get(wire.HeaderKey), site, string(bearer)) {
		s.fail(w, http.StatusUnauthorized, 0)
		return
	}
	raw, _, ok := s.policyFor(site)
	if !ok {
		s.fail(w, http.StatusNotFound, 0)
		return
	}
	if f.NullPolicy {
		raw = nil
	}
	s.answer(w, r, secret, f, s.leaseBody(raw, f))
}

func (s *Server) handlePulse(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	secret, f, ok := s.preamble(w, r, true, body)
	if !ok {
		return
	}
	if f.PulseStatus != 0 {
		s.fail(w, f.PulseStatus, f.RetryAfter)
		return
	}
	var p Pulse
	if err := json.Unmarshal(body, &p); err != nil || p.Seq == 0 || p.InstanceID != r.Header.Get(wire.HeaderInstance) {
		s.fail(w, http.StatusBadRequest, 0)
		return
	}
	p.Raw = body
	p.Site = r.Header.Get(wire.HeaderSite)
	if p.SiteID != p.Site {
		s.fail(w, http.StatusBadRequest, 0)
		return
	}
	key := instanceSeq{p.InstanceID, p.Seq}
	s.mu.Lock()
	if !s.counted[key] {
		s.counted[key] = true
		s.pulses = keep(s.pulses, p, s.logLimit)
		s.count(&p)
		s.evaluate(p.Site, &p, time.Now())
	}
	s.mu.Unlock()
	if f.CountThenHang {
		s.hang(r)
		return
	}
	var policy json.RawMessage
	if raw, version, ok := s.policyFor(p.Site); ok && version != p.PolicyVersion {
		policy = raw
	}
	if f.NullPolicy {
		policy = nil
	}
	s.answer(w, r, secret, f, s.leaseBody(policy, f))
}
