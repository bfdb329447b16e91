package waitstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// PolicyStore keeps the client's last verified answer from the control
// plane across restarts, so that a process started while the control plane
// is away enforces what it enforced before. Set one in Options.PolicyStore;
// FileStore keeps it in a file, and a store shared by a fleet (the module
// github.com/waitstate/waitstate-go/contrib/redis keeps it in Redis) lets a
// new instance start with the fleet's last policy.
//
// A snapshot is opaque bytes, sealed by the client with its SecretKey: a
// store needs no integrity of its own, and one that hands back another
// key's, another site's or a tampered snapshot only makes the client start
// as it would without a store. Load and Save should return once their
// context is done: the client stops waiting then (Load in New after one
// second), but a call that never returns keeps its goroutine, and the
// store's next call waits for it.
type PolicyStore interface {
	// Load returns the last snapshot saved, or (nil, nil) when there is
	// none yet.
	Load(ctx context.Context) ([]byte, error)
	// Save replaces the snapshot kept with snapshot.
	Save(ctx context.Context, snapshot []byte) error
}

// DefaultSnapshotMaxAge is the SnapshotMaxAge used when Options leaves it
// zero.
const DefaultSnapshotMaxAge = 24 * time.Hour

// Bounds of the client's calls to its PolicyStore.
const (
	loadTimeout = time.Second     // New never waits longer on Load
	saveTimeout = 5 * time.Second // nor a save on Save
	// After a failed save, the next waits this long, doubling up to
	// saveRetryMax.
	saveRetryMin = time.Second
	saveRetryMax = time.Minute
)

// MaxSnapshotBytes bounds a snapshot: the client never saves a larger one
// and refuses a larger one loaded. A store may refuse to hold or hand back
// more. (The control plane's answer is at most 1 MiB, and a snapshot holds
// it in base64 with a few short fields.)
const MaxSnapshotBytes = 2 << 20

// ErrBadSnapshot wraps the reason a snapshot loaded from a PolicyStore was
// not restored. The client then starts as it would without a store.
var ErrBadSnapshot = errors.New("waitstate: snapshot not restored")

// FileStore returns a PolicyStore that keeps the snapshot in the file at
// path. Save writes a temporary file in the same directory with mode 0600,
// syncs it, renames it over path and syncs the directory, so the file holds
// either the old snapshot or the new one, whole, even across a crash. Load
// of a missing file is (nil, nil). Two processes may share one path; the
// last save wins. New refuses an empty path.
func FileStore(path string) PolicyStore { return &fileStore{path: path} }

type fileStore struct{ path string }

// String names the store by its path.
func (s *fileStore) String() string { return fmt.Sprintf("FileStore(%q)", s.path) }

func (s *fileStore) Load(ctx context.Context) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := os.Open(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSnapshotBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxSnapshotBytes {
		return nil, fmt.Errorf("%s is larger than a snapshot can be (%d bytes)", s.path, MaxSnapshotBytes)
	}
	return data, nil
}

func (s *fileStore) Save(ctx context.Context, snapshot []byte) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	dir, name := filepath.Split(s.path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+name+".tmp-*") // mode 0600
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(snapshot); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes a rename in dir durable. Windows cannot sync a directory,
// and does not need to.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// snapshotFormat names the snapshot encoding and domain-separates its seal
// from every signature of the protocol.
const snapshotFormat = "waitstate-snapshot/1"

// snapshot is what a PolicyStore keeps: a verified answer as received (its
// body, its signature and the request fields the signature covers), when it
// was received, and the client's seal over all of it.
type snapshot struct {
	Format     string `json:"format"`
	PublishKey string `json:"publishKey"`
	SiteID     string `json:"siteId"`
	InstanceID string `json:"instanceId"` // of the process that received it
	Path       string `json:"path"`
	Nonce      string `json:"nonce"`
	Signature  string `json:"signature"`
	Body       []byte `json:"body"`       // base64: kept byte for byte
	ReceivedMs int64  `json:"receivedMs"` // Unix milliseconds, wall clock
	Seal       string `json:"seal"`
}

