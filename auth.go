package waitstate

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

// Protocol limits.
const (
	maxResponseBody = wire.MaxBody     // a larger response body is refused
	maxRetryAfter   = 10 * time.Minute // Retry-After is honoured up to this
	tokenLeeway     = 30 * time.Second // clock skew allowed on a token's times
)

// call is one request to the control plane.
type call struct {
	op     string // "token", "policy" or "pulse": for errors and logs
	method string
	path   string // below BaseURL, such as wire.PathPulse
	body   []byte // nil for none
	signed bool   // sign the request
	bearer string // the JWT, for GET /v1/policy
}

// do sends k and returns the 2xx answer whose signature verifies. A non-2xx
// answer is a *StatusError. Nothing secret ends up in an error.
func (c *Client) do(ctx context.Context, k call) (*signedAnswer, error) {
	var body io.Reader = http.NoBody
	if k.body != nil {
		body = bytes.NewReader(k.body)
	}
	req, err := http.NewRequestWithContext(ctx, k.method, c.base.JoinPath(k.path).String(), body)
	if err != nil {
		return nil, fmt.Errorf("waitstate: %s: building request: %w", k.op, err)
	}
	path := req.URL.RequestURI()
	nonce := wire.RandomHex()
	h := req.Header
	h.Set("User-Agent", UserAgent)
	h.Set(wire.HeaderKey, c.opts.PublishKey)
	h.Set(wire.HeaderInstance, c.opts.InstanceID)
	h.Set(wire.HeaderNonce, nonce)
	if c.opts.SiteID != "" {
		h.Set(wire.HeaderSite, c.opts.SiteID)
	}
	if k.body != nil {
		h.Set("Content-Type", "application/json")
	}
	if k.signed {
		ts := strconv.FormatInt(c.wall().Unix(), 10)
		h.Set(wire.HeaderTimestamp, ts)
		h.Set(wire.HeaderSignature, wire.Sign(c.opts.SecretKey, wire.RequestCanonical(k.method, path, ts, nonce, c.identity(), k.body)))
	}
	if k.bearer != "" {
		h.Set("Authorization", "Bearer "+k.bearer)
	}

	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("waitstate: %s: %w", k.op, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody+1))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, &StatusError{Op: k.op, StatusCode: resp.StatusCode, RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"))}
	}
	if err != nil {
		return nil, fmt.Errorf("waitstate: %s: reading response: %w", k.op, err)
	}
	sig := resp.Header.Get(wire.HeaderSignature)
	if err := c.verifyResponse(path, nonce, sig, data); err != nil {
		return nil, fmt.Errorf("waitstate: %s: %w", k.op, err)
	}
	return &signedAnswer{body: data, path: path, nonce: nonce, signature: sig}, nil
}

// verifyResponse accepts the body of a 2xx answer to the request with path
// and nonce only when it is at most 1 MiB and signature is its signature.
func (c *Client) verifyResponse(path, nonce, signature string, body []byte) error {
	if len(body) > maxResponseBody {
		return ErrResponseTooLarge
	}
	if !wire.Verify(c.opts.SecretKey, wire.ResponseCanonical(path, nonce, c.identity(), body), signature) {
		return ErrBadSignature
	}
	return nil
}

// identity is what every signature binds this client to.
func (c *Client) identity() wire.Identity {
	return wire.Identity{PublishKey: c.opts.PublishKey, InstanceID: c.opts.InstanceID, SiteID: c.opts.SiteID}
}

// parseRetryAfter reads a Retry-After header in seconds or as an HTTP date,
// capped at maxRetryAfter; zero when absent or unreadable.
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if s, err := strconv.ParseUint(v, 10, 32); err == nil {
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
	}
	return min(max(d, 0), maxRetryAfter)
}

// retryAfter returns the Retry-After of a 429 or 503 answer in err, if any.
func retryAfter(err error) time.Duration {
	var se *StatusError
	if errors.As(err, &se) && (se.StatusCode == http.StatusTooManyRequests || se.StatusCode == http.StatusServiceUnavailable) {
		return se.RetryAfter
	}
	return 0
}

