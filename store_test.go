package waitstate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// memStore is a PolicyStore in memory that counts its calls.
type memStore struct {
	mu    sync.Mutex
	data  []byte
	saves int
}

func (s *memStore) Load(context.Context) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.data, nil
}

func (s *memStore) Save(_ context.Context, b []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.data = append([]byte(nil), b...)
	s.saves++
	return nil
}

func (s *memStore) snapshot() ([]byte, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.data, s.saves
}

// funcStore is a PolicyStore made of two functions.
type funcStore struct {
	load func(context.Context) ([]byte, error)
	save func(context.Context, []byte) error
}

func (s funcStore) Load(ctx context.Context) ([]byte, error) { return s.load(ctx) }
func (s funcStore) Save(ctx context.Context, b []byte) error {
	if s.save == nil {
		return nil
	}
	return s.save(ctx, b)
}

func TestFileStore(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.snapshot")
	s := FileStore(path)
	ctx := context.Background()

	data, err := s.Load(ctx)
	require.NoError(t, err, "a missing file is no snapshot, not an error")
	assert.Nil(t, data)

	require.NoError(t, s.Save(ctx, []byte("first")))
	require.NoError(t, s.Save(ctx, []byte("second")))
	data, err = s.Load(ctx)
	require.NoError(t, err)
	assert.Equal(t, "second", string(data))
	info, err := os.Stat(path)
	require.NoError(t, err)
	if runtime.GOOS != "windows" {
		assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file is left behind")

	require.NoError(t, os.WriteFile(path, make([]byte, MaxSnapshotBytes+1), 0o600))
	_, err = s.Load(ctx)
	assert.ErrorContains(t, err, "larger than a snapshot can be")

	// A path that cannot be written: in a missing directory, and under a
	// file. Nothing is left behind.
	for _, bad := range []string{filepath.Join(dir, "missing", "p"), filepath.Join(path, "p")} {
		assert.Error(t, FileStore(bad).Save(ctx, []byte("x")), bad)
	}
	entries, err = os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1)

	canceled, cancel := context.WithCancel(ctx)
	cancel()
	assert.ErrorIs(t, s.Save(canceled, []byte("x")), context.Canceled)
	_, err = s.Load(canceled)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, `FileStore("`+path+`")`, storeShown(s))
}

// TestFileStoreReadOnlyDirectory: a directory the process may not write
// to fails the save and leaves the old snapshot whole.
func TestFileStoreReadOnlyDirectory(t *testing.T) {
	if runtime.GOOS == "windows" || os.Geteuid() == 0 {
		t.Skip("permissions do not bind this user") // TestFileStore covers a path under a file
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "p")
	s := FileStore(path)
	require.NoError(t, s.Save(context.Background(), []byte("kept")))
	require.NoError(t, os.Chmod(dir, 0o500))
	t.Cleanup(func() { _ = os.Chmod(dir, 0o700) })
	assert.Error(t, s.Save(context.Background(), []byte("lost")))
	data, err := s.Load(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "kept", string(data))
}

// restorePlane is a control plane whose site "" blocks free in its base
// policy (version 3), with one rule, and short leases.
func restorePlane(t *testing.T) *controlplane.Server {
	t.Helper()
	cp := newPlane(t)
	cp.SetLeaseTTL(time.Second)
	cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	require.NoError(t, cp.SetRules("", controlplane.Rule{Name: "protect-enterprise", MetricTag: "enterprise",
		Metric: controlplane.MetricLatencyP95, Operator: ">", Threshold: 300, TagName: "pro",
		Action: controlplane.ActionBlock, CooldownSeconds: 5}))
	return cp
}

