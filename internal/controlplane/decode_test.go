package controlplane

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// pulseSeeds are pulse bodies, valid and not, for the decoder's tests.
func pulseSeeds() []string {
	r := rand.New(rand.NewPCG(3, 4))
	return []string{
		string(fleetPulse(r, 1, 7, 3)),
		`{"instanceId":"i1","seq":1,"tags":{}}`,
		`{"instanceId":"i\u00e9\ud83d\ude00\"\\\/\b\f\n\r\t","seq":1,"unknown":[1,{"a":[true,false,null]},"x",-1.5e3],"tags":null}`,
		`{"seq":1,"health":null,"metrics":{"q":{"count":2,"sum":3.5,"min":1,"max":2.5},"n":null},"shadow":true}`,
		`{"seq":1,"tags":{"a":{"usage":1,"health":{"requests":2,"errors":1,"latencyMs":{"p50":1,"p95":2,"p99":3,"max":4},"histogram":{"scheme":"loglinear-us-8","counts":{"3":2}}}}}}`,
		`{"health":{"requests":1,"histogram":{"scheme":"x","counts":{"1":1}},"histogram":{"counts":{"2":1}}}}`,
		`{"tags":{"a":{"health":{"histogram":{"scheme":5}}},"b":{"health":{"histogram":{"counts":{"1":-1}}}}}}`,
		`{"seq":1.5}`, `{"seq":-1}`, `{"seq":"1"}`, `{"seq":1,}`, `{"seq":1} x`, `{"seq":01}`, `{"instanceId":"\x"}`,
		`{"instanceId":"\ud800"}`, `{"shadow":1}`, `{"tags":[]}`, `{"windowEndMs":1e3}`, `[]`, `{"seq":1e400}`,
		`{"health":{"latencyMs":{"p50":1e400}}}`, `{"a":[[[[]]]]}`, ``, `{`, `{"seq":18446744073709551616}`,
		`{"seq":1,"localRules":["protect-enterprise","r\u00e9"],"restored":true}`, `{"localRules":[]}`, `{"localRules":null}`,
		`{"localRules":["x","y"],"localRules":[null]}`, `{"localRules":[1]}`, `{"localRules":"x"}`, `{"localRules":["x",]}`,
		`{"restored":"yes"}`,
		`{"seq":1,"trimmed":{"histograms":3,"metrics":2,"tags":1,"x":0}}`, `{"trimmed":null}`, `{"trimmed":{"tags":-1}}`,
		`{"trimmed":{"tags":1},"trimmed":{"metrics":2}}`, `{"trimmed":[]}`,
	}
}

func TestDecodePulse(t *testing.T) {
	for _, seed := range pulseSeeds() {
		comparePulseDecoders(t, []byte(seed))
	}
	var p wire.PulseBody
	require.NoError(t, decodePulse([]byte(pulseSeeds()[2]), &p, false, nil))
	assert.Equal(t, "ié😀\"\\/\b\f\n\r\t", p.InstanceID)
	var twice wire.PulseBody
	require.NoError(t, decodePulse([]byte(`{"tags":{"a":{"usage":1},"a":{"bounced":2}}}`), &twice, false, nil))
	assert.Equal(t, map[string]wire.TagCount{"a": {Bounced: 2}}, twice.Tags, "a key given twice: the later wins, as in encoding/json")
	assert.Error(t, decodePulse([]byte(`null`), &p, false, nil))
	assert.Error(t, decodePulse([]byte(strings.Repeat("[", 20_000)), &p, false, nil))
	// Nesting as deep as encoding/json takes, the pulse's object included,
	// and one level more.
	for _, deep := range []int{9_999, 10_000} {
		comparePulseDecoders(t, []byte(`{"a":`+strings.Repeat("[", deep)+strings.Repeat("]", deep)+`}`))
		comparePulseDecoders(t, []byte(`{"tags":{"t":{"x":`+strings.Repeat(`{"a":`, deep-2)+"1"+strings.Repeat("}", deep-2)+`}}}`))
	}
	var lean wire.PulseBody
	require.NoError(t, decodePulse([]byte(pulseSeeds()[0]), &lean, true, []string{"tenant-1"}))
	require.NoError(t, decodePulse([]byte(pulseSeeds()[0]), &p, false, nil))
	assert.NotNil(t, lean.Health.Histogram, "the site's histogram is kept")
	assert.NotNil(t, lean.Tags["tenant-1"].Health.Histogram, "a watched tag's is kept")
	assert.Nil(t, lean.Tags["tenant-0"].Health.Histogram, "another tag's is not")
	assert.Equal(t, p.Tags["tenant-0"].Health.Requests, lean.Tags["tenant-0"].Health.Requests)
	deep := `{"x":` + strings.Repeat("[", 20_000) + strings.Repeat("]", 20_000) + `}`
	assert.Error(t, decodePulse([]byte(deep), &p, false, nil), "nested deeper than encoding/json allows")
}

// FuzzDecodePulse: the control plane's pulse decoder accepts what
// encoding/json accepts, with the same result, but for the stricter cases
// its doc names.
func FuzzDecodePulse(f *testing.F) {
	for _, seed := range pulseSeeds() {
		f.Add([]byte(seed))
	}
	f.Fuzz(comparePulseDecoders)
}

func comparePulseDecoders(t *testing.T, data []byte) {
	var want, got wire.PulseBody
	wantErr := json.Unmarshal(data, &want)
	gotErr := decodePulse(data, &got, false, nil)
	var lean wire.PulseBody
	leanErr := decodePulse(data, &lean, true, []string{"a"})
	require.Equal(t, gotErr == nil, leanErr == nil, "lean decoding refuses what full decoding refuses: %q", data)
	if foldedName(data) {
		return // encoding/json reads "tAgs" as tags; decodePulse skips it as unknown
	}
	if gotErr == nil {
		require.NoError(t, wantErr, "decodePulse accepted what encoding/json refuses: %q", data)
		require.Equal(t, want, got, "%q", data)
		return
	}
	if wantErr != nil {
		return
	}
	// encoding/json accepted it: only the stricter cases may differ.
	trimmed := bytes.TrimSpace(data)
	switch {
	case !utf8.Valid(data), bytes.Equal(trimmed, []byte("null")):
		return
	}
	t.Fatalf("decodePulse refused what encoding/json accepts: %q: %v", data, gotErr)
}

// foldedName reports whether data has a member name that matches a field
// only case-insensitively. It reads the tokens, so that a repeated key
// cannot hide one.
func foldedName(data []byte) bool {
	fields := []string{"instanceId", "siteId", "sdk", "seq", "windowEndMs", "windowMs", "mode", "policyVersion", "shadow", "localRules", "restored", "usageDelta",
		"bouncedDelta", "usageTotal", "bouncedTotal", "tags", "health", "metrics", "usage", "bounced", "requests", "errors",
		"latencyMs", "histogram", "p50", "p95", "p99", "max", "scheme", "counts", "count", "sum", "min", "trimmed", "histograms"}
	type frame struct{ object, wantKey bool }
	var stack []*frame
	valueDone := func() {
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].wantKey = true
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	for {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &frame{object: true, wantKey: true})
		case json.Delim('['):
			stack = append(stack, &frame{})
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
			valueDone()
		default:
			if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].wantKey {
				k := tok.(string)
				for _, f := range fields {
					if k != f && strings.EqualFold(k, f) {
						return true
					}
				}
				stack[n-1].wantKey = false
				continue
			}
			valueDone()
		}
	}
}
