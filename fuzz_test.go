package waitstate

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Fuzz targets for every parser of outside input. Their seed corpora are in
// testdata/fuzz; .ci/run fuzzes each for a few seconds on top of them.

// FuzzParsePolicy: any input is either refused with ErrBadPolicy or gives a
// policy within the limits that survives a round trip.
func FuzzParsePolicy(f *testing.F) {
	f.Add([]byte(`{"version": 17, "globalMaxWeight": 5, "tagMaxWeights": {"enterprise": "Infinity", "free": 0}}`))
	f.Add([]byte(`{"version": 3, "globalShedPercent": 12.5, "tagShedPercents": {"pro": 50, "free": 100}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := parsePolicy(data)
		if err != nil {
			if !errors.Is(err, ErrBadPolicy) {
				t.Fatalf("error %v does not wrap ErrBadPolicy", err)
			}
			if p != nil {
				t.Fatal("a refused policy came back")
			}
			return
		}
		checkPolicy(t, p)
		again, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("an accepted policy does not encode: %v", err)
		}
		q, err := parsePolicy(again)
		if err != nil {
			t.Fatalf("round trip refused %s: %v", again, err)
		}
		if q.Version != p.Version || q.GlobalMaxWeight != p.GlobalMaxWeight || len(q.TagMaxWeights) != len(p.TagMaxWeights) ||
			q.GlobalShedPercent != p.GlobalShedPercent || !maps.Equal(q.TagShedPercents, p.TagShedPercents) {
			t.Fatalf("round trip changed %+v into %+v", p, q)
		}
		for tag, w := range p.TagMaxWeights {
			if q.TagMaxWeights[tag] != w {
				t.Fatalf("round trip changed tag %q: %v → %v", tag, w, q.TagMaxWeights[tag])
			}
		}
	})
}

// checkPolicy asserts the limits every accepted policy keeps.
func checkPolicy(t *testing.T, p *Policy) {
	t.Helper()
	if p.Version < 0 {
		t.Fatalf("negative version %d", p.Version)
	}
	if !(p.GlobalMaxWeight >= 0) {
		t.Fatalf("global weight %v", p.GlobalMaxWeight)
	}
	if err := p.Validate(); err != nil {
		t.Fatalf("accepted a policy that Validate refuses: %v", err)
	}
	for tag, w := range p.TagMaxWeights {
		if len(tag) > MaxTagNameBytes || !(w >= 0) || math.Signbit(w) {
			t.Fatalf("tag %q weight %v", tag, w)
		}
	}
}

// FuzzResponse drives an answer of the control plane through what the
// client does with it: the size and signature check, then the body. The
// invariant: a refused answer changes nothing — not the policy in force, not
// the lease — and an accepted policy is within the limits.
func FuzzResponse(f *testing.F) {
	f.Add([]byte(`{"policy": {"version": 9, "globalMaxWeight": 1}, "leaseTtlMs": 60000}`), true, "")
	f.Add([]byte(`{"policy": null, "pulseIntervalMs": 250, "syncIntervalMs": 99999999999999999999999}`), true, "")
	c := idleClient(f, nil, nil)
	held := &Policy{Version: 5, GlobalMaxWeight: 3, TagMaxWeights: map[string]float64{"free": 0}}
	const path, nonce = wire.PathPulse, "0123456789abcdef0123456789abcdef"
	f.Fuzz(func(t *testing.T, body []byte, sign bool, signature string) {
		c.applyLease(leaseAnswer{policy: held, ttl: time.Hour}, false, c.pulseGenNow()) // a known state: v5, enforcing
		c.mu.Lock()
		deadline := c.leaseDeadline
		c.mu.Unlock()
		if sign {
			signature = wire.Sign(testSecretKey, wire.ResponseCanonical(path, nonce, c.identity(), body))
		}
		want := wire.Sign(testSecretKey, wire.ResponseCanonical(path, nonce, c.identity(), body))
		err := c.verifyResponse(path, nonce, signature, body)
		if err == nil && (len(body) > maxResponseBody || !strings.EqualFold(signature, want)) {
			t.Fatalf("accepted an answer with signature %q", signature)
		}
		if err == nil {
			var a leaseAnswer
			if a, err = parseLeaseResponse(body); err == nil {
				if a.policy != nil {
					checkPolicy(t, a.policy)
				}
				if a.ttl < 0 || a.ttl > maxLease {
					t.Fatalf("lease %v", a.ttl)
				}
				for _, d := range []time.Duration{a.pulseEvery, a.syncEvery} {
					if d != 0 && (d < minIntervalSet || d > maxIntervalSet) {
						t.Fatalf("interval %v outside [%v, %v]", d, minIntervalSet, maxIntervalSet)
					}
				}
				c.applyLease(a, true, 0)
				return
			}
		}
		// Refused: nothing moved.
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.policy != held || c.leaseDeadline != deadline || c.mode != ModeEnforcing {
			t.Fatalf("a refused answer (%v) changed the client's state", err)
		}
	})
}

// FuzzToken: a token the client accepts is HS256, signed with the secret
// key, and has the issuer, subject, expiry and site the protocol requires;
// anything else is refused with ErrBadToken.
func FuzzToken(f *testing.F) {
	f.Add("not.a.jwt")
	opts := Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: "http://127.0.0.1:1", SiteID: "eu-1"}
	c, err := newClient(opts, func() time.Duration { return 0 }, time.Now)
	if err != nil {
		f.Fatal(err)
	}
	c.cancel()
	_ = c.group.Wait()
	f.Fuzz(func(t *testing.T, tok string) {
		exp, err := c.validateToken(tok)
		if err != nil {
			if !errors.Is(err, ErrBadToken) {
				t.Fatalf("error %v does not wrap ErrBadToken", err)
			}
			if strings.Contains(err.Error(), testSecretKey) || (len(tok) > 8 && strings.Contains(err.Error(), tok)) {
				t.Fatal("the error quotes a secret or the token")
			}
			return
		}
		parts := strings.Split(tok, ".")
		if len(parts) != 3 {
			t.Fatalf("accepted %q", tok)
		}
		mac := hmac.New(sha256.New, []byte(testSecretKey))
		mac.Write([]byte(parts[0] + "." + parts[1]))
		sig, err := base64.RawURLEncoding.DecodeString(parts[2])
		if err != nil || !hmac.Equal(sig, mac.Sum(nil)) {
			t.Fatalf("accepted a token not signed with the secret key: %q", tok)
		}
		var header struct{ Alg string }
		var claims struct {
			Iss, Sub, Site string
			Exp            *json.Number // a number; golang-jwt also reads a numeric string
		}
		h, _ := base64.RawURLEncoding.DecodeString(parts[0])
		b, _ := base64.RawURLEncoding.DecodeString(parts[1])
		if json.Unmarshal(h, &header) != nil || json.Unmarshal(b, &claims) != nil {
			t.Fatalf("accepted unreadable parts: %q", tok)
		}
		if header.Alg != "HS256" || claims.Iss != wire.Issuer || claims.Sub != testPublishKey || claims.Site != "eu-1" || claims.Exp == nil {
			t.Fatalf("accepted header %+v claims %+v", header, claims)
		}
		if time.Until(exp) < -tokenLeeway {
			t.Fatalf("accepted a token expired at %v", exp)
		}
	})
}

// FuzzMiddleware: whatever the Tag and Weight callbacks return, a request is
// gated once, counted once, and decided as the policy decides.
func FuzzMiddleware(f *testing.F) {
	f.Add("free", 1.0)
	p := &Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0, "ent": math.Inf(1)}}
	c := idleClient(f, nil, p)
	f.Fuzz(func(t *testing.T, tag string, weight float64) {
		var seen GateResult
		h := c.HTTPMiddleware(MiddlewareOptions{
			Tag:    func(*http.Request) string { return tag },
			Weight: func(*http.Request) float64 { return weight },
			Denied: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				seen, _ = ResultFromContext(r.Context())
				w.WriteHeader(http.StatusTooManyRequests)
			}),
		})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			seen, _ = ResultFromContext(r.Context())
		}))
		before := c.Stats()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
		after := c.Stats()
		if got := (after.Usage + after.Bounced) - (before.Usage + before.Bounced); got != 1 {
			t.Fatalf("counted %d times", got)
		}
		if want := p.Gate(tag, weight); seen != want && !(math.IsNaN(seen.Limit) && math.IsNaN(want.Limit)) {
			t.Fatalf("decided %+v, the policy says %+v", seen, want)
		}
		if seen.Allowed == (rec.Code == http.StatusTooManyRequests) {
			t.Fatalf("allowed=%v but status %d", seen.Allowed, rec.Code)
		}
		if !bytes.Equal(rec.Body.Bytes(), nil) && seen.Allowed {
			t.Fatalf("unexpected body %q", rec.Body)
		}
	})
}
