package dashboard_test

import (
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// get fetches path from the dashboard's handler over HTTP.
func get(t *testing.T, srv *httptest.Server, path string) (string, http.Header) {
	t.Helper()
	resp, err := http.Get(srv.URL + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, path)
	return string(body), resp.Header
}

// seriesOf parses svg as XML and returns the data-series of its polylines
// and the labels of its bands.
func seriesOf(t *testing.T, svg string) (series map[string]int, bands []string) {
	t.Helper()
	series = map[string]int{}
	dec := xml.NewDecoder(strings.NewReader(svg))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return series, bands
		}
		require.NoError(t, err, "the SVG parses as XML")
		if se, ok := tok.(xml.StartElement); ok {
			for _, a := range se.Attr {
				switch {
				case se.Name.Local == "polyline" && a.Name.Local == "data-series":
					series[a.Value]++
				case se.Name.Local == "g" && a.Name.Local == "data-band":
					bands = append(bands, a.Value)
				}
			}
		}
	}
}

// TestDashboard: the JSON and the chart of a fleet of three, before and
// after a spike that fires a rule; no key anywhere.
func TestDashboard(t *testing.T) {
	f := startFleet(t)
	srv := httptest.NewServer(f.d.Handler())
	defer srv.Close()

	require.Eventually(t, func() bool {
		s := f.d.State()
		return len(s.Sites) == 1 && s.Sites[0].Instances["total"] == 3 && len(s.Sites[0].Tags) == 3
	}, 60*time.Second, 50*time.Millisecond, "three instances and their three tags")
	f.spike(t)

	body, header := get(t, srv, "/state.json")
	assert.Equal(t, "application/json", header.Get("Content-Type"))
	var state struct {
		Sites []struct {
			Site      string         `json:"site"`
			Instances map[string]int `json:"instances"`
			Policy    struct {
				Version       int64              `json:"version"`
				TagMaxWeights map[string]float64 `json:"tagMaxWeights"`
			} `json:"policy"`
			Tags []struct {
				Tag          string   `json:"tag"`
				AllowedPerS  float64  `json:"allowedPerSec"`
				DeniedPerSec float64  `json:"deniedPerSec"`
				P95Ms        *float64 `json:"p95Ms"`
			} `json:"tags"`
			Rules []struct {
				Rule struct {
					Name string `json:"name"`
				} `json:"rule"`
				Fired  bool `json:"fired"`
				Events []struct {
					Fired   bool  `json:"fired"`
					Version int64 `json:"version"`
				} `json:"events"`
			} `json:"rules"`
		} `json:"sites"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &state))
	require.Len(t, state.Sites, 1)
	site := state.Sites[0]
	assert.Equal(t, "", site.Site)
	assert.Equal(t, 3, site.Instances["total"])
	assert.Equal(t, 3, site.Instances["enforcing"])
	assert.GreaterOrEqual(t, site.Policy.Version, int64(2), "the rule's policy is in force")
	assert.Zero(t, site.Policy.TagMaxWeights["free"], "free blocked")
	require.Len(t, site.Rules, 1)
	assert.Equal(t, "protect-enterprise", site.Rules[0].Rule.Name)
	assert.True(t, site.Rules[0].Fired)
	require.NotEmpty(t, site.Rules[0].Events)
	assert.True(t, site.Rules[0].Events[0].Fired)
	tags := map[string]bool{}
	for _, tag := range site.Tags {
		tags[tag.Tag] = true
		if tag.Tag == "enterprise" {
			require.NotNil(t, tag.P95Ms)
			assert.Greater(t, *tag.P95Ms, 300.0, "enterprise's p95 from the merged histograms")
		}
	}
	assert.Equal(t, map[string]bool{"free": true, "pro": true, "enterprise": true}, tags)

	svg, header := get(t, srv, "/chart.svg?site=")
	assert.Equal(t, "image/svg+xml", header.Get("Content-Type"))
	series, bands := seriesOf(t, svg)
	for _, tag := range []string{"free", "pro", "enterprise"} {
		assert.Positive(t, series[tag], "a series of %s's allowed calls and one of its p95", tag)
		assert.Positive(t, series[tag+" denied"], tag)
	}
	assert.Contains(t, bands, "protect-enterprise fired")
	assert.Contains(t, svg, "protect-enterprise: enterprise &gt; 300 ms", "the threshold drawn")

	page, header := get(t, srv, "/")
	assert.Contains(t, header.Get("Content-Security-Policy"), "default-src 'self'")
	assert.Contains(t, page, "<title>WaitState control plane</title>")
	assert.NotContains(t, page, "http://", "nothing loaded from elsewhere")
	for _, text := range []string{body, svg, page} {
		assert.NotContains(t, text, secretKey)
		assert.NotContains(t, text, publishKey)
	}
	resp, err := http.Get(srv.URL + "/chart.svg?site=nowhere")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
}
