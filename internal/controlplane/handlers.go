package controlplane

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// maxNonceHeader bounds the nonce header: the SDK's nonces are 32 hex
// digits, and token nonces are remembered for the clock-skew window.
const maxNonceHeader = 128

// maxLoops bounds the loops whose requests in flight are counted
// (MaxInFlight). Only callers that hold a key's secret are counted, and one
// can name as many instances as it likes: at the bound, a new loop takes
// the place of one with nothing in flight that never had two.
const maxLoops = 10_000

// flight is a request's place in the in-flight count, once authenticated.
type flight struct{ loop string }

type flightKey struct{}

// recorder refuses a request whose instance or site header is longer than
// the SDK's InstanceID and SiteID can be (wire.MaxIDBytes), or whose nonce
// is longer than maxNonceHeader, before anything of it is kept; it logs
// every other request, its status and duration, and ends the in-flight
// count of a request that preamble authenticated (enter). It reads no
// body: it logs what the handler read.
func (s *Server) recorder(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.Header.Get(wire.HeaderInstance)) > wire.MaxIDBytes || len(r.Header.Get(wire.HeaderSite)) > wire.MaxIDBytes ||
			len(r.Header.Get(wire.HeaderNonce)) > maxNonceHeader {
			http.Error(w, "instance or site header longer than 256 bytes, or nonce longer than 128", http.StatusBadRequest)
			return
		}
		at := time.Now()
		fl := &flight{}
		r = r.WithContext(context.WithValue(r.Context(), flightKey{}, fl))
		s.logMu.Lock()
		logging := s.logLimit > 0
		s.logMu.Unlock()
		body := &capture{ReadCloser: r.Body}
		if logging {
			r.Body = body
		}
		sw := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)

		if fl.loop != "" {
			s.mu.Lock()
			if s.inflight[fl.loop]--; s.inflight[fl.loop] <= 0 {
				delete(s.inflight, fl.loop)
			}
			s.mu.Unlock()
		}
		if !logging {
			return
		}
		req := Request{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: bytes.Clone(body.buf.Bytes()),
			Status: sw.status, At: at, Duration: time.Since(at)}
		cost := 256 + len(req.Path) + len(req.Body)
		for k, vs := range req.Header {
			for _, v := range vs {
				cost += len(k) + len(v)
			}
		}
		s.logMu.Lock()
		s.requests.add(req, cost, s.logLimit, s.logBytes)
		s.logMu.Unlock()
	})
}

// capture keeps what is read of a request body, for the log.
type capture struct {
	io.ReadCloser
	buf bytes.Buffer
}

func (c *capture) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.buf.Write(p[:n])
	return n, err
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