// TestRestoreDuringOutage: a process restarted with a FileStore while the
// control plane is down enforces the restored policy from its first Gate
// (no fail_open decision at all), with its rules; its lease runs out into
// safe mode with that policy; and the control plane's first policy, back,
// replaces it whatever its version.
func TestRestoreDuringOutage(t *testing.T) {
	cp := restorePlane(t)
	path := filepath.Join(t.TempDir(), "waitstate.snapshot")
	opts := testOptions(cp)
	opts.PulseInterval, opts.SyncInterval = 200*time.Millisecond, 200*time.Millisecond
	opts.SafeMode = SafeModeLocalRules
	opts.PolicyStore = FileStore(path)

	first, _ := startClient(t, opts)
	waitReady(t, first)
	eventually(t, func() bool {
		data, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		a, _, err := first.openSnapshot(data)
		return err == nil && a.policy.Version == 3 && a.reflex != nil
	}, "the policy and its rules saved")
	cp.SetFaults(controlplane.Faults{Down: true})
	_ = first.Close() // its final pulse finds the control plane down

	var applied atomic.Int64
	opts.OnPolicyApplied = func(p *Policy) { applied.Store(p.Version) }
	c, logs := startClient(t, opts) // a new process: another random InstanceID
	free, enterprise := c.Gate("free", 1), c.Gate("enterprise", 1)
	assert.False(t, free.Allowed, "the first Gate after New enforces the restored policy")
	assert.Equal(t, ReasonTagMaxWeight, free.Reason)
	assert.True(t, enterprise.Allowed)
	s := c.Stats()
	assert.NotContains(t, s.Decisions, ReasonFailOpen, "no call failed open")
	assert.True(t, s.Restored)
	assert.Equal(t, ModeEnforcing, s.Mode)
	assert.EqualValues(t, 3, s.PolicyVersion)
	assert.Zero(t, s.StoreErrors)
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	assert.NoError(t, c.Ready(canceled), "Ready returns at once")
	require.Len(t, c.Rules(), 1)
	assert.Equal(t, "protect-enterprise", c.Rules()[0].Name)
	eventually(t, func() bool { return applied.Load() == 3 }, "OnPolicyApplied called with the restored policy")
	assert.Contains(t, logs.String(), "policy restored from the policy store")

	eventually(t, func() bool { return c.Mode() == ModeSafeMode }, "the restored lease runs out")
	assert.False(t, c.Gate("free", 1).Allowed, "safe mode keeps the restored policy")
	assert.True(t, c.Stats().Restored)
	assert.NotContains(t, c.Stats().Decisions, ReasonFailOpen)

	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	cp.SetFaults(controlplane.Faults{})
	eventually(t, func() bool { return c.Mode() == ModeEnforcing && c.Policy().Version == 1 },
		"the control plane's policy replaces the restored one, whatever its version")
	assert.False(t, c.Stats().Restored)
	assert.True(t, c.Gate("free", 1).Allowed)
}

// TestSnapshotSavedOnChange: an answer is saved when it brings another
// policy or other rules, not at every pulse, and what is saved restores.
func TestSnapshotSavedOnChange(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	store := &memStore{}
	opts := testOptions(cp)
	opts.PolicyStore = store
	c, _ := startClient(t, opts)
	waitReady(t, c)
	saves := func() int { _, n := store.snapshot(); return n }
	eventually(t, func() bool { return saves() == 1 }, "the first policy saved")
	sent := c.Stats().PulsesSent
	eventually(t, func() bool { return c.Stats().PulsesSent >= sent+5 }, "five more pulses")
	assert.Equal(t, 1, saves(), "the same policy is not saved again")

	cp.SetPolicy("", controlplane.Policy{Version: 2, GlobalMaxWeight: 5})
	eventually(t, func() bool { return saves() == 2 }, "a new policy saved")
	require.NoError(t, cp.SetRules("", controlplane.Rule{Name: "r", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: controlplane.ActionBlock}))
	eventually(t, func() bool { return saves() == 3 }, "new rules saved")
	sent = c.Stats().PulsesSent
	eventually(t, func() bool { return c.Stats().PulsesSent >= sent+5 }, "five more pulses")
	assert.Equal(t, 3, saves())

	data, _ := store.snapshot()
	a, _, err := c.openSnapshot(data)
	require.NoError(t, err)
	assert.EqualValues(t, 2, a.policy.Version)
	require.NotNil(t, a.reflex)
	assert.Equal(t, "r", a.reflex.rules[0].Name)
	assert.NotContains(t, string(data), testSecretKey)
	assert.Zero(t, c.Stats().StoreErrors)

	// A client restored from it does not save the same answer again when
	// the control plane confirms it.
	c2, logs := startClient(t, opts)
	assert.Contains(t, logs.String(), "policy restored from the policy store", "New restores")
	eventually(t, func() bool { return !c2.Stats().Restored }, "the control plane confirms")
	sent = c2.Stats().PulsesSent
	eventually(t, func() bool { return c2.Stats().PulsesSent >= sent+3 }, "three more pulses")
	assert.Equal(t, 3, saves())
}

