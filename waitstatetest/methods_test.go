package waitstatetest_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// TestServerPrintsNoSecret: every verb prints the server as String does,
// its URL and publish key, never its secret key.
func TestServerPrintsNoSecret(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	secret := srv.Options().SecretKey
	require.NotEmpty(t, secret)
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		out := fmt.Sprintf(verb, srv)
		assert.NotContains(t, out, secret, verb)
		assert.Equal(t, srv.String(), out, verb)
	}
	assert.Contains(t, srv.String(), srv.URL)
	assert.Contains(t, srv.String(), "[REDACTED]")
}

// TestServerAddKeyAndRequests: a client of another key pair is served,
// its counts kept apart from those of Options' key, and Requests lists what
// each sent, with the status answered.
func TestServerAddKeyAndRequests(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.AddKey("pk_other", "sk_other_secret")
	opts := srv.Options()
	opts.PublishKey, opts.SecretKey = "pk_other", "sk_other_secret"
	c, err := waitstate.New(opts)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.Ready(ctx))
	c.Gate("free", 1)
	require.NoError(t, c.Shutdown(ctx)) // its last pulse is acknowledged
	assert.Zero(t, srv.Totals("").Usage, "Totals is the books of Options' key")

	pulses := 0
	for _, r := range srv.Requests() {
		require.Equal(t, "pk_other", r.Header.Get("X-WaitState-Key"), "only this client sent requests")
		if r.Method == "POST" && r.Path == "/v1/pulse" && r.Status == 200 {
			pulses++
		}
	}
	assert.Positive(t, pulses)
}

// TestServerSetLeaseTTL: every answer carries the lease set.
func TestServerSetLeaseTTL(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	srv.SetLeaseTTL(time.Hour)
	c := start(t, srv, "")
	eventually(t, func() bool { return c.Stats().LeaseRemaining > 10*time.Minute },
		"an hour's lease, not the default of three sync intervals")
}

// TestServerSetPolicyJSON: a policy served as raw JSON that a client must
// refuse is refused whole; the one in force stays.
func TestServerSetPolicyJSON(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	c := start(t, srv, "")
	srv.SetPolicyJSON("", `{"version": 9, "globalMaxWeight": -1}`)
	eventually(t, func() bool { return c.Stats().PolicyErrors > 0 }, "the bad policy is refused")
	assert.NotEqual(t, int64(9), c.Policy().Version)
	srv.SetPolicyJSON("", `{"version": 10, "globalMaxWeight": 3}`)
	eventually(t, func() bool { return c.Policy().Version == 10 }, "a good one applies")
	assert.False(t, c.Gate("x", 4).Allowed)
}

// TestServerRevokeTokens: once tokens are revoked, a client's next policy
// request is refused and it fetches a new token, staying ready.
func TestServerRevokeTokens(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	c := start(t, srv, "")
	tokens := func() (n int) {
		for _, r := range srv.Requests() {
			if r.Path == "/v1/token" && r.Status == 200 {
				n++
			}
		}
		return n
	}
	eventually(t, func() bool { return tokens() > 0 }, "a first token")
	before := tokens()
	srv.RevokeTokens()
	eventually(t, func() bool { return tokens() > before }, "a new token after the revocation")
	assert.Equal(t, waitstate.ModeEnforcing, c.Mode())
}

// TestServerSetLogger: the server tells its logger what an operator should
// know, here two processes pulsing under one InstanceID.
func TestServerSetLogger(t *testing.T) {
	srv := waitstatetest.NewTestServer(t)
	var logs syncBuffer
	srv.SetLogger(slog.New(slog.NewTextHandler(&logs, nil)))
	for range 2 {
		opts := srv.Options()
		opts.InstanceID = "pod-7"
		c, err := waitstate.New(opts)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
	}
	eventually(t, func() bool { return bytes.Contains(logs.Bytes(), []byte("two processes pulse under one instance ID")) },
		"the shared instance ID is logged")
	assert.Contains(t, string(logs.Bytes()), "instance=pod-7")
}

// syncBuffer is a bytes.Buffer that the server's goroutines can write to
// while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}
