// Command chi serves a small search API with chi, gated by WaitState: the
// SDK's net/http middleware goes straight into chi's Use.
//
//	go run ./chi -duration 2s
//
// With WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set it uses that
// control plane; without them, one embedded on loopback whose policy
// denies plan "free" weight above 0. A request is gated under the plan of
// the account its API key names ("Authorization: Bearer key-pro").
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/contrib/examples/internal/demo"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	duration := flag.Duration("duration", 0, "send a request per plan, print the answers and exit after this long (0: serve until killed)")
	flag.Parse()
	if err := run(*addr, *duration); err != nil {
		log.Fatal(err)
	}
}

func run(addr string, duration time.Duration) error {
	opts, closePlane, err := demo.Options()
	if err != nil {
		return err
	}
	defer closePlane()
	client, err := waitstate.New(opts)
	if err != nil {
		return err
	}
	defer client.Close()

	r := chi.NewRouter()
	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	r.Group(func(r chi.Router) {
		// Authentication first: the tag is the plan of the account the
		// API key names, never a header the caller could set.
		r.Use(demo.Authenticate)
		r.Use(client.HTTPMiddleware(waitstate.MiddlewareOptions{
			Tag: func(r *http.Request) string { return demo.PlanOf(r.Context()) },
		}))
		r.Get("/search", func(w http.ResponseWriter, r *http.Request) {
			res, _ := waitstate.ResultFromContext(r.Context())
			fmt.Fprintf(w, "results for %q (%s)\n", r.URL.Query().Get("q"), res.Reason)
		})
	})
	return demo.Serve(addr, r, client, duration)
}
