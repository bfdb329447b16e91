package waitstate

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"math"
	"net"
	"net/http"
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

// uuidPattern matches a UUID version 4 in canonical form.
const uuidPattern = `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`

// closedURL is the address of a loopback port nothing listens on.
func closedURL(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return "http://" + addr
}

// requestsTo returns the requests cp saw for method and path.
func requestsTo(cp *controlplane.Server, method, path string) []controlplane.Request {
	var out []controlplane.Request
	for _, r := range cp.Requests() {
		if r.Method == method && r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

func TestNetworkFailOpenWhenUnreachable(t *testing.T) {
	opts := Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: closedURL(t),
		PulseInterval: MinInterval, SyncInterval: MinInterval}
	c, logs := startClient(t, opts)

	assert.Equal(t, ModeFailOpen, c.Mode())
	assert.Equal(t, GateResult{true, false, ReasonFailOpen, math.Inf(1)}, c.Gate("free", 1e9))
	eventually(t, func() bool { s := c.Stats(); return s.SyncsFailed >= 3 && s.PulsesFailed >= 2 }, "syncs and pulses keep failing")
	assert.Equal(t, ModeFailOpen, c.Mode())
	assert.Equal(t, GateResult{true, false, ReasonFailOpen, math.Inf(1)}, c.Gate("free", 1e9))
	assert.Equal(t, DefaultPolicy(), c.Policy())

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, c.Ready(ctx), context.DeadlineExceeded)

	s := c.Stats()
	assert.EqualValues(t, 2, s.Usage)
	assert.Zero(t, s.PolicyVersion)
	assert.NotEmpty(t, s.LastError)
	assert.Equal(t, 1, strings.Count(logs.String(), `op=sync`), "a failing loop logs the change of state once, not every tick:\n%s", logs)
}

func TestNetworkFailOpenWithWrongKeys(t *testing.T) {
	for name, edit := range map[string]func(*Options){
		"unknown publish key": func(o *Options) { o.PublishKey = "pk_unknown" },
		"wrong secret key":    func(o *Options) { o.SecretKey = "sk_wrong_" + testSecretKey },
	} {
		t.Run(name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 0})
			opts := testOptions(cp)
			edit(&opts)
			c, logs := startClient(t, opts)
			eventually(t, func() bool { s := c.Stats(); return s.SyncsFailed >= 2 && s.PulsesFailed >= 3 }, "requests refused")
			assert.Equal(t, ModeFailOpen, c.Mode())
			assert.True(t, c.Gate("x", 1).Allowed)
			assert.Empty(t, cp.Pulses(), "the control plane counted nothing")
			for _, r := range cp.Requests() {
				assert.Equal(t, http.StatusUnauthorized, r.Status)
			}
			out := logs.String()
			assert.Equal(t, 2, strings.Count(out, "level=ERROR"), "one error per loop, once:\n%s", out)
			assert.Contains(t, out, "refuses the keys")
			assert.NotContains(t, out, testSecretKey)
			assert.NotContains(t, c.Stats().LastError, testSecretKey)
		})
	}
}

func TestProtocolEnforcingWithEveryInfinityForm(t *testing.T) {
	forms := []string{`"Infinity"`, `"+Infinity"`, `"inf"`, `"+Inf"`, `"INFINITY"`, `"iNf"`, `null`, `1e999`}
	for _, form := range forms {
		t.Run(form, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicyJSON("", `{"version": 7, "globalMaxWeight": `+form+`, "tagMaxWeights": {"free": 0, "ent": `+form+`}}`)
			c, _ := startClient(t, testOptions(cp))
			waitReady(t, c)
			assert.Equal(t, ModeEnforcing, c.Mode())
			p := c.Policy()
			assert.EqualValues(t, 7, p.Version)
			assert.True(t, math.IsInf(p.GlobalMaxWeight, 1))
			assert.True(t, math.IsInf(p.TagMaxWeights["ent"], 1))
			assert.Equal(t, GateResult{true, false, ReasonAllowed, math.Inf(1)}, c.Gate("ent", math.MaxFloat64))
			assert.Equal(t, GateResult{true, false, ReasonAllowed, math.Inf(1)}, c.Gate("pro", 1e300))
			assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
		})
	}
	t.Run("absent globalMaxWeight", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetPolicyJSON("", `{"version": 1}`)
		c, _ := startClient(t, testOptions(cp))
		waitReady(t, c)
		assert.Equal(t, GateResult{true, false, ReasonAllowed, math.Inf(1)}, c.Gate("any", 1e300))
	})
}

