package waitstate

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// syncState is the sync goroutine's own state.
type syncState struct {
	tok     *token
	synced  bool          // a policy has been fetched and applied
	backoff time.Duration // next backoff ceiling until synced
	failing bool
}

// syncLoop fetches the policy at once, then retries with exponential
// backoff and full jitter until the first success, then syncs every sync
// interval in force (jittered) until ctx ends.
func (c *Client) syncLoop(ctx context.Context) error {
	c.runCallbacks(false) // those of a policy restored in New
	st := &syncState{backoff: min(time.Second, c.syncInterval())}
	t := time.NewTimer(c.syncTick(ctx, st))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			t.Reset(c.syncTick(ctx, st))
		}
	}
}

// syncTick syncs once and returns how long to wait before the next sync.
func (c *Client) syncTick(ctx context.Context, st *syncState) time.Duration {
	err := c.syncOnce(ctx, st)
	if ctx.Err() != nil {
		return time.Hour // the loop is ending
	}
	st.failing = c.logTransition("sync", st.failing, err)
	every := c.syncInterval()
	var wait time.Duration
	switch {
	case err == nil:
		st.synced = true
		wait = jitter(every)
	case isConfigError(err) || st.synced:
		c.syncsFailed.Add(1)
		c.setError(err)
		wait = jitter(every) // the longest wait there is
	default:
		c.syncsFailed.Add(1)
		c.setError(err)
		wait = rand.N(st.backoff) + 1 // full jitter
		st.backoff = min(2*st.backoff, every)
	}
	return max(wait, c.retryDelay(err, every))
}

// syncOnce makes sure a valid token is held, fetches the policy, and applies
// it. A 401 drops the token; a new one is fetched and the GET retried once.
func (c *Client) syncOnce(ctx context.Context, st *syncState) error {
	if err := c.ensureToken(ctx, st); err != nil {
		return err
	}
	gen, sent := c.pulseGenNow(), c.clock()
	ans, err := c.getPolicy(ctx, st.tok.value)
	var se *StatusError
	if errors.As(err, &se) && se.StatusCode == http.StatusUnauthorized {
		st.tok = nil
		if err := c.ensureToken(ctx, st); err != nil {
			return err
		}
		gen, sent = c.pulseGenNow(), c.clock()
		ans, err = c.getPolicy(ctx, st.tok.value)
	}
	if err != nil {
		return err
	}
	a, err := parseLeaseResponse(ans.body)
	if err == nil && a.policy == nil {
		err = fmt.Errorf("%w: policy is null", ErrBadResponse)
	}
	if err != nil {
		c.policyErrors.Add(1)
		return fmt.Errorf("waitstate: policy: %w", err)
	}
	a.from, a.sent = ans, sent
	c.applyLease(a, false, gen)
	return nil
}

// ensureToken fetches a token when none is held or less than half of its
// lifetime is left. A failed refresh keeps a token that has not expired.
func (c *Client) ensureToken(ctx context.Context, st *syncState) error {
	now := c.clock()
	if st.tok != nil && now < st.tok.refreshAt {
		return nil
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout(c.syncInterval()))
	defer cancel()
	tok, err := c.fetchToken(rctx)
	if err != nil {
		if st.tok != nil && now < st.tok.expiresAt {
			c.setError(err)
			return nil
		}
		st.tok = nil
		return err
	}
	st.tok = tok
	return nil
}

// minRequestTimeout is the shortest a request may take before it is given
// up: a control plane that sets an interval shorter than its own round trip
// still gets its answers through, at one request at a time.
const minRequestTimeout = 2 * time.Second

// requestTimeout bounds a request of a loop whose interval is every: one
// interval, and never less than minRequestTimeout.
func requestTimeout(every time.Duration) time.Duration { return max(every, minRequestTimeout) }

func (c *Client) getPolicy(ctx context.Context, bearer string) (*signedAnswer, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout(c.syncInterval()))
	defer cancel()
	return c.do(rctx, call{op: "policy", method: http.MethodGet, path: wire.PathPolicy, bearer: bearer})
}

func (c *Client) pulseGenNow() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pulseGen
}
