package waitstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// finalPulse shuts c down and returns the last pulse cp counted from it.
func finalPulse(t *testing.T, cp *controlplane.Server, c *Client) controlplane.Pulse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
	var last controlplane.Pulse
	for _, p := range cp.Pulses() {
		if p.InstanceID == c.opts.InstanceID {
			last = p
		}
	}
	require.NotZero(t, last.Seq, "a pulse from the client")
	return last
}

// TestProtocolTagHealthAndMetrics sends one window of known samples and
// reads them back as the control plane received them: per-tag health with
// its histogram, site-wide health over every sample, metrics per tag and
// site-wide.
func TestProtocolTagHealthAndMetrics(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour // one window: the final pulse
	c, _ := startClient(t, opts)
	waitReady(t, c)

	for _, ms := range []int{10, 10, 10, 100} {
		c.ObserveTag("free", time.Duration(ms)*time.Millisecond, ms == 100)
	}
	c.StartTimer("pro").Stop(true)
	c.Observe(5*time.Millisecond, false)
	c.ObserveTag("", 5*time.Millisecond, true)
	api := c.HTTPMiddleware(MiddlewareOptions{Tag: func(*http.Request) string { return "api" }})(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) }))
	api.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
	for _, v := range []float64{2, 6, 4} {
		c.Record("free", "queue_depth", v)
	}
	c.Record("", "db.pool_wait_ms", 7)

	p := finalPulse(t, cp, c)
	free := p.Tags["free"]
	require.NotNil(t, free.Health)
	assert.EqualValues(t, 4, free.Health.Requests)
	assert.EqualValues(t, 1, free.Health.Errors)
	assert.InEpsilon(t, 100, free.Health.LatencyMs.Max, 0.05)
	assert.InEpsilon(t, 10, free.Health.LatencyMs.P50, 0.05)
	assert.Equal(t, "loglinear-us-8", free.Health.Histogram.Scheme)
	assert.Equal(t, map[string]uint64{wire.BucketKey(wire.HistIndex(10000)): 3, wire.BucketKey(wire.HistIndex(100000)): 1}, free.Health.Histogram.Counts)
	assert.Equal(t, controlplane.MetricAgg{Count: 3, Sum: 12, Min: 2, Max: 6}, free.Metrics["queue_depth"])
	assert.EqualValues(t, 1, p.Tags["pro"].Health.Errors, "StartTimer(tag).Stop(true)")
	assert.EqualValues(t, 1, p.Tags["api"].Health.Errors, "the middleware records under the request's tag; a 5xx failed")
	assert.EqualValues(t, 1, p.Tags["api"].Usage, "and gates it")
	assert.NotContains(t, p.Tags, "", "tag \"\" has no health of its own")
	require.NotNil(t, p.Health)
	assert.EqualValues(t, 4+1+2+1, p.Health.Requests, "site-wide health covers every sample")
	assert.EqualValues(t, 1+1+1+1, p.Health.Errors)
	assert.EqualValues(t, 8, histogramTotal(p.Health.Histogram.Counts))
	assert.Equal(t, map[string]controlplane.MetricAgg{"db.pool_wait_ms": {Count: 1, Sum: 7, Min: 7, Max: 7}}, p.Metrics)
	for _, key := range []string{`"histogram":{"scheme":"loglinear-us-8","counts":{`, `"metrics":{"db.pool_wait_ms"`} {
		assert.Contains(t, string(p.Raw), key)
	}
}

// TestProtocolShedPercents: a policy's shed percents travel from the
// control plane to Gate, and bad ones are refused whole.
func TestProtocolShedPercents(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Minute)
	cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 5, TagShedPercents: map[string]float64{"pro": 50}})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	assert.Equal(t, map[string]float64{"pro": 50}, c.Policy().TagShedPercents)
	assert.Equal(t, []bool{false, true, false, true}, shedPattern(c, "pro", 1, 4))
	assert.Equal(t, []bool{false, false, false}, shedPattern(c, "free", 1, 3))

	cp.SetPolicy("", controlplane.Policy{Version: 4, GlobalMaxWeight: 5, GlobalShedPercent: 100})
	eventually(t, func() bool { return c.Policy().Version == 4 }, "v4")
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 5}, c.Gate("free", 1))
}