func TestProtocolBadPoliciesRefusedWhole(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Minute) // refused answers renew nothing: keep the lease out of the way
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	c, logs := startClient(t, testOptions(cp))
	waitReady(t, c)
	want := c.Policy()

	// In a fixed order: the client logs when a loop starts failing, not each
	// later error, so the log below names the first case's kind of error
	// ("not JSON" is a malformed answer, not an invalid policy).
	bad := badPolicies()
	for _, name := range slices.Sorted(maps.Keys(bad)) {
		raw := bad[name]
		before := c.Stats().PolicyErrors
		cp.SetPolicyJSON("", raw)
		// Both the pulse and the sync answers carry it: wait for both kinds
		// of refusal, then check nothing moved.
		eventually(t, func() bool { return c.Stats().PolicyErrors >= before+3 }, "%s: refused", name)
		assert.Equal(t, want, c.Policy(), name)
		assert.Equal(t, ModeEnforcing, c.Mode(), name)
		assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1), name)
	}
	assert.Contains(t, logs.String(), "invalid policy", "the first case, %q, is an invalid policy", slices.Sorted(maps.Keys(bad))[0])

	cp.SetPolicy("", controlplane.Policy{Version: 2, GlobalMaxWeight: 9})
	eventually(t, func() bool { return c.Policy().Version == 2 }, "a good policy is applied again")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 9}, c.Gate("free", 1))
}

func TestProtocolNullPolicyFromGetIsAnError(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	cp.SetFaults(controlplane.Faults{NullPolicy: true})
	c, _ := startClient(t, testOptions(cp))
	eventually(t, func() bool { return c.Stats().SyncsFailed >= 2 }, "GET with null policy fails")
	assert.Equal(t, ModeFailOpen, c.Mode())
	assert.Contains(t, c.Stats().LastError, "policy is null")
	cp.SetFaults(controlplane.Faults{})
	waitReady(t, c)
}

// gateFor gates from 8 goroutines until stop is closed, and returns what
// they saw: the exact counts the control plane must end up with.
func gateFor(c *Client, stop <-chan struct{}) func() (usage, bounced uint64, tags map[string]controlplane.TagCount) {
	tags := []string{"free", "pro", "enterprise", "batch", "internal"}
	var wg sync.WaitGroup
	local := make([]map[string]controlplane.TagCount, 8)
	for g := range local {
		local[g] = map[string]controlplane.TagCount{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				tag := tags[(i*7+g)%len(tags)]
				tc := local[g][tag]
				if c.Gate(tag, float64(i%10)).Allowed {
					tc.Usage++
				} else {
					tc.Bounced++
				}
				local[g][tag] = tc
				if i%16 == 0 {
					time.Sleep(50 * time.Microsecond) // leave the loops some CPU
				}
			}
		}()
	}
	return func() (uint64, uint64, map[string]controlplane.TagCount) {
		wg.Wait()
		var usage, bounced uint64
		sum := map[string]controlplane.TagCount{}
		for _, m := range local {
			for tag, tc := range m {
				s := sum[tag]
				sum[tag] = controlplane.TagCount{Usage: s.Usage + tc.Usage, Bounced: s.Bounced + tc.Bounced}
				usage += tc.Usage
				bounced += tc.Bounced
			}
		}
		return usage, bounced, sum
	}
}

