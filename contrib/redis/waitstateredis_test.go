//go:build unix

package waitstateredis_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go"
	waitstateredis "github.com/waitstate/waitstate-go/contrib/redis"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func TestMain(m *testing.M) {
	redis.SetLogger(quiet{}) // a Redis killed on purpose is not news
	goleak.VerifyTestMain(m)
}

type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}

// snapshotOf is a snapshot holding the two fields a store reads: when its
// answer was received and its policy's version. It has no seal: a store
// orders snapshots, and only the client that loads one verifies it.
func snapshotOf(t testing.TB, received, version int64) []byte {
	t.Helper()
	body := base64.StdEncoding.EncodeToString(fmt.Appendf(nil, `{"policy":{"version":%d}}`, version))
	data := fmt.Appendf(nil, `{"format":"waitstate-snapshot/1","receivedMs":%d,"body":%q}`, received, body)
	info, err := waitstate.ReadSnapshotInfo(data)
	require.NoError(t, err)
	require.Equal(t, waitstate.SnapshotInfo{Received: time.UnixMilli(received), PolicyVersion: version}, info)
	return data
}

// order is what newest-wins compares of a snapshot.
type order struct{ received, version int64 }

func (o order) less(p order) bool {
	return o.received < p.received || (o.received == p.received && o.version < p.version)
}

func orderOf(t testing.TB, data []byte) order {
	t.Helper()
	info, err := waitstate.ReadSnapshotInfo(data)
	require.NoError(t, err)
	return order{info.Received.UnixMilli(), info.PolicyVersion}
}

func ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestLoadSave(t *testing.T) {
	s := startRedis(t)
	store := waitstateredis.NewStore(s.client(), "waitstate:snapshot:eu")
	data, err := store.Load(ctx(t))
	require.NoError(t, err)
	assert.Nil(t, data, "no snapshot yet is (nil, nil)")

	snap := snapshotOf(t, time.Now().UnixMilli(), 3)
	require.NoError(t, store.Save(ctx(t), snap))
	data, err = store.Load(ctx(t))
	require.NoError(t, err)
	assert.Equal(t, snap, data)

	other := waitstateredis.NewStore(s.client(), "waitstate:snapshot:us")
	data, err = other.Load(ctx(t))
	require.NoError(t, err)
	assert.Nil(t, data, "each key holds its own")

	err = store.Save(ctx(t), []byte("not a snapshot"))
	require.ErrorIs(t, err, waitstate.ErrBadSnapshot, "what the client could not have saved is refused")
	data, err = store.Load(ctx(t))
	require.NoError(t, err)
	assert.Equal(t, snap, data, "and the snapshot held stays")

	assert.Equal(t, `waitstateredis.Store("waitstate:snapshot:eu")`, store.String())
	assert.PanicsWithValue(t, "waitstateredis: NewStore needs a key", func() { waitstateredis.NewStore(s.client(), "") })
	assert.PanicsWithValue(t, "waitstateredis: NewStore needs a Redis client", func() { waitstateredis.NewStore(nil, "k") })
}