// TestProtocolInstanceID: a stable instance name is sent in every request
// and pulse, and bound into every signature (the control plane verifies
// them all).
func TestProtocolInstanceID(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.InstanceID = "checkout-7f9c-pod-3"
	c, _ := startClient(t, opts)
	waitReady(t, c)
	eventually(t, func() bool { return len(cp.Pulses()) >= 1 }, "a pulse")
	assert.Equal(t, "checkout-7f9c-pod-3", cp.Pulses()[0].InstanceID)
	for _, r := range cp.Requests() {
		assert.Equal(t, "checkout-7f9c-pod-3", r.Header.Get(wire.HeaderInstance))
		assert.Equal(t, http.StatusOK, r.Status)
	}
}

// TestProtocolAnswersBoundToIdentity: an answer signed with the right key
// but for another instance and site — another site's answer relayed — is
// refused: nothing from it is applied.
func TestProtocolAnswersBoundToIdentity(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 0})
	cp.SetFaults(controlplane.Faults{OtherIdentity: true})
	opts := testOptions(cp)
	opts.SiteID = "eu-1"
	c, _ := startClient(t, opts)
	eventually(t, func() bool { s := c.Stats(); return s.SyncsFailed >= 2 && s.PulsesFailed >= 2 }, "answers refused")
	assert.Equal(t, ModeFailOpen, c.Mode())
	assert.Contains(t, c.Stats().LastError, "signature")
	assert.Zero(t, c.Stats().PulsesSent, "no pulse acknowledged by a refused answer")

	cp.SetFaults(controlplane.Faults{})
	waitReady(t, c)
	eventually(t, func() bool { return c.Stats().PulsesSent >= 1 }, "acknowledged once the answers are this site's")
}

// TestProtocolControlPlaneSetsIntervals: intervals in verified answers are
// adopted from the next tick, clamped to [100 ms, 10 min], and shown in
// Stats.
func TestProtocolControlPlaneSetsIntervals(t *testing.T) {
	t.Run("speed up", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
		cp.SetIntervals(0, 120*time.Millisecond)
		opts := testOptions(cp)
		opts.SyncInterval = time.Hour // without the control plane's interval: one sync an hour
		c, _ := startClient(t, opts)
		waitReady(t, c)
		eventually(t, func() bool { return len(requestsTo(cp, http.MethodGet, wire.PathPolicy)) >= 5 }, "syncs at the control plane's pace")
		assert.Equal(t, 120*time.Millisecond, c.Stats().SyncInterval)
		assert.Equal(t, opts.PulseInterval, c.Stats().PulseInterval, "an interval left out leaves the one in force")
	})
	t.Run("slow down", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetLeaseTTL(time.Hour)
		cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
		c, _ := startClient(t, testOptions(cp))
		waitReady(t, c)
		eventually(t, func() bool { return len(cp.Pulses()) >= 2 }, "pulses at 50 ms")
		cp.SetIntervals(time.Hour, 0)
		eventually(t, func() bool { return c.Stats().PulseInterval == 10*time.Minute }, "clamped to 10 min")
		// The tick armed before the answer may still come; after it none.
		n := len(requestsTo(cp, http.MethodPost, wire.PathPulse))
		time.Sleep(500 * time.Millisecond) // 10 of the old intervals
		assert.LessOrEqual(t, len(requestsTo(cp, http.MethodPost, wire.PathPulse)), n+1)
	})
	t.Run("clamped up", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
		cp.SetIntervals(time.Millisecond, time.Millisecond)
		c, _ := startClient(t, testOptions(cp))
		eventually(t, func() bool {
			s := c.Stats()
			return s.SyncInterval == 100*time.Millisecond && s.PulseInterval == 100*time.Millisecond
		}, "100 ms at least")
	})
}