// TestCountExact drives 8 gating goroutines across several pulses while
// the control plane misbehaves, then checks that it counted every call
// once, to the unit, globally and per tag, totals too.
func TestCountExact(t *testing.T) {
	scenarios := map[string]controlplane.Faults{
		"healthy":             {},
		"pulses fail 500":     {PulseStatus: http.StatusInternalServerError},
		"pulses fail 503":     {PulseStatus: http.StatusServiceUnavailable},
		"acks lost":           {CountThenHang: true},
		"acks forged":         {ForgeSig: true},
		"control plane down":  {Down: true},
		"requests hang":       {Hang: true},
		"oversized responses": {Oversize: true},
	}
	for name, fault := range scenarios {
		t.Run(name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 1, "enterprise": math.Inf(1)}})
			c, _ := startClient(t, testOptions(cp))
			waitReady(t, c)

			stop := make(chan struct{})
			results := gateFor(c, stop)
			eventually(t, func() bool { return len(cp.Pulses()) >= 2 }, "pulses before the fault")
			cp.SetFaults(fault)
			failedBefore := c.Stats().PulsesFailed
			eventually(t, func() bool { return c.Stats().PulsesFailed >= failedBefore+3 || fault == (controlplane.Faults{}) }, "pulses fail under the fault")
			cp.SetFaults(controlplane.Faults{})
			n := len(cp.Pulses())
			eventually(t, func() bool { return len(cp.Pulses()) >= n+3 }, "three more pulses after the fault")
			close(stop)
			usage, bounced, tags := results()
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			require.NoError(t, c.Shutdown(ctx))

			got := cp.Totals("")
			assert.Equal(t, usage, got.Usage, "usage")
			assert.Equal(t, bounced, got.Bounced, "bounced")
			assert.Equal(t, tags, got.Tags, "per tag")
			pulses := cp.Pulses()
			last := pulses[len(pulses)-1]
			assert.Equal(t, usage, last.UsageTotal, "usageTotal")
			assert.Equal(t, bounced, last.BouncedTotal, "bouncedTotal")
			for i, p := range pulses {
				assert.EqualValues(t, i+1, p.Seq, "each seq counted once, none skipped")
			}
			s := c.Stats()
			assert.Equal(t, usage, s.Usage)
			assert.Equal(t, bounced, s.Bounced)
			assert.Greater(t, usage, uint64(100))
			assert.Greater(t, bounced, uint64(100))
			if fault != (controlplane.Faults{}) {
				sent := requestsTo(cp, http.MethodPost, wire.PathPulse)
				assert.Greater(t, len(sent), len(pulses), "the fault made the client resend")
				for _, r := range sent {
					var body wire.PulseBody
					require.NoError(t, json.Unmarshal(r.Body, &body))
					assert.Equal(t, c.incarnation, body.Incarnation, "a resend keeps the incarnation, as its seq")
				}
			}
		})
	}
}

