package main

import (
	"encoding/xml"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestPicture checks a picture of a whole run: the README's
// (docs/quickstart.svg), or the one $WAITSTATE_QUICKSTART_SVG names (.ci/run
// draws one). It parses as XML and holds one series of admitted and one of
// denied calls per tag, enterprise's p95, and a band of each state of the
// story.
func TestPicture(t *testing.T) {
	path := os.Getenv("WAITSTATE_QUICKSTART_SVG")
	if path == "" {
		path = "../../docs/quickstart.svg"
	}
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	series, bands := map[string]int{}, map[string]bool{}
	dec := xml.NewDecoder(f)
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err, "%s parses as XML", path)
		if se, ok := tok.(xml.StartElement); ok {
			for _, a := range se.Attr {
				switch a.Name.Local {
				case "data-series":
					if strings.Contains(se.Name.Local, "polyline") {
						series[a.Value]++
					}
				case "data-band":
					bands[a.Value] = true
				}
			}
		}
	}
	for _, tt := range tags {
		assert.Equal(t, 1, series[tt.name], "one series of %s's admitted calls", tt.name)
		assert.Equal(t, 1, series[tt.name+" denied"], "one of its denied calls")
	}
	assert.Positive(t, series["enterprise p95"], "enterprise's p95 (a second without its calls is a gap)")
	for _, b := range []string{bandFired, bandDown, bandSafe, bandLocal, bandRestored} {
		assert.True(t, bands[b], "a band for %q", b)
	}
}
