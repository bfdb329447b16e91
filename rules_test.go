package waitstate

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// protectRules are the quickstart's rules: enterprise's p95 blocks free
// and throttles pro.
var protectRules = []controlplane.Rule{
	{Name: "protect-enterprise", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95, Operator: ">", Threshold: 300,
		TagName: "free", Action: controlplane.ActionBlock, CooldownSeconds: 2},
	{Name: "throttle-pro", MetricTag: "enterprise", Metric: controlplane.MetricLatencyP95, Operator: ">", Threshold: 300,
		TagName: "pro", Action: controlplane.ActionThrottle, AdmitPercent: 50, CooldownSeconds: 2},
}

// TestProtocolRulesTravelWithThePolicy: every answer of a site with rules
// carries its reflex block; the client keeps the last one and Rules
// returns a copy; an answer without one makes it forget them.
func TestProtocolRulesTravelWithThePolicy(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 4, GlobalMaxWeight: 10})
	require.NoError(t, cp.SetRules("", protectRules...))
	cp.SetRuleWindow(3 * time.Second)
	c, logs := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return c.Rules() != nil }, "the rules arrive")

	want := []Rule{
		{Name: "protect-enterprise", MetricTag: "enterprise", Metric: "latency_p95_ms", Operator: ">", Threshold: 300, TagName: "free", Action: "block", CooldownSeconds: 2},
		{Name: "throttle-pro", MetricTag: "enterprise", Metric: "latency_p95_ms", Operator: ">", Threshold: 300, TagName: "pro", Action: "throttle", AdmitPercent: 50, CooldownSeconds: 2},
	}
	assert.Equal(t, want, c.Rules())
	got := c.Rules()
	got[0].Threshold = 1
	assert.Equal(t, want, c.Rules(), "Rules returns a copy")
	c.mu.Lock()
	block := c.reflex
	c.mu.Unlock()
	assert.Equal(t, 3*time.Second, block.window)
	assert.EqualValues(t, 4, block.base.Version)
	assert.Empty(t, block.fired)
	assert.Len(t, block.local, 2)
	assert.Contains(t, logs.String(), "reflex rules received")

	// Every answer, pulse and policy alike, carries the block.
	eventually(t, func() bool {
		return len(requestsTo(cp, "GET", wire.PathPolicy)) >= 2 && len(requestsTo(cp, "POST", wire.PathPulse)) >= 2
	}, "answers of both kinds")
	assert.Empty(t, c.Stats().PolicyErrors)

	require.NoError(t, cp.SetRules(""))
	eventually(t, func() bool { return c.Rules() == nil }, "an answer without rules makes the client forget them")
	assert.Contains(t, logs.String(), "sends no reflex rules any more")
}

// TestReflexBlockBuiltOncePerChange: the control plane builds the reflex
// block with the policy, once per change of the policy, the rules or what
// they fired, not per answer.
func TestReflexBlockBuiltOncePerChange(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 1, GlobalMaxWeight: 10})
	require.NoError(t, cp.SetRules("", protectRules...))
	c, _ := startClient(t, testOptions(cp))
	waitReady(t, c)
	eventually(t, func() bool { return len(requestsTo(cp, "POST", wire.PathPulse)) >= 10 }, "ten pulses answered")
	assert.Equal(t, 1, cp.AnswerBuilds(testPublishKey, ""), "one policy, one set of rules: built once")
}

// reflexAnswer is the reflex member of an answer, as raw JSON members for
// Faults.AnswerFields.
func reflexAnswer(block string) string { return `"reflex": ` + block }

// goodBase is a valid base policy in JSON.
const goodBase = `{"version": 3, "globalMaxWeight": 10}`

// ruleJSON is one rule in the schema, named name.
func ruleJSON(name string) string {
	return fmt.Sprintf(`{"name": %q, "metricTag": "enterprise", "metric": "latency_p95_ms", "operator": ">", "threshold": 300, "tagName": "free", "action": "block"}`, name)
}