// TestSafeMode: a lease that is not renewed expires into safe mode, which
// admits SafeModeMaxRPS per second whatever the tag or weight, and a
// renewal returns to enforcing.
func TestSafeMode(t *testing.T) {
	for name, fault := range map[string]controlplane.Faults{
		"control plane down": {Down: true},
		"requests hang":      {Hang: true},
		"responses forged":   {ForgeSig: true},
		"responses replayed": {Replay: true},
		"responses garbage":  {Garbage: true},
		"no signature":       {NoSig: true},
		"oversized":          {Oversize: true},
	} {
		t.Run(name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetLeaseTTL(300 * time.Millisecond)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 0})
			opts := testOptions(cp)
			opts.SafeModeMaxRPS = 40
			c, logs := startClient(t, opts)
			waitReady(t, c)
			assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 0}, c.Gate("x", 1))

			cp.SetPolicy("", controlplane.Policy{Version: 2, GlobalMaxWeight: 0})
			cp.SetFaults(fault)
			eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the lease expires")
			assert.EqualValues(t, 1, c.Policy().Version, "nothing from a refused answer is applied")
			assert.Contains(t, logs.String(), "entering safe mode")

			// Count admissions over 2 s: a burst of one second's worth, then
			// 40 per second. The bucket holds a second, so only a pause of
			// nearly a second between two calls, on a loaded machine, loses
			// admissions: at most 40 per second of pause beyond 0.9 s.
			allowed, first := 0, time.Now()
			last, paused := first, time.Duration(0)
			for time.Since(first) < 2*time.Second {
				r := c.Gate("tag-"+string(rune('a'+allowed%3)), 1e9)
				now := time.Now()
				paused += max(now.Sub(last)-900*time.Millisecond, 0)
				last = now
				if r.Allowed {
					allowed++
					require.Equal(t, GateResult{true, false, ReasonSafeMode, math.Inf(1)}, r)
				} else {
					require.Equal(t, GateResult{false, false, ReasonSafeModeLimit, math.Inf(1)}, r)
				}
				time.Sleep(time.Millisecond)
			}
			most := 40 + 40*last.Sub(first).Seconds()
			assert.LessOrEqual(t, float64(allowed), most+1, "admissions over %v", last.Sub(first))
			assert.GreaterOrEqual(t, float64(allowed), most-40*paused.Seconds()-3, "admissions over %v, %v of it paused", last.Sub(first), paused)

			cp.SetFaults(controlplane.Faults{})
			eventually(t, func() bool { return c.Mode() == ModeEnforcing }, "a renewal returns to enforcing")
			eventually(t, func() bool { return c.Policy().Version == 2 }, "and the new policy applies")
			assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 0}, c.Gate("x", 1))
			assert.Contains(t, logs.String(), "enforcing again")
		})
	}
}

func TestProtocolBadTokensAreNeverSent(t *testing.T) {
	faults := map[string]controlplane.TokenFault{
		"wrong key":     controlplane.TokenWrongKey,
		"alg none":      controlplane.TokenAlgNone,
		"HS512":         controlplane.TokenHS512,
		"expired":       controlplane.TokenExpired,
		"no expiry":     controlplane.TokenNoExpiry,
		"wrong subject": controlplane.TokenWrongSubject,
		"wrong issuer":  controlplane.TokenWrongIssuer,
		"wrong site":    controlplane.TokenWrongSite,
		"not a JWT":     controlplane.TokenGarbage,
	}
	for name, fault := range faults {
		t.Run(name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
			cp.SetFaults(controlplane.Faults{BadToken: fault})
			opts := testOptions(cp)
			opts.SiteID = "eu-1"
			c, logs := startClient(t, opts)
			eventually(t, func() bool { return len(requestsTo(cp, http.MethodPost, wire.PathToken)) >= 3 }, "token requests")
			assert.Empty(t, requestsTo(cp, http.MethodGet, wire.PathPolicy), "a refused token is never sent")
			assert.Contains(t, c.Stats().LastError, "invalid token")
			assert.NotContains(t, logs.String(), "eyJ", "no token in the logs")

			cp.SetFaults(controlplane.Faults{})
			eventually(t, func() bool { return len(requestsTo(cp, http.MethodGet, wire.PathPolicy)) > 0 }, "a good token is used")
			waitReady(t, c)
		})
	}
}

func TestProtocolSite(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 1})
	cp.SetPolicy("eu-1", controlplane.Policy{Version: 7, GlobalMaxWeight: 7})
	opts := testOptions(cp)
	opts.SiteID = "eu-1"
	c, _ := startClient(t, opts)
	waitReady(t, c)
	assert.EqualValues(t, 7, c.Policy().Version, "the site's own policy")
	eventually(t, func() bool { return len(cp.Pulses()) >= 1 }, "a pulse")

	for _, r := range cp.Requests() {
		assert.Equal(t, "eu-1", r.Header.Get(wire.HeaderSite), "%s %s", r.Method, r.Path)
	}
	tok := requestsTo(cp, http.MethodPost, wire.PathToken)
	require.NotEmpty(t, tok)
	var body map[string]string
	require.NoError(t, json.Unmarshal(tok[0].Body, &body))
	assert.Equal(t, map[string]string{"instanceId": tok[0].Header.Get(wire.HeaderInstance), "siteId": "eu-1"}, body)
	assert.Equal(t, "eu-1", cp.Pulses()[0].SiteID)
	// The GET succeeded, so the token's site claim matched (the control
	// plane checks it); TestProtocolBadTokensAreNeverSent checks that the
	// SDK refuses a token whose claim does not.

	// Without a site: no header, no field.
	cp2 := newPlane(t)
	cp2.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 1})
	c2, _ := startClient(t, testOptions(cp2))
	waitReady(t, c2)
	eventually(t, func() bool { return len(cp2.Pulses()) >= 1 }, "a pulse")
	for _, r := range cp2.Requests() {
		assert.Empty(t, r.Header.Values(wire.HeaderSite))
		assert.NotContains(t, string(r.Body), "siteId")
	}
}