// sealCanonical is the string a snapshot's seal covers. Every field but the
// body is free of newlines (openSnapshot checks), and the body is hashed.
func (s *snapshot) sealCanonical() string {
	return strings.Join([]string{snapshotFormat, s.PublishKey, s.SiteID, s.InstanceID, s.Path, s.Nonce,
		s.Signature, strconv.FormatInt(s.ReceivedMs, 10), wire.BodyHash(s.Body)}, "\n")
}

// signedAnswer is a verified answer of the control plane as received.
type signedAnswer struct {
	body      []byte
	path      string // the request URI the answer is bound to
	nonce     string
	signature string
}

// pendingSave is an answer to save and when it was received.
type pendingSave struct {
	answer   *signedAnswer
	received time.Time
}

// savedState is what the store holds, as far as the client knows: the
// policy and reflex block of the last answer saved or restored, and when it
// was received.
type savedState struct {
	policy   *Policy
	reflex   []byte // the block as received; nil for none
	received time.Time
}

// sealSnapshot encodes and seals s for the store.
func (c *Client) sealSnapshot(s pendingSave) ([]byte, error) {
	snap := snapshot{
		Format:     snapshotFormat,
		PublishKey: c.opts.PublishKey,
		SiteID:     c.opts.SiteID,
		InstanceID: c.opts.InstanceID,
		Path:       s.answer.path,
		Nonce:      s.answer.nonce,
		Signature:  s.answer.signature,
		Body:       s.answer.body,
		ReceivedMs: s.received.UnixMilli(),
	}
	snap.Seal = wire.Sign(c.opts.SecretKey, snap.sealCanonical())
	data, err := json.Marshal(snap)
	if err == nil && len(data) > MaxSnapshotBytes { // an answer of 1 MiB and its fields fit well within it
		err = fmt.Errorf("the snapshot is %d bytes, more than MaxSnapshotBytes", len(data))
	}
	return data, err
}

// decodeSnapshot decodes data as a snapshot, without checking more than
// its size and format. Errors wrap ErrBadSnapshot.
func decodeSnapshot(data []byte) (snapshot, error) {
	var snap snapshot
	if len(data) > MaxSnapshotBytes {
		return snap, fmt.Errorf("%w: %d bytes, more than MaxSnapshotBytes", ErrBadSnapshot, len(data))
	}
	if err := json.Unmarshal(data, &snap); err != nil {
		return snap, fmt.Errorf("%w: not a snapshot: %v", ErrBadSnapshot, err)
	}
	if snap.Format != snapshotFormat {
		return snap, fmt.Errorf("%w: format is not %s", ErrBadSnapshot, snapshotFormat)
	}
	return snap, nil
}

// SnapshotInfo is what ReadSnapshotInfo reads of a snapshot.
type SnapshotInfo struct {
	// Received is when the client received the control plane's answer the
	// snapshot holds, by its wall clock, to the millisecond.
	Received time.Time
	// PolicyVersion is the Version of the answer's policy.
	PolicyVersion int64
}

// ReadSnapshotInfo reads when the answer a snapshot holds was received and
// the version of its policy, for a PolicyStore shared by a fleet: many
// instances save, some late, and the store keeps the newest. It does not
// verify the snapshot — a store holds no key — so it orders snapshots and
// nothing more: the client that loads one verifies it. A snapshot the
// client could not have saved (no policy, an answer that does not parse,
// no receipt time) is an error wrapping ErrBadSnapshot.
func ReadSnapshotInfo(snapshot []byte) (SnapshotInfo, error) {
	snap, err := decodeSnapshot(snapshot)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if snap.ReceivedMs <= 0 {
		return SnapshotInfo{}, fmt.Errorf("%w: it has no receipt time", ErrBadSnapshot)
	}
	a, err := parseLeaseResponse(snap.Body)
	switch {
	case err != nil:
		return SnapshotInfo{}, fmt.Errorf("%w: its answer does not parse: %v", ErrBadSnapshot, err)
	case a.policy == nil:
		return SnapshotInfo{}, fmt.Errorf("%w: its answer has no policy", ErrBadSnapshot)
	}
	return SnapshotInfo{Received: time.UnixMilli(snap.ReceivedMs), PolicyVersion: a.policy.Version}, nil
}