// sealed builds a snapshot the way a client with opts would have saved
// one: body signed by the control plane for instance "i-1" and the site
// in opts, received at received.
func sealed(t *testing.T, opts Options, body string, received time.Time) []byte {
	t.Helper()
	opts.InstanceID = "i-1"
	sealer := idleClientOpts(t, opts, nil, nil, nil)
	const path, nonce = "/v1/policy", "0123456789abcdef0123456789abcdef"
	id := wire.Identity{PublishKey: sealer.opts.PublishKey, InstanceID: "i-1", SiteID: sealer.opts.SiteID}
	ans := &signedAnswer{body: []byte(body), path: path, nonce: nonce,
		signature: wire.Sign(sealer.opts.SecretKey, wire.ResponseCanonical(path, nonce, id, []byte(body)))}
	data, err := sealer.sealSnapshot(pendingSave{answer: ans, received: received})
	require.NoError(t, err)
	return data
}

// TestBadSnapshotsIgnored: a snapshot that does not verify for this key
// and site, is too old, or does not parse is logged and ignored: the
// client starts as it would without a store.
func TestBadSnapshotsIgnored(t *testing.T) {
	const body = `{"policy":{"version":7,"globalMaxWeight":10,"tagMaxWeights":{"free":0}},"leaseTtlMs":60000}`
	now := time.Now()
	good := sealed(t, Options{}, body, now.Add(-time.Hour))
	edit := func(f func(s *snapshot)) []byte {
		var s snapshot
		require.NoError(t, json.Unmarshal(good, &s))
		f(&s)
		b, err := json.Marshal(s)
		require.NoError(t, err)
		return b
	}
	otherSecret := Options{SecretKey: "another-secret-of-enough-length"}
	for _, tc := range []struct {
		name string
		data []byte
		opts Options // of the restoring client
		why  string
	}{
		{"truncated", good[:len(good)/2], Options{}, "not a snapshot"},
		{"not JSON", []byte("policy: 7"), Options{}, "not a snapshot"},
		{"empty object", []byte("{}"), Options{}, "format"},
		{"seal flipped", edit(func(s *snapshot) { s.Seal = flipLast(s.Seal) }), Options{}, "seal does not verify"},
		{"body changed", edit(func(s *snapshot) { s.Body = []byte(`{"policy":{"version":8}}`) }), Options{}, "seal does not verify"},
		{"made younger", edit(func(s *snapshot) { s.ReceivedMs = now.UnixMilli() }), Options{}, "seal does not verify"},
		{"newline in a field", edit(func(s *snapshot) { s.Nonce += "\n" }), Options{}, "control character"},
		{"another secret", good, otherSecret, "seal does not verify"},
		{"another publish key", sealed(t, Options{}, body, now), Options{PublishKey: "pk-2"}, "another PublishKey"},
		{"another site", sealed(t, Options{SiteID: "eu"}, body, now), Options{}, "another SiteID"},
		{"too old", sealed(t, Options{}, body, now.Add(-25*time.Hour)), Options{}, "old, SnapshotMaxAge is 24h0m0s"},
		{"older than the option", good, Options{SnapshotMaxAge: time.Minute}, "SnapshotMaxAge is 1m0s"},
		{"from the future", sealed(t, Options{}, body, now.Add(time.Hour)), Options{}, "in the future"},
		{"good (the control case)", good, Options{}, ""},
		{"larger than MaxSnapshotBytes", append(bytes.Repeat([]byte(" "), MaxSnapshotBytes), good...), Options{}, "more than MaxSnapshotBytes"},
		{"no policy", sealed(t, Options{}, `{"leaseTtlMs":60000}`, now), Options{}, "has no policy"},
		{"bad policy", sealed(t, Options{}, `{"policy":{"version":-1}}`, now), Options{}, "does not parse"},
		{"bad reflex", sealed(t, Options{}, `{"policy":{"version":1},"reflex":{"rules":7}}`, now), Options{}, "reflex block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &logBuffer{}
			opts := tc.opts
			opts.Logger = newTestLogger(logs, false)
			opts.PolicyStore = funcStore{load: func(context.Context) ([]byte, error) { return tc.data, nil }}
			if opts.SecretKey == "" {
				opts.SecretKey = testSecretKey
			}
			c := restoringClient(t, opts)
			s := c.Stats()
			if tc.why == "" {
				assert.True(t, s.Restored)
				assert.EqualValues(t, 7, s.PolicyVersion)
				return
			}
			assert.False(t, s.Restored)
			assert.Equal(t, ModeFailOpen, s.Mode)
			assert.True(t, c.Gate("free", 1).Allowed)
			assert.Zero(t, s.StoreErrors, "the store did its part")
			assert.Contains(t, logs.String(), "snapshot is ignored")
			assert.Contains(t, logs.String(), tc.why)
			assert.NotContains(t, logs.String(), opts.SecretKey)
		})
	}

	// A wrong response signature under a good seal: a client that sealed
	// what it should not have. The control plane's signature still counts.
	var s snapshot
	require.NoError(t, json.Unmarshal(good, &s))
	s.Signature = flipLast(s.Signature)
	sealer := idleClientOpts(t, Options{InstanceID: "i-1"}, nil, nil, nil)
	s.Seal = wire.Sign(sealer.opts.SecretKey, s.sealCanonical())
	data, err := json.Marshal(s)
	require.NoError(t, err)
	_, _, err = sealer.openSnapshot(data)
	assert.ErrorIs(t, err, ErrBadSnapshot)
	assert.ErrorContains(t, err, "the control plane's signature does not verify")
}