// preamble authenticates a request and applies the faults that come
// before any processing. The key is checked first; the body of a signed
// request is read only then, at most wire.MaxBody of it, and before any
// delay or hang (a server notices a client that gave up only once it has
// read the body). The signature, or the bearer token of an unsigned
// request, is checked next, and only an authenticated request is counted
// in flight; the faults then answer every caller alike, as an outage
// would, and only after them is a token request's nonce recorded and an
// unauthenticated request refused. It returns the key's secret, the faults
// in force and the body, or false when it has answered.
func (s *Server) preamble(w http.ResponseWriter, r *http.Request, signed bool) (string, Faults, []byte, bool) {
	s.mu.Lock()
	f := s.faults
	key := r.Header.Get(wire.HeaderKey)
	secret, known := s.keys[key]
	s.mu.Unlock()
	if !known {
		s.fail(w, http.StatusUnauthorized, 0)
		return "", f, nil, false
	}
	var body []byte
	if signed {
		if r.ContentLength > wire.MaxBody {
			s.fail(w, http.StatusRequestEntityTooLarge, 0)
			return "", f, nil, false
		}
		var err error
		buf := bytes.NewBuffer(make([]byte, 0, max(r.ContentLength, 0)+bytes.MinRead))
		_, err = buf.ReadFrom(http.MaxBytesReader(w, r.Body, wire.MaxBody))
		if body = buf.Bytes(); err != nil {
			status := http.StatusBadRequest
			var tooLarge *http.MaxBytesError
			if errors.As(err, &tooLarge) {
				status = http.StatusRequestEntityTooLarge
			}
			s.fail(w, status, 0)
			return "", f, nil, false
		}
	}
	var ts int64
	var authed bool
	if signed {
		ts, authed = verifyRequest(secret, r, body)
	} else {
		bearer, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		authed = s.validToken(secret, key, r.Header.Get(wire.HeaderSite), bearer)
	}
	if authed {
		s.enter(r)
	}
	if f.Delay > 0 {
		select {
		case <-time.After(f.Delay):
		case <-r.Context().Done():
			return "", f, nil, false
		case <-s.quit:
			return "", f, nil, false
		}
	}
	if f.Hang {
		s.hang(r)
		return "", f, nil, false
	}
	if f.Down {
		s.fail(w, http.StatusServiceUnavailable, f.RetryAfter)
		return "", f, nil, false
	}
	if authed && r.URL.Path == wire.PathToken {
		// A replayed token request would mint a token; a replayed pulse
		// is acknowledged and not counted again, by its seq.
		authed = s.nonces.fresh(key, r.Header.Get(wire.HeaderNonce), ts, time.Now().Unix())
	}
	if !authed {
		s.fail(w, http.StatusUnauthorized, 0)
		return "", f, nil, false
	}
	return secret, f, body, true
}

// enter counts an authenticated request in flight in its loop ("<instance>
// pulse" or "<instance> sync") until the recorder sees it answered.
func (s *Server) enter(r *http.Request) {
	fl, _ := r.Context().Value(flightKey{}).(*flight)
	if fl == nil {
		return // served without the recorder
	}
	loop := r.Header.Get(wire.HeaderInstance) + " sync"
	if r.URL.Path == wire.PathPulse {
		loop = r.Header.Get(wire.HeaderInstance) + " pulse"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, seen := s.maxFlight[loop]; !seen && len(s.maxFlight) >= maxLoops {
		evicted := false
		for l, most := range s.maxFlight {
			if most <= 1 && s.inflight[l] == 0 {
				delete(s.maxFlight, l)
				evicted = true
				break
			}
		}
		if !evicted {
			return // every loop counted is in flight or had two at once
		}
	}
	fl.loop = loop
	s.inflight[loop]++
	s.maxFlight[loop] = max(s.maxFlight[loop], s.inflight[loop])
}

// verifyRequest checks a signed request's timestamp and signature, and
// returns its timestamp.
func verifyRequest(secret string, r *http.Request, body []byte) (int64, bool) {
	ts := r.Header.Get(wire.HeaderTimestamp)
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return 0, false
	}
	if skew := time.Now().Unix() - sec; skew > wire.MaxClockSkewSeconds || skew < -wire.MaxClockSkewSeconds {
		return 0, false
	}
	canonical := wire.RequestCanonical(r.Method, r.URL.RequestURI(), ts, r.Header.Get(wire.HeaderNonce), identity(r), body)
	return sec, wire.Verify(secret, canonical, r.Header.Get(wire.HeaderSignature))
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
	s.failWith(w, status, retryAfter, http.StatusText(status))
}

// failWith answers with status and the reason given.
func (s *Server) failWith(w http.ResponseWriter, status int, retryAfter time.Duration, reason string) {
	if retryAfter > 0 && (status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests) {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retryAfter.Seconds()))))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":%q}`, reason)
}

