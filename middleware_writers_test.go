package waitstate

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"
)

// optional are the optional interfaces the middleware's writer keeps.
var optional = []struct {
	name string
	has  func(http.ResponseWriter) bool
}{
	{"Flusher", func(w http.ResponseWriter) bool { _, ok := w.(http.Flusher); return ok }},
	{"Hijacker", func(w http.ResponseWriter) bool { _, ok := w.(http.Hijacker); return ok }},
	{"ReaderFrom", func(w http.ResponseWriter) bool { _, ok := w.(io.ReaderFrom); return ok }},
	{"Pusher", func(w http.ResponseWriter) bool { _, ok := w.(http.Pusher); return ok }},
}

// Writers with each combination of the optional interfaces, each method
// recording that it was called.
type (
	baseWriter struct {
		header http.Header
		code   int
		calls  []string
	}
	flusher    struct{ *baseWriter }
	hijacker   struct{ *baseWriter }
	readerFrom struct{ *baseWriter }
	pusher     struct{ *baseWriter }
)

func (w *baseWriter) Header() http.Header  { return w.header }
func (w *baseWriter) WriteHeader(code int) { w.code = code }
func (w *baseWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return len(b), nil
}

func (w flusher) Flush() { w.calls = append(w.calls, "Flush") }
func (w hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.calls = append(w.calls, "Hijack")
	return nil, nil, nil
}
func (w readerFrom) ReadFrom(r io.Reader) (int64, error) {
	w.calls = append(w.calls, "ReadFrom")
	return io.Copy(io.Discard, r)
}
func (w pusher) Push(string, *http.PushOptions) error { w.calls = append(w.calls, "Push"); return nil }

// combination returns a writer with the optional interfaces of mask (bit i:
// optional[i]), built by embedding.
func combination(mask int, b *baseWriter) http.ResponseWriter {
	type (
		F    = flusher
		H    = hijacker
		R    = readerFrom
		P    = pusher
		base = *baseWriter
	)
	// Each method set is embedded through its interface, so that only its
	// method is promoted.
	out := http.ResponseWriter(struct{ base }{b})
	f, h, r, p := F{b}, H{b}, R{b}, P{b}
	switch mask {
	case 1:
		out = struct {
			base
			http.Flusher
		}{b, f}
	case 2:
		out = struct {
			base
			http.Hijacker
		}{b, h}
	case 3:
		out = struct {
			base
			http.Flusher
			http.Hijacker
		}{b, f, h}
	case 4:
		out = struct {
			base
			io.ReaderFrom
		}{b, r}
	case 5:
		out = struct {
			base
			http.Flusher
			io.ReaderFrom
		}{b, f, r}
	case 6:
		out = struct {
			base
			http.Hijacker
			io.ReaderFrom
		}{b, h, r}
	case 7:
		out = struct {
			base
			http.Flusher
			http.Hijacker
			io.ReaderFrom
		}{b, f, h, r}
	case 8:
		out = struct {
			base
			http.Pusher
		}{b, p}
	case 9:
		out = struct {
			base
			http.Flusher
			http.Pusher
		}{b, f, p}
	case 10:
		out = struct {
			base
			http.Hijacker
			http.Pusher
		}{b, h, p}
	case 11:
		out = struct {
			base
			http.Flusher
			http.Hijacker
			http.Pusher
		}{b, f, h, p}
	case 12:
		out = struct {
			base
			io.ReaderFrom
			http.Pusher
		}{b, r, p}
	case 13:
		out = struct {
			base
			http.Flusher
			io.ReaderFrom
			http.Pusher
		}{b, f, r, p}
	case 14:
		out = struct {
			base
			http.Hijacker
			io.ReaderFrom
			http.Pusher
		}{b, h, r, p}
	case 15:
		out = struct {
			base
			http.Flusher
			http.Hijacker
			io.ReaderFrom
			http.Pusher
		}{b, f, h, r, p}
	}
	return out
}