// flipLast changes the last hex digit of s.
func flipLast(s string) string {
	last := "0"
	if s[len(s)-1] == '0' {
		last = "1"
	}
	return s[:len(s)-1] + last
}

// TestReadSnapshotInfo: a store reads when a snapshot's answer was
// received and its policy's version, without a key; what the client could
// not have saved is an error.
func TestReadSnapshotInfo(t *testing.T) {
	received := time.UnixMilli(time.Now().UnixMilli())
	info, err := ReadSnapshotInfo(sealed(t, Options{}, `{"policy":{"version":7,"globalMaxWeight":10}}`, received))
	require.NoError(t, err)
	assert.Equal(t, SnapshotInfo{Received: received, PolicyVersion: 7}, info)

	// What the client saves, read back: an answer from a control plane.
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 4, GlobalMaxWeight: 10})
	store := &memStore{}
	opts := testOptions(cp)
	opts.PolicyStore = store
	c, _ := startClient(t, opts)
	waitReady(t, c)
	eventually(t, func() bool { _, n := store.snapshot(); return n == 1 }, "the policy saved")
	data, _ := store.snapshot()
	info, err = ReadSnapshotInfo(data)
	require.NoError(t, err)
	assert.EqualValues(t, 4, info.PolicyVersion)
	assert.WithinDuration(t, time.Now(), info.Received, time.Minute)

	for name, data := range map[string][]byte{
		"not JSON":        []byte("policy: 7"),
		"another format":  []byte(`{"format":"waitstate-snapshot/0","receivedMs":1,"body":"e30="}`),
		"no receipt time": []byte(`{"format":"waitstate-snapshot/1","body":"eyJwb2xpY3kiOnsidmVyc2lvbiI6MX19"}`),
		"no policy":       sealed(t, Options{}, `{"leaseTtlMs":60000}`, received),
		"bad policy":      sealed(t, Options{}, `{"policy":{"version":-1}}`, received),
		"too large":       append(bytes.Repeat([]byte(" "), MaxSnapshotBytes), data...),
	} {
		_, err := ReadSnapshotInfo(data)
		assert.ErrorIs(t, err, ErrBadSnapshot, name)
	}
}

