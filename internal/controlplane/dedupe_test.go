package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// incPulse is a pulse body of one process: instance and incarnation ("":
// none, as an SDK before incarnations sends), counting usage calls.
func incPulse(instance, incarnation string, seq, usage uint64) []byte {
	inc := ""
	if incarnation != "" {
		inc = fmt.Sprintf(`"incarnation":%q,`, incarnation)
	}
	return fmt.Appendf(nil, `{"instanceId":%q,%s"seq":%d,"windowEndMs":%d,"windowMs":1000,"usageDelta":%d,"tags":{}}`,
		instance, inc, seq, time.Now().UnixMilli(), usage)
}

// dedupePlane is a control plane with logs off that knows key "pk".
func dedupePlane(t *testing.T) *Server {
	t.Helper()
	s := NewUnstarted()
	t.Cleanup(s.Close)
	s.AddKey("pk", "sk")
	s.SetLogLimit(0)
	s.SetPolicy("", Policy{Version: 1, GlobalMaxWeight: 10})
	return s
}

// sendPulse sends one pulse of instance to s and requires a 200.
func sendPulse(t testing.TB, s *Server, instance, incarnation string, seq, usage uint64) {
	t.Helper()
	req := signed(http.MethodPost, wire.PathPulse, "sk", wire.Identity{PublishKey: "pk", InstanceID: instance}, incPulse(instance, incarnation, seq, usage))
	require.Equal(t, http.StatusOK, serve(s, req), "pulse %s/%s seq %d", instance, incarnation, seq)
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	sb strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sb.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sb.String()
}

// TestIncarnationsCountedApart: two processes under one instance ID, each
// with its own seqs from 1, interleaved and each resending, are counted
// once each; the control plane says once that they share the ID, and its
// metrics count two processes.
func TestIncarnationsCountedApart(t *testing.T) {
	s := dedupePlane(t)
	logs := &syncBuffer{}
	s.SetLogger(slog.New(slog.NewTextHandler(logs, nil)))
	for seq := uint64(1); seq <= 20; seq++ {
		for _, inc := range []string{"aaaa", "bbbb"} {
			sendPulse(t, s, "web", inc, seq, 10)
			sendPulse(t, s, "web", inc, seq, 10) // a resend
		}
	}
	got := s.Totals("")
	assert.EqualValues(t, 2*20*10, got.Usage)
	assert.Equal(t, 40, got.Pulses)
	assert.Equal(t, 1, got.Instances, "one instance ID")
	assert.Equal(t, 2, s.Metrics("").Instances, "two processes")
	assert.Equal(t, 1, strings.Count(logs.String(), "two processes pulse under one instance ID"), logs.String())
	assert.Contains(t, logs.String(), "instance=web")
	assert.NotContains(t, logs.String(), "pk", "the log names no key")
}

// TestRestartIsNotShared: a process that stops and a new one that starts
// under the same ID are two incarnations in turn, never taken for two
// processes at once.
func TestRestartIsNotShared(t *testing.T) {
	s := dedupePlane(t)
	logs := &syncBuffer{}
	s.SetLogger(slog.New(slog.NewTextHandler(logs, nil)))
	for life := range 4 {
		for seq := uint64(1); seq <= 5; seq++ {
			sendPulse(t, s, "worker", "life"+strconv.Itoa(life), seq, 1)
		}
	}
	assert.EqualValues(t, 20, s.Totals("").Usage)
	assert.Empty(t, logs.String())
}

// TestLegacyPulsesDeduped: pulses without an incarnation, from an SDK that
// sends none, are one incarnation per instance: a resend and a pulse whose
// acknowledgement was lost are counted once.
func TestLegacyPulsesDeduped(t *testing.T) {
	s := dedupePlane(t)
	sendPulse(t, s, "old", "", 1, 5)
	sendPulse(t, s, "old", "", 1, 5) // a resend

	// Seq 2 is counted, then its answer never comes: the client gives up
	// and sends it again.
	s.SetFaults(Faults{CountThenHang: true})
	ctx, cancel := context.WithCancel(context.Background())
	req := signed(http.MethodPost, wire.PathPulse, "sk", wire.Identity{PublishKey: "pk", InstanceID: "old"}, incPulse("old", "", 2, 7)).WithContext(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Handler().ServeHTTP(httptest.NewRecorder(), req)
	}()
	require.Eventually(t, func() bool { return s.Totals("").Pulses == 2 }, 10*time.Second, time.Millisecond, "seq 2 counted")
	cancel()
	<-done
	s.SetFaults(Faults{})
	sendPulse(t, s, "old", "", 2, 7)
	sendPulse(t, s, "old", "", 3, 1)

	got := s.Totals("")
	assert.EqualValues(t, 5+7+1, got.Usage)
	assert.Equal(t, 3, got.Pulses)
}

