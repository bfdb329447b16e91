package waitstate

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countingConn counts the bytes a connection carries, both ways.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (c countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestOverheadIdleClient measures what one idle client costs at the default
// intervals: per pulse and per sync, the bytes on the wire (both ways,
// headers included), the allocations and the CPU of the client alone (the
// control plane runs in another process), and from them an hour's worth:
// 180 pulses, 120 syncs and 2 token refreshes.
func TestOverheadIdleClient(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a second process")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childPlaneEnv+"="+testPublishKey+":"+testSecretKey)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	url, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err)

	var wire atomic.Int64
	dialer := &net.Dialer{}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{conn, &wire}, nil
	}
	defer transport.CloseIdleConnections()
	start := time.Now()
	c, err := newClient(Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: strings.TrimSpace(url),
		HTTPClient: &http.Client{Transport: transport}}, func() time.Duration { return time.Since(start) }, time.Now)
	require.NoError(t, err)
	c.cancel() // drive the loops' work by hand
	require.NoError(t, c.group.Wait())
	ctx := context.Background()
	st := &syncState{}
	require.NoError(t, c.syncOnce(ctx, st)) // token and first policy; connection opened
	require.NoError(t, c.pulseTick(ctx))

	measure := func(n int, f func()) (bytes float64, allocs float64, cpu time.Duration) {
		w0, c0 := wire.Load(), processCPU()
		allocs = testing.AllocsPerRun(n, f) // runs f n+1 times
		return float64(wire.Load()-w0) / float64(n+1), allocs, (processCPU() - c0) / time.Duration(n+1)
	}
	pulseBytes, pulseAllocs, pulseCPU := measure(200, func() { require.NoError(t, c.pulseTick(ctx)) })
	syncBytes, syncAllocs, syncCPU := measure(200, func() { require.NoError(t, c.syncOnce(ctx, st)) })
	tokenBytes, tokenAllocs, tokenCPU := measure(50, func() {
		st.tok = nil
		require.NoError(t, c.syncOnce(ctx, st))
	})
	tokenBytes, tokenAllocs, tokenCPU = tokenBytes-syncBytes, tokenAllocs-syncAllocs, tokenCPU-syncCPU

	// A pulse with traffic: 10 tags, then 1,000 tags in its window.
	tagged := func(tags int) (wireBytes, body int) {
		for i := range tags {
			c.Gate("tenant-"+strconv.Itoa(i), float64(i%8))
		}
		w0 := wire.Load()
		c.pending = c.cut(false)
		body = len(c.pending.body)
		_, err := c.sendPulse(ctx, c.pending)
		require.NoError(t, err)
		c.pending = nil
		return int(wire.Load() - w0), body
	}
	w10, b10 := tagged(10)
	w1000, b1000 := tagged(1000)
	t.Logf("pulse with 10 tags: %d bytes on the wire (body %d); with 1,000 tags: %d bytes (body %d)", w10, b10, w1000, b1000)

	perHour := func(p, s, tok float64) float64 { return 180*p + 120*s + 2*tok }
	t.Logf("per pulse: %.0f bytes on the wire, %.0f allocations, %v CPU", pulseBytes, pulseAllocs, pulseCPU)
	t.Logf("per sync:  %.0f bytes on the wire, %.0f allocations, %v CPU", syncBytes, syncAllocs, syncCPU)
	t.Logf("per token refresh (on top of a sync): %.0f bytes, %.0f allocations, %v CPU", tokenBytes, tokenAllocs, tokenCPU)
	hourCPU := time.Duration(perHour(float64(pulseCPU), float64(syncCPU), float64(tokenCPU)))
	hourBytes := perHour(pulseBytes, syncBytes, tokenBytes)
	t.Logf("an idle client for an hour at the default intervals: %v CPU, %.0f KiB on the wire, %.0f allocations",
		hourCPU.Round(time.Millisecond), hourBytes/1024, perHour(pulseAllocs, syncAllocs, tokenAllocs))

	assert.Less(t, pulseBytes, 4096.0, "a pulse stays well under a TCP window")
	assert.Less(t, hourCPU, 5*time.Second, "background CPU is negligible")
	assert.Less(t, pulseAllocs, 400.0)
	require.NoError(t, c.Shutdown(ctx))
}