func TestProtocolPulseShape(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 17, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(cp.Pulses()) >= 2 }, "idle pulses")
	idle := cp.Pulses()[1]
	assert.Contains(t, string(idle.Raw), `"tags":{}`, "tags is {} when empty")
	assert.NotContains(t, string(idle.Raw), `"health"`, "health is omitted without samples")

	// One window with known traffic: the final pulse of Shutdown.
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour
	c2, _ := startClient(t, opts)
	waitReady(t, c2)
	for range 60 {
		c2.Gate("free", 1)
	}
	for range 40 {
		c2.Gate("pro", 2)
	}
	for ms := 1; ms <= 100; ms++ {
		c2.Observe(time.Duration(ms)*time.Millisecond, ms > 98)
	}
	before := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c2.Shutdown(ctx))

	var p controlplane.Pulse
	for _, q := range cp.Pulses() {
		if q.InstanceID != idle.InstanceID {
			p = q
		}
	}
	require.NotZero(t, p.Seq)
	var raw map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(p.Raw, &raw))
	var keys []string
	for k := range raw {
		keys = append(keys, k)
	}
	assert.ElementsMatch(t, []string{"instanceId", "incarnation", "sdk", "seq", "windowEndMs", "windowMs", "ownPulseIntervalMs", "mode",
		"policyVersion", "usageDelta", "bouncedDelta", "usageTotal", "bouncedTotal", "tags", "health", "shadow"}, keys)
	assert.Regexp(t, uuidPattern, p.InstanceID, "a random UUID v4 by default")
	assert.Regexp(t, `^[0-9a-f]{32}$`, p.Incarnation, "128 random bits in lowercase hex")
	assert.NotEqual(t, idle.Incarnation, p.Incarnation, "one per New")
	assert.False(t, p.Shadow)
	assert.Equal(t, "waitstate-go/"+Version, p.SDK)
	assert.EqualValues(t, 1, p.Seq)
	assert.Equal(t, "enforcing", p.Mode)
	assert.EqualValues(t, 17, p.PolicyVersion)
	assert.EqualValues(t, 40, p.UsageDelta)
	assert.EqualValues(t, 60, p.BouncedDelta)
	assert.EqualValues(t, 40, p.UsageTotal)
	assert.EqualValues(t, 60, p.BouncedTotal)
	assert.Equal(t, map[string]controlplane.TagCount{"free": {Bounced: 60}, "pro": {Usage: 40}}, p.Tags)
	assert.InDelta(t, before.UnixMilli(), p.WindowEndMs, 5000)
	assert.Positive(t, p.WindowMs)
	assert.EqualValues(t, time.Hour.Milliseconds(), p.OwnIntervalMs, "its own PulseInterval")
	require.NotNil(t, p.Health)
	assert.EqualValues(t, 100, p.Health.Requests)
	assert.EqualValues(t, 2, p.Health.Errors)
	assert.InEpsilon(t, 50, p.Health.LatencyMs.P50, 0.05)
	assert.InEpsilon(t, 95, p.Health.LatencyMs.P95, 0.05)
	assert.InEpsilon(t, 99, p.Health.LatencyMs.P99, 0.05)
	assert.InEpsilon(t, 100, p.Health.LatencyMs.Max, 0.05)

	// Headers of every request; signatures are verified by the control
	// plane, which answered 200 to all of them.
	nonces := map[string]bool{}
	for _, r := range cp.Requests() {
		assert.Equal(t, http.StatusOK, r.Status, "%s %s", r.Method, r.Path)
		assert.Equal(t, UserAgent, r.Header.Get("User-Agent"))
		assert.Equal(t, testPublishKey, r.Header.Get(wire.HeaderKey))
		assert.Regexp(t, uuidPattern, r.Header.Get(wire.HeaderInstance))
		nonce := r.Header.Get(wire.HeaderNonce)
		assert.Regexp(t, `^[0-9a-f]{32}$`, nonce)
		assert.False(t, nonces[nonce], "a fresh nonce per request")
		nonces[nonce] = true
		if r.Method == http.MethodPost {
			assert.Regexp(t, `^v2=[0-9a-f]{64}$`, r.Header.Get(wire.HeaderSignature))
			assert.NotEmpty(t, r.Header.Get(wire.HeaderTimestamp))
		} else {
			assert.Regexp(t, `^Bearer ey`, r.Header.Get("Authorization"))
		}
	}

	// Seqs of the first client grow by one.
	var seqs []uint64
	for _, q := range cp.Pulses() {
		if q.InstanceID == idle.InstanceID {
			seqs = append(seqs, q.Seq)
		}
	}
	for i, s := range seqs {
		assert.EqualValues(t, i+1, s)
	}
}

