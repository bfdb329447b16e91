package waitstateotel_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/contrib/otel"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// collect reads every data point once, keyed by instrument name and
// attributes, such as "waitstate.decisions{decision=denied,reason=throttled}".
func collect(t *testing.T, reader *sdkmetric.ManualReader) map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	out := map[string]float64{}
	key := func(name string, attrs attribute.Set) string {
		s := name + "{"
		for i, kv := range attrs.ToSlice() {
			if i > 0 {
				s += ","
			}
			s += string(kv.Key) + "=" + kv.Value.Emit()
		}
		return s + "}"
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				assert.True(t, d.IsMonotonic, m.Name)
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] = float64(p.Value)
				}
			case metricdata.Gauge[float64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] = p.Value
				}
			default:
				t.Fatalf("%s: unexpected data %T", m.Name, m.Data)
			}
		}
	}
	return out
}

func TestRegister(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetLeaseTTL(time.Minute)
	srv.SetPolicy("", &waitstate.Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0},
		TagShedPercents: map[string]float64{"pro": 50}})
	client, err := waitstate.New(srv.Options())
	require.NoError(t, err)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, waitstatetest.WaitForPolicy(ctx, client, 3))

	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { require.NoError(t, provider.Shutdown(context.Background())) }()
	reg, err := waitstateotel.Register(client, provider.Meter("test"), waitstateotel.Options{Tags: []string{"free"}})
	require.NoError(t, err)
	defer func() { require.NoError(t, reg.Unregister()) }()

	client.Gate("free", 1)
	client.Gate("pro", 1)
	client.Gate("pro", 1)
	client.ObserveTag("pro", 5*time.Millisecond, false)
	require.Eventually(t, func() bool {
		st := client.Stats()
		return client.TagStats("free").Bounced == 1 && st.HealthRequests == 1 && st.PulsesSent > 0
	}, 15*time.Second, 5*time.Millisecond, "the window is cut, and a pulse acknowledged")

	got := collect(t, reader)
	want := map[string]float64{
		"waitstate.decisions{decision=allowed,reason=allowed}":          1,
		"waitstate.decisions{decision=denied,reason=throttled}":         1,
		"waitstate.decisions{decision=denied,reason=tag_max_weight}":    1,
		"waitstate.decisions{decision=denied,reason=global_max_weight}": 0,
		"waitstate.tag.decisions{decision=denied,tag=free}":             1,
		"waitstate.tag.decisions{decision=allowed,tag=free}":            0,
		"waitstate.health.requests{}":                                   1,
		"waitstate.health.errors{}":                                     0,
		"waitstate.shadow.denials{}":                                    0,
		"waitstate.policy.version{}":                                    3,
		"waitstate.mode{mode=enforcing}":                                1,
		"waitstate.mode{mode=safe_mode}":                                0,
		"waitstate.shadow{}":                                            0,
		"waitstate.pulse.interval{}":                                    0.1,
	}
	for k, v := range want {
		assert.Equal(t, v, got[k], k)
	}
	assert.Positive(t, got["waitstate.pulses{outcome=sent}"])
	assert.Positive(t, got["waitstate.lease.remaining{}"])
	assert.Len(t, got, 7+2+1+3+5+3+5, "a bounded set of series: tag attributes only for the allow-list")
}

// TestRegisterShadowNoTags: in shadow mode the would-be denials are
// exported, and without an allow-list no series has a tag attribute.
func TestRegisterShadowNoTags(t *testing.T) {
	client, err := waitstate.New(waitstate.Options{Offline: true, Shadow: true,
		InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}}})
	require.NoError(t, err)
	defer client.Close()
	client.Gate("free", 1)
	client.Gate("free", 1)
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { require.NoError(t, provider.Shutdown(context.Background())) }()
	_, err = waitstateotel.Register(client, provider.Meter("test"), waitstateotel.Options{Prefix: "ws."})
	require.NoError(t, err)
	got := collect(t, reader)
	assert.Equal(t, 2.0, got["ws.shadow.denials{}"])
	assert.Equal(t, 1.0, got["ws.shadow{}"])
	for k := range got {
		assert.NotContains(t, k, "tag=", k)
	}
}
