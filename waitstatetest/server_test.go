package waitstatetest_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// TestIncidentCadenceReachesClients: while a rule is fired, the clients
// pulse at the incident interval; once it has cleared, at the normal one
// again.
func TestIncidentCadenceReachesClients(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetIntervals(400*time.Millisecond, 0)
	srv.SetRuleWindow(2 * time.Second)
	require.NoError(t, srv.SetRules("", waitstatetest.Rule{Name: "block-free", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: waitstatetest.ActionBlock, CooldownSeconds: 0.2}))
	c := start(t, srv, "")
	eventually(t, func() bool { return c.Stats().PulseInterval == 400*time.Millisecond }, "the normal interval")

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
			case <-time.After(time.Millisecond):
			}
			latency := 20 * time.Millisecond
			if slow.Load() {
				latency = 800 * time.Millisecond
			}
			c.ObserveTag("enterprise", latency, false)
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	slow.Store(true)
	eventually(t, func() bool { return c.Stats().PulseInterval == 250*time.Millisecond },
		"during the incident: max(400 ms / 4, 250 ms)")
	assert.False(t, c.Gate("free", 1).Allowed)
	slow.Store(false)
	eventually(t, func() bool { return c.Stats().PulseInterval == 400*time.Millisecond }, "the normal interval again")
	eventually(t, func() bool { return c.Gate("free", 1).Allowed }, "free admitted again")

	srv.SetIncidentPulseInterval("", 150*time.Millisecond)
	slow.Store(true)
	eventually(t, func() bool { return c.Stats().PulseInterval == 150*time.Millisecond }, "the incident interval set")
}

func TestWaitForPolicy(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	c := start(t, srv, "")
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	srv.SetPolicy("", &waitstate.Policy{Version: 7, GlobalMaxWeight: 1})
	require.NoError(t, waitstatetest.WaitForPolicy(ctx, c, 7))
	assert.Equal(t, int64(7), c.Policy().Version)

	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := waitstatetest.WaitForPolicy(short, c, 8)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "waiting for policy version 8 (the client has version 7)")
}

func TestRuleJSON(t *testing.T) {
	var rules []waitstatetest.Rule
	require.NoError(t, json.Unmarshal([]byte(`[
	 {"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
	  "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30},
	 {"name": "legacy", "metric": "error_rate", "operator": "gt", "threshold": 0.1, "tagName": "free", "maxWeight": 2}]`), &rules))
	assert.Equal(t, waitstatetest.Rule{Name: "protect-enterprise", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: waitstatetest.ActionBlock, CooldownSeconds: 30}, rules[0])
	assert.Equal(t, 2.0, rules[1].MaxWeight)
	assert.NoError(t, rules[1].Validate())

	var r waitstatetest.Rule
	assert.Error(t, json.Unmarshal([]byte(`{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle"}`), &r),
		"a throttle without a percent")
	err := json.Unmarshal([]byte(`{"name": "x", "metric": "rps", "operator": ">", "threshold": 1, "action": "block", "tag_name": "free"}`), &r)
	require.Error(t, err, "a misspelled key")
	assert.Contains(t, err.Error(), `unknown keys "tag_name"`)
	require.NoError(t, json.Unmarshal([]byte(`{"name": "t", "metric": "rps", "operator": ">", "threshold": 1, "action": "throttle", "admitPercent": 20}`), &r))
	assert.Equal(t, 20.0, r.AdmitPercent)

	// A rule built in Go says what it does: the zero values of Action and
	// AdmitPercent are not a block.
	assert.ErrorContains(t, waitstatetest.Rule{Name: "x", Metric: waitstatetest.MetricErrorRate, Operator: ">"}.Validate(), "no action")
	assert.ErrorContains(t, waitstatetest.Rule{Name: "x", Metric: waitstatetest.MetricErrorRate, Operator: ">",
		Action: waitstatetest.ActionThrottle}.Validate(), "a throttle admits more than 0")
	assert.NoError(t, waitstatetest.Rule{Name: "x", Metric: waitstatetest.MetricErrorRate, Operator: ">",
		Action: waitstatetest.ActionCap}.Validate(), "a cap at 0 that says so")
	srv := waitstatetest.NewTestServer(t)
	assert.Error(t, srv.SetRules("", waitstatetest.Rule{Name: "x", Metric: "latency_p90_ms", Operator: ">", Action: waitstatetest.ActionBlock}))
}

// TestTagMetrics: the figures of a tag a rule measures are its own.
func TestTagMetrics(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetRuleWindow(time.Minute) // so that the samples stay in it, however slow the machine
	require.NoError(t, srv.SetRules("", waitstatetest.Rule{Name: "watch", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 1e9, TagName: "free", Action: waitstatetest.ActionBlock}))
	c := start(t, srv, "")
	for range 50 {
		c.ObserveTag("enterprise", 400*time.Millisecond, false)
		c.ObserveTag("search", 5*time.Millisecond, false)
	}
	eventually(t, func() bool { return srv.TagMetrics("", "enterprise").Requests == 50 }, "enterprise's samples")
	m := srv.TagMetrics("", "enterprise")
	assert.InEpsilon(t, 400, m.LatencyP95Ms, 0.0625)
	assert.Equal(t, uint64(100), srv.Metrics("").Requests, "the site's are all of them")
}

// TestUI: the live page and its JSON, served by a handler of the test's
// own, show the site a client pulses for and no key; Close stops its
// sampling (goleak checks).
func TestUI(t *testing.T) {
	srv := waitstatetest.NewServer()
	page := httptest.NewServer(srv.UI())
	defer page.Close()
	client, err := waitstate.New(srv.Options())
	require.NoError(t, err)
	defer client.Close()
	client.Gate("free", 1)

	var body string
	require.Eventually(t, func() bool {
		resp, err := http.Get(page.URL + "/state.json")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		body = string(data)
		return strings.Contains(body, `"tag":"free"`)
	}, 30*time.Second, 50*time.Millisecond, "the page's JSON shows the client's tag")
	assert.NotContains(t, body, srv.Options().SecretKey)
	assert.NotContains(t, body, srv.Options().PublishKey)
	resp, err := http.Get(page.URL + "/")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, "text/html; charset=utf-8", resp.Header.Get("Content-Type"))
	assert.Same(t, srv.UI(), srv.UI(), "one page a server")

	require.NoError(t, client.Close())
	srv.Close()
	assert.NotNil(t, srv.UI(), "after Close: a handler still, the last one")
	closed := waitstatetest.NewServer()
	closed.Close()
	rec := httptest.NewRecorder()
	closed.UI().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	assert.Equal(t, http.StatusNotFound, rec.Code, "no page for a server closed before its first UI call")
}