func TestProtocolTagCap(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour
	c, _ := startClient(t, opts)
	waitReady(t, c)
	for i := range MaxWindowTags + 500 {
		c.Gate("tenant-"+strings.Repeat("x", i%3)+string(rune(0x4e00+i)), float64(i%10))
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
	pulses := cp.Pulses()
	require.Len(t, pulses, 1)
	p := pulses[0]
	assert.Len(t, p.Tags, MaxWindowTags+1)
	other := p.Tags[OtherTag]
	assert.EqualValues(t, 500, other.Usage+other.Bounced)
	assert.EqualValues(t, MaxWindowTags+500, p.UsageDelta+p.BouncedDelta)
}

func TestProtocolTokenRefreshOn401(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(requestsTo(cp, http.MethodGet, wire.PathPolicy)) >= 3 }, "syncs")
	assert.Len(t, requestsTo(cp, http.MethodPost, wire.PathToken), 1, "a token is reused until half its life")

	n := len(cp.Requests())
	cp.RevokeTokens()
	cp.SetPolicy("", controlplane.Policy{Version: 2, GlobalMaxWeight: 5})
	eventually(t, func() bool { return len(requestsTo(cp, http.MethodPost, wire.PathToken)) >= 2 }, "a new token")
	eventually(t, func() bool {
		var sync []controlplane.Request
		for _, r := range cp.Requests()[n:] {
			if r.Path != wire.PathPulse {
				sync = append(sync, r)
			}
		}
		return len(sync) >= 3 &&
			sync[0].Method == http.MethodGet && sync[0].Status == http.StatusUnauthorized &&
			sync[1].Path == wire.PathToken && sync[1].Status == http.StatusOK &&
			sync[2].Method == http.MethodGet && sync[2].Status == http.StatusOK
	}, "401, new token, retried GET")
	assert.Zero(t, c.Stats().SyncsFailed, "the retry made the sync succeed")
}

func TestProtocolTokenRefreshAtHalfLife(t *testing.T) {
	cp := newPlane(t)
	cp.SetTokenTTL(2 * time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(requestsTo(cp, http.MethodPost, wire.PathToken)) >= 3 }, "refreshed before expiry")
	for _, r := range requestsTo(cp, http.MethodGet, wire.PathPolicy) {
		assert.Equal(t, http.StatusOK, r.Status, "no expired token was ever sent")
	}
}