// TestProtocolBadIntervalsRefused: an interval that is not a positive
// integer refuses the answer like a bad policy; a pulse is still
// acknowledged. One too large to parse is 10 minutes.
func TestProtocolBadIntervalsRefused(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Minute)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	for _, field := range []string{`"pulseIntervalMs": null`, `"pulseIntervalMs": 1.5`, `"syncIntervalMs": -5`,
		`"pulseIntervalMs": "250"`, `"syncIntervalMs": 0`, `"pulseIntervalMs": 1e3`, `"syncIntervalMs": true`} {
		s := c.Stats()
		counted := len(cp.Pulses())
		cp.SetFaults(controlplane.Faults{AnswerFields: field})
		eventually(t, func() bool { return c.Stats().PolicyErrors >= s.PolicyErrors+2 && len(cp.Pulses()) >= counted+2 }, "%s refused", field)
		after := c.Stats()
		assert.Equal(t, s.PulseInterval, after.PulseInterval, field)
		assert.Equal(t, s.SyncInterval, after.SyncInterval, field)
		assert.Greater(t, after.PulsesSent, s.PulsesSent, "%s: pulses still acknowledged", field)
		assert.Contains(t, after.LastError, "IntervalMs", field)
	}
	cp.SetFaults(controlplane.Faults{AnswerFields: `"syncIntervalMs": 99999999999999999999999999`})
	eventually(t, func() bool { return c.Stats().SyncInterval == 10*time.Minute }, "too large to parse: 10 min")
}

// TestProtocolRetryAfterBoundedByLease: a 503 with Retry-After: 600 on both
// loops — what a proxy or anyone on the path can send, unsigned — delays
// them only until shortly before the lease would run out: the client never
// drops into safe mode while the control plane is healthy.
func TestProtocolRetryAfterBoundedByLease(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(4 * time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.PulseInterval, opts.SyncInterval = 500*time.Millisecond, 500*time.Millisecond
	var modes []Mode
	var mu sync.Mutex
	opts.OnModeChange = func(_, to Mode) { mu.Lock(); modes = append(modes, to); mu.Unlock() }
	c, _ := startClient(t, opts)
	waitReady(t, c)

	cp.SetFaults(controlplane.Faults{PulseStatus: http.StatusServiceUnavailable, PolicyStatus: http.StatusServiceUnavailable, RetryAfter: 600 * time.Second})
	eventually(t, func() bool {
		return slices.ContainsFunc(requestsTo(cp, http.MethodPost, wire.PathPulse), status503) &&
			slices.ContainsFunc(requestsTo(cp, http.MethodGet, wire.PathPolicy), status503)
	}, "both loops got a 503 Retry-After: 600")
	cp.SetFaults(controlplane.Faults{})
	n := len(cp.Pulses())
	eventually(t, func() bool { return len(cp.Pulses()) > n }, "pulses resume well before 600 s")
	eventually(t, func() bool {
		return len(requestsTo(cp, http.MethodGet, wire.PathPolicy)) > slices.IndexFunc(requestsTo(cp, http.MethodGet, wire.PathPolicy), status503)+1
	}, "syncs resume too")
	assert.Equal(t, ModeEnforcing, c.Mode())
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []Mode{ModeEnforcing}, modes, "never in safe mode")
}

func status503(r controlplane.Request) bool { return r.Status == http.StatusServiceUnavailable }

// TestProtocolInitialPolicy: an initial policy is in force from New,
// enforcing and never expiring, until the control plane's first policy
// replaces it whatever its version.
func TestProtocolInitialPolicy(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 9})
	cp.SetFaults(controlplane.Faults{Down: true})
	opts := testOptions(cp)
	opts.InitialPolicy = &Policy{Version: 100, GlobalMaxWeight: 1}
	var applied []int64
	var mu sync.Mutex
	opts.OnPolicyApplied = func(p *Policy) { mu.Lock(); applied = append(applied, p.Version); mu.Unlock() }
	c, _ := startClient(t, opts)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	assert.NoError(t, c.Ready(done), "ready at once")
	assert.Equal(t, ModeEnforcing, c.Mode())
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 1}, c.Gate("a", 2))

	eventually(t, func() bool { s := c.Stats(); return s.SyncsFailed >= 3 && s.PulsesFailed >= 6 }, "the control plane is down")
	time.Sleep(400 * time.Millisecond) // longer than the default lease of 300 ms
	assert.Equal(t, ModeEnforcing, c.Mode(), "the initial policy never expires into safe mode")
	assert.Zero(t, c.Stats().LeaseRemaining, "it has no lease")

	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return c.Policy().Version == 1 }, "the control plane's v1 replaces the initial v100")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 9}, c.Gate("a", 2))
	// Callbacks run just after the change is visible: wait for this one.
	appliedSoFar := func() []int64 { mu.Lock(); defer mu.Unlock(); return slices.Clone(applied) }
	eventually(t, func() bool { return len(appliedSoFar()) > 0 }, "OnPolicyApplied for v1")
	assert.Equal(t, int64(1), appliedSoFar()[0], "OnPolicyApplied is not called for the initial policy")
	assert.Positive(t, c.Stats().LeaseRemaining, "now leased")
}