// TestMiddlewareKeepsEveryInterface: for each of the 16 combinations of
// optional interfaces a writer can have, the handler behind the middleware
// gets a writer with exactly the same ones, and each passes its calls on.
func TestMiddlewareKeepsEveryInterface(t *testing.T) {
	c := idleClient(t, nil, nil)
	for mask := range 16 {
		b := &baseWriter{header: http.Header{}}
		under := combination(mask, b)
		for i, o := range optional {
			require.Equal(t, mask&(1<<i) != 0, o.has(under), "test writer %d: %s", mask, o.name)
		}
		var got http.ResponseWriter
		c.HTTPMiddleware(MiddlewareOptions{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			got = w
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
			if h, ok := w.(http.Hijacker); ok {
				_, _, _ = h.Hijack()
			}
			if rf, ok := w.(io.ReaderFrom); ok {
				_, _ = rf.ReadFrom(strings.NewReader("body"))
			}
			if p, ok := w.(http.Pusher); ok {
				_ = p.Push("/style.css", nil)
			}
		})).ServeHTTP(under, httptest.NewRequest(http.MethodGet, "/", nil))
		var want []string
		for i, o := range optional {
			assert.Equal(t, mask&(1<<i) != 0, o.has(got), "writer %d: %s", mask, o.name)
			if mask&(1<<i) != 0 {
				want = append(want, map[string]string{"Flusher": "Flush", "Hijacker": "Hijack", "ReaderFrom": "ReadFrom", "Pusher": "Push"}[o.name])
			}
		}
		assert.Equal(t, want, b.calls, "writer %d: calls passed on", mask)
		assert.True(t, under == got.(interface{ Unwrap() http.ResponseWriter }).Unwrap(), "writer %d: Unwrap returns the writer wrapped", mask)
	}
}

// TestMiddlewareHijackAndFlushOverTheNetwork: behind the middleware, on a
// real server, a handler hijacks the connection (as websocket libraries
// do, with a direct type assertion) and another streams with Flush.
func TestMiddlewareHijackAndFlushOverTheNetwork(t *testing.T) {
	c := idleClient(t, nil, nil)
	mux := http.NewServeMux()
	mux.HandleFunc("/upgrade", func(w http.ResponseWriter, r *http.Request) {
		conn, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer conn.Close()
		_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		_ = rw.Flush()
		line, _ := rw.ReadString('\n')
		_, _ = rw.WriteString("echo: " + line)
		_ = rw.Flush()
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		for i := range 3 {
			_, _ = io.WriteString(w, strings.Repeat("x", i+1)+"\n")
			w.(http.Flusher).Flush()
			<-r.Context().Done() // never: the client reads each line before the next exists
		}
	})
	// /stream waits for nothing after all: it flushes, and the client
	// reading the first line before the handler returns proves the flush.
	mux.HandleFunc("/stream2", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-time.After(time.Minute):
		}
	})
	srv := httptest.NewServer(c.HTTPMiddleware(MiddlewareOptions{})(mux))
	defer srv.Close()

	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	_, _ = io.WriteString(conn, "GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	r := bufio.NewReader(conn)
	resp, err := http.ReadResponse(r, nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	_, _ = io.WriteString(conn, "hello\n")
	line, err := r.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "echo: hello\n", line)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/stream2", nil)
	sresp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer sresp.Body.Close()
	first, err := bufio.NewReader(sresp.Body).ReadString('\n')
	require.NoError(t, err, "the flushed line arrives while the handler still runs")
	assert.Equal(t, "first\n", first)
	cancel()
}

// TestMiddlewareSkip: skipped requests pass ungated and unmeasured.
func TestMiddlewareSkip(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 0}) // everything denied
	h := c.HTTPMiddleware(MiddlewareOptions{Skip: func(r *http.Request) bool { return r.URL.Path == "/healthz" }})(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, gated := ResultFromContext(r.Context())
			assert.False(t, gated, "no decision for a skipped request")
			_, _ = io.WriteString(w, "ok")
		}))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
	assert.Equal(t, http.StatusOK, rec.Code)
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/search", nil))
	assert.Equal(t, http.StatusTooManyRequests, rec.Code)
	st := c.Stats()
	assert.Equal(t, uint64(0), st.Usage)
	assert.Equal(t, uint64(1), st.Bounced, "only /search was gated")
}