// TestNewestWins: Save replaces the snapshot held only with a newer one:
// received later, or in the same millisecond with a higher policy version.
func TestNewestWins(t *testing.T) {
	s := startRedis(t)
	rdb := s.client()
	now := time.Now().UnixMilli()
	const big = 1<<53 + 1 // not a float64: the versions compare exactly
	for _, tc := range []struct {
		name        string
		held, saved order
		replaced    bool
	}{
		{"received later", order{now - 1000, 3}, order{now, 3}, true},
		{"received earlier", order{now, 3}, order{now - 1000, 3}, false},
		{"received later from a restarted control plane, versions from 1 again", order{now - 1000, 9}, order{now, 1}, true},
		{"received earlier with a higher version", order{now, 1}, order{now - 1000, 9}, false},
		{"same millisecond, higher version", order{now, 3}, order{now, 4}, true},
		{"same millisecond, lower version", order{now, 4}, order{now, 3}, false},
		{"the same", order{now, 4}, order{now, 4}, false},
		{"versions beyond float64", order{now, big - 1}, order{now, big}, true},
		{"versions beyond float64, lower", order{now, big}, order{now, big - 1}, false},
		{"held from a clock far ahead", order{now + time.Hour.Milliseconds(), 3}, order{now, 3}, true},
		{"held from a clock a little ahead", order{now + time.Minute.Milliseconds(), 3}, order{now, 3}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := waitstateredis.NewStore(rdb, "k:"+tc.name)
			held, saved := snapshotOf(t, tc.held.received, tc.held.version), snapshotOf(t, tc.saved.received, tc.saved.version)
			require.NoError(t, store.Save(ctx(t), held))
			require.NoError(t, store.Save(ctx(t), saved), "keeping the newer one is not an error")
			data, err := store.Load(ctx(t))
			require.NoError(t, err)
			if tc.replaced {
				assert.Equal(t, saved, data)
			} else {
				assert.Equal(t, held, data)
			}
		})
	}

	// What is held but is not a number of the store's loses to any snapshot.
	store := waitstateredis.NewStore(rdb, "k:garbled")
	snap := snapshotOf(t, now, 1)
	for _, fields := range [][]string{
		{"snapshot", "x", "receivedMs", "soon", "version", "1"},
		{"snapshot", "x", "receivedMs", "1e99", "version", "1"},
		{"snapshot", "x", "receivedMs", "0099999999999999", "version", "1"},
		{"snapshot", "x", "receivedMs", "-1", "version", "1"},
		{"snapshot", "x", "version", "1"},
		{"snapshot", "x", "receivedMs", "1", "version", "one"},
	} {
		require.NoError(t, rdb.Del(ctx(t), "k:garbled").Err())
		require.NoError(t, rdb.HSet(ctx(t), "k:garbled", fields).Err())
		require.NoError(t, store.Save(ctx(t), snap))
		data, err := store.Load(ctx(t))
		require.NoError(t, err)
		assert.Equal(t, snap, data, "held: %q", fields)
	}
}

// TestNewestWinsOutOfOrder: two instances save the same answers, each in
// another order, for 1,000 rounds, while a third reads: what is held never
// goes back to an older answer, and after each round it is the newest.
func TestNewestWinsOutOfOrder(t *testing.T) {
	s := startRedis(t)
	const key, rounds = "waitstate:snapshot", 1000
	a, b := waitstateredis.NewStore(s.client(), key), waitstateredis.NewStore(s.client(), key)
	reader := waitstateredis.NewStore(s.client(), key)
	base := time.Now().Add(-time.Hour).UnixMilli()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads int
	var readErr error
	wg.Add(1)
	go func() { // the reader: never an older answer than it saw before
		defer wg.Done()
		var last order
		for {
			select {
			case <-stop:
				return
			default:
			}
			data, err := reader.Load(context.Background())
			if err != nil {
				readErr = err
				return
			}
			if data == nil {
				continue
			}
			info, err := waitstate.ReadSnapshotInfo(data)
			if err != nil {
				readErr = err
				return
			}
			o := order{info.Received.UnixMilli(), info.PolicyVersion}
			if o.less(last) {
				readErr = fmt.Errorf("read %v after %v", o, last)
				return
			}
			last = o
			reads++
		}
	}()

	var newest order
	for i := range rounds {
		// Two answers a round, received in the same millisecond every other
		// round, so that the version breaks the tie; the older one is a
		// late save of an answer from some rounds ago.
		newer := order{base + int64(i/2)*10, int64(i)}
		older := order{base + int64(max(i-3, 0)/2)*10, int64(max(i-3, 0))}
		snaps := [][]byte{snapshotOf(t, older.received, older.version), snapshotOf(t, newer.received, newer.version)}
		errs := make(chan error, 4)
		var round sync.WaitGroup
		for _, save := range []func(){
			func() { errs <- a.Save(context.Background(), snaps[0]); errs <- a.Save(context.Background(), snaps[1]) },
			func() { errs <- b.Save(context.Background(), snaps[1]); errs <- b.Save(context.Background(), snaps[0]) },
		} {
			round.Add(1)
			go func() { defer round.Done(); save() }()
		}
		round.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		data, err := reader.Load(ctx(t))
		require.NoError(t, err)
		got := orderOf(t, data)
		require.Equal(t, newer, got, "round %d", i)
		require.False(t, got.less(newest), "round %d went back", i)
		newest = got
	}
	close(stop)
	wg.Wait()
	require.NoError(t, readErr)
	t.Logf("%d rounds of 4 saves out of order, %d concurrent reads, none went back", rounds, reads)
}