// openSnapshot checks a loaded snapshot and returns its answer, parsed,
// and when it was received. Errors wrap ErrBadSnapshot and say why without
// quoting the snapshot.
func (c *Client) openSnapshot(data []byte) (leaseAnswer, time.Time, error) {
	fail := func(format string, args ...any) (leaseAnswer, time.Time, error) {
		return leaseAnswer{}, time.Time{}, fmt.Errorf("%w: %s", ErrBadSnapshot, fmt.Sprintf(format, args...))
	}
	snap, err := decodeSnapshot(data)
	if err != nil {
		return leaseAnswer{}, time.Time{}, err
	}
	for _, f := range []string{snap.PublishKey, snap.SiteID, snap.InstanceID, snap.Path, snap.Nonce, snap.Signature} {
		if !validHeaderValue(f) {
			return fail("a field holds a space or a control character")
		}
	}
	if !wire.Verify(c.opts.SecretKey, snap.sealCanonical(), snap.Seal) {
		return fail("its seal does not verify with this SecretKey")
	}
	if snap.PublishKey != c.opts.PublishKey {
		return fail("it was answered to another PublishKey")
	}
	if snap.SiteID != c.opts.SiteID {
		return fail("it was answered to another SiteID (%q)", snap.SiteID)
	}
	id := wire.Identity{PublishKey: snap.PublishKey, InstanceID: snap.InstanceID, SiteID: snap.SiteID}
	if len(snap.Body) > maxResponseBody ||
		!wire.Verify(c.opts.SecretKey, wire.ResponseCanonical(snap.Path, snap.Nonce, id, snap.Body), snap.Signature) {
		return fail("the control plane's signature does not verify")
	}
	received := time.UnixMilli(snap.ReceivedMs)
	age := c.wall().Sub(received)
	switch {
	case age >= c.opts.SnapshotMaxAge:
		return fail("it is %v old, SnapshotMaxAge is %v", age.Round(time.Second), c.opts.SnapshotMaxAge)
	case age < -wire.MaxClockSkewSeconds*time.Second:
		return fail("it was received %v in the future", (-age).Round(time.Second))
	}
	a, err := parseLeaseResponse(snap.Body)
	switch {
	case err != nil:
		return fail("its answer does not parse: %v", err)
	case a.policy == nil:
		return fail("its answer has no policy")
	case a.reflexErr != nil:
		return fail("its reflex block does not parse: %v", a.reflexErr)
	}
	return a, received, nil
}

// callStore runs f, a call of the store, in a goroutine and waits for it
// at most timeout. Calls run one at a time: one still running after its
// timeout holds up the next one, which gives up within its own timeout.
// Call it from one goroutine at a time (New, then the store goroutine,
// then Shutdown).
func (c *Client) callStore(ctx context.Context, timeout time.Duration, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if c.storeBusy != nil {
		select {
		case <-c.storeBusy:
		case <-ctx.Done():
			return fmt.Errorf("the store's last call has not returned: %w", ctx.Err())
		}
	}
	done := make(chan struct{})
	c.storeBusy = done
	var err error
	go func() {
		defer close(done)
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("the store panicked: %v", p)
			}
		}()
		err = f(ctx)
	}()
	select {
	case <-done:
		return err // written before done was closed
	case <-ctx.Done():
		return fmt.Errorf("the store did not answer: %w", ctx.Err())
	}
}

// restore loads the store's snapshot and puts it in force when it opens.
// It runs in New, before any goroutine of the client starts.
func (c *Client) restore() {
	var data []byte
	err := c.callStore(context.Background(), loadTimeout, func(ctx context.Context) error {
		var err error
		data, err = c.opts.PolicyStore.Load(ctx)
		return err
	})
	if err != nil {
		c.storeErrors.Add(1)
		c.setError(fmt.Errorf("waitstate: policy store: load: %w", err))
		c.log.Warn("waitstate: the policy store failed to load; starting without it", "error", err)
		return
	}
	if data == nil {
		c.log.Info("waitstate: the policy store holds no snapshot yet")
		return
	}
	a, received, err := c.openSnapshot(data)
	if err != nil {
		c.setError(err)
		c.log.Warn("waitstate: the policy store's snapshot is ignored", "error", err)
		return
	}
	// Put in force as if just received, but with the lease and intervals
	// of New: the answer's lease ran from when it was received, and the
	// control plane sets its intervals again when it answers.
	a.restored, a.ttl, a.pulseEvery, a.syncEvery = received, 0, 0, 0
	c.mu.Lock()
	c.applyLeaseLocked(a, false, c.pulseGen)
	c.mu.Unlock()
}

