// Command quickstart gates simulated traffic with the WaitState SDK.
//
// With no environment it starts a control plane on loopback and runs
// against it; with WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set (and
// optionally WAITSTATE_BASE_URL and WAITSTATE_SITE_ID) it runs against that
// control plane instead.
//
// This is the first version: it shows the client gating traffic under a
// policy. The adaptive loop (reflex rules shedding a tag under load, safe
// mode and recovery) comes with the reference control plane.
package main

import (
	"context"
	"fmt"
	"log"
	"math"
	"os"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/internal/controlplane"
)

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	opts, err := waitstate.OptionsFromEnv()
	if err != nil {
		cp := controlplane.New()
		defer cp.Close()
		cp.AddKey("pk_quickstart", "sk_quickstart")
		cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0, "enterprise": math.Inf(1)}})
		opts = waitstate.Options{PublishKey: "pk_quickstart", SecretKey: "sk_quickstart", BaseURL: cp.URL}
		fmt.Println("embedded control plane on", cp.URL)
	}
	client, err := waitstate.New(opts)
	if err != nil {
		return err
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.Ready(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "no policy yet, failing open:", err)
	}
	fmt.Printf("mode %s, policy v%d\n", client.Mode(), client.Policy().Version)
	for _, c := range []struct {
		tag    string
		weight float64
	}{{"free", 1}, {"pro", 5}, {"pro", 10}, {"enterprise", 10}} {
		r := client.Gate(c.tag, c.weight)
		fmt.Printf("Gate(%q, %v): allowed=%v reason=%s\n", c.tag, c.weight, r.Allowed, r.Reason)
	}
	return nil
}