// logBuffer is an io.Writer for a slog handler, safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newClient is a client of srv with store, whose log goes to the returned
// buffer; it is closed when the test ends.
func newClient(t *testing.T, srv *waitstatetest.Server, store waitstate.PolicyStore, instance string) (*waitstate.Client, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	opts := srv.Options()
	opts.InstanceID = instance
	opts.PolicyStore = store
	opts.SafeMode = waitstate.SafeModeLocalRules
	opts.PulseInterval, opts.SyncInterval = 200*time.Millisecond, 200*time.Millisecond
	opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, err := waitstate.New(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c, logs
}

// storeFailsQuietly: a client whose store failed to load starts as it
// would without one, counts the failure and logs it, and Gate answers.
func storeFailsQuietly(t *testing.T, store waitstate.PolicyStore, why string) {
	t.Helper()
	srv := waitstatetest.NewTestServer(t)
	srv.SetFaults(waitstatetest.Faults{Down: true}) // no policy: what the store does shows
	c, logs := newClient(t, srv, store, "i-1")
	st := c.Stats()
	assert.EqualValues(t, 1, st.StoreErrors)
	assert.False(t, st.Restored)
	assert.Equal(t, waitstate.ModeFailOpen, st.Mode)
	assert.True(t, c.Gate("free", 1).Allowed)
	assert.Contains(t, logs.String(), "the policy store failed to load")
	assert.Contains(t, logs.String(), why)
}

// TestStalledRedis: against a Redis that answers nothing (a paused
// process), Load and Save return at their context's deadline, and New
// returns without it.
func TestStalledRedis(t *testing.T) {
	s := startRedis(t)
	for _, tc := range []struct {
		name string
		opts redis.Options
	}{
		{"ContextTimeoutEnabled", redis.Options{ContextTimeoutEnabled: true}},
		{"the client's defaults", redis.Options{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			opts.Addr = s.addr
			rdb := redis.NewClient(&opts)
			defer rdb.Close()
			store := waitstateredis.NewStore(rdb, "waitstate:snapshot")
			require.NoError(t, rdb.Ping(ctx(t)).Err()) // a connection in the pool, then the stall
			s.pause()
			defer s.resume()

			short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			_, err := store.Load(short)
			assert.ErrorIs(t, err, context.DeadlineExceeded)
			err = store.Save(short, snapshotOf(t, time.Now().UnixMilli(), 1))
			assert.ErrorIs(t, err, context.DeadlineExceeded)

			storeFailsQuietly(t, store, "deadline exceeded") // New returned while Redis is still paused
			s.resume()
			require.NoError(t, rdb.Ping(ctx(t)).Err(), "Redis answers again")
		})
	}
}

// TestRedisDown: a Redis that is not there fails Load, and New goes on.
func TestRedisDown(t *testing.T) {
	s := startRedis(t)
	rdb := s.client()
	s.kill()
	store := waitstateredis.NewStore(rdb, "waitstate:snapshot")
	_, err := store.Load(ctx(t))
	assert.ErrorContains(t, err, "connection refused")
	assert.ErrorContains(t, store.Save(ctx(t), snapshotOf(t, time.Now().UnixMilli(), 1)), "connection refused")
	// go-redis dials again a few times with a backoff, past New's second:
	// the client stops waiting.
	storeFailsQuietly(t, store, "waitstate: the policy store failed to load")
}

// TestRedisAnswersGarbage: a peer that does not speak Redis, a key of
// another type, and a snapshot too large are errors of the store; a
// snapshot that is not one is the client's to refuse.
func TestRedisAnswersGarbage(t *testing.T) {
	t.Run("a peer that is not Redis", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		var wg sync.WaitGroup
		defer wg.Wait()
		defer l.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				conn, err := l.Accept()
				if err != nil {
					return
				}
				_, _ = conn.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
				_ = conn.Close()
			}
		}()
		rdb := redis.NewClient(&redis.Options{Addr: l.Addr().String(), ContextTimeoutEnabled: true, MaxRetries: -1})
		defer rdb.Close()
		store := waitstateredis.NewStore(rdb, "waitstate:snapshot")
		_, err = store.Load(ctx(t))
		require.Error(t, err)
		storeFailsQuietly(t, store, "waitstateredis: load")
	})

	s := startRedis(t)
	rdb := s.client()
	t.Run("a key of another type", func(t *testing.T) {
		require.NoError(t, rdb.Set(ctx(t), "a-string", "hello", 0).Err())
		store := waitstateredis.NewStore(rdb, "a-string")
		assert.ErrorContains(t, store.Save(ctx(t), snapshotOf(t, time.Now().UnixMilli(), 1)), "WRONGTYPE")
		storeFailsQuietly(t, store, "WRONGTYPE")
	})
	t.Run("a snapshot too large", func(t *testing.T) {
		require.NoError(t, rdb.HSet(ctx(t), "large", "snapshot", strings.Repeat("x", waitstate.MaxSnapshotBytes+1)).Err())
		store := waitstateredis.NewStore(rdb, "large")
		_, err := store.Load(ctx(t))
		assert.ErrorContains(t, err, "larger than waitstate.MaxSnapshotBytes")
		storeFailsQuietly(t, store, "larger than waitstate.MaxSnapshotBytes")
	})
	t.Run("a snapshot that is not one", func(t *testing.T) {
		require.NoError(t, rdb.HSet(ctx(t), "junk", "snapshot", "junk").Err())
		srv := waitstatetest.NewTestServer(t)
		srv.SetFaults(waitstatetest.Faults{Down: true})
		c, logs := newClient(t, srv, waitstateredis.NewStore(rdb, "junk"), "i-1")
		assert.Zero(t, c.Stats().StoreErrors, "Redis did its part")
		assert.False(t, c.Stats().Restored)
		assert.Contains(t, logs.String(), "snapshot is ignored")
	})
}

