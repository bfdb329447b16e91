package waitstate

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/reflex/reflexcases"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// blockOf parses the reflex block a control plane would send for base and
// rules, with the rules named in fired fired there.
func blockOf(t testing.TB, base wire.Policy, rules []reflex.Rule, window time.Duration, fired ...string) *reflexBlock {
	t.Helper()
	if fired == nil {
		fired = []string{}
	}
	raw, err := json.Marshal(reflex.Block{Base: base, Rules: rules, Fired: fired, RuleWindowMs: window.Milliseconds()})
	require.NoError(t, err)
	b, err := parseReflex(raw)
	require.NoError(t, err)
	return b
}

// localClient is an idle client with SafeModeLocalRules that holds block
// with its base as the policy, enforcing, on clock.
func localClient(t testing.TB, clock *fakeClock, block *reflexBlock) *Client {
	t.Helper()
	clock.advance(time.Hour)
	c := idleClientOpts(t, Options{SafeMode: SafeModeLocalRules}, clock.read, nil, nil)
	c.applyLease(leaseAnswer{policy: block.base, ttl: time.Hour, reflex: block}, false, 0)
	require.Equal(t, ModeEnforcing, c.Mode())
	return c
}

// play records a step's traffic as a service would: one ObserveTag per
// latency sample (the first Errors of them failed), one Record per custom
// metric sample, one Gate per call.
func play(c *Client, traffic map[string]reflexcases.Traffic) {
	for tag, tr := range traffic {
		for i, ms := range tr.LatencyMs {
			c.ObserveTag(tag, time.Duration(ms*float64(time.Millisecond)), i < tr.Errors)
		}
		for name, vs := range tr.Metrics {
			for _, v := range vs {
				c.Record(tag, name, v)
			}
		}
		for range tr.Calls {
			c.Gate(tag, 1)
		}
	}
}

// TestLocalRuleCases runs the one table of rule cases on a client's own
// samples: the control plane is away, the client is in safe mode with
// SafeModeLocalRules, and each step's traffic is recorded through the
// public calls, one step every reflexcases.Gap of the client's clock.
func TestLocalRuleCases(t *testing.T) {
	for _, tc := range reflexcases.Cases {
		t.Run(tc.Name, func(t *testing.T) {
			var clock fakeClock
			c := localClient(t, &clock, blockOf(t, tc.Base, tc.Rules, reflexcases.Window))
			enterSafeMode(t, c, &clock)
			assert.Empty(t, c.Stats().LocalRulesFired, "nothing fired before any traffic")
			for i, step := range tc.Steps {
				play(c, step.Traffic)
				clock.advance(reflexcases.Gap)
				c.localTick()
				assert.Equal(t, step.Fired, c.Stats().LocalRulesFired, "step %d: fired", i)
				assert.Equal(t, reflexcases.Normalize(step.Want), reflexcases.Normalize(c.Policy().toWire()), "step %d", i)
			}
		})
	}
}

// TestLocalSamplesSurviveCuts: the samples of the rule window are counted
// once whatever cuts happen between two samples: none, one, or several.
func TestLocalSamplesSurviveCuts(t *testing.T) {
	rules := []reflex.Rule{{Name: "slow", MetricTag: "enterprise", Metric: reflex.MetricLatencyP50, Operator: ">", Threshold: 1000,
		TagName: "free", Action: reflex.ActionBlock}}
	var clock fakeClock
	c := localClient(t, &clock, blockOf(t, wire.Policy{Version: 1, GlobalMaxWeight: 10}, rules, 10*time.Second))
	requests := func() uint64 { n, _ := ringSamples(c, "enterprise"); return n }
	for cuts := range 4 {
		for i := range 10 {
			c.ObserveTag("enterprise", time.Millisecond, false)
			if i%4 == 3 && cuts > 0 {
				for range cuts {
					c.cut(false)
				}
			}
		}
		clock.advance(100 * time.Millisecond)
		c.localTick()
		assert.EqualValues(t, 10*(cuts+1), requests(), "with %d cuts between samples", cuts)
	}
	clock.advance(11 * time.Second)
	c.localTick()
	assert.Zero(t, requests(), "the rule window moved on")
}

