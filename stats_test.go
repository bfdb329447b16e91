package waitstate

import (
	"fmt"
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
	assert.Equal(t, TagStats{Usage: 2, Bounced: 2}, c.TagStats("pro"), "the windows cut and the live one")
	assert.Equal(t, TagStats{Bounced: 2}, c.TagStats("free"))
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

// TestTagStatsIncludeLiveWindow: a tag's counts include the live window, as
// Stats' totals do, so an exporter's per-tag series add up to its totals at
// every scrape; and they never go down, even for tags that a cut folds
// into OtherTag.
func TestTagStatsIncludeLiveWindow(t *testing.T) {
	c := idleClient(t, nil, &Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}})
	for range 3 {
		c.Gate("pro", 1)
		c.Gate("free", 1)
	}
	assert.Equal(t, TagStats{Usage: 3}, c.TagStats("pro"), "before any cut")
	assert.Equal(t, TagStats{Bounced: 3}, c.TagStats("free"))
	st := c.Stats()
	assert.Equal(t, TagStats{Usage: st.Usage, Bounced: st.Bounced},
		TagStats{Usage: c.TagStats("pro").Usage, Bounced: c.TagStats("free").Bounced})
	cutPulse(t, c, false)
	assert.Equal(t, TagStats{Usage: 3}, c.TagStats("pro"), "the cut moves them, adds nothing")
	c.Gate("pro", 1)
	assert.Equal(t, TagStats{Usage: 4}, c.TagStats("pro"))

	// Fill the totals to a few places short of MaxWindowTags, then count
	// more new tags in one window than there is room for: each new tag's
	// counts, read before and after the cut, never go down.
	for i := range MaxWindowTags - 5 {
		c.Gate(fmt.Sprint("fill-", i), 1)
	}
	cutPulse(t, c, false)
	before := map[string]TagStats{}
	for i := range 10 {
		tag := fmt.Sprint("late-", i)
		c.Gate(tag, 1)
		before[tag] = c.TagStats(tag)
	}
	before[OtherTag] = c.TagStats(OtherTag)
	cutPulse(t, c, false)
	var folded uint64
	for tag, b := range before {
		after := c.TagStats(tag)
		assert.GreaterOrEqual(t, after.Usage, b.Usage, tag)
		if tag != OtherTag && after.Usage == 0 {
			folded++
		}
	}
	assert.Positive(t, folded, "some late tags were folded into %s", OtherTag)
	assert.Equal(t, folded, c.TagStats(OtherTag).Usage)
}