// TestProtocolBadReflexIgnored: a reflex block that is not well-formed is
// ignored, logged and counted, and the rest of the answer applies; a rule
// this client cannot evaluate is skipped alone.
func TestProtocolBadReflexIgnored(t *testing.T) {
	many := make([]string, 257)
	for i := range many {
		many[i] = ruleJSON(fmt.Sprint("r", i))
	}
	bad := map[string]string{
		"not an object":       `"rules"`,
		"rules not an array":  `{"base": ` + goodBase + `, "rules": "x", "fired": [], "ruleWindowMs": 5000}`,
		"threshold a string":  `{"base": ` + goodBase + `, "rules": [{"name": "x", "metric": "error_rate", "operator": ">", "threshold": "1", "tagName": "free", "action": "block"}], "fired": [], "ruleWindowMs": 5000}`,
		"no base":             `{"rules": [` + ruleJSON("a") + `], "fired": [], "ruleWindowMs": 5000}`,
		"invalid base":        `{"base": {"version": 3, "globalMaxWeight": -1}, "rules": [` + ruleJSON("a") + `], "fired": [], "ruleWindowMs": 5000}`,
		"257 rules":           `{"base": ` + goodBase + `, "rules": [` + strings.Join(many, ",") + `], "fired": [], "ruleWindowMs": 5000}`,
		"two rules of a name": `{"base": ` + goodBase + `, "rules": [` + ruleJSON("a") + `,` + ruleJSON("a") + `], "fired": [], "ruleWindowMs": 5000}`,
		"no rule window":      `{"base": ` + goodBase + `, "rules": [` + ruleJSON("a") + `], "fired": []}`,
	}
	for _, name := range slices.Sorted(maps.Keys(bad)) {
		t.Run(name, func(t *testing.T) {
			cp := newPlane(t)
			cp.SetPolicyJSON("", `{"version": 7, "globalMaxWeight": 5}`)
			cp.SetFaults(controlplane.Faults{AnswerFields: reflexAnswer(bad[name])})
			c, logs := startClient(t, testOptions(cp))
			waitReady(t, c)
			assert.EqualValues(t, 7, c.Policy().Version, "the policy of the answer applies")
			eventually(t, func() bool { return c.Stats().PolicyErrors >= 2 }, "counted")
			assert.Nil(t, c.Rules())
			assert.Equal(t, 1, strings.Count(logs.String(), "reflex rules refused"), "logged once:\n%s", logs)
			assert.Equal(t, ModeEnforcing, c.Mode())
			assert.NotContains(t, logs.String(), testSecretKey)
		})
	}

	t.Run("a refused block keeps the last good one", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetPolicyJSON("", `{"version": 7, "globalMaxWeight": 5}`)
		good := `{"base": ` + goodBase + `, "rules": [` + ruleJSON("a") + `], "fired": ["a"], "ruleWindowMs": 5000}`
		cp.SetFaults(controlplane.Faults{AnswerFields: reflexAnswer(good)})
		c, _ := startClient(t, testOptions(cp))
		eventually(t, func() bool { return len(c.Rules()) == 1 }, "the good block")
		errs := c.Stats().PolicyErrors
		cp.SetFaults(controlplane.Faults{AnswerFields: reflexAnswer(bad["two rules of a name"])})
		eventually(t, func() bool { return c.Stats().PolicyErrors >= errs+2 }, "the bad ones refused")
		assert.Equal(t, "a", c.Rules()[0].Name)
	})

	t.Run("rules it cannot evaluate are skipped alone", func(t *testing.T) {
		cp := newPlane(t)
		cp.SetPolicyJSON("", `{"version": 7, "globalMaxWeight": 5}`)
		rules := []string{
			ruleJSON("good"),
			`{"name": "metric", "metric": "cpu_seconds", "operator": ">", "threshold": 1, "tagName": "free", "action": "block"}`,
			`{"name": "operator", "metric": "error_rate", "operator": "~", "threshold": 1, "tagName": "free", "action": "block"}`,
			`{"name": "action", "metric": "error_rate", "operator": ">", "threshold": 1, "tagName": "free", "action": "drop"}`,
			`{"name": "fleet", "metric": "rps", "operator": ">", "threshold": 1, "tagName": "free", "action": "block"}`,
		}
		block := `{"base": ` + goodBase + `, "rules": [` + strings.Join(rules, ",") + `], "fired": ["fleet", "ghost"], "ruleWindowMs": 5000}`
		cp.SetFaults(controlplane.Faults{AnswerFields: reflexAnswer(block)})
		c, logs := startClient(t, testOptions(cp))
		eventually(t, func() bool { return len(c.Rules()) == 5 }, "every rule kept, as sent")
		c.mu.Lock()
		b := c.reflex
		c.mu.Unlock()
		require.Len(t, b.local, 1)
		assert.Equal(t, "good", b.local[0].Name)
		assert.Equal(t, []string{"fleet"}, b.fired, "a fired name that is not a rule is dropped")
		assert.Zero(t, c.Stats().PolicyErrors)
		for _, name := range []string{"metric", "operator", "action", "fleet"} {
			assert.Equal(t, 1, strings.Count(logs.String(), `rule \"`+name+`\"`), "logged once: %s\n%s", name, logs)
		}
	})
}

