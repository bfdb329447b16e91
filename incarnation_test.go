package waitstate

import (
	"context"
	"log/slog"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// countingPolicy admits weights up to 5 and denies "free", so that a run
// of gateFor both allows and denies.
var countingPolicy = controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 1, "enterprise": math.Inf(1)}}

// shutdown shuts c down within waitFor, failing the test on an error.
func shutdown(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
}

// pulsesOf counts the pulses cp counted from incarnation.
func pulsesOf(cp *controlplane.Server, incarnation string) int {
	n := 0
	for _, p := range cp.Pulses() {
		if p.Incarnation == incarnation {
			n++
		}
	}
	return n
}

// TestCountExactSharedInstanceID: two processes named after their host
// share an InstanceID, pulse out of step and gate at once. Before
// incarnations the control plane took their two seq streams for one and
// dropped whatever fell below the other's high-water mark.
func TestCountExactSharedInstanceID(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", countingPolicy)
	planeLogs := &logBuffer{}
	cp.SetLogger(slog.New(slog.NewTextHandler(planeLogs, nil)))

	var clients [2]*Client
	var results [2]func() (uint64, uint64, map[string]controlplane.TagCount)
	stop := make(chan struct{})
	for i, every := range []time.Duration{MinInterval, 140 * time.Millisecond} {
		opts := testOptions(cp)
		opts.InstanceID = "web"
		opts.PulseInterval = every
		clients[i], _ = startClient(t, opts)
		waitReady(t, clients[i])
		results[i] = gateFor(clients[i], stop)
	}
	require.NotEqual(t, clients[0].incarnation, clients[1].incarnation)
	eventually(t, func() bool {
		return pulsesOf(cp, clients[0].incarnation) >= 5 && pulsesOf(cp, clients[1].incarnation) >= 5
	}, "both processes pulse, interleaved")
	assert.Equal(t, 2, cp.Metrics("").Instances, "Metrics counts processes, not instance IDs")
	close(stop)

	var usage, bounced uint64
	for i, c := range clients {
		u, b, _ := results[i]()
		shutdown(t, c)
		s := c.Stats()
		require.Equal(t, u, s.Usage)
		require.Equal(t, b, s.Bounced)
		usage, bounced = usage+s.Usage, bounced+s.Bounced
	}
	got := cp.Totals("")
	assert.Equal(t, usage, got.Usage, "usage: every call of both processes, once")
	assert.Equal(t, bounced, got.Bounced, "bounced")
	assert.Positive(t, usage)
	assert.Positive(t, bounced)
	assert.Equal(t, 1, got.Instances, "one instance ID")
	assert.Equal(t, 1, strings.Count(planeLogs.String(), "two processes pulse under one instance ID"), "logged once:\n%s", planeLogs)
	assert.Contains(t, planeLogs.String(), "instance=web")
}

// TestCountExactAcrossRestarts: one InstanceID restarted three times, each
// process starting its seqs at 1 again, is counted exactly, and the control
// plane never takes a restart for two processes sharing the ID.
func TestCountExactAcrossRestarts(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", countingPolicy)
	planeLogs := &logBuffer{}
	cp.SetLogger(slog.New(slog.NewTextHandler(planeLogs, nil)))

	var usage, bounced uint64
	seen := map[string]bool{}
	for range 4 {
		opts := testOptions(cp)
		opts.InstanceID = "worker-0"
		c, _ := startClient(t, opts)
		waitReady(t, c)
		stop := make(chan struct{})
		results := gateFor(c, stop)
		eventually(t, func() bool { return pulsesOf(cp, c.incarnation) >= 3 }, "the process pulses")
		close(stop)
		results()
		shutdown(t, c)
		s := c.Stats()
		usage, bounced = usage+s.Usage, bounced+s.Bounced
		assert.False(t, seen[c.incarnation], "a fresh incarnation per New")
		seen[c.incarnation] = true
	}
	got := cp.Totals("")
	assert.Equal(t, usage, got.Usage, "usage")
	assert.Equal(t, bounced, got.Bounced, "bounced")
	assert.NotContains(t, planeLogs.String(), "two processes", "a restart is not a second process")
}
