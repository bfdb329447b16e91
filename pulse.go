package waitstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// pulse is a cut window, frozen: it is resent with the same seq and body
// until the control plane acknowledges it.
type pulse struct {
	seq  uint64
	body []byte
}

// pulseJSON is the body of POST /v1/pulse.
type pulseJSON = wire.PulseBody

// pulseOutcome is what became of one attempt to send a pulse.
type pulseOutcome int

const (
	pulseAcked   pulseOutcome = iota // acknowledged: done with it
	pulseRetry                       // failed or unknown: send it again
	pulseDropped                     // refused with a 4xx: give it up
)

// pulseLoop sends a pulse every pulse interval in force (jittered) until
// ctx ends. The first one comes at a uniformly random point of the first
// interval (between 0.1 and 1.1 intervals): ±10 % alone would leave a fleet
// started together pulsing together for many intervals.
func (c *Client) pulseLoop(ctx context.Context) error {
	every := c.pulseInterval()
	t := time.NewTimer(every/10 + rand.N(every))
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		err := c.pulseTick(ctx)
		if c.opts.SafeMode == SafeModeLocalRules {
			c.localTick()
		}
		if ctx.Err() != nil {
			return nil // shutting down: Shutdown sends what is pending
		}
		failing = c.logTransition("pulse", failing, err)
		every := c.pulseInterval()
		t.Reset(max(jitter(every), c.retryDelay(err, every)))
	}
}

// pulseTick cuts a window unless a pulse is pending, and sends the pending
// pulse once.
func (c *Client) pulseTick(ctx context.Context) error {
	if c.pending == nil {
		c.pending = c.cut(false)
	}
	out, err := c.sendPulse(ctx, c.pending)
	if out != pulseRetry {
		c.pending = nil
	}
	return err
}

// sendPulse sends p once and acts on the answer. A 2xx answer whose
// signature verifies acknowledges p even when its body does not parse.
func (c *Client) sendPulse(ctx context.Context, p *pulse) (pulseOutcome, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout(c.pulseInterval()))
	ans, err := c.do(rctx, call{op: "pulse", method: http.MethodPost, path: wire.PathPulse, body: p.body, signed: true})
	cancel()
	if err != nil {
		var se *StatusError
		if errors.As(err, &se) && !retryableStatus(se.StatusCode) {
			c.pulsesDropped.Add(1)
			c.setError(err)
			c.log.Warn("waitstate: pulse refused and dropped", "seq", p.seq, "status", se.StatusCode)
			return pulseDropped, err
		}
		if ctx.Err() == nil {
			c.pulsesFailed.Add(1)
			c.setError(err)
		}
		return pulseRetry, err
	}
	c.pulsesSent.Add(1)
	a, err := parseLeaseResponse(ans.body)
	if err != nil {
		c.policyErrors.Add(1)
		c.setError(err)
		return pulseAcked, fmt.Errorf("waitstate: pulse response: %w", err)
	}
	a.from = ans
	c.applyLease(a, true, 0)
	return pulseAcked, nil
}

// retryableStatus reports whether a pulse answered with code is to be sent
// again: 3xx, 5xx, 401, 403, 408 and 429. Any other 4xx drops it.
func retryableStatus(code int) bool {
	switch {
	case code >= 300 && code < 400, code >= 500:
		return true
	}
	switch code {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true
	}
	return false
}

// cut closes the live window and returns it as the next pulse. With final
// set no new window opens: from then on Gate counts nothing. After the final
// cut there is nothing to cut: it returns nil.
func (c *Client) cut(final bool) *pulse {
	now := c.clock()
	c.mu.Lock()
	old := c.win
	if old == nil {
		c.mu.Unlock()
		return nil
	}
	if final {
		c.win = nil
	} else {
		c.win = newWindow(c.seed, now)
		c.keepAll(c.win)
	}
	c.publish()
	// Once the new view is published, a writer that still finds the old
	// window finds it sealed and writes again in the new one.
	r := old.report()
	c.retire(old, c.win)
	c.usageTotal += r.usage
	c.bouncedTotal += r.bounced
	c.reasonTotals.addAll(&r.reasons)
	c.addTagTotals(r.tags)
	if r.health != nil {
		c.healthRequests += r.health.Requests
		c.healthErrors += r.health.Errors
	}
	body := pulseJSON{
		InstanceID:   c.opts.InstanceID,
		Incarnation:  c.incarnation,
		SiteID:       c.opts.SiteID,
		SDK:          UserAgent,
		WindowEndMs:  c.wall().UnixMilli(),
		WindowMs:     (now - old.start).Milliseconds(),
		Mode:         c.mode.String(),
		Shadow:       c.opts.Shadow,
		LocalRules:   slices.Clone(c.local.fired),
		Restored:     c.restored,
		UsageDelta:   r.usage,
		BouncedDelta: r.bounced,
		UsageTotal:   c.usageTotal,
		BouncedTotal: c.bouncedTotal,
		Tags:         r.tags,
		Health:       r.health,
		Metrics:      r.metrics,
	}
	if c.mode != ModeFailOpen && c.policy != nil {
		body.PolicyVersion = c.policy.Version
	}
	c.mu.Unlock()

	c.seq++
	body.Seq = c.seq
	data, err := json.Marshal(body)
	if err != nil {
		panic("waitstate: encoding a pulse: " + err.Error()) // finite numbers and strings: cannot fail
	}
	return &pulse{seq: c.seq, body: data}
}

// flush is Shutdown's last word: the pending pulse, then the last window,
// one try each; the last window is cut only if the pending pulse was
// acknowledged. Its counts stay in Stats either way.
func (c *Client) flush(ctx context.Context) error {
	if c.opts.Offline {
		c.cut(true) // nothing is sent; the counts stay in Stats
		return nil
	}
	if c.pending != nil {
		out, err := c.sendPulse(ctx, c.pending)
		if out != pulseAcked {
			c.cut(true) // close the window without sending it
			return err
		}
		c.pending = nil
	}
	last := c.cut(true)
	if last == nil {
		return nil
	}
	_, err := c.sendPulse(ctx, last)
	return err
}

// logTransition logs when a loop starts failing (401/403 as an error: the
// keys or site are refused) and when it recovers, not every failed tick.
// It returns whether the loop is failing now.
func (c *Client) logTransition(op string, wasFailing bool, err error) bool {
	switch {
	case err == nil && wasFailing:
		c.log.Info("waitstate: control plane answering again", "op", op)
	case err != nil && !wasFailing && isConfigError(err):
		c.log.Error("waitstate: control plane refuses the keys or site; check PublishKey, SecretKey and SiteID", "op", op, "error", err)
	case err != nil && !wasFailing:
		c.log.Warn("waitstate: control plane request failing", "op", op, "error", err)
	}
	return err != nil
}