// TestRuleJSONRoundTrip: Rule reads and writes the control plane's schema.
func TestRuleJSONRoundTrip(t *testing.T) {
	var r Rule
	require.NoError(t, json.Unmarshal([]byte(ruleJSON("protect")), &r))
	assert.Equal(t, Rule{Name: "protect", MetricTag: "enterprise", Metric: "latency_p95_ms", Operator: ">", Threshold: 300, TagName: "free", Action: "block"}, r)
	assert.NoError(t, r.Validate())
	out, err := json.Marshal(r)
	require.NoError(t, err)
	var back Rule
	require.NoError(t, json.Unmarshal(out, &back))
	assert.Equal(t, r, back)

	// As answers carry it: a rule with a maxWeight and no action is a cap,
	// and "admitPercent" is read as "percent"; unknown keys are skipped.
	var legacy, spelled Rule
	require.NoError(t, json.Unmarshal([]byte(`{"name": "legacy", "metric": "error_rate", "operator": ">", "threshold": 0.5,
	  "tagName": "free", "maxWeight": 0, "since": "v9"}`), &legacy))
	assert.Equal(t, Rule{Name: "legacy", Metric: "error_rate", Operator: ">", Threshold: 0.5, TagName: "free", Action: "cap"}, legacy)
	assert.NoError(t, legacy.Validate())
	require.NoError(t, json.Unmarshal([]byte(`{"name": "t", "metric": "error_rate", "operator": ">", "threshold": 0.5,
	  "tagName": "pro", "action": "throttle", "admitPercent": 20}`), &spelled))
	assert.Equal(t, 20.0, spelled.AdmitPercent)

	for name, bad := range map[string]Rule{
		"no name":         {Metric: "error_rate", Operator: ">", Action: "block"},
		"name too long":   {Name: strings.Repeat("n", MaxTagNameBytes+1), Metric: "error_rate", Operator: ">", Action: "block"},
		"unknown metric":  {Name: "x", Metric: "cpu", Operator: ">", Action: "block"},
		"unknown action":  {Name: "x", Metric: "error_rate", Operator: ">", Action: "drop"},
		"percent over":    {Name: "x", Metric: "error_rate", Operator: ">", Action: "throttle", AdmitPercent: 101},
		"negative weight": {Name: "x", Metric: "error_rate", Operator: ">", MaxWeight: -1},
		"no action":       {Name: "x", Metric: "error_rate", Operator: ">"},
		"admitting 0":     {Name: "x", Metric: "error_rate", Operator: ">", Action: "throttle"},
	} {
		err := bad.Validate()
		require.Error(t, err, name)
		assert.Less(t, len(err.Error()), 200, "the error does not repeat a long name")
		assert.True(t, strings.HasPrefix(err.Error(), "waitstate: "), err.Error())
	}
}
