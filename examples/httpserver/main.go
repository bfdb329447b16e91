// Command httpserver is a net/http service gated by WaitState's middleware:
// the tag is the plan of the account the request's API key names, the
// weight comes from the route. The tag comes from who the caller is, as the
// service authenticated it, never from a header the caller sets: with a
// tag read from an X-Plan header, a free caller would send
// "X-Plan: enterprise" and pass where free is denied.
//
//	go run ./examples/httpserver                 # serve until Ctrl-C
//	go run ./examples/httpserver -duration 5s    # send itself a few requests, then exit
//
// It runs against an embedded control plane on loopback unless
// WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY name a real one.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// accounts stands in for the service's own accounts: the plan each API key
// pays for.
var accounts = map[string]string{"key-free": "free", "key-pro": "pro", "key-enterprise": "enterprise"}

type planKey struct{}

// authenticate answers 401 to a request without a known API key
// ("Authorization: Bearer <key>") and passes the others on with their
// account's plan in the context, for the gate's Tag.
func authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		plan, ok := accounts[key]
		if !ok {
			http.Error(w, "unknown API key", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), planKey{}, plan)))
	})
}

// routeWeights is what each route costs the backend.
var routeWeights = map[string]float64{
	"/search": 1,
	"/report": 5,
	"/export": 20,
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	duration := flag.Duration("duration", 0, "if set, send a few requests to itself and exit after this long")
	flag.Parse()
	if err := run(*addr, *duration); err != nil {
		log.Fatal(err)
	}
}

func run(addr string, duration time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	opts, err := waitstate.OptionsFromEnv()
	if os.Getenv(waitstate.EnvPublishKey) == "" && os.Getenv(waitstate.EnvSecretKey) == "" {
		srv := waitstatetest.NewServer()
		defer srv.Close()
		srv.SetPolicy("", &waitstate.Policy{
			Version:         1,
			GlobalMaxWeight: 10,
			TagMaxWeights:   map[string]float64{"free": 2, "enterprise": math.Inf(1)},
		})
		opts, err = srv.Options(), nil
		fmt.Println("embedded control plane on", srv.URL, "— policy: global max weight 10, free 2, enterprise unlimited")
	}
	if err != nil {
		return err
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	client, err := waitstate.New(opts)
	if err != nil {
		return err
	}
	defer client.Close()

	mux := http.NewServeMux()
	for route := range routeWeights {
		mux.HandleFunc(route, func(w http.ResponseWriter, r *http.Request) {
			res, _ := waitstate.ResultFromContext(r.Context())
			fmt.Fprintf(w, "%s served (limit %v)\n", r.URL.Path, res.Limit)
		})
	}
	handler := authenticate(client.HTTPMiddleware(waitstate.MiddlewareOptions{
		Tag:    func(r *http.Request) string { return r.Context().Value(planKey{}).(string) },
		Weight: func(r *http.Request) float64 { return routeWeights[r.URL.Path] },
	})(mux))

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	server := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()
	base := "http://" + ln.Addr().String()
	fmt.Printf("listening on %s; try: curl -H 'Authorization: Bearer key-pro' %s/report\n", base, base)

	if duration > 0 {
		readyCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := client.Ready(readyCtx); err != nil {
			fmt.Println("no policy yet, failing open:", err)
		}
		cancel()
		selfDemo(base)
		var cancelRun context.CancelFunc
		ctx, cancelRun = context.WithTimeout(ctx, duration)
		defer cancelRun()
	}

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := server.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	fmt.Printf("stopped; %+v\n", client.Stats())
	return nil
}

// selfDemo sends one request per plan and route, then one with the free
// key claiming "X-Plan: enterprise", which changes nothing, and prints the
// answers.
func selfDemo(base string) {
	send := func(label, key, route string, header http.Header) {
		req, _ := http.NewRequest(http.MethodGet, base+route, nil)
		for k, v := range header {
			req.Header[k] = v
		}
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			fmt.Println(err)
			return
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("%-10s %-8s (weight %2v) → %d %s", label, route, routeWeights[route], resp.StatusCode, body)
		if resp.StatusCode == http.StatusTooManyRequests {
			fmt.Printf(" (Retry-After: %s)\n", resp.Header.Get("Retry-After"))
		}
	}
	for _, plan := range []string{"free", "pro", "enterprise"} {
		for _, route := range []string{"/search", "/report", "/export"} {
			send(plan, "key-"+plan, route, nil)
		}
	}
	send("free, claiming X-Plan: enterprise", "key-free", "/report", http.Header{"X-Plan": {"enterprise"}})
}
