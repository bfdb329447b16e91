package waitstate

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

func TestMiddleware(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	opts := testOptions(cp)
	opts.PulseInterval = time.Hour // one window: the final pulse holds every sample
	c, _ := startClient(t, opts)
	waitReady(t, c)

	mw := c.HTTPMiddleware(MiddlewareOptions{
		Tag: func(r *http.Request) string { return r.Header.Get("X-Plan") },
		Weight: func(r *http.Request) float64 {
			w, _ := strconv.ParseFloat(r.URL.Query().Get("w"), 64)
			return w
		},
	})
	var seen GateResult
	h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ok bool
		seen, ok = ResultFromContext(r.Context())
		require.True(t, ok)
		switch r.URL.Path {
		case "/boom":
			panic("handler bug")
		case "/fail":
			w.WriteHeader(http.StatusBadGateway)
		default:
			_, _ = io.WriteString(w, "ok")
		}
	}))
	serve := func(plan, target string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, target, nil)
		req.Header.Set("X-Plan", plan)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}

	rec := serve("pro", "/?w=5")
	assert.Equal(t, http.StatusOK, rec.Code)
	assert.Equal(t, "ok", rec.Body.String())
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 5}, seen)

	rec = serve("free", "/?w=1")
	assert.Equal(t, http.StatusTooManyRequests, rec.Code)
	assert.Equal(t, "3600", rec.Header().Get("Retry-After"), "a policy denial waits a pulse interval")
	assert.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	assert.JSONEq(t, `{"error":"rate_limited","reason":"tag_max_weight"}`, rec.Body.String())

	rec = serve("pro", "/?w=6")
	assert.JSONEq(t, `{"error":"rate_limited","reason":"global_max_weight"}`, rec.Body.String())

	rec = serve("pro", "/fail?w=1")
	assert.Equal(t, http.StatusBadGateway, rec.Code)

	assert.PanicsWithValue(t, "handler bug", func() { serve("pro", "/boom?w=1") }, "a panic is re-raised")

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Shutdown(ctx))
	p := cp.Pulses()
	require.Len(t, p, 1)
	assert.EqualValues(t, 3, p[0].UsageDelta)
	assert.EqualValues(t, 2, p[0].BouncedDelta)
	require.NotNil(t, p[0].Health)
	assert.EqualValues(t, 3, p[0].Health.Requests, "a served request is a sample; a denied one is not")
	assert.EqualValues(t, 2, p[0].Health.Errors, "5xx and panic are failures")
}

func TestMiddlewareDefaultsAndDeniedHandler(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 0.5, TagMaxWeights: map[string]float64{"": 2}})
	var denied GateResult
	mw := c.HTTPMiddleware(MiddlewareOptions{
		Weight: func(*http.Request) float64 { return 3 },
		Denied: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			denied, _ = ResultFromContext(r.Context())
			w.WriteHeader(http.StatusServiceUnavailable)
		}),
	})
	rec := httptest.NewRecorder()
	mw(http.NotFoundHandler()).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	assert.Equal(t, http.StatusServiceUnavailable, rec.Code)
	assert.Equal(t, GateResult{false, false, ReasonTagMaxWeight, 2}, denied, "a nil Tag is the tag \"\"")

	rec = httptest.NewRecorder()
	c.HTTPMiddleware(MiddlewareOptions{})(http.NotFoundHandler()).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	assert.Equal(t, http.StatusNotFound, rec.Code, "a nil Weight is 1: allowed under the tag's limit of 2")

	_, ok := ResultFromContext(context.Background())
	assert.False(t, ok)
}

func TestDenyRetryAfter(t *testing.T) {
	c := idleClient(t, nil, nil)
	c.pulseEvery.Store(int64(2500 * time.Millisecond)) // the interval in force, as a control plane may set it
	for reason, want := range map[Reason]string{
		ReasonSafeModeLimit:   "1",
		ReasonThrottled:       "3",
		ReasonTagMaxWeight:    "3",
		ReasonGlobalMaxWeight: "3",
	} {
		rec := httptest.NewRecorder()
		c.deny(rec, GateResult{Reason: reason})
		assert.Equal(t, want, rec.Header().Get("Retry-After"), reason.String())
		assert.Equal(t, want, c.RetryAfterHeader(GateResult{Reason: reason}), "the helper gives what the middleware sends")
		var body map[string]string
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
		assert.Equal(t, map[string]string{"error": "rate_limited", "reason": reason.String()}, body)
	}
}

func TestRetryAfterHeaderRoundsUp(t *testing.T) {
	c := idleClient(t, nil, nil)
	for every, want := range map[time.Duration]string{
		100 * time.Millisecond:  "1", // at least 1
		time.Second:             "1",
		1001 * time.Millisecond: "2",
		20 * time.Second:        "20",
	} {
		c.pulseEvery.Store(int64(every))
		assert.Equal(t, want, c.RetryAfterHeader(GateResult{Reason: ReasonThrottled}), every.String())
	}
}

func TestMiddlewareKeepsFlusher(t *testing.T) {
	c := idleClient(t, nil, nil)
	rec := httptest.NewRecorder()
	c.HTTPMiddleware(MiddlewareOptions{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		require.NoError(t, http.NewResponseController(w).Flush())
		_, isFlusher := w.(http.Flusher)
		assert.True(t, isFlusher)
	})).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	assert.True(t, rec.Flushed)
}
