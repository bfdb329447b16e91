package waitstate

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
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
	sent := c.clock()
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
	a.from, a.sent = ans, sent
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
		c.win.shedFrom.Store(old.shedFrom.Load())
		c.keepAll(c.win)
	}
	c.publish()
	// Once the new view is published, a writer that still finds the old
	// window finds it sealed and writes again in the new one.
	r := old.report()
	if c.win != nil {
		carryTurns(old, c.win)
	}
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
		InstanceID:    c.opts.InstanceID,
		Incarnation:   c.incarnation,
		SiteID:        c.opts.SiteID,
		SDK:           UserAgent,
		WindowEndMs:   c.wall().UnixMilli(),
		WindowMs:      ceilMillis(now - old.start),
		OwnIntervalMs: c.opts.PulseInterval.Milliseconds(),
		Mode:          c.mode.String(),
		Shadow:        c.opts.Shadow,
		LocalRules:    slices.Clone(c.local.fired),
		Restored:      c.restored,
		UsageDelta:    r.usage,
		BouncedDelta:  r.bounced,
		UsageTotal:    c.usageTotal,
		BouncedTotal:  c.bouncedTotal,
		Tags:          r.tags,
		Health:        r.health,
		Metrics:       r.metrics,
	}
	if c.mode != ModeFailOpen && c.policy != nil {
		body.PolicyVersion = c.policy.Version
	}
	c.mu.Unlock()

	c.seq++
	body.Seq = c.seq
	data := encodePulse(&body, maxPulseBytes)
	if body.Trimmed != nil {
		c.pulsesTrimmed.Add(1)
		if !c.trimming {
			c.log.Warn("waitstate: a pulse shed detail to fit the control plane's size limit; its counts are whole",
				"seq", body.Seq, "tags", len(r.tags), "histogramsLeftOut", body.Trimmed.Histograms,
				"metricsLeftOut", body.Trimmed.Metrics, "tagsFolded", body.Trimmed.Tags)
		}
	}
	c.trimming = body.Trimmed != nil
	return &pulse{seq: c.seq, body: data}
}

// maxPulseBytes is the size a pulse is kept within: the largest body a
// control plane accepts.
const maxPulseBytes = wire.MaxBody

// encodePulse encodes body in at most limit bytes. A window of many tags
// with long names, wide latency spreads and custom metrics can encode to
// more than a control plane accepts, and a pulse refused for its size would
// lose every count in it. So detail is shed until it fits, the least
// missed first, each step only if the one before was not enough:
//
//  1. the tags' latency histograms (their quantiles stay);
//  2. the tags' custom metrics;
//  3. whole tags, those with the fewest calls first, folded into OtherTag:
//     their calls are added to OtherTag's, their health left out (the
//     site's health keeps every sample).
//
// Calls are never shed: the site's and each tag's usage and bounced add up
// as before, a folded tag's under OtherTag. What was shed is counted in
// body.Trimmed. With every tag folded, a pulse holds a bounded rest — IDs,
// one site histogram, MaxMetricsPerTag site metrics, at most
// reflex.MaxRules fired rule names — which fits in limit
// (TestPulseWorstCaseFits), so the result always does.
func encodePulse(body *pulseJSON, limit int) []byte {
	data := marshalPulse(body)
	if len(data) <= limit {
		return data
	}
	tr := &wire.Trimmed{}
	body.Trimmed = tr
	for tag, tc := range body.Tags {
		if tc.Health != nil && tc.Health.Histogram != nil {
			h := *tc.Health
			h.Histogram = nil
			tc.Health = &h
			body.Tags[tag] = tc
			tr.Histograms++
		}
	}
	if data = marshalPulse(body); len(data) <= limit {
		return data
	}
	for tag, tc := range body.Tags {
		if tc.Metrics != nil {
			tc.Metrics = nil
			body.Tags[tag] = tc
			tr.Metrics++
		}
	}
	if data = marshalPulse(body); len(data) <= limit {
		return data
	}
	// Fold the tags with the fewest calls until the estimate fits, and
	// check: the estimate is each folded tag's own encoding, and OtherTag's
	// entry grows by a few digits at most, so one more round is rare.
	type entry struct {
		tag   string
		calls uint64
		size  int
	}
	var entries []entry
	for tag, tc := range body.Tags {
		if tag != OtherTag {
			entries = append(entries, entry{tag, tc.Usage + tc.Bounced, len(marshalPulse(tag)) + len(marshalPulse(tc)) + 2})
		}
	}
	slices.SortFunc(entries, func(a, b entry) int {
		return cmp.Or(cmp.Compare(a.calls, b.calls), strings.Compare(a.tag, b.tag))
	})
	over := len(data) - limit
	for len(data) > limit {
		other := body.Tags[OtherTag]
		for over > -64 && len(entries) > 0 { // 64: room for OtherTag's larger numbers
			e := entries[0]
			entries = entries[1:]
			tc := body.Tags[e.tag]
			other.Usage += tc.Usage
			other.Bounced += tc.Bounced
			delete(body.Tags, e.tag)
			tr.Tags++
			over -= e.size
		}
		body.Tags[OtherTag] = other
		data = marshalPulse(body)
		over = len(data) - limit
		if len(entries) == 0 {
			break // everything is folded: the rest is bounded and fits
		}
	}
	return data
}

// marshalPulse encodes v as JSON without escaping <, > and & to six bytes
// each: a pulse is not HTML, and its size is bounded.
func marshalPulse(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic("waitstate: encoding a pulse: " + err.Error()) // finite numbers and strings: cannot fail
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
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

// ceilMillis is d in whole milliseconds, rounded up: a window shorter than
// a millisecond (a Close right after a cut) still reports a duration, so
// that a control plane never divides its calls by zero.
func ceilMillis(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}
