package waitstate_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func ExamplePolicy_Gate() {
	p := &waitstate.Policy{
		Version:         17,
		GlobalMaxWeight: 5,
		TagMaxWeights:   map[string]float64{"free": 0, "enterprise": math.Inf(1)},
	}
	for _, c := range []struct {
		tag    string
		weight float64
	}{{"free", 1}, {"pro", 5}, {"pro", 10}, {"enterprise", 100}} {
		r := p.Gate(c.tag, c.weight)
		fmt.Printf("%-10s %3v  allowed=%-5v reason=%s limit=%v\n", c.tag, c.weight, r.Allowed, r.Reason, r.Limit)
	}
	// Output:
	// free         1  allowed=false reason=tag_max_weight limit=0
	// pro          5  allowed=true  reason=allowed limit=5
	// pro         10  allowed=false reason=global_max_weight limit=5
	// enterprise 100  allowed=true  reason=allowed limit=+Inf
}

func ExampleDefaultPolicy() {
	r := waitstate.DefaultPolicy().Gate("anything", 1e9)
	fmt.Println(r.Allowed, r.Reason, r.Limit)
	// Output: true allowed +Inf
}

func ExampleNew() {
	// A control plane on loopback stands in for the real one.
	srv := waitstatetest.NewServer()
	defer srv.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})

	opts := srv.Options() // in production: waitstate.OptionsFromEnv()
	client, err := waitstate.New(waitstate.Options{
		PublishKey: opts.PublishKey,
		SecretKey:  opts.SecretKey,
		BaseURL:    opts.BaseURL,
	})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	// Gate fails open until the first policy arrives; wait for it here so
	// the output is the same every run.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.Ready(ctx); err != nil {
		panic(err)
	}
	fmt.Println("mode:", client.Mode(), "policy version:", client.Policy().Version)
	fmt.Println("free:", client.Gate("free", 1).Reason)
	fmt.Println("pro:", client.Gate("pro", 1).Reason)
	// Output:
	// mode: enforcing policy version: 1
	// free: tag_max_weight
	// pro: allowed
}

func ExampleClient_HTTPMiddleware() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: math.Inf(1), TagMaxWeights: map[string]float64{"free": 0}})
	client, err := waitstate.New(srv.Options())
	if err != nil {
		panic(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.Ready(ctx); err != nil {
		panic(err)
	}

	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "report generated")
	})
	// The tag is the plan of the account the service's own authentication
	// found (here a stand-in), never a header the caller sets: a free
	// caller would send "X-Plan: pro".
	gated := authenticate(client.HTTPMiddleware(waitstate.MiddlewareOptions{
		Tag: func(r *http.Request) string { return planOf(r.Context()) },
	})(api))

	for _, key := range []string{"key-pro", "key-free"} {
		req := httptest.NewRequest(http.MethodGet, "/report", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("X-Plan", "pro") // the caller's say-so: not read
		rec := httptest.NewRecorder()
		gated.ServeHTTP(rec, req)
		fmt.Printf("%s: %d %s", key, rec.Code, rec.Body)
	}
	// Output:
	// key-pro: 200 report generated
	// key-free: 429 {"error":"rate_limited","reason":"tag_max_weight"}
}

type planKey struct{}

// authenticate stands in for a service's authentication: it finds the
// account of the request's API key and puts its plan in the context.
func authenticate(next http.Handler) http.Handler {
	plans := map[string]string{"Bearer key-free": "free", "Bearer key-pro": "pro"}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plan, ok := plans[r.Header.Get("Authorization")]
		if !ok {
			http.Error(w, "unknown API key", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), planKey{}, plan)))
	})
}

// planOf is the plan authenticate found.
func planOf(ctx context.Context) string {
	plan, _ := ctx.Value(planKey{}).(string)
	return plan
}

// A client with no control plane at all enforces a policy it ships, here
// throttling "pro" to 50 %: every other call is shed, evenly.
func ExampleOptions_offline() {
	client, err := waitstate.New(waitstate.Options{
		Offline:       true,
		InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagShedPercents: map[string]float64{"pro": 50}},
	})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	for range 4 {
		r := client.Gate("pro", 1)
		fmt.Println(r.Allowed, r.Reason)
	}
	// Output:
	// true allowed
	// false throttled
	// true allowed
	// false throttled
}

// A service that also runs without keys, on a developer's machine, says so
// in code: OptionsFromEnv reports unset keys with ErrNoKeys, and the
// service then starts Offline with a policy of its own (or against a
// waitstatetest server, as examples/httpserver does). Any other error,
// such as a value that does not parse, is a deployment's mistake and
// stops it.
func ExampleOptionsFromEnv() {
	opts, err := waitstate.OptionsFromEnv()
	if errors.Is(err, waitstate.ErrNoKeys) {
		log.Print("waitstate: no keys: offline, with the development policy")
		opts, err = waitstate.Options{
			Offline:       true,
			InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10},
		}, nil
	}
	if err != nil {
		log.Fatal(err)
	}
	client, err := waitstate.New(opts)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	_ = client.Gate("free", 1)
}

// Shadow mode is a dry run: every call is allowed, and the ones the policy
// would deny say so.
func ExampleOptions_shadow() {
	client, err := waitstate.New(waitstate.Options{
		Offline:       true, // here; in production, with keys, pulses say "shadow": true
		Shadow:        true,
		InitialPolicy: &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}},
	})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	for _, tag := range []string{"free", "pro"} {
		r := client.Gate(tag, 1)
		fmt.Printf("%s: allowed=%v shadowed=%v reason=%s\n", tag, r.Allowed, r.Shadowed, r.Reason)
	}
	fmt.Println("bounced:", client.Stats().Bounced)
	// Output:
	// free: allowed=true shadowed=true reason=tag_max_weight
	// pro: allowed=true shadowed=false reason=allowed
	// bounced: 1
}

// Health is measured per tag: a timer around the work, stopped with
// whether it failed. Custom metrics go beside it.
func ExampleClient_StartTimer() {
	srv := waitstatetest.NewServer()
	defer srv.Close()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
	opts := srv.Options()
	opts.PulseInterval = time.Hour // one window, sent by Close
	client, err := waitstate.New(opts)
	if err != nil {
		panic(err)
	}

	for i := range 3 {
		t := client.StartTimer("search")
		err := search(i) // the work being measured
		t.Stop(err != nil)
		client.Record("search", "results", float64(10*i))
	}
	client.ObserveTag("export", 120*time.Millisecond, false) // a latency measured elsewhere
	if err := client.Close(); err != nil {
		panic(err)
	}

	pulses := srv.Pulses()
	p := pulses[len(pulses)-1]
	h := p.Tags["search"].Health
	m := p.Tags["search"].Metrics["results"]
	var inHistogram uint64
	for _, n := range h.Histogram {
		inHistogram += n
	}
	fmt.Printf("search: %d requests, %d errors, %d in the latency histogram\n", h.Requests, h.Errors, inHistogram)
	fmt.Printf("search results: count %d, min %v, max %v\n", m.Count, m.Min, m.Max)
	fmt.Printf("site: %d requests\n", p.Health.Requests)
	// Output:
	// search: 3 requests, 1 errors, 3 in the latency histogram
	// search results: count 3, min 0, max 20
	// site: 4 requests
}

// search stands in for real work; its second call fails.
func search(i int) error {
	if i == 1 {
		return fmt.Errorf("backend unavailable")
	}
	return nil
}