// TestProtocolCallbacks: OnModeChange and OnPolicyApplied run one at a
// time, in the order of the changes, outside every lock (they call back
// into the client), and a panic in one is recovered and logged.
func TestProtocolCallbacks(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	var mu sync.Mutex
	var log []string
	running := 0
	enter := func(s string) {
		mu.Lock()
		running++
		concurrent := running > 1
		log = append(log, s)
		mu.Unlock()
		if concurrent {
			t.Error("two callbacks ran at once")
		}
	}
	leave := func() { mu.Lock(); running--; mu.Unlock() }
	var c *Client
	started := make(chan struct{}) // c is set
	panicked := false
	opts := testOptions(cp)
	opts.OnModeChange = func(from, to Mode) {
		<-started
		enter(from.String() + "→" + to.String())
		defer leave()
		_ = c.Stats() // takes the client's lock: deadlocks if called under it
		if !panicked {
			panicked = true
			panic("a bug in the callback")
		}
	}
	opts.OnPolicyApplied = func(p *Policy) {
		<-started
		enter(fmt.Sprint("policy v", p.Version))
		defer leave()
		_ = c.Policy()
	}
	var logs *logBuffer
	c, logs = startClient(t, opts)
	close(started)
	waitReady(t, c)
	cp.SetPolicy("", controlplane.Policy{Version: 2, GlobalMaxWeight: 5})
	eventually(t, func() bool { return c.Policy().Version == 2 }, "v2")
	cp.SetFaults(controlplane.Faults{Down: true})
	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "safe mode")
	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return c.Mode() == ModeEnforcing }, "enforcing again")
	require.NoError(t, c.Shutdown(context.Background()))

	mu.Lock()
	defer mu.Unlock()
	// Shutdown ran every queued callback. The policies came in order, and
	// each change of mode starts where the one before it ended: a loaded
	// machine may add a lease expiry, never a change out of order.
	var policies []string
	modes := []string{"fail_open"}
	for _, entry := range log {
		if from, to, ok := strings.Cut(entry, "→"); ok {
			require.Equal(t, modes[len(modes)-1], from, "changes in order: %q", log)
			modes = append(modes, to)
		} else {
			policies = append(policies, entry)
		}
	}
	assert.Equal(t, []string{"policy v1", "policy v2"}, policies)
	assert.Equal(t, "policy v1", log[0], "v1 is applied before the mode changes to enforcing")
	assert.Contains(t, modes, "safe_mode")
	assert.Equal(t, "enforcing", modes[len(modes)-1])
	assert.Contains(t, logs.String(), "a callback panicked")
}

// TestProtocolShadowPulses: a shadow client's pulses say so, and count
// would-be denials as bounced.
func TestProtocolShadowPulses(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 0})
	opts := testOptions(cp)
	opts.Shadow = true
	c, _ := startClient(t, opts)
	waitReady(t, c)
	for range 10 {
		require.Equal(t, GateResult{true, true, ReasonGlobalMaxWeight, 0}, c.Gate("free", 1))
	}
	p := finalPulse(t, cp, c)
	assert.True(t, p.Shadow)
	assert.Contains(t, string(p.Raw), `"shadow":true`)
	assert.EqualValues(t, 10, cp.Totals("").Bounced)
}