// TestLocalSamplesConcurrent: samples taken while other goroutines observe
// and windows are cut add up to every sample once, and the figures are
// read without a data race.
func TestLocalSamplesConcurrent(t *testing.T) {
	rules := []reflex.Rule{
		{Name: "slow", MetricTag: "enterprise", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 2, TagName: "free", Action: reflex.ActionBlock},
		{Name: "site", Metric: reflex.MetricErrorRate, Operator: ">", Threshold: 2, TagName: "free", Action: reflex.ActionBlock},
	}
	var clock fakeClock
	c := localClient(t, &clock, blockOf(t, wire.Policy{Version: 1, GlobalMaxWeight: 10}, rules, time.Hour))
	var wg sync.WaitGroup
	const per = 20_000
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				c.ObserveTag([]string{"enterprise", "free"}[g%2], time.Duration(i%5000)*time.Microsecond, i%3 == 0)
			}
		}()
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() { // the pulse goroutine's cuts and the sampler, interleaved
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%3 == 0 {
				c.cut(false)
			}
			clock.advance(time.Millisecond)
			c.localTick()
		}
	}()
	wg.Wait()
	close(stop)
	<-done
	clock.advance(time.Millisecond)
	c.localTick()
	for _, scope := range []string{"enterprise", ""} {
		writers := map[string]uint64{"enterprise": 2, "": 4}[scope]
		req, errs := ringSamples(c, scope)
		assert.Equal(t, writers*per, req, "scope %q: every sample once", scope)
		assert.Equal(t, writers*((per+2)/3), errs, "scope %q: every error once", scope)
	}
}

// ringSamples adds up the samples and errors the sampler holds for scope.
func ringSamples(c *Client, scope string) (requests, errors uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.local.ring {
		if d := s.scopes[scope]; d != nil {
			errors += d.errors
			for _, k := range d.hist {
				requests += k
			}
		}
	}
	return requests, errors
}

// TestLocalRulesStartFromTheControlPlane: entering safe mode, the rules
// the control plane reported fired start fired, and clear once their
// metric has been good for their cooldown from then; with no rules the
// strategy is SafeModeLastPolicy.
func TestLocalRulesStartFromTheControlPlane(t *testing.T) {
	rules := []reflex.Rule{
		{Name: "protect", MetricTag: "enterprise", Metric: reflex.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "free", Action: reflex.ActionBlock, CooldownSeconds: 5},
		{Name: "fleet", Metric: reflex.MetricRPS, Operator: ">", Threshold: 1, TagName: "pro", Action: reflex.ActionBlock},
	}
	base := wire.Policy{Version: 2, GlobalMaxWeight: 10}
	var clock fakeClock
	c := localClient(t, &clock, blockOf(t, base, rules, time.Second, "protect", "fleet"))
	var applied []*Policy
	c.opts.OnPolicyApplied = func(p *Policy) { applied = append(applied, p) }
	// The control plane's policy had free blocked; its version is kept.
	c.applyLease(leaseAnswer{policy: &Policy{Version: 9, GlobalMaxWeight: 10, TagShedPercents: map[string]float64{"free": 100}}, ttl: time.Hour,
		reflex: blockOf(t, base, rules, time.Second, "protect", "fleet")}, true, 0)
	enterSafeMode(t, c, &clock)
	assert.Equal(t, []string{"protect"}, c.Stats().LocalRulesFired, "fired at the control plane: fired here; rps is not run")
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 10}, c.Gate("free", 1))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 10}, c.Gate("pro", 1), "the rps rule is not run locally")
	assert.EqualValues(t, 9, c.Policy().Version, "the last control-plane version")

	for i := range 4 { // good for 4 s of the 5 s cooldown
		c.ObserveTag("enterprise", 50*time.Millisecond, false)
		clock.advance(time.Second)
		c.localTick()
		require.Equal(t, []string{"protect"}, c.Stats().LocalRulesFired, "second %d", i+1)
	}
	c.ObserveTag("enterprise", 50*time.Millisecond, false)
	clock.advance(time.Second)
	c.localTick()
	assert.Empty(t, c.Stats().LocalRulesFired, "the cooldown counted from entering safe mode")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 10}, c.Gate("free", 1))
	c.runCallbacks(true)
	require.NotEmpty(t, applied)
	assert.Nil(t, applied[len(applied)-1].TagShedPercents, "OnPolicyApplied saw the base again")

	// A renewal returns to the control plane's policy.
	c.applyLease(leaseAnswer{ttl: time.Hour}, true, 0)
	assert.Equal(t, ModeEnforcing, c.Mode())
	assert.Empty(t, c.Stats().LocalRulesFired)
	assert.Equal(t, GateResult{false, false, ReasonThrottled, 10}, c.Gate("free", 1), "the control plane's policy")

	t.Run("no rules: the last policy", func(t *testing.T) {
		var clock fakeClock
		p := &Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}}
		c := idleClientOpts(t, Options{SafeMode: SafeModeLocalRules}, clock.read, nil, p)
		enterSafeMode(t, c, &clock)
		assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 0}, c.Gate("free", 1))
		assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, c.Gate("x", 5))
		assert.Empty(t, c.Stats().LocalRulesFired)
	})
}