// retryDelay is how long a loop whose tick is every waits after err
// because of a Retry-After. Such answers are unsigned: anyone on the path,
// a proxy among them, can send one. So while a lease is held it never
// delays the loop past the lease's remaining time less one interval, and at
// least one interval: a stray 503 cannot run a healthy client's lease out.
// Before the first policy it delays the loop one interval at most: a stray
// 503 cannot keep a new client failing open either.
func (c *Client) retryDelay(err error, every time.Duration) time.Duration {
	d := retryAfter(err)
	if d == 0 {
		return 0
	}
	c.mu.Lock()
	leased := c.policy != nil && !c.initial
	left := c.leaseDeadline - c.clock()
	c.mu.Unlock()
	if leased {
		return min(d, max(left-every, every))
	}
	return min(d, every)
}

// token is a validated JWT and when it must be refreshed.
type token struct {
	value     string
	refreshAt time.Duration // client clock: half of its lifetime
	expiresAt time.Duration // client clock: the end of its lifetime
}

// tokenClaims are a token's claims: the registered ones, and the site.
type tokenClaims struct {
	jwt.RegisteredClaims
	Site string `json:"site,omitempty"`
}

// fetchToken asks POST /v1/token for a JWT and validates it.
func (c *Client) fetchToken(ctx context.Context) (*token, error) {
	reqBody, err := json.Marshal(struct {
		InstanceID string `json:"instanceId"`
		SiteID     string `json:"siteId,omitempty"`
	}{c.opts.InstanceID, c.opts.SiteID})
	if err != nil {
		return nil, err
	}
	received := c.clock()
	ans, err := c.do(ctx, call{op: "token", method: http.MethodPost, path: wire.PathToken, body: reqBody, signed: true})
	if err != nil {
		return nil, err
	}
	var resp struct {
		Token     string  `json:"token"`
		ExpiresIn float64 `json:"expiresIn"`
	}
	if err := json.Unmarshal(ans.body, &resp); err != nil {
		return nil, fmt.Errorf("waitstate: token: %w: %v", ErrBadResponse, err)
	}
	exp, err := c.validateToken(resp.Token)
	if err != nil {
		return nil, fmt.Errorf("waitstate: token: %w", err)
	}
	life := exp.Sub(c.wall())
	if resp.ExpiresIn > 0 && resp.ExpiresIn < life.Seconds() {
		life = time.Duration(resp.ExpiresIn * float64(time.Second))
	}
	if life <= 0 {
		return nil, fmt.Errorf("waitstate: token: %w: already expired", ErrBadToken)
	}
	return &token{value: resp.Token, refreshAt: received + life/2, expiresAt: received + life}, nil
}

// validateToken checks a JWT and returns its expiry: HS256
// signed with the secret key, iss "waitstate", sub the publish key, exp
// present, 30 s of leeway, and site equal to SiteID when one is set.
func (c *Client) validateToken(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, fmt.Errorf("%w: empty", ErrBadToken)
	}
	var claims tokenClaims
	_, err := c.jwtParser.ParseWithClaims(s, &claims, func(*jwt.Token) (any, error) {
		return []byte(c.opts.SecretKey), nil
	})
	if err != nil {
		return time.Time{}, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	if c.opts.SiteID != "" && claims.Site != c.opts.SiteID {
		return time.Time{}, fmt.Errorf("%w: site claim does not match SiteID", ErrBadToken)
	}
	return claims.ExpiresAt.Time, nil
}

func newJWTParser(publishKey string, wall func() time.Time) *jwt.Parser {
	return jwt.NewParser(
		jwt.WithTimeFunc(wall),
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithIssuer(wire.Issuer),
		jwt.WithSubject(publishKey),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(tokenLeeway),
	)
}

