package waitstatetest_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// A test as a user writes it: a control plane, a policy, a client, and
// assertions on Gate.
func TestUserStyle(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	client, err := waitstate.New(srv.Options())
	require.NoError(t, err)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, client.Ready(ctx))
	require.False(t, client.Gate("free", 1).Allowed)
	require.True(t, client.Gate("pro", 10).Allowed)
}

func Example() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})

	client, err := waitstate.New(srv.Options())
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.Ready(ctx); err != nil {
		panic(err)
	}
	fmt.Println("free:", client.Gate("free", 1).Reason)
	fmt.Println("pro:", client.Gate("pro", 5).Reason)

	// Close flushes the last window: the control plane has every count.
	if err := client.Close(); err != nil {
		panic(err)
	}
	t := srv.Totals("")
	fmt.Printf("control plane counted: usage %d, bounced %d; free %d/%d, pro %d/%d\n", t.Usage, t.Bounced,
		t.Tags["free"].Usage, t.Tags["free"].Bounced, t.Tags["pro"].Usage, t.Tags["pro"].Bounced)
	// Output:
	// free: tag_max_weight
	// pro: allowed
	// control plane counted: usage 1, bounced 1; free 0/1, pro 1/0
}

// A rule watches one tier's own latency and acts on another: while
// enterprise's p95 is above 300 ms, free is blocked.
func ExampleServer_SetRules() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	err := srv.SetRules("", waitstatetest.Rule{
		Name: "protect-enterprise", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: waitstatetest.ActionBlock, CooldownSeconds: 60,
	})
	if err != nil {
		panic(err)
	}
	client, err := waitstate.New(srv.Options())
	if err != nil {
		panic(err)
	}
	defer client.Close()

	for range 20 {
		client.ObserveTag("enterprise", 800*time.Millisecond, false) // enterprise is slow
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := waitstatetest.WaitForPolicy(ctx, client, 2); err != nil { // the version the rule's firing makes
		panic(err)
	}
	fmt.Println("free:", client.Gate("free", 1).Reason)
	fmt.Println("enterprise:", client.Gate("enterprise", 1).Reason)
	// Output:
	// free: throttled
	// enterprise: allowed
}
