package waitstate

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

func TestMain(m *testing.M) {
	if keys := os.Getenv(childPlaneEnv); keys != "" {
		serveChildPlane(keys) // this process is a control plane for another test
		return
	}
	goleak.VerifyTestMain(m)
}

// childPlaneEnv makes the test binary serve a control plane instead of
// running tests: a test that measures the client alone runs the control
// plane in another process, so that its allocations and CPU are not counted.
const childPlaneEnv = "WAITSTATE_TEST_CHILD_PLANE"

// serveChildPlane serves a control plane for the key pair "publish:secret",
// prints its URL, and exits when standard input closes.
func serveChildPlane(keys string) {
	pub, secret, _ := strings.Cut(keys, ":")
	cp := controlplane.New()
	cp.AddKey(pub, secret)
	cp.SetLogLimit(0)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	fmt.Println(cp.URL)
	_, _ = io.Copy(io.Discard, os.Stdin)
	cp.Close()
}

// Test keys. The secret is long and distinctive so that a leak into a log
// or an error is easy to find.
const (
	testPublishKey = "pk_test_5f1c"
	testSecretKey  = "sk_test_SECRET_e3b0c44298fc1c149afbf4c8996fb924"
)

// Generous bounds for polling: the machine is a loaded 2-core box.
const (
	waitFor = 15 * time.Second
	tick    = 2 * time.Millisecond
)

// newPlane starts a control plane that knows the test keys and closes it
// when the test ends. Its leases last a minute, so that a loaded machine
// cannot run one out in the middle of a test that counts decisions; a test
// of expiry sets its own.
func newPlane(t testing.TB) *controlplane.Server {
	t.Helper()
	cp := controlplane.New()
	cp.AddKey(testPublishKey, testSecretKey)
	cp.SetLeaseTTL(time.Minute)
	t.Cleanup(cp.Close)
	return cp
}

// logBuffer collects everything a client logs, for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// testOptions are Options for cp with short intervals.
func testOptions(cp *controlplane.Server) Options {
	return Options{
		PublishKey:    testPublishKey,
		SecretKey:     testSecretKey,
		BaseURL:       cp.URL,
		PulseInterval: MinInterval,
		SyncInterval:  MinInterval,
	}
}

// startClient starts a client with opts and shuts it down when the test
// ends (before the control plane closes). Its log is returned.
func startClient(t testing.TB, opts Options) (*Client, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	c, err := New(opts)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		_ = c.Shutdown(ctx)
	})
	return c, logs
}

// eventually polls cond until it holds, failing the test after waitFor.
func eventually(t testing.TB, cond func() bool, msg string, args ...any) {
	t.Helper()
	require.Eventually(t, cond, waitFor, tick, append([]any{msg}, args...)...)
}

// waitReady waits until c has applied a policy.
func waitReady(t testing.TB, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Ready(ctx))
}

// idleClient is a client whose background goroutines are stopped, so that
// a test drives its state by hand: policy p applied (enforcing) unless nil
// (fail-open). clock is its monotonic clock; nil is the real one.
func idleClient(tb testing.TB, clock func() time.Duration, p *Policy) *Client {
	tb.Helper()
	return idleClientWall(tb, clock, time.Now, p)
}

// idleClientWall is idleClient with a wall clock of the test's too.
func idleClientWall(tb testing.TB, clock func() time.Duration, wall func() time.Time, p *Policy) *Client {
	tb.Helper()
	return idleClientOpts(tb, Options{}, clock, wall, p)
}

// idleClientOpts is idleClientWall with opts (its keys and BaseURL are set
// here).
func idleClientOpts(tb testing.TB, opts Options, clock func() time.Duration, wall func() time.Time, p *Policy) *Client {
	tb.Helper()
	if clock == nil {
		start := time.Now()
		clock = func() time.Duration { return time.Since(start) }
	}
	if wall == nil {
		wall = time.Now
	}
	opts.PublishKey, opts.SecretKey, opts.BaseURL = "pk", testSecretKey, "http://127.0.0.1:1"
	c, err := newClient(opts, clock, wall)
	require.NoError(tb, err)
	c.cancel()
	require.NoError(tb, c.group.Wait())
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		_ = c.Shutdown(ctx) // nothing listens: the flush fails at once
	})
	if p != nil {
		c.applyLease(leaseAnswer{policy: p, ttl: time.Hour}, false, 0)
	}
	return c
}

// newDiscardLogger is a *log.Logger that writes nowhere, for servers whose
// recovered panics are expected.
func newDiscardLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// sprintf is fmt.Sprintf with a format that is not a constant, for tests
// that try every verb.
func sprintf(format string, v any) string { return fmt.Sprintf(format, v) }

// newTestLogger logs to w as text, or as JSON.
func newTestLogger(w io.Writer, asJSON bool) *slog.Logger {
	if asJSON {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}
