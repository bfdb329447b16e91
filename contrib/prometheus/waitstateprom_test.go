package waitstateprom_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go"
	waitstateprom "github.com/waitstate/waitstate-go/contrib/prometheus"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCollector(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetLeaseTTL(time.Minute) // a loaded machine cannot run it out mid-test
	srv.SetPolicy("", &waitstate.Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	client, err := waitstate.New(srv.Options())
	require.NoError(t, err)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, waitstatetest.WaitForPolicy(ctx, client, 3))

	client.Gate("free", 1)
	client.Gate("free", 1)
	client.Gate("pro", 1)
	client.Gate("pro", 9)
	client.ObserveTag("pro", 20*time.Millisecond, true)
	require.Eventually(t, func() bool {
		st := client.Stats()
		return client.TagStats("free").Bounced == 2 && st.HealthRequests == 1 && st.PulsesSent > 0
	}, 15*time.Second, 5*time.Millisecond, "the window is cut, and a pulse acknowledged")

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(waitstateprom.NewCollector(client, waitstateprom.Options{ConstLabels: prometheus.Labels{"service": "search"},
		Tags: []string{"free", "pro"}}))
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP waitstate_decisions_total Gate calls by decision (allowed or denied) and reason; in shadow mode, the decision Gate would have made.
# TYPE waitstate_decisions_total counter
waitstate_decisions_total{decision="allowed",reason="allowed",service="search"} 1
waitstate_decisions_total{decision="allowed",reason="fail_open",service="search"} 0
waitstate_decisions_total{decision="allowed",reason="safe_mode",service="search"} 0
waitstate_decisions_total{decision="denied",reason="global_max_weight",service="search"} 1
waitstate_decisions_total{decision="denied",reason="safe_mode_limit",service="search"} 0
waitstate_decisions_total{decision="denied",reason="tag_max_weight",service="search"} 2
waitstate_decisions_total{decision="denied",reason="throttled",service="search"} 0
# HELP waitstate_tag_decisions_total Gate calls of the allow-listed tags by decision, the live window included, as the totals.
# TYPE waitstate_tag_decisions_total counter
waitstate_tag_decisions_total{decision="allowed",service="search",tag="free"} 0
waitstate_tag_decisions_total{decision="allowed",service="search",tag="pro"} 1
waitstate_tag_decisions_total{decision="denied",service="search",tag="free"} 2
waitstate_tag_decisions_total{decision="denied",service="search",tag="pro"} 1
# HELP waitstate_health_requests_total Health samples in the windows already sent.
# TYPE waitstate_health_requests_total counter
waitstate_health_requests_total{service="search"} 1
# HELP waitstate_health_errors_total Failed health samples in the windows already sent.
# TYPE waitstate_health_errors_total counter
waitstate_health_errors_total{service="search"} 1
# HELP waitstate_mode 1 for the mode Gate answers in, 0 for the others.
# TYPE waitstate_mode gauge
waitstate_mode{mode="enforcing",service="search"} 1
waitstate_mode{mode="fail_open",service="search"} 0
waitstate_mode{mode="safe_mode",service="search"} 0
# HELP waitstate_policy_version Version of the policy in force; 0 before the first.
# TYPE waitstate_policy_version gauge
waitstate_policy_version{service="search"} 3
# HELP waitstate_shadow 1 when the client decides in shadow mode.
# TYPE waitstate_shadow gauge
waitstate_shadow{service="search"} 0
# HELP waitstate_shadow_denials_total Calls allowed only because the client is in shadow mode: those the policy would have denied.
# TYPE waitstate_shadow_denials_total counter
waitstate_shadow_denials_total{service="search"} 0
# HELP waitstate_pulse_interval_seconds The pulse interval in force: the client's, or the control plane's.
# TYPE waitstate_pulse_interval_seconds gauge
waitstate_pulse_interval_seconds{service="search"} 0.1
`), "waitstate_decisions_total", "waitstate_tag_decisions_total", "waitstate_health_requests_total", "waitstate_health_errors_total",
		"waitstate_mode", "waitstate_policy_version", "waitstate_shadow", "waitstate_shadow_denials_total", "waitstate_pulse_interval_seconds"))

	assert.Positive(t, testutil.ToFloat64(metric(t, reg, "waitstate_lease_remaining_seconds")))
	sent, err := pulses(reg, "sent")
	require.NoError(t, err)
	assert.Positive(t, sent)
	n, err := testutil.GatherAndCount(reg)
	require.NoError(t, err)
	assert.Equal(t, 7+4+3+3+1+1+1+1+1+1+1+1+1+1+1, n, "a bounded set of series: no tag label beyond the allow-list")

	// A call shows in its tag's series at the next scrape, as in the
	// totals, not a pulse later.
	client.Gate("pro", 1)
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP waitstate_tag_decisions_total Gate calls of the allow-listed tags by decision, the live window included, as the totals.
# TYPE waitstate_tag_decisions_total counter
waitstate_tag_decisions_total{decision="allowed",service="search",tag="free"} 0
waitstate_tag_decisions_total{decision="allowed",service="search",tag="pro"} 2
waitstate_tag_decisions_total{decision="denied",service="search",tag="free"} 2
waitstate_tag_decisions_total{decision="denied",service="search",tag="pro"} 1
`), "waitstate_tag_decisions_total"))
}

// TestCollectorShadowAndNoTags: in shadow mode the would-be denials are
// exported, and without an allow-list no series has a tag label.
func TestCollectorShadowAndNoTags(t *testing.T) {
	client, err := waitstate.New(waitstate.Options{Offline: true, Shadow: true,
		InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}}})
	require.NoError(t, err)
	defer client.Close()
	for range 3 {
		client.Gate("free", 1)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(waitstateprom.NewCollector(client, waitstateprom.Options{Namespace: "ws"}))
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP ws_shadow_denials_total Calls allowed only because the client is in shadow mode: those the policy would have denied.
# TYPE ws_shadow_denials_total counter
ws_shadow_denials_total 3
# HELP ws_shadow 1 when the client decides in shadow mode.
# TYPE ws_shadow gauge
ws_shadow 1
`), "ws_shadow_denials_total", "ws_shadow"))
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				assert.NotEqual(t, "tag", l.GetName(), f.GetName())
			}
		}
	}
}

// metric returns the one metric of a family, for testutil.ToFloat64.
func metric(t *testing.T, reg *prometheus.Registry, name string) prometheus.Collector {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() == name {
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name})
			g.Set(f.GetMetric()[0].GetGauge().GetValue())
			return g
		}
	}
	t.Fatalf("no metric %s", name)
	return nil
}

// pulses returns waitstate_pulses_total for an outcome.
func pulses(reg *prometheus.Registry, outcome string) (float64, error) {
	families, err := reg.Gather()
	if err != nil {
		return 0, err
	}
	for _, f := range families {
		if f.GetName() != "waitstate_pulses_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue(), nil
				}
			}
		}
	}
	return 0, nil
}