// tooManySites refuses a request for a site beyond the key's maxSites.
func (s *Server) tooManySites(w http.ResponseWriter) {
	s.failWith(w, http.StatusTooManyRequests, sweepEvery,
		fmt.Sprintf("this key has %d sites, the most the control plane keeps; another is refused until one has been idle long enough to be forgotten", maxSites))
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
	if f.Replay {
		s.mu.Lock()
		prev, ok := s.lastReply[r.URL.Path]
		s.mu.Unlock()
		if ok {
			body, sig = prev.body, prev.sig
		} else {
			// Nothing to replay yet: an answer bound to another request.
			sig = wire.Sign(secret, wire.ResponseCanonical(path, wire.RandomHex(), id, body))
		}
	} else if r.URL.Path == wire.PathToken || r.URL.Path == wire.PathPolicy || r.URL.Path == wire.PathPulse {
		s.mu.Lock()
		s.lastReply[r.URL.Path] = reply{body: body, sig: sig}
		s.mu.Unlock()
	}
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
	secret, f, body, ok := s.preamble(w, r, true)
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
	ttl, gen := s.tokenTTL, s.tokenGen
	s.mu.Unlock()
	tok := issue(secret, r.Header.Get(wire.HeaderKey), req.SiteID, ttl, gen, f.BadToken)
	out, _ := json.Marshal(map[string]any{"token": tok, "expiresIn": int64(ttl / time.Second)})
	s.answer(w, r, secret, f, out)
}