// decisions is how c answers one call of each tag.
func decisions(c *waitstate.Client) map[string]waitstate.Reason {
	d := make(map[string]waitstate.Reason)
	for _, tag := range []string{"free", "bulk", "pro", "enterprise"} {
		d[tag] = c.Gate(tag, 1).Reason
	}
	return d
}

// TestFleetScalesOutDuringOutage: instance A saves the control plane's
// policy v7 and rules to Redis; the control plane goes down; instance B,
// new, starts from the same store and enforces v7 from its first Gate,
// then runs the rules on its own samples once its lease runs out. When
// Redis dies too, both gate as before; when the control plane returns,
// both follow it, and their failed saves only count.
func TestFleetScalesOutDuringOutage(t *testing.T) {
	s := startRedis(t)
	srv := waitstatetest.NewTestServer(t)
	srv.SetLeaseTTL(time.Second)
	srv.SetRuleWindow(time.Second)
	srv.SetPolicy("", &waitstate.Policy{Version: 7, GlobalMaxWeight: 1e6, TagMaxWeights: map[string]float64{"bulk": 0}})
	require.NoError(t, srv.SetRules("", waitstatetest.Rule{Name: "protect-enterprise", MetricTag: "enterprise",
		Metric: waitstatetest.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "free",
		Action: waitstatetest.ActionBlock, CooldownSeconds: 3600}))
	const key = "waitstate:snapshot"

	a, _ := newClient(t, srv, waitstateredis.NewStore(s.client(), key), "instance-a")
	require.NoError(t, waitstatetest.WaitForPolicy(ctx(t), a, 7))
	require.Len(t, a.Rules(), 1)
	reader := waitstateredis.NewStore(s.client(), key)
	require.Eventually(t, func() bool {
		data, err := reader.Load(ctx(t))
		return err == nil && data != nil && orderOf(t, data).version == 7
	}, 15*time.Second, 10*time.Millisecond, "A saves v7 to Redis")

	srv.SetFaults(waitstatetest.Faults{Down: true})
	b, logs := newClient(t, srv, waitstateredis.NewStore(s.client(), key), "instance-b")
	first := decisions(b)
	assert.Equal(t, map[string]waitstate.Reason{"free": waitstate.ReasonAllowed, "bulk": waitstate.ReasonTagMaxWeight,
		"pro": waitstate.ReasonAllowed, "enterprise": waitstate.ReasonAllowed}, first, "B enforces v7 from its first Gate")
	st := b.Stats()
	assert.True(t, st.Restored)
	assert.EqualValues(t, 7, st.PolicyVersion)
	assert.Equal(t, waitstate.ModeEnforcing, st.Mode)
	assert.Zero(t, st.StoreErrors)
	require.Len(t, b.Rules(), 1, "and holds the rules")
	assert.Contains(t, logs.String(), "policy restored from the policy store")

	// Enterprise slows down on both; B's lease from New runs out, and each
	// instance fires the rule on its own samples.
	stop := make(chan struct{})
	var traffic sync.WaitGroup
	for _, c := range []*waitstate.Client{a, b} {
		traffic.Add(1)
		go func() {
			defer traffic.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				c.ObserveTag("enterprise", 500*time.Millisecond, false)
			}
		}()
	}
	defer func() { close(stop); traffic.Wait() }()
	for name, c := range map[string]*waitstate.Client{"A": a, "B": b} {
		require.Eventually(t, func() bool {
			st := c.Stats()
			return st.Mode == waitstate.ModeSafeMode && len(st.LocalRulesFired) == 1 && !c.Gate("free", 1).Allowed
		}, 30*time.Second, 10*time.Millisecond, "%s runs the rule itself in safe mode", name)
	}
	before := map[string]map[string]waitstate.Reason{"A": decisions(a), "B": decisions(b)}
	assert.Equal(t, waitstate.ReasonThrottled, before["B"]["free"], "free blocked by the fired rule")
	assert.Equal(t, waitstate.ReasonTagMaxWeight, before["B"]["bulk"], "bulk by v7")
	assert.Equal(t, waitstate.ReasonAllowed, before["B"]["enterprise"])
	assert.Equal(t, before["A"], before["B"])

	s.kill()
	failed := b.Stats().PulsesFailed
	require.Eventually(t, func() bool { return b.Stats().PulsesFailed >= failed+5 }, 30*time.Second, 10*time.Millisecond)
	assert.Equal(t, before, map[string]map[string]waitstate.Reason{"A": decisions(a), "B": decisions(b)},
		"with Redis dead too, both gate as before")
	assert.NotContains(t, b.Stats().Decisions, waitstate.ReasonFailOpen, "B never failed open")

	srv.SetPolicy("", &waitstate.Policy{Version: 8, GlobalMaxWeight: 1e6})
	srv.Heal()
	for name, c := range map[string]*waitstate.Client{"A": a, "B": b} {
		var st waitstate.Stats
		require.Eventually(t, func() bool {
			st = c.Stats()
			return st.Mode == waitstate.ModeEnforcing && st.PolicyVersion >= 8 && st.StoreErrors > 0
		}, 30*time.Second, 10*time.Millisecond, "%s follows the control plane back (v8, or later once its rules fire there); its save to the dead Redis is counted: %+v", name, &st)
		assert.True(t, c.Gate("bulk", 1).Allowed, "%s enforces v8", name)
		assert.False(t, c.Stats().Restored)
	}
	assert.NotContains(t, b.Stats().Decisions, waitstate.ReasonFailOpen)
}
