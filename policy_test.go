package waitstate

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var inf = math.Inf(1)

func TestPolicyGate(t *testing.T) {
	p := &Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0, "vip": 50, "ent": inf}}
	tests := []struct {
		tag    string
		weight float64
		want   GateResult
	}{
		{"other", 5, GateResult{true, false, ReasonAllowed, 5}},
		{"other", 5.0001, GateResult{false, false, ReasonGlobalMaxWeight, 5}},
		{"free", 0, GateResult{true, false, ReasonAllowed, 0}},
		{"free", 0.5, GateResult{false, false, ReasonTagMaxWeight, 0}},
		{"vip", 50, GateResult{true, false, ReasonAllowed, 50}}, // a tag entry may be above the global limit
		{"ent", 1e308, GateResult{true, false, ReasonAllowed, inf}},
		{"ent", inf, GateResult{true, false, ReasonAllowed, inf}},
		{"free", math.NaN(), GateResult{false, false, ReasonTagMaxWeight, 0}}, // NaN counts as 1
		{"free", -3, GateResult{false, false, ReasonTagMaxWeight, 0}},         // so does a negative weight
		{"other", -3, GateResult{true, false, ReasonAllowed, 5}},
		{"", 6, GateResult{false, false, ReasonGlobalMaxWeight, 5}},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, p.Gate(tt.tag, tt.weight), "Gate(%q, %v)", tt.tag, tt.weight)
	}

	assert.Equal(t, GateResult{true, false, ReasonAllowed, inf}, DefaultPolicy().Gate("x", 1e300))
	assert.Equal(t, GateResult{true, false, ReasonAllowed, inf}, (*Policy)(nil).Gate("x", 1))
	assert.Equal(t, GateResult{false, false, ReasonGlobalMaxWeight, 0}, (&Policy{}).Gate("x", 1), "the zero Policy denies every positive weight")
	assert.Equal(t, GateResult{true, false, ReasonAllowed, 0}, (&Policy{}).Gate("x", 0))
}

func TestPolicyGateAllocatesNothing(t *testing.T) {
	p := &Policy{Version: 1, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0}}
	allocs := testing.AllocsPerRun(1000, func() {
		p.Gate("free", 1)
		p.Gate("pro", 1)
	})
	assert.Zero(t, allocs)
}

func TestParsePolicyAcceptsEveryInfinityForm(t *testing.T) {
	raw := `{"version": 17, "tagMaxWeights": {
		"a": "Infinity", "b": "+Infinity", "c": "inf", "d": "+Inf", "e": "INFINITY",
		"f": "iNfInItY", "g": null, "h": 1e400, "i": 2.5, "j": 0, "k": -0, "l": "+INF"}}`
	p, err := parsePolicy([]byte(raw))
	require.NoError(t, err)
	assert.EqualValues(t, 17, p.Version)
	assert.True(t, math.IsInf(p.GlobalMaxWeight, 1), "an absent globalMaxWeight is Infinity")
	for _, tag := range strings.Split("abcdefghl", "") {
		assert.True(t, math.IsInf(p.TagMaxWeights[tag], 1), "tag %s: %v", tag, p.TagMaxWeights[tag])
	}
	assert.Equal(t, 2.5, p.TagMaxWeights["i"])
	assert.Equal(t, 0.0, p.TagMaxWeights["j"])
	assert.False(t, math.Signbit(p.TagMaxWeights["k"]), "-0 is read as 0")

	for _, g := range []string{`null`, `"Infinity"`, `"+inf"`, `1e999`} {
		p, err := parsePolicy([]byte(`{"version": 0, "globalMaxWeight": ` + g + `}`))
		require.NoError(t, err, g)
		assert.True(t, math.IsInf(p.GlobalMaxWeight, 1), g)
		assert.Nil(t, p.TagMaxWeights)
	}
}

