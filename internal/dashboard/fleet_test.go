package dashboard_test

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/dashboard"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	publishKey = "pk_dashboard_test_0123"
	secretKey  = "sk_dashboard_test_never_shown_4567"
)

// fleet is a control plane with one rule, its dashboard sampling once a
// second, and three clients gating free, pro and enterprise traffic, with
// enterprise's latency set by slow.
type fleet struct {
	cp      *controlplane.Server
	d       *dashboard.Dashboard
	clients []*waitstate.Client
	slow    atomic.Bool // enterprise takes 500 ms, not 20
}

func startFleet(t *testing.T) *fleet {
	t.Helper()
	cp := controlplane.New()
	t.Cleanup(cp.Close)
	cp.AddKey(publishKey, secretKey)
	cp.SetLeaseTTL(time.Minute) // a loaded machine does not run it out
	cp.SetRuleWindow(2 * time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 100, TagMaxWeights: map[string]float64{"pro": 50}})
	require.NoError(t, cp.SetRules("", controlplane.Rule{Name: "protect-enterprise", MetricTag: "enterprise",
		Metric: controlplane.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "free",
		Action: controlplane.ActionBlock, CooldownSeconds: 3600}))
	f := &fleet{cp: cp, d: dashboard.New(cp)}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); f.d.Run(ctx) }()

	for _, id := range []string{"instance-1", "instance-2", "instance-3"} {
		c, err := waitstate.New(waitstate.Options{PublishKey: publishKey, SecretKey: secretKey, BaseURL: cp.URL,
			InstanceID: id, PulseInterval: 200 * time.Millisecond, SyncInterval: 200 * time.Millisecond})
		require.NoError(t, err)
		f.clients = append(f.clients, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(5 * time.Millisecond):
				}
				c.Gate("free", 1)
				c.Gate("pro", 1)
				c.Gate("enterprise", 1)
				latency := 20 * time.Millisecond
				if f.slow.Load() {
					latency = 500 * time.Millisecond
				}
				c.ObserveTag("enterprise", latency, false)
				c.ObserveTag("free", 10*time.Millisecond, false)
			}
		}()
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		for _, c := range f.clients {
			_ = c.Close()
		}
	})
	return f
}

// spike slows enterprise down until the rule fires and free is denied.
func (f *fleet) spike(t *testing.T) {
	t.Helper()
	f.slow.Store(true)
	if !assert.Eventually(t, func() bool {
		s := f.d.State()
		if len(s.Sites) != 1 || len(s.Sites[0].Rules) != 1 || !s.Sites[0].Rules[0].Fired {
			return false
		}
		for _, tag := range s.Sites[0].Tags {
			if tag.Tag == "free" && tag.DeniedPerSec > 0 {
				return true
			}
		}
		return false
	}, 60*time.Second, 50*time.Millisecond, "the rule fires and free is denied") {
		data, _ := json.Marshal(f.d.State())
		t.Fatalf("the page's view: %s", data)
	}
}