func TestProtocolRetryAfter(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Minute) // a lease long enough for the Retry-After to be honoured whole
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(cp.Pulses()) >= 1 }, "a pulse")
	cp.SetFaults(controlplane.Faults{PulseStatus: http.StatusTooManyRequests, RetryAfter: 2 * time.Second})
	var at time.Time
	eventually(t, func() bool {
		for _, r := range requestsTo(cp, http.MethodPost, wire.PathPulse) {
			if r.Status == http.StatusTooManyRequests {
				at = time.Now()
				return true
			}
		}
		return false
	}, "a 429")
	n := len(requestsTo(cp, http.MethodPost, wire.PathPulse))
	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return len(requestsTo(cp, http.MethodPost, wire.PathPulse)) > n }, "pulses resume")
	assert.GreaterOrEqual(t, time.Since(at), 1800*time.Millisecond, "the next pulse waited for Retry-After")
	assert.Contains(t, c.Stats().LastError, "429")
}

// TestRetryAfterBeforeFirstPolicy: unsigned 503s with Retry-After: 600
// before the first policy do not keep a new client failing open for ten
// minutes: it asks again at its own intervals.
func TestRetryAfterBeforeFirstPolicy(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	cp.SetFaults(controlplane.Faults{Down: true, RetryAfter: 600 * time.Second})
	c, _ := startClient(t, testOptions(cp))
	eventually(t, func() bool {
		return len(requestsTo(cp, http.MethodPost, wire.PathPulse)) >= 1 && len(requestsTo(cp, http.MethodPost, wire.PathToken)) >= 1
	}, "a pulse and a sync answered 503 with Retry-After: 600")
	assert.Equal(t, ModeFailOpen, c.Mode())
	cp.SetFaults(controlplane.Faults{})
	waitReady(t, c) // within the test's deadline, not ten minutes
	assert.Equal(t, ModeEnforcing, c.Mode())
}

func TestNetworkShutdown(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	c.Gate("a", 1)
	c.Gate("a", 9)

	require.NoError(t, c.Shutdown(context.Background()))
	assert.NoError(t, c.Shutdown(context.Background()), "a second call returns nil")
	assert.NoError(t, c.Close())
	got := cp.Totals("")
	assert.EqualValues(t, 1, got.Usage, "the last window was flushed")
	assert.EqualValues(t, 1, got.Bounced)

	n := len(cp.Requests())
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 5}, c.Gate("a", 9), "Gate answers after Shutdown")
	c.Observe(time.Second, true)
	s := c.Stats()
	assert.EqualValues(t, 1, s.Usage, "and counts nothing")
	assert.EqualValues(t, 1, s.Bounced)
	assert.NoError(t, c.Ready(context.Background()), "ready stays ready")
	time.Sleep(150 * time.Millisecond) // three pulse intervals: nothing may be sent
	assert.Len(t, cp.Requests(), n, "no request after Shutdown")
}

func TestNetworkShutdownBeforeReady(t *testing.T) {
	c, _ := startClient(t, Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: closedURL(t)})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Ready(ctx) }()
	err := c.Shutdown(ctx)
	assert.Error(t, err, "the final pulse could not be delivered")
	var opErr *net.OpError
	assert.True(t, errors.As(err, &opErr), "%v", err)
	assert.ErrorIs(t, <-done, ErrClosed)
}

func TestNetworkShutdownWithHangingControlPlane(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	cp.SetFaults(controlplane.Faults{Hang: true})

	// The first call hangs in its final flush until its context ends; the
	// second returns while the first is still running, whatever the
	// machine's speed.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := make(chan error, 1)
	go func() { first <- c.Shutdown(ctx) }()
	eventually(t, func() bool { return c.shutdown.Load() }, "the first Shutdown started")
	assert.NoError(t, c.Shutdown(context.Background()), "a concurrent second call returns nil")
	select {
	case err := <-first:
		t.Fatalf("the first call returned (%v) before its context ended: the second did not run beside it", err)
	default:
	}
	cancel()
	assert.ErrorIs(t, <-first, context.Canceled, "Shutdown returns when its context ends")
}