// TestNetworkNewNeverWaits: with every request hanging, New returns and
// Gate answers before the control plane has answered anything.
func TestNetworkNewNeverWaits(t *testing.T) {
	cp := newPlane(t)
	cp.SetFaults(controlplane.Faults{Hang: true})
	c, _ := startClient(t, testOptions(cp))
	assert.Equal(t, failOpen, c.Gate("a", 1e9))
	assert.Empty(t, cp.Requests(), "no request had been answered")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, c.Shutdown(ctx), context.DeadlineExceeded)
	var se *StatusError
	assert.False(t, errors.As(c.Shutdown(ctx), &se))
}

// TestSecretsNeverPrinted prints, logs and marshals every value that holds
// the secret key, with every verb.
func TestSecretsNeverPrinted(t *testing.T) {
	opts := Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: "https://user:url-password-1234@cp.example", SiteID: "eu-1"}
	c, err := New(Options{PublishKey: testPublishKey, SecretKey: testSecretKey, Offline: true})
	require.NoError(t, err)
	defer c.Close()
	var out strings.Builder
	for _, v := range []any{opts, &opts, c, *c.view.Load()} {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d", "%T"} {
			out.WriteString(sprintf(verb, v) + "\n")
		}
		b, _ := json.Marshal(v)
		out.Write(b)
	}
	logs := &logBuffer{}
	text := newTestLogger(logs, false)
	text.Info("opts", "opts", opts, "client", c)
	newTestLogger(logs, true).Info("opts", "opts", opts, "ptr", &opts, "client", c)
	all := out.String() + logs.String()
	assert.NotContains(t, all, testSecretKey)
	assert.NotContains(t, all, "url-password-1234")
	assert.Contains(t, all, testPublishKey, "the rest is still shown")
	assert.Contains(t, all, "[REDACTED]")
}

// TestSafeModeStrategiesOverTheNetwork: a control plane that goes down
// after a policy was applied expires the lease into safe mode, and each
// strategy answers as it says.
func TestSafeModeStrategiesOverTheNetwork(t *testing.T) {
	for _, strategy := range []SafeModeStrategy{SafeModeLastPolicy, SafeModeOpen} {
		t.Run(strategy.String(), func(t *testing.T) {
			cp := newPlane(t)
			cp.SetLeaseTTL(300 * time.Millisecond)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
			opts := testOptions(cp)
			opts.SafeMode = strategy
			c, _ := startClient(t, opts)
			waitReady(t, c)
			cp.SetFaults(controlplane.Faults{Down: true})
			eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the lease expires")
			for range 200 { // far more than any fixed rate's burst
				switch strategy {
				case SafeModeLastPolicy:
					require.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
					require.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("pro", 1))
				case SafeModeOpen:
					require.Equal(t, GateResult{true, false, ReasonSafeMode, math.Inf(1)}, c.Gate("free", 1))
				}
			}
			cp.SetFaults(controlplane.Faults{})
			eventually(t, func() bool { return c.Mode() == ModeEnforcing }, "enforcing again")
		})
	}
}

// TestProtocolTagHygiene: tags too long or not valid UTF-8 reach the
// control plane as _other, and the pulse stays small.
func TestProtocolTagHygiene(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour
	c, _ := startClient(t, opts)
	waitReady(t, c)
	plans := c.HTTPMiddleware(MiddlewareOptions{Tag: func(r *http.Request) string { return r.Header.Get("X-Plan") }})(
		http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	for i := range 10 {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("X-Plan", strings.Repeat(string(rune('a'+i)), 1<<20)) // 1 MiB headers
		plans.ServeHTTP(httptest.NewRecorder(), r)
	}
	c.Gate("\xff\xfe", 1)
	c.Gate("pro", 1)
	p := finalPulse(t, cp, c)
	assert.Equal(t, []string{OtherTag, "pro"}, slices.Sorted(maps.Keys(p.Tags)))
	assert.EqualValues(t, 11, p.Tags[OtherTag].Usage)
	assert.EqualValues(t, 10, p.Tags[OtherTag].Health.Requests, "the middleware's samples too")
	assert.Less(t, len(p.Raw), 4<<10)
}