// TestMiddlewareAllocations: an allowed request costs two allocations over
// the bare handler: its context and writer, and the request copy.
func TestMiddlewareAllocations(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 10})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	h := c.HTTPMiddleware(MiddlewareOptions{Tag: func(*http.Request) string { return "pro" }})(handler)
	w, req := newBenchWriter(), httptest.NewRequest(http.MethodGet, "/search", nil)
	bare := testing.AllocsPerRun(200, func() { w.reset(); handler.ServeHTTP(w, req) })
	gated := testing.AllocsPerRun(200, func() { w.reset(); h.ServeHTTP(w, req) })
	assert.LessOrEqual(t, gated-bare, 2.0)

	// A denied request costs the same two, its default 429 nothing more,
	// and reading the decision back allocates nothing.
	deny := c.HTTPMiddleware(MiddlewareOptions{Tag: func(*http.Request) string { return "pro" },
		Weight: func(*http.Request) float64 { return 11 }})(handler)
	denied := testing.AllocsPerRun(200, func() { w.reset(); deny.ServeHTTP(w, req) })
	assert.Equal(t, http.StatusTooManyRequests, w.code)
	assert.Equal(t, `{"error":"rate_limited","reason":"global_max_weight"}`, w.body.String())
	assert.Equal(t, []string{"20"}, w.header["Retry-After"], "the pulse interval in force, DefaultPulseInterval")
	assert.LessOrEqual(t, denied, 2.0)
	type otherKey struct{}
	ctx := context.WithValue(&resultContext{Context: context.Background(), res: failOpen}, otherKey{}, 1) // as other middleware wraps it
	var got GateResult
	assert.Zero(t, testing.AllocsPerRun(200, func() { got, _ = ResultFromContext(ctx) }))
	assert.Equal(t, failOpen, got)
}

// benchWriter is a reusable ResponseWriter that flushes, as
// httptest.ResponseRecorder does, so that the writer's own cost stays out
// of the measurements.
type benchWriter struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func newBenchWriter() *benchWriter                 { return &benchWriter{header: http.Header{}} }
func (w *benchWriter) Header() http.Header         { return w.header }
func (w *benchWriter) WriteHeader(code int)        { w.code = code }
func (w *benchWriter) Write(b []byte) (int, error) { return w.body.Write(b) }
func (w *benchWriter) Flush()                      {}
func (w *benchWriter) reset()                      { clear(w.header); w.code = 0; w.body.Reset() }

// BenchmarkMiddleware: the same handler bare, behind HTTPMiddleware, and
// behind a middleware of golang.org/x/time/rate's Limiter, on one reusable
// writer. The middleware's cost is the difference from the bare handler.
func BenchmarkMiddleware(b *testing.B) {
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte("ok"))
	})
	c := idleClient(b, nil, &Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 1}})
	gated := c.HTTPMiddleware(MiddlewareOptions{Tag: func(r *http.Request) string { return r.Header.Get("X-Plan") }})(handler)
	lim := rate.NewLimiter(rate.Inf, 1)
	limited := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !lim.Allow() {
			http.Error(w, "rate limited", http.StatusTooManyRequests)
			return
		}
		handler.ServeHTTP(w, r)
	})
	for _, bc := range []struct {
		name string
		h    http.Handler
	}{{"bare", handler}, {"waitstate", gated}, {"rate", limited}} {
		b.Run(bc.name, func(b *testing.B) {
			w, req := newBenchWriter(), httptest.NewRequest(http.MethodGet, "/search", nil)
			req.Header.Set("X-Plan", "pro")
			b.ReportAllocs()
			for b.Loop() {
				w.reset()
				bc.h.ServeHTTP(w, req)
			}
		})
	}
}
