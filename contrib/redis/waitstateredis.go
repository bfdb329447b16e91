// Package waitstateredis keeps a waitstate.Client's last verified answer
// from the control plane in Redis, where a whole fleet shares it: every
// instance that receives an answer saves it, and an instance started while
// the control plane is away — the new pods an autoscaler adds in an
// incident — starts with the fleet's last policy and rules instead of
// failing open.
//
//	rdb := redis.NewClient(&redis.Options{Addr: "redis:6379", ContextTimeoutEnabled: true})
//	opts.PolicyStore = waitstateredis.NewStore(rdb, "waitstate:snapshot:"+opts.SiteID)
//
// For one process, waitstate.FileStore needs no server. The Redis store
// adds the fleet: a new instance knows what the others were told.
//
// # Newest wins
//
// Many instances save the same answers, and a slow one may save an older
// answer after a newer one. Save replaces the snapshot held only with a
// newer one, compared in Redis by a script so that two instances never
// interleave a read and a write: newer means received later by the
// instance that saved it, and, received in the same millisecond, a higher
// policy version. The receipt time comes first because the control plane's
// policy versions are not a clock the fleet can rely on: a control plane
// restarted from scratch numbers its policies from 1 again, and its answers
// must still replace the ones of the process it replaced. Receipt times
// come from the instances' wall clocks, so the order is as good as their
// clocks agree; a snapshot held that was received more than five minutes
// after Redis's own clock (TIME) — one no client would restore — is
// replaced by any save.
//
// # Never in the way
//
// Load and Save return once their context is done, whatever the client's
// settings, and the waitstate client bounds both (Load in waitstate.New by
// one second): a Redis that is down, stalled or answers garbage shows in
// Stats().StoreErrors and the log, never in Gate. go-redis applies a
// context's deadline to the connection itself only with
// redis.Options.ContextTimeoutEnabled; without it a stalled call returns
// at its deadline but holds its connection, and a goroutine, until the
// client's ReadTimeout.
//
// The snapshot is sealed by the client with its SecretKey: Redis holds no
// secret, and a snapshot tampered with in Redis, or written for another
// key or site, is refused by the client that loads it. Give each site its
// own key. The Lua scripts need Redis 5 or later (or a server with Lua
// scripting and the same commands); the key is one hash, so a cluster
// serves it from one slot.
package waitstateredis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/waitstate/waitstate-go"
)

// maxAhead is how far in the future of Redis's clock a held snapshot's
// receipt time may be and still be kept against older saves: the clock
// skew the waitstate client tolerates when it restores one.
const maxAhead = 5 * time.Minute

// The hash's fields.
const (
	fieldSnapshot = "snapshot"
	fieldReceived = "receivedMs" // Unix milliseconds, in decimal
	fieldVersion  = "version"    // the policy's version, in decimal
)

// saveScript replaces the hash's snapshot when ARGV's is newer; it returns
// 1 when it did, 0 when the one held is as new or newer. Both numbers are
// compared as decimal strings, exact for any int64 (Lua's numbers are
// float64), and a held field that is not a decimal number, or a held
// receipt time too far in the future, loses to any snapshot.
//
// KEYS[1] is the hash; ARGV is the snapshot, its receipt time, its policy
// version and maxAhead in milliseconds.
var saveScript = redis.NewScript(`
local function decimal(s) return s and (s == '0' or string.match(s, '^[1-9][0-9]*$') ~= nil) end
local function less(a, b) if #a ~= #b then return #a < #b end return a < b end
local held = redis.call('HMGET', KEYS[1], '` + fieldReceived + `', '` + fieldVersion + `')
local r, v = held[1], held[2]
if decimal(r) and decimal(v) then
	local t = redis.call('TIME')
	local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
	if tonumber(r) <= now + tonumber(ARGV[4]) and
		(less(ARGV[2], r) or (ARGV[2] == r and not less(v, ARGV[3]))) then
		return 0
	end
end
redis.call('HSET', KEYS[1], '` + fieldSnapshot + `', ARGV[1], '` + fieldReceived + `', ARGV[2], '` + fieldVersion + `', ARGV[3])
return 1
`)

// loadScript returns the hash's snapshot, nil when it has none, or an
// error when it is larger than ARGV[1] bytes, without sending it.
var loadScript = redis.NewScript(`
if redis.call('HSTRLEN', KEYS[1], '` + fieldSnapshot + `') > tonumber(ARGV[1]) then
	return redis.error_reply('the snapshot held is larger than waitstate.MaxSnapshotBytes')
end
return redis.call('HGET', KEYS[1], '` + fieldSnapshot + `')
`)

// Store is the waitstate.PolicyStore NewStore returns.
type Store struct {
	client redis.UniversalClient
	key    string
}

var _ waitstate.PolicyStore = (*Store)(nil)

// NewStore returns a waitstate.PolicyStore that keeps the snapshot in the
// Redis hash at key, through client: a single node, a sentinel-managed
// primary or a cluster. Instances that share a key share one snapshot,
// the newest any of them saved; use one key per site. NewStore panics when
// client is nil or key is empty, as for any other misuse at startup.
func NewStore(client redis.UniversalClient, key string) *Store {
	if client == nil {
		panic("waitstateredis: NewStore needs a Redis client")
	}
	if key == "" {
		panic("waitstateredis: NewStore needs a key")
	}
	return &Store{client: client, key: key}
}

// String names the store by its key.
func (s *Store) String() string { return fmt.Sprintf("waitstateredis.Store(%q)", s.key) }

// Load returns the snapshot held, or (nil, nil) when there is none.
func (s *Store) Load(ctx context.Context) ([]byte, error) {
	data, err := withContext(ctx, func(ctx context.Context) ([]byte, error) {
		data, err := loadScript.Run(ctx, s.client, []string{s.key}, waitstate.MaxSnapshotBytes).Text()
		if errors.Is(err, redis.Nil) {
			return nil, nil
		}
		return []byte(data), err
	})
	if err != nil {
		return nil, fmt.Errorf("waitstateredis: load %q: %w", s.key, err)
	}
	return data, nil
}

// Save replaces the snapshot held with snapshot when snapshot is newer: see
// the package documentation. Keeping a newer one is not an error. A
// snapshot that waitstate.ReadSnapshotInfo cannot read is refused.
func (s *Store) Save(ctx context.Context, snapshot []byte) error {
	info, err := waitstate.ReadSnapshotInfo(snapshot)
	if err == nil {
		_, err = withContext(ctx, func(ctx context.Context) (int64, error) {
			return saveScript.Run(ctx, s.client, []string{s.key}, snapshot,
				strconv.FormatInt(info.Received.UnixMilli(), 10), strconv.FormatInt(info.PolicyVersion, 10),
				maxAhead.Milliseconds()).Int64()
		})
	}
	if err != nil {
		return fmt.Errorf("waitstateredis: save %q: %w", s.key, err)
	}
	return nil
}

// withContext returns f's result, or ctx's error once ctx is done, whichever
// comes first: a call that go-redis does not cut at the deadline finishes
// on its own goroutine.
func withContext[T any](ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f(ctx)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}
