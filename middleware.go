package waitstate

import (
	"bufio"
	"context"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"time"
)

// MiddlewareOptions configures HTTPMiddleware.
type MiddlewareOptions struct {
	// Tag returns a request's tag. If nil, every request has tag "".
	Tag func(*http.Request) string

	// Weight returns a request's weight. If nil, every request weighs 1.
	Weight func(*http.Request) float64

	// Denied answers a denied request. If nil, the answer is 429 Too Many
	// Requests with a Retry-After header and the JSON body
	// {"error":"rate_limited","reason":"<reason>"}. It can read the
	// decision with ResultFromContext.
	Denied http.Handler

	// Skip, if set, lets the requests it returns true for through ungated
	// and unmeasured, such as health checks and metrics scrapes.
	Skip func(*http.Request) bool
}

type resultKey struct{}

// ResultFromContext returns the Gate decision that HTTPMiddleware stored in
// a request's context, and whether there was one. It allocates nothing.
func ResultFromContext(ctx context.Context) (GateResult, bool) {
	if r, ok := ctx.Value(resultKey{}).(*GateResult); ok {
		return *r, true
	}
	return GateResult{}, false
}

// gated is what the middleware allocates for one request, once: the
// request's context, which also answers ResultFromContext, and the writer
// that records the status.
type gated struct {
	resultContext
	sw statusWriter
}

// resultContext is a request's context with its Gate decision.
type resultContext struct {
	context.Context
	res GateResult
}

// Value answers ResultFromContext's key with a pointer to the decision (a
// pointer fits in an interface without an allocation), and passes any
// other key to the parent.
func (c *resultContext) Value(key any) any {
	if key == (resultKey{}) {
		return &c.res
	}
	return c.Context.Value(key)
}

// HTTPMiddleware returns middleware that gates each request before the next
// handler runs. A denied request goes to opts.Denied; an allowed one is
// served and recorded as one health sample of its tag's traffic
// (ObserveTag): its latency, failed when the status is 5xx or the handler
// panics. A panic is re-raised once it is recorded. Requests opts.Skip
// returns true for pass through untouched.
//
// The handler's ResponseWriter has exactly the optional interfaces of the
// one the middleware received — http.Flusher, http.Hijacker (websockets,
// proxies), io.ReaderFrom (sendfile), http.Pusher — and Unwrap, for
// http.ResponseController. An allowed request costs two allocations: its
// context and writer, and the request copy that carries them.
func (c *Client) HTTPMiddleware(opts MiddlewareOptions) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if opts.Skip != nil && opts.Skip(r) {
				next.ServeHTTP(w, r)
				return
			}
			tag, weight := "", 1.0
			if opts.Tag != nil {
				tag = opts.Tag(r)
			}
			if opts.Weight != nil {
				weight = opts.Weight(r)
			}
			g := &gated{resultContext: resultContext{Context: r.Context(), res: c.Gate(tag, weight)}}
			r = r.WithContext(&g.resultContext)
			if !g.res.Allowed {
				if opts.Denied != nil {
					opts.Denied.ServeHTTP(w, r)
				} else {
					c.deny(w, g.res)
				}
				return
			}
			g.sw.ResponseWriter = w
			start := time.Now()
			defer func() {
				p := recover()
				c.ObserveTag(tag, time.Since(start), p != nil || g.sw.status >= 500)
				if p != nil {
					panic(p)
				}
			}()
			next.ServeHTTP(wrapWriter(&g.sw), r)
		})
	}
}

// RetryAfter is how long a caller denied with res should wait before
// trying again: a second for the safe-mode rate, else the pulse interval
// in force, since a policy can change only at a pulse or sync. The
// middleware sends it, rounded up to whole seconds, as Retry-After.
func (c *Client) RetryAfter(res GateResult) time.Duration {
	if res.Reason == ReasonSafeModeLimit {
		return time.Second
	}
	return c.pulseInterval()
}

// RetryAfterHeader is RetryAfter as the value of an HTTP Retry-After
// header: whole seconds, rounded up, at least 1. The middleware's default
// denial sends it; a handler of another framework can too.
func (c *Client) RetryAfterHeader(res GateResult) string {
	return c.retryAfterValues(res)[0]
}

// deny writes the default denial: 429, Retry-After (RetryAfterHeader) and
// a JSON body, with no allocation: the header values and bodies are made
// once and shared. A header's values are only read once set (net/http
// writes them; Set replaces them and Add appends to a copy, since each
// shared slice is full), so sharing them is safe.
func (c *Client) deny(w http.ResponseWriter, res GateResult) {
	h := w.Header()
	h["Retry-After"] = c.retryAfterValues(res)
	h["Content-Type"] = jsonContentType
	w.WriteHeader(http.StatusTooManyRequests)
	body := denyBodies[0]
	if int(res.Reason) < len(denyBodies) {
		body = denyBodies[res.Reason]
	}
	_, _ = w.Write(body)
}

// denyBodies are the default denial's bodies, by reason.
var denyBodies = func() (b [numReasons][]byte) {
	for r := range b {
		b[r] = []byte(`{"error":"rate_limited","reason":"` + Reason(r).String() + `"}`)
	}
	return b
}()

// jsonContentType is the default denial's Content-Type values.
var jsonContentType = []string{"application/json"}

// retryAfterHeader is a Retry-After header's values and the seconds they say.
type retryAfterHeader struct {
	secs   int
	values []string
}

// retryAfterValues is RetryAfterHeader as a header's values, made anew
// only when the seconds change (the pulse interval, or safe mode).
func (c *Client) retryAfterValues(res GateResult) []string {
	secs := max(1, int(math.Ceil(c.RetryAfter(res).Seconds())))
	if ra := c.retryAfter.Load(); ra != nil && ra.secs == secs {
		return ra.values
	}
	ra := &retryAfterHeader{secs: secs, values: []string{strconv.Itoa(secs)}}
	c.retryAfter.Store(ra)
	return ra.values
}

// statusWriter remembers the status a handler wrote. Its optional
// interfaces are added by wrapWriter, as the writer it wraps has them.
type statusWriter struct {
	http.ResponseWriter
	status int
}

// WriteHeader records the first final status and passes it on.
func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 { // 1xx are interim
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// Write records an implicit 200 and passes the bytes on.
func (w *statusWriter) Write(b []byte) (int, error) {
	w.implicitOK()
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// implicitOK records the 200 that writing a body before a status sends.
func (w *statusWriter) implicitOK() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
}

func (w *statusWriter) flush() {
	w.implicitOK()
	w.ResponseWriter.(http.Flusher).Flush()
}

func (w *statusWriter) hijack() (net.Conn, *bufio.ReadWriter, error) {
	return w.ResponseWriter.(http.Hijacker).Hijack()
}

func (w *statusWriter) readFrom(r io.Reader) (int64, error) {
	w.implicitOK()
	return w.ResponseWriter.(io.ReaderFrom).ReadFrom(r)
}

func (w *statusWriter) push(target string, opts *http.PushOptions) error {
	return w.ResponseWriter.(http.Pusher).Push(target, opts)
}