// restoringClient is a client whose New loads from opts.PolicyStore, with
// its background goroutines stopped.
func restoringClient(t *testing.T, opts Options) *Client {
	t.Helper()
	if opts.PublishKey == "" {
		opts.PublishKey = "pk"
	}
	opts.BaseURL = "http://127.0.0.1:1"
	c, err := New(opts)
	require.NoError(t, err)
	c.cancel()
	require.NoError(t, c.group.Wait())
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestStoreFailuresNeverBlock: a store that fails, panics, hangs until its
// context ends, or hangs regardless never holds New past its one second,
// never stops a loop, and its failures are counted.
func TestStoreFailuresNeverBlock(t *testing.T) {
	release := make(chan struct{})
	for _, tc := range []struct {
		name  string
		store PolicyStore
	}{
		{"errors", funcStore{load: func(context.Context) ([]byte, error) { return nil, errors.New("disk on fire") }}},
		{"panics", funcStore{load: func(context.Context) ([]byte, error) { panic("store bug") }}},
		{"hangs until its context ends", funcStore{load: func(ctx context.Context) ([]byte, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}}},
		{"hangs regardless", funcStore{load: func(context.Context) ([]byte, error) {
			<-release
			return nil, nil
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
			opts := testOptions(cp)
			opts.PolicyStore = tc.store
			start := time.Now()
			c, logs := startClient(t, opts)
			took := time.Since(start)
			t.Logf("New took %v", took)
			assert.Less(t, took, 3*time.Second, "New gives the store one second")
			assert.EqualValues(t, 1, c.Stats().StoreErrors)
			assert.False(t, c.Stats().Restored)
			assert.Contains(t, logs.String(), "policy store failed to load")
			waitReady(t, c) // the loops run
			eventually(t, func() bool { return c.Stats().PulsesSent > 2 }, "pulses go on")
		})
	}
	close(release) // the store that hung returns: its goroutine ends
}

// TestStoreSaveFailures: a store that cannot save (a read-only path, a
// save that hangs) is counted and logged once while it fails; the loops
// go on, and Shutdown does not wait on it past its context.
func TestStoreSaveFailures(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "file"), nil, 0o600))

	opts := testOptions(cp)
	opts.PolicyStore = FileStore(filepath.Join(dir, "file", "snapshot")) // under a file: never writable
	start := time.Now()
	c, logs := startClient(t, opts)
	waitReady(t, c)
	// The first error is New's Load (the path is under a file), then saves.
	eventually(t, func() bool { return c.Stats().StoreErrors >= 1+3 }, "later answers try again and fail")
	attempts, elapsed := c.Stats().StoreErrors-1, time.Since(start)
	// A retry waits 1 s, then 2 s, ...: at most one more attempt than whole
	// seconds elapsed, however many answers came meanwhile.
	assert.LessOrEqual(t, attempts, 1+uint64(elapsed/time.Second), "%d attempts in %v", attempts, elapsed)
	assert.Greater(t, c.Stats().PulsesSent, attempts, "more answers came than were saved")
	assert.Equal(t, 1, strings.Count(logs.String(), "failed to save"), "logged once while it fails")
	sent := c.Stats().PulsesSent
	eventually(t, func() bool { return c.Stats().PulsesSent > sent+2 }, "pulses go on")

	hung := make(chan struct{})
	var once sync.Once
	opts.PolicyStore = funcStore{
		load: func(context.Context) ([]byte, error) { return nil, nil },
		save: func(ctx context.Context, _ []byte) error {
			once.Do(func() { close(hung) })
			<-ctx.Done()
			return ctx.Err()
		},
	}
	c2, _ := startClient(t, opts)
	<-hung
	sent = c2.Stats().PulsesSent
	eventually(t, func() bool { return c2.Stats().PulsesSent > sent+2 }, "pulses go on while a save hangs")
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c2.Shutdown(ctx))
	assert.Positive(t, c2.Stats().StoreErrors)
}

// TestStoreOptions: the options around a store.
func TestStoreOptions(t *testing.T) {
	_, err := New(Options{PublishKey: "pk", SecretKey: testSecretKey, SnapshotMaxAge: -time.Second})
	assert.ErrorIs(t, err, ErrInvalidOptions)
	assert.ErrorContains(t, err, "SnapshotMaxAge is negative")
	_, err = New(Options{PublishKey: "pk", SecretKey: testSecretKey, PolicyStore: FileStore("")})
	assert.ErrorContains(t, err, "FileStore has an empty path")

	t.Setenv(EnvPublishKey, "pk")
	t.Setenv(EnvSecretKey, testSecretKey)
	t.Setenv(EnvPolicyFile, "/var/lib/app/waitstate.snapshot")
	opts, err := OptionsFromEnv()
	require.NoError(t, err)
	assert.Equal(t, FileStore("/var/lib/app/waitstate.snapshot"), opts.PolicyStore)
	assert.Contains(t, opts.String(), `PolicyStore:FileStore("/var/lib/app/waitstate.snapshot")`)
	opts.PolicyStore = funcStore{}
	assert.Contains(t, opts.String(), "PolicyStore:waitstate.funcStore")

	// Offline: the store is neither loaded nor saved to.
	var loads atomic.Int64
	c, err := New(Options{Offline: true, PolicyStore: funcStore{load: func(context.Context) ([]byte, error) {
		loads.Add(1)
		return nil, nil
	}}})
	require.NoError(t, err)
	require.NoError(t, c.Close())
	assert.Zero(t, loads.Load())
}