// reflexRaw is the reflex block held, as received; nil for none. Call with
// c.mu held.
func (c *Client) reflexRaw() []byte {
	if c.reflex == nil {
		return nil
	}
	return c.reflex.raw
}

// noteAnswer queues the answer a for saving when it brought the policy in
// force and the reflex block held, and either changed since the last save,
// or the last save is old enough that its snapshot should be renewed (a
// quarter of SnapshotMaxAge): a policy the control plane keeps confirming
// stays restorable. Call with c.mu held, after a is applied.
func (c *Client) noteAnswer(a leaseAnswer) {
	if c.saves == nil || a.from == nil || a.policy == nil || a.reflexErr != nil ||
		c.policy == nil || c.initial || !a.policy.equal(c.policy) {
		return // not an answer that restores what is in force
	}
	reflex := c.reflexRaw()
	now := c.wall()
	if c.saved.policy != nil && c.saved.policy.equal(c.policy) && string(c.saved.reflex) == string(reflex) &&
		now.Sub(c.saved.received) < c.opts.SnapshotMaxAge/4 {
		return
	}
	c.saved = savedState{policy: c.policy, reflex: reflex, received: now}
	s := &pendingSave{answer: a.from, received: now}
	select { // the latest answer replaces one not saved yet
	case <-c.saves:
	default:
	}
	c.saves <- s // cannot block: this is the only sender, under c.mu
}

// storeLoop saves the answers noteAnswer queues, one at a time, until ctx
// ends; Shutdown saves one still queued then. A save under way when ctx
// ends runs to its end or its timeout. After a failed save it waits before
// the next, from saveRetryMin doubling to saveRetryMax, while the answers
// queued meanwhile replace each other: a store that is down is tried a few
// times a minute, not at every answer of every instance.
func (c *Client) storeLoop(ctx context.Context) error {
	var wait time.Duration
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-c.saves:
			if c.save(context.WithoutCancel(ctx), s) {
				wait = 0
				continue
			}
			wait = min(max(2*wait, saveRetryMin), saveRetryMax)
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
	}
}

// save seals s and hands it to the store, and reports whether the store
// took it; a failure is logged and counted.
func (c *Client) save(ctx context.Context, s *pendingSave) bool {
	data, err := c.sealSnapshot(*s)
	if err == nil {
		err = c.callStore(ctx, saveTimeout, func(ctx context.Context) error {
			return c.opts.PolicyStore.Save(ctx, data)
		})
	}
	if err != nil {
		c.storeErrors.Add(1)
		c.setError(fmt.Errorf("waitstate: policy store: save: %w", err))
		if !c.storeFailing {
			c.storeFailing = true
			c.log.Warn("waitstate: the policy store failed to save the last answer; retrying with a later one", "error", err)
		}
		c.mu.Lock()
		c.saved = savedState{} // unknown: the next answer saves again
		c.mu.Unlock()
		return false
	}
	if c.storeFailing {
		c.storeFailing = false
		c.log.Info("waitstate: the policy store saves again")
	}
	c.log.Debug("waitstate: answer saved to the policy store", "bytes", len(data))
	return true
}

// saveQueued saves an answer still queued, within ctx, unless the last
// save failed: Shutdown, which calls it once the store goroutine has
// returned, does not wait on a failing store.
func (c *Client) saveQueued(ctx context.Context) {
	if c.saves == nil || c.storeFailing {
		return
	}
	select {
	case s := <-c.saves:
		c.save(ctx, s)
	default:
	}
}