// issue makes a token, good or bad as fault says. Its "gen" claim is the
// revocation generation it was issued in: the control plane keeps no list
// of the tokens it issued.
func issue(secret, sub, site string, ttl time.Duration, gen int64, fault TokenFault) string {
	now := time.Now()
	claims := jwt.MapClaims{
		"iss": wire.Issuer,
		"sub": sub,
		"iat": now.Unix(),
		"exp": now.Add(ttl).Unix(),
		"jti": wire.RandomHex(),
		"gen": gen,
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
// is of the current revocation generation.
func (s *Server) validToken(secret, key, site, bearer string) bool {
	s.mu.Lock()
	gen := s.tokenGen
	s.mu.Unlock()
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
	g, _ := claims["gen"].(float64)
	return got == site && g == float64(gen)
}

// leaseBody encodes an answer carrying policy (nil: null), the reflex
// block (nil: none) and the server's epoch. The policy is written as it
// is, so that a policy set with SetPolicyJSON reaches the client even when
// it is not JSON.
func (s *Server) leaseBody(policy, block json.RawMessage, cfg *resolved, pulseEvery time.Duration, f Faults) []byte {
	if policy == nil {
		policy = json.RawMessage("null")
	}
	b := make([]byte, 0, len(policy)+len(block)+160)
	b = append(b, `{"policy":`...)
	b = append(b, policy...)
	b = append(append(append(b, `,"epoch":"`...), s.epoch...), '"')
	if block != nil {
		b = append(append(b, `,"reflex":`...), block...)
	}
	if cfg.leaseTTL > 0 {
		b = strconv.AppendInt(append(b, `,"leaseTtlMs":`...), cfg.leaseTTL.Milliseconds(), 10)
	}
	if pulseEvery > 0 {
		b = strconv.AppendInt(append(b, `,"pulseIntervalMs":`...), pulseEvery.Milliseconds(), 10)
	}
	if cfg.syncEvery > 0 {
		b = strconv.AppendInt(append(b, `,"syncIntervalMs":`...), cfg.syncEvery.Milliseconds(), 10)
	}
	if f.AnswerFields != "" {
		b = append(append(b, ','), f.AnswerFields...)
	}
	return append(b, '}')
}

func (s *Server) handlePolicy(w http.ResponseWriter, r *http.Request) {
	secret, f, _, ok := s.preamble(w, r, false)
	if !ok {
		return
	}
	if f.PolicyStatus != 0 {
		s.fail(w, f.PolicyStatus, f.RetryAfter)
		return
	}
	key, site := r.Header.Get(wire.HeaderKey), r.Header.Get(wire.HeaderSite)
	cfg := s.resolve(site)
	now := s.now()
	st, ok := s.lockSite(key, site, now)
	if !ok {
		s.tooManySites(w)
		return
	}
	raw, _, block, ok := st.policy(cfg)
	pulseEvery := st.pulseInterval(cfg, now)
	st.mu.Unlock()
	if !ok {
		s.fail(w, http.StatusNotFound, 0)
		return
	}
	if f.NullPolicy {
		raw = nil
	}
	s.answer(w, r, secret, f, s.leaseBody(raw, block, cfg, pulseEvery, f))
}

func (s *Server) handlePulse(w http.ResponseWriter, r *http.Request) {
	secret, f, body, ok := s.preamble(w, r, true)
	if !ok {
		return
	}
	if f.PulseStatus != 0 {
		s.fail(w, f.PulseStatus, f.RetryAfter)
		return
	}
	key := r.Header.Get(wire.HeaderKey)
	cfg := s.resolve(r.Header.Get(wire.HeaderSite))
	s.logMu.Lock()
	logging := s.logLimit > 0 // the log keeps pulses whole
	s.logMu.Unlock()
	observer := s.observer.Load()
	if observer != nil && key != s.primaryKey() {
		observer = nil
	}
	var p Pulse
	if err := decodePulse(body, &p.PulseBody, !logging && observer == nil, cfg.watched); err != nil || p.Seq == 0 || p.InstanceID != r.Header.Get(wire.HeaderInstance) {
		s.fail(w, http.StatusBadRequest, 0)
		return
	}
	p.Raw = body
	p.Site = r.Header.Get(wire.HeaderSite)
	if p.SiteID != p.Site || !tagsBounded(&p) {
		s.fail(w, http.StatusBadRequest, 0)
		return
	}
	now := s.now()
	st, ok := s.lockSite(key, p.Site, now)
	if !ok {
		s.tooManySites(w)
		return
	}
	counted, shared := st.count(&p, cfg, now)
	var events []Event
	if counted {
		events = st.evaluate(cfg, now)
	}
	raw, version, block, hasPolicy := st.policy(cfg)
	pulseEvery := st.pulseInterval(cfg, now)
	st.mu.Unlock()

	if shared {
		s.warn("waitstate control plane: two processes pulse under one instance ID; each is counted on its own, but the ID no longer names one process",
			"site", p.Site, "instance", p.InstanceID)
	}
	if counted {
		s.logMu.Lock()
		s.pulses.add(p, pulseCost(&p), s.logLimit, s.logBytes)
		for _, e := range events {
			e.Seq, e.Key, e.Site = s.events.seq+1, key, p.Site
			s.events.add(e, 128+len(e.Rule)+len(e.Key)+len(e.Site), s.logLimit, s.logBytes)
		}
		s.logMu.Unlock()
		if observer != nil {
			(*observer)(p.Site, &p, events, pulseEvery)
		}
	}
	if f.CountThenHang {
		s.hang(r)
		return
	}
	var policy json.RawMessage
	if hasPolicy && version != p.PolicyVersion {
		policy = raw
	}
	if f.NullPolicy {
		policy = nil
	}
	s.answer(w, r, secret, f, s.leaseBody(policy, block, cfg, pulseEvery, f))
}

// tagsBounded reports whether every tag of p has a name of at most
// wire.MaxTagNameBytes: a pulse with a longer one did not come from the
// SDK, and is refused whole rather than kept.
func tagsBounded(p *Pulse) bool {
	for tag := range p.Tags {
		if len(tag) > wire.MaxTagNameBytes {
			return false
		}
	}
	return true
}

// pulseCost estimates the bytes a logged pulse holds: its body and what
// was parsed of it, histograms and all.
func pulseCost(p *Pulse) int {
	cost := 512 + len(p.Raw)
	health := func(h *Health) {
		if h != nil {
			cost += 96
			if h.Histogram != nil {
				cost += 64 + 48*len(h.Histogram.Counts)
			}
		}
	}
	health(p.Health)
	for tag, tc := range p.Tags {
		cost += 96 + len(tag) + 96*len(tc.Metrics)
		health(tc.Health)
	}
	return cost + 96*len(p.Metrics)
}
