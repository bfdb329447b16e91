package waitstate_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// The README's quick start, compiled with the tests so that it stays
// correct. It reads its keys from the environment, so it is not run.
func Example_quickStart() {
	client, err := waitstate.New(waitstate.Options{
		PublishKey: os.Getenv("WAITSTATE_PUBLISH_KEY"),
		SecretKey:  os.Getenv("WAITSTATE_SECRET_KEY"),
	})
	if err != nil {
		log.Fatal(err) // bad options only: New never waits on the network
	}
	defer client.Close() // stops the goroutines and flushes the last pulse

	handle := func(plan string) error {
		if r := client.Gate(plan, 1); !r.Allowed {
			return fmt.Errorf("busy: %s", r.Reason) // e.g. "tag_max_weight", "throttled"
		}
		t := client.StartTimer(plan) // one health sample of this plan's traffic
		err := doExpensiveWork()
		t.Stop(err != nil)                                       // its latency, and whether it failed
		client.Record(plan, "queue_depth", float64(queue.Len())) // a custom metric
		return err
	}
	_ = handle("pro")
}

// Stand-ins for the quick start's own work.
var queue interface{ Len() int } = fakeQueue{}

type fakeQueue struct{}

func (fakeQueue) Len() int { return 3 }

func doExpensiveWork() error { return nil }

// Gate answers from memory: whether to serve the call, and why. Here the
// policy caps "free" at weight 0 and the site at 10.
func ExampleClient_Gate() {
	client, err := waitstate.New(waitstate.Options{
		Offline:       true, // here; in production, with keys and a control plane
		InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}},
	})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	for _, call := range []struct {
		tag    string
		weight float64
	}{{"free", 1}, {"pro", 5}, {"pro", 50}} {
		r := client.Gate(call.tag, call.weight)
		fmt.Printf("%s weight %v: allowed=%v reason=%s\n", call.tag, call.weight, r.Allowed, r.Reason)
	}
	// Output:
	// free weight 1: allowed=false reason=tag_max_weight
	// pro weight 5: allowed=true reason=allowed
	// pro weight 50: allowed=false reason=global_max_weight
}

// ObserveTag records a latency measured elsewhere (a queue's wait, a
// client library's own timing) as one health sample of a tag's traffic.
func ExampleClient_ObserveTag() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	opts := srv.Options()
	opts.PulseInterval = time.Hour // one window, sent by Close
	client, err := waitstate.New(opts)
	if err != nil {
		panic(err)
	}
	client.ObserveTag("export", 120*time.Millisecond, false)
	client.ObserveTag("export", 2*time.Second, true) // timed out
	if err := client.Close(); err != nil {
		panic(err)
	}
	var requests, errs uint64
	for _, p := range srv.Pulses() {
		if h := p.Tags["export"].Health; h != nil {
			requests, errs = requests+h.Requests, errs+h.Errors
		}
	}
	fmt.Printf("export: %d requests, %d failed\n", requests, errs)
	// Output:
	// export: 2 requests, 1 failed
}

// Record adds a sample of a custom metric of a tag; each pulse carries its
// count, sum, min and max, which rules can watch as "metric:<name>".
func ExampleClient_Record() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	opts := srv.Options()
	opts.PulseInterval = time.Hour // one window, sent by Close
	client, err := waitstate.New(opts)
	if err != nil {
		panic(err)
	}
	for _, depth := range []float64{4, 9, 2} {
		client.Record("batch", "queue_depth", depth)
	}
	if err := client.Close(); err != nil {
		panic(err)
	}
	pulses := srv.Pulses()
	m := pulses[len(pulses)-1].Tags["batch"].Metrics["queue_depth"]
	fmt.Printf("queue_depth: count %d, mean %.0f, max %.0f\n", m.Count, m.Sum/float64(m.Count), m.Max)
	// Output:
	// queue_depth: count 3, mean 5, max 9
}

// Stats reports the client's counters and state, for logs, metrics and
// health endpoints.
func ExampleClient_Stats() {
	client, err := waitstate.New(waitstate.Options{
		Offline:       true,
		InitialPolicy: &waitstate.Policy{Version: 4, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}},
	})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	client.Gate("free", 1)
	client.Gate("pro", 1)
	client.Gate("pro", 1)
	st := client.Stats()
	fmt.Printf("mode %s, policy v%d: %d allowed, %d denied\n", st.Mode, st.PolicyVersion, st.Usage, st.Bounced)
	// Output:
	// mode enforcing, policy v4: 2 allowed, 1 denied
}

// A test waits for a policy, or for a rule's firing, to reach a client.
func Example_waitForPolicy() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	client, err := waitstate.New(srv.Options())
	if err != nil {
		panic(err)
	}
	defer client.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 2, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := waitstatetest.WaitForPolicy(ctx, client, 2); err != nil {
		panic(err)
	}
	fmt.Println("free:", client.Gate("free", 1).Reason)
	// Output:
	// free: tag_max_weight
}

// A process restarted while the control plane is down enforces the policy
// it had, from its first call, when it keeps it in a FileStore.
func ExampleFileStore() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 3, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	dir, err := os.MkdirTemp("", "waitstate-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "waitstate.snapshot")
	opts := srv.Options()
	opts.PolicyStore = waitstate.FileStore(path)

	first, err := waitstate.New(opts)
	if err != nil {
		panic(err)
	}
	// The first policy is saved as soon as it is applied.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			break
		}
	}
	srv.SetFaults(waitstatetest.Faults{Down: true}) // the control plane goes away
	_ = first.Close()                               // and the process restarts

	restarted, err := waitstate.New(opts)
	if err != nil {
		panic(err)
	}
	defer restarted.Close()
	s := restarted.Stats()
	fmt.Println(restarted.Gate("free", 1).Reason, s.Mode, s.Restored, s.PolicyVersion)
	// Output: tag_max_weight enforcing true 3
}