// badPolicies are policies that must be refused whole.
func badPolicies() map[string]string {
	many := make(map[string]int, MaxPolicyTags+1)
	for i := range MaxPolicyTags + 1 {
		many[fmt.Sprintf("t%d", i)] = 1
	}
	manyJSON, _ := json.Marshal(many)
	// 5,001 weight tags and 5,000 other shed tags: 10,001 distinct names.
	weights, sheds := map[string]int{}, map[string]int{}
	for i := range MaxPolicyTags/2 + 1 {
		weights[fmt.Sprintf("w%d", i)] = 1
		sheds[fmt.Sprintf("s%d", i)] = 1
	}
	delete(sheds, "s0")
	sheds["w0"] = 1 // shared with the weights: counted once
	weightsJSON, _ := json.Marshal(weights)
	shedsJSON, _ := json.Marshal(sheds)
	return map[string]string{
		"negative shed":          `{"version": 2, "globalShedPercent": -1}`,
		"shed over 100":          `{"version": 2, "tagShedPercents": {"pro": 100.5}}`,
		"shed as a string":       `{"version": 2, "tagShedPercents": {"pro": "50"}}`,
		"shed null":              `{"version": 2, "globalShedPercent": null}`,
		"shed NaN":               `{"version": 2, "tagShedPercents": {"pro": "NaN"}}`,
		"shed tag of 257 bytes":  `{"version": 2, "tagShedPercents": {"` + strings.Repeat("a", 257) + `": 1}}`,
		"10,001 tags in all":     `{"version": 2, "tagMaxWeights": ` + string(weightsJSON) + `, "tagShedPercents": ` + string(shedsJSON) + `}`,
		"negative weight":        `{"version": 2, "globalMaxWeight": 5, "tagMaxWeights": {"free": -1}}`,
		"tiny negative weight":   `{"version": 2, "tagMaxWeights": {"free": -1e-400}}`,
		"negative global":        `{"version": 2, "globalMaxWeight": -0.5}`,
		"NaN string":             `{"version": 2, "globalMaxWeight": "NaN"}`,
		"minus Infinity":         `{"version": 2, "globalMaxWeight": "-Infinity"}`,
		"other string":           `{"version": 2, "tagMaxWeights": {"free": "ten"}}`,
		"numeric string":         `{"version": 2, "tagMaxWeights": {"free": "10"}}`,
		"boolean weight":         `{"version": 2, "tagMaxWeights": {"free": true}}`,
		"object weight":          `{"version": 2, "tagMaxWeights": {"free": {}}}`,
		"missing version":        `{"globalMaxWeight": 5}`,
		"null version":           `{"version": null, "globalMaxWeight": 5}`,
		"negative version":       `{"version": -2, "globalMaxWeight": 5}`,
		"fractional version":     `{"version": 2.5, "globalMaxWeight": 5}`,
		"exponent version":       `{"version": 2e3, "globalMaxWeight": 5}`,
		"string version":         `{"version": "2", "globalMaxWeight": 5}`,
		"version beyond int64":   `{"version": 9223372036854775808, "globalMaxWeight": 5}`,
		"tags not an object":     `{"version": 2, "tagMaxWeights": ["free"]}`,
		"not an object":          `[1, 2]`,
		"not JSON":               `{"version": 2,`,
		"tag name of 257 bytes":  `{"version": 2, "tagMaxWeights": {"` + strings.Repeat("a", 257) + `": 1}}`,
		"more than 10,000 tags":  `{"version": 2, "tagMaxWeights": ` + string(manyJSON) + `}`,
		"escaped tag of 257 (é)": `{"version": 2, "tagMaxWeights": {"` + strings.Repeat(`\u00e9`, 128) + `a": 1}}`,
	}
}

func TestParsePolicyRefusesWhole(t *testing.T) {
	for name, raw := range badPolicies() {
		t.Run(name, func(t *testing.T) {
			p, err := parsePolicy([]byte(raw))
			require.ErrorIs(t, err, ErrBadPolicy)
			assert.Nil(t, p)

			held := &Policy{Version: 1, GlobalMaxWeight: 3}
			require.Error(t, json.Unmarshal([]byte(raw), held))
			assert.Equal(t, &Policy{Version: 1, GlobalMaxWeight: 3}, held, "a refused policy leaves the target unchanged")
		})
	}
}

func TestParsePolicyLimitsAreInclusive(t *testing.T) {
	tags := make(map[string]int, MaxPolicyTags)
	for i := range MaxPolicyTags {
		tags[fmt.Sprintf("t%d", i)] = 1
	}
	require.Len(t, tags, MaxPolicyTags)
	raw, _ := json.Marshal(map[string]any{"version": 1, "tagMaxWeights": tags})
	p, err := parsePolicy(raw)
	require.NoError(t, err)
	assert.Len(t, p.TagMaxWeights, MaxPolicyTags)

	// 256 bytes after unescaping, though longer as JSON.
	p, err = parsePolicy([]byte(`{"version": 1, "tagMaxWeights": {"` + strings.Repeat(`\u00e9`, 128) + `": 1}}`))
	require.NoError(t, err)
	for tag := range p.TagMaxWeights {
		assert.Len(t, tag, MaxTagNameBytes)
	}
}

func TestPolicyJSONRoundTrip(t *testing.T) {
	p := &Policy{Version: 9, GlobalMaxWeight: inf, TagMaxWeights: map[string]float64{"free": 0, "pro": 2.5, "ent": inf}}
	data, err := json.Marshal(p)
	require.NoError(t, err)
	assert.JSONEq(t, `{"version":9,"globalMaxWeight":"Infinity","tagMaxWeights":{"ent":"Infinity","free":0,"pro":2.5}}`, string(data))
	var q Policy
	require.NoError(t, json.Unmarshal(data, &q))
	assert.Equal(t, p, &q)

	_, err = json.Marshal(&Policy{GlobalMaxWeight: math.NaN()})
	require.ErrorIs(t, err, ErrBadPolicy)
}

func TestPolicyClone(t *testing.T) {
	p := &Policy{Version: 1, GlobalMaxWeight: 1, TagMaxWeights: map[string]float64{"a": 1}}
	q := p.Clone()
	q.TagMaxWeights["a"] = 2
	assert.Equal(t, 1.0, p.TagMaxWeights["a"])
	assert.Nil(t, (*Policy)(nil).Clone())
}

// TestPolicyErrorsQuoteLittle: a refused value of any size is quoted in
// the error (and so in LastError and the log) by its first 32 bytes only.
func TestPolicyErrorsQuoteLittle(t *testing.T) {
	huge := strings.Repeat("9", 1<<20)
	for _, raw := range []string{
		`{"version":1,"globalMaxWeight":"` + huge + `"}`,
		`{"version":1,"globalMaxWeight":-` + huge + `}`,
		`{"version":1,"globalShedPercent":` + huge + `}`,
		`{"version":1,"tagShedPercents":{"a":"` + huge + `"}}`,
		`{"version":1,"globalMaxWeight":[` + huge + `]}`,
	} {
		_, err := parsePolicy([]byte(raw))
		require.ErrorIs(t, err, ErrBadPolicy)
		assert.Less(t, len(err.Error()), 200, "%.80s", err)
	}
}
