// Command gin serves a small search API with gin, gated by WaitState. Gin
// handlers write to gin's own writer, so the gate is a gin middleware of a
// few lines over the SDK's calls — Gate, StartTimer, RetryAfter — rather
// than the net/http middleware, which would not see the status they write.
//
//	go run ./gin -duration 2s
//
// With WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set it uses that
// control plane; without them, one embedded on loopback whose policy
// denies plan "free" weight above 0. A request is gated under the plan of
// the account its API key names ("Authorization: Bearer key-pro").
package main

import (
	"flag"
	"log"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/contrib/examples/internal/demo"
)

// gate gates each request under the tag tag returns, answers a denied one
// 429 with Retry-After, and records a served one as a health sample of its
// tag: failed on a 5xx.
func gate(client *waitstate.Client, tag func(*gin.Context) string) gin.HandlerFunc {
	return func(c *gin.Context) {
		t := tag(c)
		res := client.Gate(t, 1)
		if !res.Allowed {
			c.Header("Retry-After", client.RetryAfterHeader(res))
			c.AbortWithStatusJSON(http.StatusTooManyRequests, gin.H{"error": "rate_limited", "reason": res.Reason.String()})
			return
		}
		c.Set("waitstate", res)
		timer := client.StartTimer(t)
		c.Next()
		timer.Stop(c.Writer.Status() >= http.StatusInternalServerError)
	}
}

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

	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	r.GET("/healthz", func(c *gin.Context) { c.String(http.StatusOK, "ok\n") })
	// Authentication first: the tag is the plan of the account the API
	// key names, never a header the caller could set.
	authenticate := func(c *gin.Context) {
		plan, ok := demo.PlanFor(c.GetHeader("Authorization"))
		if !ok {
			c.AbortWithStatusJSON(http.StatusUnauthorized, gin.H{"error": "unknown API key"})
			return
		}
		c.Set("plan", plan)
	}
	api := r.Group("/", authenticate, gate(client, func(c *gin.Context) string { return c.GetString("plan") }))
	api.GET("/search", func(c *gin.Context) {
		c.String(http.StatusOK, "results for %q\n", c.Query("q"))
	})
	return demo.Serve(addr, r, client, duration)
}
