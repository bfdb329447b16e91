package waitstate

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// TestProtocolDecisionsAndHealthInStats: Stats counts Gate's decisions by
// reason, across windows cut and the live one, adding up to Usage and
// Bounced, and the health samples of the windows sent.
func TestProtocolDecisionsAndHealthInStats(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0},
		TagShedPercents: map[string]float64{"pro": 50}})
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)

	gate := func() {
		c.Gate("free", 1)       // tag_max_weight
		c.Gate("batch", 9)      // global_max_weight
		c.Gate("pro", 1)        // allowed or throttled, in turn
		c.Gate("pro", 1)        // the other
		c.Gate("enterprise", 1) // allowed
	}
	gate()
	c.ObserveTag("enterprise", 10*time.Millisecond, false)
	c.ObserveTag("enterprise", 10*time.Millisecond, true)
	sent := c.Stats().PulsesSent
	require.Eventually(t, func() bool { return c.Stats().PulsesSent > sent+1 }, waitFor, tick, "two more pulses: the samples are sent")
	gate() // in the live window

	st := c.Stats()
	assert.Equal(t, map[Reason]uint64{ReasonTagMaxWeight: 2, ReasonGlobalMaxWeight: 2, ReasonThrottled: 2, ReasonAllowed: 4}, st.Decisions)
	var allowed, denied uint64
	for r, n := range st.Decisions {
		if r.allows() {
			allowed += n
		} else {
			denied += n
		}
	}
	assert.Equal(t, st.Usage, allowed)
	assert.Equal(t, st.Bounced, denied)
	assert.Equal(t, TagStats{Usage: 1, Bounced: 1}, c.TagStats("pro"), "the first window's")
	assert.Equal(t, TagStats{Bounced: 1}, c.TagStats("free"))
	assert.Equal(t, TagStats{}, c.TagStats("never"))
	assert.Equal(t, uint64(2), st.HealthRequests)
	assert.Equal(t, uint64(1), st.HealthErrors)
}

// TestDecisionsInShadow: in shadow mode the reasons are those Gate would
// have given.
func TestDecisionsInShadow(t *testing.T) {
	c, err := New(Options{Offline: true, Shadow: true,
		InitialPolicy: &Policy{Version: 1, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}}})
	require.NoError(t, err)
	defer c.Close()
	assert.True(t, c.Gate("free", 1).Allowed)
	assert.True(t, c.Gate("pro", 1).Allowed)
	assert.Equal(t, map[Reason]uint64{ReasonTagMaxWeight: 1, ReasonAllowed: 1}, c.Stats().Decisions)
}