// leaseResponse is the body of a signed answer from /v1/pulse or /v1/policy.
type leaseResponse struct {
	Policy          json.RawMessage `json:"policy"`
	LeaseTTLMs      json.RawMessage `json:"leaseTtlMs"`
	PulseIntervalMs json.RawMessage `json:"pulseIntervalMs"`
	SyncIntervalMs  json.RawMessage `json:"syncIntervalMs"`
	Reflex          json.RawMessage `json:"reflex"`
	Epoch           string          `json:"epoch"`
}

// maxEpochBytes bounds the epoch an answer names.
const maxEpochBytes = 128

// Bounds of what a response can set.
const (
	maxLease       = 7 * 24 * time.Hour // so that a huge leaseTtlMs cannot overflow
	minIntervalSet = MinInterval
	maxIntervalSet = 10 * time.Minute
)

// parseLeaseResponse parses a verified body. A malformed body wraps
// ErrBadResponse and a refused policy ErrBadPolicy: the answer is refused
// whole. The policy is nil when the body has none ("policy": null or
// absent); a ttl of 0 means the default lease; an interval of 0 is one the
// answer leaves out, which returns the client to Options'.
func parseLeaseResponse(data []byte) (leaseAnswer, error) {
	var resp leaseResponse
	if err := json.Unmarshal(data, &resp); err != nil {
		return leaseAnswer{}, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	if len(resp.Epoch) > maxEpochBytes {
		return leaseAnswer{}, fmt.Errorf("%w: an epoch of %d bytes, at most %d", ErrBadResponse, len(resp.Epoch), maxEpochBytes)
	}
	a := leaseAnswer{epoch: resp.Epoch}
	if len(resp.LeaseTTLMs) != 0 && string(resp.LeaseTTLMs) != "null" {
		ms, err := strconv.ParseFloat(string(resp.LeaseTTLMs), 64)
		if err != nil || math.IsNaN(ms) {
			return leaseAnswer{}, fmt.Errorf("%w: leaseTtlMs is not a number", ErrBadResponse)
		}
		if ms > 0 {
			a.ttl = time.Duration(min(ms, float64(maxLease/time.Millisecond))) * time.Millisecond
		}
	}
	var err error
	if a.pulseEvery, err = parseIntervalMs(resp.PulseIntervalMs, "pulseIntervalMs"); err != nil {
		return leaseAnswer{}, err
	}
	if a.syncEvery, err = parseIntervalMs(resp.SyncIntervalMs, "syncIntervalMs"); err != nil {
		return leaseAnswer{}, err
	}
	if len(resp.Policy) != 0 && string(resp.Policy) != "null" {
		if a.policy, err = parsePolicy(resp.Policy); err != nil {
			return leaseAnswer{}, err
		}
	}
	if len(resp.Reflex) != 0 && string(resp.Reflex) != "null" {
		// A bad block is ignored, not the answer: its policy still applies.
		a.reflex, a.reflexErr = parseReflex(resp.Reflex)
	}
	return a, nil
}

// parseIntervalMs reads an interval a control plane sets: absent is 0 (no
// change); a positive JSON integer is clamped to [100 ms, 10 min] (one too
// large to parse is 10 min); anything else, null included, refuses the
// answer.
func parseIntervalMs(raw json.RawMessage, name string) (time.Duration, error) {
	if raw == nil {
		return 0, nil
	}
	s := string(raw)
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%w: %s must be a positive integer, not %.32s", ErrBadResponse, name, s)
	}
	ms, err := strconv.ParseUint(s, 10, 64)
	switch {
	case err != nil: // digits only, so: too large
		return maxIntervalSet, nil
	case ms == 0:
		return 0, fmt.Errorf("%w: %s must be a positive integer, not 0", ErrBadResponse, name)
	}
	return min(max(time.Duration(min(ms, uint64(maxIntervalSet/time.Millisecond)))*time.Millisecond, minIntervalSet), maxIntervalSet), nil
}
