//go:build unix

package waitstateredis_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
)

// requireRedis, set by .ci/run, turns the skip of a machine without
// redis-server into a failure, so that CI always runs these tests.
const requireRedis = "WAITSTATE_REQUIRE_REDIS"

// redisServer is a real redis-server the test started on a free loopback
// port, in a temporary directory, with persistence off. It is killed when
// the test ends.
type redisServer struct {
	t    testing.TB
	addr string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited
}

// startRedis starts a redis-server for t, or skips t when the binary is
// missing (and requireRedis is not set).
func startRedis(t testing.TB) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv(requireRedis) != "" {
			t.Fatalf("redis-server is not installed, and %s is set", requireRedis)
		}
		t.Skip("redis-server is not installed: these tests run against a real one (apt-get install -y redis-server)")
	}
	// A free port can be taken by another process between its release here
	// and redis-server's bind: try again on another one.
	for try := 0; ; try++ {
		s, err := tryStartRedis(t, bin)
		if err == nil {
			return s
		}
		if try == 4 {
			t.Fatalf("redis-server did not start: %v", err)
		}
	}
}

func tryStartRedis(t testing.TB, bin string) (*redisServer, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	dir := t.TempDir()
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", filepath.Join(dir, "redis.log"))
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &redisServer{t: t, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(s.done) }()
	t.Cleanup(s.kill)

	rdb := redis.NewClient(&redis.Options{Addr: s.addr, MaxRetries: -1})
	defer rdb.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := rdb.Ping(ctx).Err()
		cancel()
		if err == nil {
			return s, nil
		}
		select {
		case <-s.done:
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			return nil, fmt.Errorf("it exited: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			s.kill()
			return nil, errors.New("no answer to PING within 30 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// client is a go-redis client of s that applies contexts' deadlines to
// its connections, closed when the test ends.
func (s *redisServer) client() *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: s.addr, ContextTimeoutEnabled: true})
	s.t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// pause stops the process (SIGSTOP): it keeps its connections and answers
// nothing, as a Redis stalled by a long command or a host that froze.
func (s *redisServer) pause() { require.NoError(s.t, s.cmd.Process.Signal(syscall.SIGSTOP)) }

// resume continues a paused process.
func (s *redisServer) resume() { require.NoError(s.t, s.cmd.Process.Signal(syscall.SIGCONT)) }

// kill ends the process, paused or not, and waits for it.
func (s *redisServer) kill() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.cmd.Process.Kill()
	<-s.done
}
