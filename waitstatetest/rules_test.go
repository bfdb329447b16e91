package waitstatetest_test

import (
	"context"
	"encoding/hex"
	"fmt"
	"math"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const waitFor = 15 * time.Second

func eventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, waitFor, 2*time.Millisecond, msg)
}

// start returns a ready client of srv for site, closed at the end.
func start(t *testing.T, srv *waitstatetest.Server, site string) *waitstate.Client {
	t.Helper()
	opts := srv.Options()
	opts.SiteID = site
	c, err := waitstate.New(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Ready(ctx))
	return c
}

// observeUntil feeds c a health sample of latency every millisecond until
// stop is closed.
func observeUntil(c *waitstate.Client, latency time.Duration, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			c.Observe(latency, false)
			time.Sleep(time.Millisecond)
		}
	}()
	return &wg
}

var shedFree = waitstatetest.Rule{
	Name: "shed-free-on-latency", TagName: "free", Metric: waitstatetest.MetricLatencyP95,
	Operator: "gt", Threshold: 200, Action: waitstatetest.ActionCap, MaxWeight: 0, CooldownSeconds: 1,
}

// TestRuleShedsWithinTwoPulsesAndClearsAfterCooldown: a rule fires on the
// pulse that reports the bad latency, the client sheds by its second pulse
// after the load began, and the rule clears only once the latency has been
// good for the cooldown.
func TestRuleShedsWithinTwoPulsesAndClearsAfterCooldown(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
	require.NoError(t, srv.SetRules("", shedFree))
	c := start(t, srv, "")
	require.True(t, c.Gate("free", 1).Allowed)

	pulsesOf := func() int {
		n := 0
		for _, p := range srv.Pulses() {
			if p.Health != nil && p.Health.LatencyMs.P95 > 200 {
				n++
			}
		}
		return n
	}
	stop := make(chan struct{})
	wg := observeUntil(c, 300*time.Millisecond, stop)
	eventually(t, func() bool { return !c.Gate("free", 1).Allowed }, "free is shed")
	assert.LessOrEqual(t, pulsesOf(), 2, "shed by the second pulse after the load began")
	assert.Equal(t, waitstate.GateResult{Allowed: false, Reason: waitstate.ReasonTagMaxWeight, Limit: 0}, c.Gate("free", 1))
	assert.True(t, c.Gate("pro", 5).Allowed, "other tags pass")
	ev := srv.Events()
	require.Len(t, ev, 1)
	assert.True(t, ev[0].Fired)
	assert.Greater(t, ev[0].Value, 200.0)
	assert.Equal(t, ev[0].Version, c.Policy().Version)
	close(stop)
	wg.Wait()

	// Good latency from now on; the bad pulses leave the rule window, then
	// the cooldown runs.
	good := time.Now()
	stop = make(chan struct{})
	wg = observeUntil(c, 20*time.Millisecond, stop)
	defer func() { close(stop); wg.Wait() }()
	eventually(t, func() bool { return c.Gate("free", 1).Allowed }, "free is restored")
	assert.GreaterOrEqual(t, time.Since(good), time.Second, "not before the cooldown")
	ev = srv.Events()
	require.Len(t, ev, 2, "fired once, cleared once: no flapping")
	assert.False(t, ev[1].Fired)
	assert.GreaterOrEqual(t, ev[1].At.Sub(ev[0].At), time.Second)
	assert.Greater(t, ev[1].Version, ev[0].Version)
}

func TestRuleStrictestWins(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
	loose := shedFree
	loose.Name, loose.MaxWeight = "loose", 5
	strict := shedFree
	strict.Name, strict.MaxWeight, strict.Threshold = "strict", 2, 100
	require.NoError(t, srv.SetRules("", loose, strict))
	c := start(t, srv, "")

	stop := make(chan struct{})
	wg := observeUntil(c, 300*time.Millisecond, stop)
	defer func() { close(stop); wg.Wait() }()
	eventually(t, func() bool { return len(srv.Events()) == 2 }, "both rules fire")
	eventually(t, func() bool { return c.Policy().TagMaxWeights["free"] == 2 }, "the strictest limit applies")
	assert.Equal(t, 10.0, c.Policy().GlobalMaxWeight)
	assert.True(t, c.Gate("free", 2).Allowed)
	assert.False(t, c.Gate("free", 3).Allowed)
}

func TestSitesAreIsolated(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
	require.NoError(t, srv.SetRules("", shedFree))
	slow := start(t, srv, "eu-1")
	calm := start(t, srv, "us-1")

	stop := make(chan struct{})
	wg := observeUntil(slow, 300*time.Millisecond, stop)
	wg2 := observeUntil(calm, 10*time.Millisecond, stop)
	defer func() { close(stop); wg.Wait(); wg2.Wait() }()
	eventually(t, func() bool { return !slow.Gate("free", 1).Allowed }, "eu-1 sheds free")
	for range 5 {
		slow.Gate("pro", 1)
		calm.Gate("pro", 1)
	}
	calm.Gate("free", 1)
	n := len(srv.Pulses())
	eventually(t, func() bool { return len(srv.Pulses()) >= n+6 }, "more pulses from both sites")
	assert.True(t, calm.Gate("free", 1).Allowed, "us-1 is not affected")
	assert.EqualValues(t, 1, calm.Policy().Version)
	for _, e := range srv.Events() {
		assert.Equal(t, "eu-1", e.Site)
	}
	assert.Less(t, srv.Metrics("us-1").LatencyP95Ms, 50.0)
	assert.Greater(t, srv.Metrics("eu-1").LatencyP95Ms, 200.0)
	require.NoError(t, slow.Close())
	require.NoError(t, calm.Close())
	for site, c := range map[string]*waitstate.Client{"eu-1": slow, "us-1": calm} {
		got, s := srv.Totals(site), c.Stats()
		assert.Equal(t, s.Usage, got.Usage, "%s counts only its own", site)
		assert.Equal(t, s.Bounced, got.Bounced, site)
		assert.Equal(t, 1, got.Instances, site)
	}
}