// TestIncarnationChurnBounded: an instance ID restarted 10,000 times (each
// process pulsing twice) keeps the control plane's heap within 2× of what
// the first 100 restarts left, while two live processes under the same ID
// go on pulsing, resending, and being counted exactly.
func TestIncarnationChurnBounded(t *testing.T) {
	churn := 10_000
	if raceEnabled || testing.Short() {
		churn = 2_000 // the race detector makes each request far slower
	}
	base := heapInUse()
	s := dedupePlane(t)
	// The rule window counts the processes that pulsed within it, for as
	// long as it lasts: a short one leaves the dedupe records to measure.
	s.SetRuleWindow(20 * time.Millisecond)
	var liveSeq uint64
	step := func(i int) {
		inc := "churn-" + strconv.Itoa(i)
		sendPulse(t, s, "pod", inc, 1, 1)
		sendPulse(t, s, "pod", inc, 2, 1)
		liveSeq++
		for _, live := range []string{"live-a", "live-b"} {
			sendPulse(t, s, "pod", live, liveSeq, 1000)
			if liveSeq > 1 {
				sendPulse(t, s, "pod", live, liveSeq-1, 1000) // a late resend
			}
		}
	}
	for i := range 100 {
		step(i)
	}
	first := heapInUse() - base
	for i := 100; i < churn; i++ {
		step(i)
	}
	last := heapInUse() - base

	got := s.Totals("")
	assert.Equal(t, uint64(churn)*2*1+2*liveSeq*1000, got.Usage, "every process counted once, the live ones exactly")
	st := s.site("pk", "")
	st.mu.Lock()
	kept := len(st.instances["pod"].incarnations)
	st.mu.Unlock()
	assert.Equal(t, maxIncarnations, kept, "an instance keeps at most maxIncarnations")
	t.Logf("heap after 100 restarts %.1f KiB, after %d %.1f KiB", float64(first)/1024, churn, float64(last)/1024)
	assert.LessOrEqual(t, last, 2*first)
}

// TestIdleIncarnationsForgotten: an incarnation silent for longer than 10 ×
// the longest lease is forgotten, and an instance left with none with it;
// one that pulsed more recently is kept.
func TestIdleIncarnationsForgotten(t *testing.T) {
	cfg := &resolved{leaseTTL: 10 * time.Second}
	st := &siteState{firing: map[string]*reflex.State{}, instances: map[string]*instance{}}
	at := time.Now()
	pulse := func(instance, inc string, seq uint64, now time.Time) bool {
		p := &Pulse{PulseBody: wire.PulseBody{InstanceID: instance, Incarnation: inc, Seq: seq, WindowMs: 1000}}
		counted, _ := st.count(p, cfg, now)
		return counted
	}
	require.True(t, pulse("gone", "g1", 1, at))
	require.True(t, pulse("kept", "k1", 1, at))
	require.True(t, pulse("kept", "k2", 1, at.Add(100*time.Second)))

	assert.Equal(t, 100*time.Second, idleAfter(cfg, st.instances["kept"].incarnations["k1"]), "10 × the lease")
	later := at.Add(100*time.Second + sweepEvery)
	require.True(t, pulse("other", "o1", 1, later))
	assert.NotContains(t, st.instances, "gone", "an instance with no live incarnation is forgotten")
	require.Contains(t, st.instances, "kept")
	assert.NotContains(t, st.instances["kept"].incarnations, "k1")
	assert.Contains(t, st.instances["kept"].incarnations, "k2", "pulsed 100 s later: not idle yet")
	assert.False(t, pulse("kept", "k2", 1, later), "a kept incarnation still dedupes")

	// Without a lease from the control plane: 3 × the longest window the
	// process reported, and never less than the client's default lease.
	cfg = &resolved{}
	assert.Equal(t, 10*defaultClientLease, idleAfter(cfg, &incarnation{window: time.Second}))
	assert.Equal(t, 10*3*time.Hour, idleAfter(cfg, &incarnation{window: time.Hour}))
}
