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
	"strings"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// apiKeys stands in for the service's own accounts: what each API key's
// account pays for.
var apiKeys = map[string]string{"key-free": "free", "key-pro": "pro"}

// PlanFor returns the plan of the account whose API key the Authorization
// header carries ("Bearer <key>"), and false when it names none. The plan
// a request is gated under must come from here, from who the caller is,
// never from a header the caller sets: with a tag taken from, say, an
// X-Plan header, a free caller sends "X-Plan: pro" and passes as pro.
func PlanFor(authorization string) (string, bool) {
	key, ok := strings.CutPrefix(authorization, "Bearer ")
	if !ok {
		return "", false
	}
	plan, ok := apiKeys[key]
	return plan, ok
}

type planKey struct{}

// Authenticate answers 401 to a request without a known API key, and
// passes the others on with their account's plan in the context (PlanOf).
func Authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plan, ok := PlanFor(r.Header.Get("Authorization"))
		if !ok {
			http.Error(w, "unknown API key", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), planKey{}, plan)))
	})
}

// PlanOf is the plan Authenticate found for the request.
func PlanOf(ctx context.Context) string {
	plan, _ := ctx.Value(planKey{}).(string)
	return plan
}

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
// sends GET /search with each plan's API key, and once with the free key
// and a header claiming "X-Plan: pro", prints the answers and returns.
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
	for _, try := range []struct{ name, key, claim string }{
		{"free", "key-free", ""},
		{"pro", "key-pro", ""},
		{"free claiming X-Plan: pro", "key-free", "pro"},
		{"no key", "", ""},
	} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ln.Addr().String()+"/search?q=go", nil)
		if try.key != "" {
			req.Header.Set("Authorization", "Bearer "+try.key)
		}
		if try.claim != "" {
			req.Header.Set("X-Plan", try.claim) // the caller's say-so: not read
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("%s: %d %s\n", try.name, resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}