func TestFleetAggregatesInstances(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 5})
	var wg sync.WaitGroup
	want := map[string]waitstatetest.TagCount{}
	var mu sync.Mutex
	for i := range 3 {
		c := start(t, srv, "eu-1")
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := map[string]waitstatetest.TagCount{}
			for j := range 2000 + 500*i {
				tag := []string{"free", "pro", "enterprise"}[j%3]
				tc := local[tag]
				if c.Gate(tag, float64(j%8)).Allowed {
					tc.Usage++
				} else {
					tc.Bounced++
				}
				local[tag] = tc
				if j%100 == 0 {
					time.Sleep(5 * time.Millisecond) // spread over several pulses
				}
			}
			require.NoError(t, c.Close())
			mu.Lock()
			defer mu.Unlock()
			for tag, tc := range local {
				w := want[tag]
				want[tag] = waitstatetest.TagCount{Usage: w.Usage + tc.Usage, Bounced: w.Bounced + tc.Bounced}
			}
		}()
	}
	wg.Wait()
	got := srv.Totals("eu-1")
	assert.Equal(t, 3, got.Instances)
	assert.Equal(t, want, got.Tags, "fleet counts are the sum of the three, to the unit")
	var usage, bounced uint64
	for _, tc := range want {
		usage += tc.Usage
		bounced += tc.Bounced
	}
	assert.Equal(t, usage, got.Usage)
	assert.Equal(t, bounced, got.Bounced)
	assert.EqualValues(t, 3*2000+500+1000, usage+bounced)
}

func TestFaultsAndRecovery(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: math.Inf(1)})
	c := start(t, srv, "")
	srv.SetFaults(waitstatetest.Faults{Down: true})
	eventually(t, func() bool { return c.Mode() == waitstate.ModeSafeMode }, "an outage expires the lease")
	srv.Heal()
	eventually(t, func() bool { return c.Mode() == waitstate.ModeEnforcing }, "recovery renews it")
}

// TestServerNeverPrintsItsSecret prints a server with every verb.
func TestServerNeverPrintsItsSecret(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	secret := srv.Options().SecretKey
	// A copy, as fmt.Println(*srv) would print it (through reflect: vet
	// refuses a Server copied by value, for its locks, but a program may
	// still print one).
	byValue := reflect.ValueOf(srv).Elem().Interface()
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		out := fmt.Sprintf(verb, srv)
		assert.NotContains(t, out, secret, verb)
		assert.Contains(t, out, "[REDACTED]", verb)
		out = fmt.Sprintf(verb, byValue)
		assert.NotContains(t, out, secret, "by value: "+verb)
		assert.NotContains(t, out, hex.EncodeToString([]byte(secret)), "by value: "+verb)
	}
}

// TestRulesProtectATier: the product's reflex — when enterprise's p95 goes
// over 300 ms, block free and throttle pro to 50 % — measured on
// enterprise's own traffic while the site as a whole stays fast, and
// lifted once enterprise is fast again.
func TestRulesProtectATier(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
	require.NoError(t, srv.SetRules("",
		waitstatetest.Rule{Name: "block-free", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
			Operator: ">", Threshold: 300, TagName: "free", Action: waitstatetest.ActionBlock, CooldownSeconds: 0.5},
		waitstatetest.Rule{Name: "throttle-pro", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
			Operator: ">", Threshold: 300, TagName: "pro", Action: waitstatetest.ActionThrottle, AdmitPercent: 50, CooldownSeconds: 0.5},
	))
	c := start(t, srv, "")
	var slow atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			entLatency := 20 * time.Millisecond
			if slow.Load() {
				entLatency = 800 * time.Millisecond
			}
			c.ObserveTag("enterprise", entLatency, false)
			for range 20 { // most of the site's traffic is fast
				c.ObserveTag("search", 5*time.Millisecond, false)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	time.Sleep(3 * waitstatetest.PulseInterval)
	assert.True(t, c.Gate("free", 1).Allowed, "enterprise is fast: nothing fires")
	slow.Store(true)
	eventually(t, func() bool { return c.Gate("free", 1).Reason == waitstate.ReasonThrottled }, "free blocked")
	p := c.Policy()
	assert.Equal(t, map[string]float64{"free": 100, "pro": 50}, p.TagShedPercents)
	shed := 0
	for range 100 {
		if c.Gate("pro", 1).Reason == waitstate.ReasonThrottled {
			shed++
		}
	}
	// Evenly: one of every two; a window cut in the loop restarts the
	// sequence, which moves the count by one at most.
	assert.InDelta(t, 50, shed, 1, "pro throttled to 50 %")
	assert.True(t, c.Gate("enterprise", 1).Allowed, "enterprise keeps passing")
	assert.Less(t, srv.Metrics("").LatencyP95Ms, 300.0, "the site as a whole is fast: only enterprise's own p95 fired the rules")

	slow.Store(false)
	eventually(t, func() bool { return c.Gate("free", 1).Allowed }, "free admitted once enterprise is fast again")
	assert.Empty(t, c.Policy().TagShedPercents)
}

// TestServerServesADefaultPolicy: a test that forgets SetPolicy gets a
// ready client with an unlimited policy, not a silent wait.
func TestServerServesADefaultPolicy(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	c := start(t, srv, "") // Ready returns
	assert.Equal(t, waitstatetest.DefaultPolicy(), c.Policy())
	assert.Equal(t, waitstate.ReasonAllowed, c.Gate("anything", 1e9).Reason)
}
