package waitstate

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/sync/errgroup"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Version is the SDK's version, sent in pulses and the User-Agent header.
const Version = "0.1.0"

// UserAgent is the User-Agent header of every request.
const UserAgent = "waitstate-go/" + Version

// closeTimeout bounds the final flush of Close.
const closeTimeout = 5 * time.Second

// Client gates work against the policy of a WaitState control plane. Create
// one with New, share it, and call Shutdown or Close when done. A Client is
// safe for concurrent use by multiple goroutines.
type Client struct {
	opts       Options // with defaults applied
	base       *url.URL
	http       *http.Client
	transport  *http.Transport // ours, when Options.HTTPClient was nil
	log        *slog.Logger
	jwtParser  *jwt.Parser
	instanceID string
	seed       uint64               // of the tag tables' hash
	clock      func() time.Duration // monotonic time since New
	wall       func() time.Time     // the wall clock

	// The hot path: Gate reads view once, and safe only in safe mode.
	view atomic.Pointer[view]
	safe limiter
	hist histogram

	// mu guards the state below and every store to view. Gate never takes it.
	mu            sync.Mutex
	mode          Mode
	policy        *Policy // the last applied policy; nil before the first
	fallback      *Policy // DefaultPolicy, in force until then
	win           *window // the live window; nil after the final cut
	leaseDeadline time.Duration
	leaseTimer    *time.Timer
	pulseGen      uint64 // bumped when a pulse response applies a policy
	closed        bool
	usageTotal    uint64 // counted in windows already cut
	bouncedTotal  uint64

	// Owned by the pulse goroutine, then by Shutdown once it has joined it.
	seq      uint64
	pending  *pulse
	histPrev *histSnapshot
	histCur  *histSnapshot

	pulsesSent    atomic.Uint64
	pulsesFailed  atomic.Uint64
	pulsesDropped atomic.Uint64
	policyErrors  atomic.Uint64
	syncsFailed   atomic.Uint64
	lastErr       atomic.Pointer[string]

	ready    chan struct{} // closed when the first policy is applied
	done     chan struct{} // closed by Shutdown
	cancel   context.CancelFunc
	group    *errgroup.Group
	shutdown atomic.Bool
}

// New validates opts, starts the client's two background goroutines and
// returns at once: it never waits on the network. Until a policy is
// applied the client is in ModeFailOpen. Invalid options give an error
// wrapping ErrInvalidOptions.
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
		opts:       o,
		base:       base,
		log:        o.Logger,
		jwtParser:  newJWTParser(o.PublishKey, wall),
		instanceID: wire.RandomHex(),
		seed:       rand.Uint64(),
		clock:      clock,
		wall:       wall,
		safe:       newLimiter(o.SafeModeMaxRPS),
		fallback:   DefaultPolicy(),
		histPrev:   new(histSnapshot),
		histCur:    new(histSnapshot),
		ready:      make(chan struct{}),
		done:       make(chan struct{}),
	}
	if o.HTTPClient != nil {
		hc := *o.HTTPClient
		c.http = &hc
	} else {
		c.transport = http.DefaultTransport.(*http.Transport).Clone()
		c.http = &http.Client{Transport: c.transport}
	}
	// A redirect would send a signed request somewhere else and could not
	// be verified: a 3xx is an answer like any other (SPEC §3: retried).
	c.http.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	c.win = newWindow(c.seed, c.clock())
	c.publish()

	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.group, ctx = errgroup.WithContext(ctx)
	c.group.Go(func() error { return c.pulseLoop(ctx) })
	c.group.Go(func() error { return c.syncLoop(ctx) })
	return c, nil
}

// publish stores a new view built from the state under mu.
func (c *Client) publish() {
	p := c.policy
	if p == nil {
		p = c.fallback
	}
	c.view.Store(&view{mode: c.mode, policy: p, win: c.win})
}

// Observe records one health sample: how long a unit of work took and
// whether it failed. Samples feed the latency quantiles and error rate of
// the next pulse. After Shutdown it records nothing.
func (c *Client) Observe(latency time.Duration, failed bool) {
	if c.view.Load().win == nil {
		return
	}
	c.hist.observe(latency, failed)
}

// Ready waits until the first policy is applied and returns nil, or returns
// ctx.Err() when ctx ends first, or ErrClosed when the client is shut down
// first. Gate does not need it: until then it fails open.
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

