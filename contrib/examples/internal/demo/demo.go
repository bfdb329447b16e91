// Package demo holds what the framework examples share: a control plane to
// run against, and a server that can send itself a request per plan.
package demo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// Options returns Options for the control plane the environment names, or
// for one embedded on loopback, whose policy denies plan "free" weight
// above 0; closePlane stops the embedded one.
func Options() (opts waitstate.Options, closePlane func(), err error) {
	if os.Getenv(waitstate.EnvPublishKey) != "" {
		opts, err := waitstate.OptionsFromEnv()
		return opts, func() {}, err
	}
	srv := waitstatetest.NewServer()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	return srv.Options(), srv.Close, nil
}

// Serve serves h on addr until the process is killed; with a duration, it
// sends GET /search as each plan, prints the answers and returns.
func Serve(addr string, h http.Handler, client *waitstate.Client, duration time.Duration) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	server := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = server.Serve(ln) }()
	defer server.Close()
	fmt.Printf("serving on http://%s\n", ln.Addr())
	if duration == 0 {
		select {}
	}
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	_ = client.Ready(ctx)
	for _, plan := range []string{"free", "pro"} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ln.Addr().String()+"/search?q=go", nil)
		req.Header.Set("X-Plan", plan)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("%s: %d %s\n", plan, resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}
