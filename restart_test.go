package waitstate

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// restartablePlane serves a control plane at one address that a test can
// restart: the old process dies (its connections are cut, its state is
// lost) and a new one, knowing the same key and nothing else of the old,
// answers at the same URL.
type restartablePlane struct {
	srv  *httptest.Server
	live atomic.Pointer[planeProcess]
}

// planeProcess is one life of a restartablePlane.
type planeProcess struct {
	cp      *controlplane.Server
	handler http.Handler
}

// newRestartablePlane starts a control plane that setup configures; the
// test's end closes it.
func newRestartablePlane(t *testing.T, setup func(*controlplane.Server)) *restartablePlane {
	t.Helper()
	rp := &restartablePlane{}
	rp.start(setup)
	rp.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rp.live.Load().handler.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		rp.srv.Close()
		rp.live.Load().cp.Close()
	})
	return rp
}

// start makes a new process that setup configures and puts it live.
func (rp *restartablePlane) start(setup func(*controlplane.Server)) *controlplane.Server {
	cp := controlplane.NewUnstarted()
	cp.AddKey(testPublishKey, testSecretKey)
	setup(cp)
	rp.live.Store(&planeProcess{cp: cp, handler: cp.Handler()})
	return cp
}

// restart replaces the live process with a new one that setup configures.
func (rp *restartablePlane) restart(setup func(*controlplane.Server)) {
	old := rp.live.Load()
	rp.start(setup)
	rp.srv.CloseClientConnections()
	old.cp.Close()
}

// options are Options for the plane's address.
func (rp *restartablePlane) options() Options {
	return Options{PublishKey: testPublishKey, SecretKey: testSecretKey, BaseURL: rp.srv.URL,
		PulseInterval: MinInterval, SyncInterval: MinInterval}
}

// TestRestartedControlPlaneCadence: a cadence set by a control plane that
// restarted does not outlive it. The new process leaves the intervals out
// of its answers, and the client returns to its own. Before, it kept the
// dead process's for good.
func TestRestartedControlPlaneCadence(t *testing.T) {
	rp := newRestartablePlane(t, func(cp *controlplane.Server) {
		cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 5})
		cp.SetIntervals(150*time.Millisecond, 120*time.Millisecond) // an incident's cadence, say
	})
	opts := rp.options()
	opts.PulseInterval, opts.SyncInterval = 300*time.Millisecond, 400*time.Millisecond
	c, _ := startClient(t, opts)
	waitReady(t, c)
	eventually(t, func() bool {
		s := c.Stats()
		return s.PulseInterval == 150*time.Millisecond && s.SyncInterval == 120*time.Millisecond
	}, "the control plane's cadence")

	rp.restart(func(cp *controlplane.Server) {
		cp.SetLeaseTTL(time.Minute)
		cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 5})
	})
	eventually(t, func() bool {
		s := c.Stats()
		return s.PulseInterval == opts.PulseInterval && s.SyncInterval == opts.SyncInterval
	}, "the client's own cadence again")
}

// TestRestartedControlPlanePolicyAtOnce: a restarted control plane's
// policy applies at its first answer, a pulse's included, though its
// versions began again; the client says so in its log. Before, pulse
// answers renewed the dead process's policy, refusing the new one's lower
// version, until the next sync (here an hour away).
func TestRestartedControlPlanePolicyAtOnce(t *testing.T) {
	rp := newRestartablePlane(t, func(cp *controlplane.Server) {
		cp.SetLeaseTTL(time.Hour)
		cp.SetPolicy("", controlplane.Policy{Version: 7, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	})
	opts := rp.options()
	opts.SyncInterval = time.Hour
	c, logs := startClient(t, opts)
	waitReady(t, c)
	assert.EqualValues(t, 7, c.Policy().Version)
	assert.False(t, c.Gate("free", 1).Allowed, "the first process blocks free")

	rp.restart(func(cp *controlplane.Server) {
		cp.SetLeaseTTL(time.Hour)
		cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5})
	})
	eventually(t, func() bool { return c.Policy().Version == 1 }, "the new process's policy, from a pulse answer")
	assert.True(t, c.Gate("free", 1).Allowed)
	assert.Contains(t, logs.String(), "the control plane restarted")

	// Its later answers, of the same epoch, follow the usual rules: a pulse
	// brings only newer versions.
	eventually(t, func() bool { return c.Stats().PulsesSent >= 3 }, "pulses to the new process")
	assert.EqualValues(t, 1, c.Policy().Version)
}