// Stats is a snapshot of a Client's counters.
type Stats struct {
	Usage         uint64 // Gate calls allowed since New
	Bounced       uint64 // Gate calls denied since New
	PulsesSent    uint64 // pulses the control plane acknowledged
	PulsesFailed  uint64 // pulse attempts that failed or had no known outcome; each is resent
	PulsesDropped uint64 // pulses the control plane refused with a 4xx; their counts stay in Usage and Bounced
	PolicyErrors  uint64 // verified responses whose body or policy was refused
	SyncsFailed   uint64 // policy syncs that failed
	PolicyVersion int64  // version of the policy in force; 0 before the first
	Mode          Mode   // the mode Gate is answering in
	LastError     string // the last error, with no secret in it; "" if none
}

// Stats returns the client's counters.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	usage, bounced := c.usageTotal, c.bouncedTotal
	if c.win != nil {
		live := c.win.collect(false)
		usage += live.usage
		bounced += live.bounced
	}
	c.mu.Unlock()
	v := c.view.Load()
	s := Stats{
		Usage:         usage,
		Bounced:       bounced,
		PulsesSent:    c.pulsesSent.Load(),
		PulsesFailed:  c.pulsesFailed.Load(),
		PulsesDropped: c.pulsesDropped.Load(),
		PolicyErrors:  c.policyErrors.Load(),
		SyncsFailed:   c.syncsFailed.Load(),
		PolicyVersion: v.policy.Version,
		Mode:          v.mode,
	}
	if e := c.lastErr.Load(); e != nil {
		s.LastError = *e
	}
	return s
}

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
	_ = c.group.Wait() // the loops return nil; their errors are in Stats
	close(c.done)
	err := c.flush(ctx)

	c.mu.Lock()
	c.closed = true
	if c.leaseTimer != nil {
		c.leaseTimer.Stop()
	}
	c.mu.Unlock()
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

// applyLease acts on a verified, parsed answer of /v1/pulse (fromPulse) or
// /v1/policy: it applies p when the version rules allow (SPEC §4), then,
// when a policy is held, renews the lease for ttl and enforces it. gen is
// pulseGen as it was when the /v1/policy request was sent.
func (c *Client) applyLease(p *Policy, ttl time.Duration, fromPulse bool, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	held := c.policy
	switch {
	case p == nil:
	case fromPulse && held != nil && p.Version <= held.Version:
		// A pulse brings only newer policies.
	case !fromPulse && gen != c.pulseGen && held != nil && held.Version > p.Version:
		// A pulse applied a newer policy while the GET was in flight.
	default:
		if fromPulse {
			c.pulseGen++
		}
		c.policy = p
		if c.win != nil {
			c.win.relimit(p) // before publish: Gate checks which policy a limit is for
		}
		if held == nil || held.Version != p.Version {
			c.log.Info("waitstate: policy applied", "version", p.Version, "tags", len(p.TagMaxWeights))
		}
	}
	if c.policy == nil {
		return // nothing held, no lease to renew
	}
	c.leaseDeadline = c.clock() + ttl
	if c.leaseTimer == nil {
		c.leaseTimer = time.AfterFunc(ttl, c.leaseExpired)
	} else {
		c.leaseTimer.Reset(ttl)
	}
	if c.mode != ModeEnforcing {
		if c.mode == ModeSafeMode {
			c.log.Info("waitstate: lease renewed, enforcing again", "version", c.policy.Version)
		}
		c.mode = ModeEnforcing
	}
	c.publish()
	if held == nil {
		close(c.ready) // after publish: Ready's caller sees the policy in force
	}
}

// leaseExpired runs on the lease timer: it enters safe mode unless the lease
// was renewed meanwhile.
func (c *Client) leaseExpired() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.mode != ModeEnforcing {
		return
	}
	now := c.clock()
	if left := c.leaseDeadline - now; left > 0 {
		c.leaseTimer.Reset(left) // renewed while the timer was firing
		return
	}
	c.log.Warn("waitstate: lease expired, entering safe mode", "version", c.policy.Version, "max_rps", c.opts.SafeModeMaxRPS)
	c.mode = ModeSafeMode
	c.safe.reset(now)
	c.publish()
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
