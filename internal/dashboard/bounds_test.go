package dashboard

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// clocked is a dashboard of an unstarted control plane on a clock the
// test moves.
func clocked(t *testing.T) (*Dashboard, *time.Time) {
	cp := controlplane.NewUnstarted()
	t.Cleanup(cp.Close)
	cp.AddKey("pk", "sk_bounds_secret_of_enough_length")
	clock := time.Unix(1_800_000_000, 0)
	return &Dashboard{cp: cp, now: func() time.Time { return clock }, sites: map[string]*site{}}, &clock
}

func pulse(instance string, tags ...string) *controlplane.Pulse {
	p := &controlplane.Pulse{}
	p.InstanceID, p.Mode, p.WindowMs, p.Tags = instance, "enforcing", 1000, map[string]wire.TagCount{}
	for _, tag := range tags {
		p.Tags[tag] = wire.TagCount{Usage: 1}
	}
	return p
}

// TestBounded: sites, tags, instances, samples and events stay within
// their bounds whatever the pulses name, and nothing is lost of the counts
// of the tags beyond maxTags: they add to _other.
func TestBounded(t *testing.T) {
	d, clock := clocked(t)
	for i := range maxSites + 10 {
		d.observe(fmt.Sprintf("site-%d", i), pulse("i"), nil, 0)
	}
	assert.Len(t, d.sites, maxSites)

	var tags []string
	for i := range 3 * maxTags {
		tags = append(tags, fmt.Sprintf("tag-%03d", i))
	}
	d.observe("site-0", pulse("i", tags...), nil, 0)
	for i := range maxInstances + 50 {
		d.observe("site-0", pulse(fmt.Sprintf("i-%d", i)), nil, 0)
	}
	events := make([]controlplane.Event, 3*maxEvents)
	d.observe("site-0", pulse("i"), events, 0)
	st := d.sites["site-0"]
	assert.Len(t, st.tags, maxTags+1)
	assert.Equal(t, otherTag, st.tags[maxTags])
	assert.EqualValues(t, 2*maxTags, st.cur.tags[otherTag].allowed, "the tags beyond the bound count under _other")
	assert.Len(t, st.instances, maxInstances)
	assert.Len(t, st.events, maxEvents)

	for range history + 20 {
		*clock = clock.Add(time.Second)
		d.Tick()
	}
	assert.Len(t, st.samples, history)
	assert.Len(t, st.recent, smoothMax)
	assert.Empty(t, st.instances, "silent instances are forgotten")
}

// TestRatesFollowTheInterval: a pulse every 5 s brings 5 s of calls; the
// rate is taken over 5 s, not shown as one second's spike.
func TestRatesFollowTheInterval(t *testing.T) {
	d, clock := clocked(t)
	var rates []float64
	for s := range 30 {
		if s%5 == 0 {
			p := pulse("i", "free")
			p.WindowMs, p.Tags["free"] = 5000, wire.TagCount{Usage: 500}
			d.observe("", p, nil, 0)
		}
		*clock = clock.Add(time.Second)
		d.Tick()
		rates = append(rates, d.State().Sites[0].Tags[0].AllowedPerSec)
	}
	for _, r := range rates[5:] {
		assert.InDelta(t, 100, r, 0.01, "%v", rates)
	}
}

// TestHostileTags: a tag named like markup comes out escaped in the JSON
// and the chart.
func TestHostileTags(t *testing.T) {
	d, clock := clocked(t)
	tag := `<img src=x onerror=alert(1)>`
	d.observe("", pulse("i", tag), nil, 0)
	*clock = clock.Add(time.Second)
	d.Tick()
	data, err := json.Marshal(d.State())
	require.NoError(t, err)
	assert.NotContains(t, string(data), "<img")
	c, ok := d.Chart("")
	require.True(t, ok)
	assert.NotContains(t, string(c.SVG()), "<img")
	assert.True(t, strings.Contains(string(c.SVG()), "&lt;img"))
}

// TestLocalRulesAndRestores: the instances' own reports — rules they hold
// fired in safe mode, a policy restored from their store — are counted per
// site and per rule, from each instance's last pulse.
func TestLocalRulesAndRestores(t *testing.T) {
	d, clock := clocked(t)
	require.NoError(t, d.cp.SetRules("", controlplane.Rule{Name: "protect", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: controlplane.ActionBlock}))
	a, b, c := pulse("a"), pulse("b"), pulse("c")
	a.Mode, a.LocalRules = "safe_mode", []string{"protect"}
	b.Mode, b.LocalRules, b.Restored = "safe_mode", []string{"protect"}, true
	c.Restored = true
	for _, p := range []*controlplane.Pulse{a, b, c} {
		d.observe("", p, nil, 0)
	}
	*clock = clock.Add(time.Second)
	d.Tick()
	s := d.State().Sites[0]
	assert.Equal(t, map[string]int{"total": 3, "enforcing": 1, "safe_mode": 2, "fail_open": 0, "local_rules": 2, "restored": 2}, s.Instances)
	require.Len(t, s.Rules, 1)
	assert.Equal(t, 2, s.Rules[0].FiredLocally)
	assert.False(t, s.Rules[0].Fired, "not by the control plane")

	a.Mode, a.LocalRules = "enforcing", nil // its lease renewed
	d.observe("", a, nil, 0)
	assert.Equal(t, 1, d.State().Sites[0].Rules[0].FiredLocally, "an instance's last pulse counts")
}
