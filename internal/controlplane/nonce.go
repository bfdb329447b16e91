package controlplane

import (
	"sync"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// nonceMemory remembers the nonces of signed requests for as long as their
// timestamp is within the clock skew the control plane accepts, so that a
// captured request cannot be replayed. Nonces are kept in one bucket per
// minute of their request's timestamp: a replay carries the same, signed,
// timestamp, so one bucket is looked up, and a bucket is dropped whole
// once no timestamp in it can be accepted any more.
type nonceMemory struct {
	mu      sync.Mutex
	buckets map[int64]map[string]struct{} // by timestamp / 60
}

// fresh reports whether the nonce of a request from key, signed at ts (Unix
// seconds), is seen for the first time, and remembers it; now is the
// control plane's clock.
func (m *nonceMemory) fresh(key, nonce string, ts, now int64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.buckets == nil {
		m.buckets = map[int64]map[string]struct{}{}
	}
	for minute := range m.buckets {
		// The latest timestamp in the bucket is minute*60+59; it is
		// accepted until skew seconds later.
		if minute*60+59+wire.MaxClockSkewSeconds < now {
			delete(m.buckets, minute)
		}
	}
	b := m.buckets[ts/60]
	if b == nil {
		b = map[string]struct{}{}
		m.buckets[ts/60] = b
	}
	k := key + "\x00" + nonce
	if _, ok := b[k]; ok {
		return false
	}
	b[k] = struct{}{}
	return true
}