// BenchmarkLocalEvaluate is one run of the local rules in safe mode: a
// sample of every scope the rules measure, then 10 rules stepped, over a
// window tracking 1,024 tags that each have 64 health samples spread over
// some 40 histogram buckets. With a rule on the whole site the sample sums
// every tag's histogram.
func BenchmarkLocalEvaluate(b *testing.B) {
	for _, site := range []bool{false, true} {
		b.Run(map[bool]string{false: "tag-scopes", true: "with-site-scope"}[site], func(b *testing.B) {
			var rules []reflex.Rule
			for i := range 10 {
				scope := fmt.Sprint("tenant-", i%5)
				if site && i == 9 {
					scope = ""
				}
				rules = append(rules, reflex.Rule{Name: fmt.Sprint("r", i), MetricTag: scope, Metric: reflex.MetricLatencyP95,
					Operator: ">", Threshold: 1e6, TagName: fmt.Sprint("tenant-", i), Action: reflex.ActionBlock})
			}
			var clock fakeClock
			c := localClient(b, &clock, blockOf(b, wire.Policy{Version: 1, GlobalMaxWeight: 10}, rules, 5*time.Second))
			r := rand.New(rand.NewPCG(1, 2))
			for i := range MaxWindowTags {
				tag := fmt.Sprint("tenant-", i)
				c.Gate(tag, 1)
				for range 64 { // latencies around 20 ms, over some 40 buckets
					c.ObserveTag(tag, time.Duration(20_000*math.Exp(0.8*r.NormFloat64()))*time.Microsecond, false)
				}
			}
			enterSafeMode(b, c, &clock)
			b.ReportAllocs()
			for b.Loop() {
				clock.advance(250 * time.Millisecond)
				c.localTick()
			}
		})
	}
}

// TestPulseReportsLocalRulesAndRestore: a pulse says which rules the
// instance holds fired itself and whether its policy was restored, so the
// control plane can show both once it hears from the instance again.
func TestPulseReportsLocalRulesAndRestore(t *testing.T) {
	body := func(c *Client) wire.PulseBody {
		var p wire.PulseBody
		require.NoError(t, json.Unmarshal(c.cut(false).body, &p))
		return p
	}
	rules := []reflex.Rule{{Name: "slow", MetricTag: "enterprise", Metric: reflex.MetricLatencyP50, Operator: ">", Threshold: 100,
		TagName: "free", Action: reflex.ActionBlock, CooldownSeconds: 60}}
	var clock fakeClock
	c := localClient(t, &clock, blockOf(t, wire.Policy{Version: 1, GlobalMaxWeight: 10}, rules, 10*time.Second))
	p := body(c)
	assert.Nil(t, p.LocalRules)
	assert.False(t, p.Restored)
	enterSafeMode(t, c, &clock)
	c.ObserveTag("enterprise", time.Second, false)
	clock.advance(100 * time.Millisecond)
	c.localTick()
	require.Equal(t, []string{"slow"}, c.Stats().LocalRulesFired)
	p = body(c)
	assert.Equal(t, []string{"slow"}, p.LocalRules)
	assert.Equal(t, "safe_mode", p.Mode)

	store := funcStore{load: func(context.Context) ([]byte, error) {
		return sealed(t, Options{}, `{"policy":{"version":7,"globalMaxWeight":10}}`, time.Now()), nil
	}}
	r := restoringClient(t, Options{SecretKey: testSecretKey, PolicyStore: store})
	require.True(t, r.Stats().Restored)
	assert.True(t, body(r).Restored)
}
