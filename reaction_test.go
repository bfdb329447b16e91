//go:build fleet

package waitstate

// The reaction time of the adaptive loop, measured: 100 clients in one
// process on one control plane, a normal pulse interval of 1 s. It measures
// wall-clock time, so it runs apart from the race-detected suite:
//
//	go test -tags fleet -run TestReactionTime -v -timeout 10m .

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

func TestReactionTime(t *testing.T) {
	const (
		clients  = 100
		normal   = time.Second            // the clients' pulse and sync interval
		incident = 250 * time.Millisecond // the control plane's default for a 1 s normal interval
		cooldown = time.Second
		runs     = 5
	)
	cp := newPlane(t)
	cp.SetLogLimit(0)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	// The rules look back one incident interval: they see a slowdown on the
	// first pulses that report it, and its end as soon as it is over.
	cp.SetRuleWindow(incident)
	require.NoError(t, cp.SetRules("", controlplane.Rule{Name: "protect-enterprise", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: controlplane.ActionBlock, CooldownSeconds: cooldown.Seconds()}))

	fleet := make([]*Client, clients)
	for i := range fleet {
		c, err := New(Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: cp.URL, PulseInterval: normal, SyncInterval: normal})
		require.NoError(t, err)
		fleet[i] = c
	}
	defer func() {
		for _, c := range fleet {
			_ = c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, c := range fleet {
		require.NoError(t, c.Ready(ctx))
	}

	// Every client serves enterprise requests all along: 20 ms, or 800 ms
	// while slow.
	var slow atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
				latency := 20 * time.Millisecond
				if slow.Load() {
					latency = 800 * time.Millisecond
				}
				for i := w; i < clients; i += 4 {
					fleet[i].ObserveTag("enterprise", latency, false)
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()

	// until returns how long after start 99 % of the clients first satisfied
	// cond.
	until := func(start time.Time, cond func(*Client) bool) time.Duration {
		done := make([]bool, clients)
		n := 0
		deadline := start.Add(time.Minute)
		for n < clients*99/100 && time.Now().Before(deadline) {
			for i, c := range fleet {
				if !done[i] && cond(c) {
					done[i] = true
					n++
				}
			}
			time.Sleep(time.Millisecond)
		}
		require.GreaterOrEqual(t, n, clients*99/100, "99 %% of the clients within a minute")
		return time.Since(start)
	}
	denied := func(c *Client) bool { return c.Gate("free", 1).Reason == ReasonThrottled }
	fast := func(c *Client) bool { return c.Stats().PulseInterval == incident }

	var react, recover, speedUp []time.Duration
	for run := range runs {
		time.Sleep(3 * normal) // steady state: normal cadence, free admitted
		for _, c := range fleet {
			require.True(t, c.Gate("free", 1).Allowed, "run %d: free admitted before the slowdown", run)
		}
		start := time.Now()
		slow.Store(true)
		react = append(react, until(start, denied))
		speedUp = append(speedUp, until(start, fast))
		for _, c := range fleet {
			assert.True(t, c.Gate("enterprise", 1).Allowed, "enterprise keeps passing")
		}
		time.Sleep(normal)
		start = time.Now()
		slow.Store(false)
		recover = append(recover, until(start, func(c *Client) bool { return c.Gate("free", 1).Allowed }))
		// The normal interval again: the one the clients were pulsing at
		// when the incident began, as the control plane saw it (their mean
		// window, about 1 s).
		until(start, func(c *Client) bool { return c.Stats().PulseInterval > normal*9/10 })
		t.Logf("run %d: 99 %% denying free %v after the first slow sample (99 %% pulsing every %v after %v); 99 %% admitting it %v after recovery",
			run+1, react[run].Round(time.Millisecond), incident, speedUp[run].Round(time.Millisecond), recover[run].Round(time.Millisecond))
	}
	median := func(d []time.Duration) time.Duration { s := slices.Sorted(slices.Values(d)); return s[len(s)/2] }
	worst := func(d []time.Duration) time.Duration { return slices.Max(d) }
	reactBudget, recoverBudget := normal+250*time.Millisecond, cooldown+2*incident+250*time.Millisecond
	t.Logf("reaction: median %v, worst %v (budget %v); recovery: median %v, worst %v (budget %v: cooldown %v + 2 incident intervals + 250 ms)",
		median(react).Round(time.Millisecond), worst(react).Round(time.Millisecond), reactBudget,
		median(recover).Round(time.Millisecond), worst(recover).Round(time.Millisecond), recoverBudget, cooldown)
	assert.LessOrEqual(t, median(react), reactBudget)
	assert.LessOrEqual(t, median(recover), recoverBudget)
}
