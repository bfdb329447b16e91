package chart

import (
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// parse reads svg as XML and returns each polyline's data-series and
// points, and every text.
func parse(t *testing.T, svg []byte) (lines map[string][]string, texts []string) {
	t.Helper()
	lines = map[string][]string{}
	dec := xml.NewDecoder(strings.NewReader(string(svg)))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return lines, texts
		}
		require.NoError(t, err)
		switch tok := tok.(type) {
		case xml.StartElement:
			if tok.Name.Local != "polyline" {
				continue
			}
			var name, points string
			for _, a := range tok.Attr {
				switch a.Name.Local {
				case "data-series":
					name = a.Value
				case "points":
					points = a.Value
				}
			}
			lines[name] = append(lines[name], points)
		case xml.CharData:
			if s := strings.TrimSpace(string(tok)); s != "" {
				texts = append(texts, s)
			}
		}
	}
}

// TestSVG: every name is escaped, a NaN breaks a series in two, points
// outside the axis are left out, and bands and thresholds are drawn.
func TestSVG(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	hostile := `"><script>alert(1)</script>&`
	c := &Chart{Title: "a & b", From: at(0), To: at(10), Panels: []Panel{{
		Title: "rates <per second>",
		Series: []Series{
			{Name: hostile, Points: []Point{{at(0), 1}, {at(1), 2}, {at(2), math.NaN()}, {at(3), 4}, {at(4), 5}}},
			{Name: "late", Points: []Point{{at(-5), 1}, {at(5), 2}, {at(6), math.Inf(1)}, {at(20), 3}}},
		},
		Lines: []Line{{Label: "threshold > 300", V: 300}},
	}}, Bands: []Band{{Label: "fired", From: at(2), To: at(4)}, {Label: "fired", From: at(6), To: at(30)}, {Label: "safe <mode>", From: at(1), To: at(3)}}}
	svg := c.SVG()
	assert.NotContains(t, string(svg), "<script>")
	lines, texts := parse(t, svg)
	require.Len(t, lines[hostile], 2, "the NaN breaks the series in two; its name round-trips")
	assert.Len(t, strings.Fields(lines[hostile][0]), 2)
	assert.Len(t, strings.Fields(lines[hostile][1]), 2)
	require.Len(t, lines["late"], 1)
	assert.Len(t, strings.Fields(lines["late"][0]), 1, "only the point on the axis, finite")
	for _, want := range []string{"a & b", "rates <per second>", "threshold > 300", "safe <mode>", hostile} {
		assert.Contains(t, texts, want)
	}
	assert.Equal(t, 2, strings.Count(string(svg), `data-band="fired"`))
}

func TestNiceCeil(t *testing.T) {
	for v, want := range map[float64]float64{0.7: 1, 1: 1, 1.2: 2, 3: 5, 7: 10, 120: 200, 4800: 5000} {
		assert.Equal(t, want, niceCeil(v), v)
	}
}