// TestNetworkSecretsNeverAppear runs a client through refused keys, bad
// tokens and forged answers with debug logging, and looks for any secret
// in what it logged and in its errors.
func TestNetworkSecretsNeverAppear(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	opts := testOptions(cp)
	opts.BaseURL = strings.Replace(cp.URL, "http://", "http://user:url-password-1234@", 1)
	c, logs := startClient(t, opts)
	waitReady(t, c)
	var errs []string
	for _, f := range []controlplane.Faults{
		{BadToken: controlplane.TokenWrongKey}, {ForgeSig: true}, {Garbage: true}, {PulseStatus: 400}, {Down: true},
	} {
		cp.RevokeTokens()
		cp.SetFaults(f)
		n := len(cp.Requests())
		eventually(t, func() bool { return len(cp.Requests()) >= n+4 }, "requests under %+v", f)
		errs = append(errs, c.Stats().LastError)
	}
	cp.SetFaults(controlplane.Faults{})
	cp.SetFaults(controlplane.Faults{Hang: true})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := c.Shutdown(ctx); err != nil {
		errs = append(errs, err.Error())
	}
	all := logs.String() + strings.Join(errs, "\n")
	assert.NotEmpty(t, errs)
	for _, secret := range []string{testSecretKey, "url-password-1234", "v2=", "Bearer", "eyJ"} {
		assert.NotContains(t, all, secret)
	}
}

// TestCountDroppedWindows: a pulse refused with a 4xx other than
// 401/403/408/429 is dropped, not resent; its counts stay in the totals.
func TestCountDroppedWindows(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, logs := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(cp.Pulses()) >= 1 }, "a pulse")
	cp.SetFaults(controlplane.Faults{PulseStatus: http.StatusUnprocessableEntity})
	for i := 0; c.Stats().PulsesDropped < 2; i++ {
		c.Gate("a", float64(i%10))
		time.Sleep(time.Millisecond)
	}
	cp.SetFaults(controlplane.Faults{})
	c.Gate("b", 1)
	n := len(cp.Pulses())
	eventually(t, func() bool { return len(cp.Pulses()) >= n+2 }, "pulses after the drops")
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))

	s := c.Stats()
	got := cp.Totals("")
	assert.GreaterOrEqual(t, s.PulsesDropped, uint64(2))
	assert.Less(t, got.Usage+got.Bounced, s.Usage+s.Bounced, "dropped windows never reached the control plane")
	pulses := cp.Pulses()
	last := pulses[len(pulses)-1]
	assert.Equal(t, s.Usage, last.UsageTotal, "totals include the dropped windows")
	assert.Equal(t, s.Bounced, last.BouncedTotal)
	assert.Greater(t, last.Seq, uint64(len(pulses)), "dropped seqs are not reused")
	dropped := 0
	for _, r := range requestsTo(cp, http.MethodPost, wire.PathPulse) {
		if r.Status == http.StatusUnprocessableEntity {
			dropped++
		}
	}
	assert.EqualValues(t, s.PulsesDropped, dropped, "each dropped pulse was sent once")
	assert.Contains(t, logs.String(), "pulse refused and dropped")
}

func TestProtocolRetryAfterOnSync(t *testing.T) {
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Minute)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	cp.SetFaults(controlplane.Faults{PolicyStatus: http.StatusServiceUnavailable, RetryAfter: 2 * time.Second})
	var at time.Time
	eventually(t, func() bool {
		for _, r := range requestsTo(cp, http.MethodGet, wire.PathPolicy) {
			if r.Status == http.StatusServiceUnavailable {
				at = time.Now()
				return true
			}
		}
		return false
	}, "a 503")
	n := len(requestsTo(cp, http.MethodGet, wire.PathPolicy))
	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return len(requestsTo(cp, http.MethodGet, wire.PathPolicy)) > n }, "syncs resume")
	assert.GreaterOrEqual(t, time.Since(at), 1800*time.Millisecond, "the next sync waited for Retry-After, not the 100 ms interval")
	assert.Equal(t, ModeEnforcing, c.Mode(), "pulses kept the lease")
}
