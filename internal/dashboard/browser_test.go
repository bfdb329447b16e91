//go:build browser

package dashboard_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// requireBrowser, set by .ci/run, turns the skip of a machine without
// Chromium into a failure.
const requireBrowser = "WAITSTATE_REQUIRE_BROWSER"

// chromium returns a function that runs headless Chromium with args and
// returns what it printed, or skips t when there is no Chromium. A run
// that fails returns what Chromium said on stderr: it crashes now and
// then on its own (a segmentation fault seen once in 20 runs here), which
// says nothing of the page, so callers try again.
func chromium(t *testing.T) func(args ...string) ([]byte, error) {
	t.Helper()
	var bin string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			bin = p
			break
		}
	}
	if bin == "" {
		if os.Getenv(requireBrowser) != "" {
			t.Fatalf("no Chromium on this machine, and %s is set", requireBrowser)
		}
		t.Skip("no Chromium on this machine: the page is tested in a real one (apt-get install -y chromium)")
	}
	return func(args ...string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		// The flags keep a headless Chromium off the network it has no
		// business with, and work as root.
		base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
			"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
			"--user-data-dir=" + t.TempDir(), "--virtual-time-budget=4000"}
		cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("chromium %v: %w: %s", args, err, stderr.String())
		}
		return out, nil
	}
}

// TestPageInBrowser opens the page of a fleet of three in headless
// Chromium, after a spike that fired a rule, and reads the rendered DOM:
// every tag, the fired rule, the instance count, the charts' points, and
// no key. It leaves a screenshot in $WAITSTATE_ARTIFACTS, or the test's
// temporary directory.
func TestPageInBrowser(t *testing.T) {
	run := chromium(t)
	f := startFleet(t)
	srv := httptest.NewServer(f.d.Handler())
	defer srv.Close()
	require.Eventually(t, func() bool {
		s := f.d.State()
		return len(s.Sites) == 1 && s.Sites[0].Instances["total"] == 3
	}, 60*time.Second, 50*time.Millisecond, "three instances pulse")
	f.spike(t)

	points := regexp.MustCompile(`<polyline class="series" data-series="([^"]+)"[^>]* points="([^"]+)"`)
	var dom string
	series := map[string]bool{}
	var failed []error // Chromium's own failures, tried again
	ok := assert.Eventually(t, func() bool {
		out, err := run("--dump-dom", srv.URL+"/")
		if err != nil {
			failed = append(failed, err)
			return false
		}
		dom = string(out)
		clear(series)
		for _, m := range points.FindAllStringSubmatch(dom, -1) {
			if strings.Count(m[2], " ") >= 2 { // three points or more
				series[m[1]] = true
			}
		}
		return series["free"] && series["pro"] && series["enterprise"] && series["free denied"]
	}, 90*time.Second, time.Second, "the page's charts hold points of every tag")
	if !ok {
		t.Fatalf("series with three points or more: %v; Chromium failed %d times: %v; the DOM, %d bytes:\n%.4000s",
			series, len(failed), failed, len(dom), dom)
	}
	for _, err := range failed {
		t.Logf("Chromium failed, and was run again: %.300s", err)
	}

	for _, tag := range []string{"free", "pro", "enterprise"} {
		assert.Contains(t, dom, `<tr data-tag="`+tag+`">`, "a row of %s", tag)
	}
	assert.Contains(t, dom, `<tr data-rule="protect-enterprise" data-state="fired">`)
	assert.Contains(t, dom, `data-event="fired"`, "the rule's timeline")
	assert.Contains(t, dom, `<div class="card" data-count="total"><b>3</b>instances</div>`)
	assert.Contains(t, dom, `<div class="card" data-count="enforcing"><b>3</b>enforcing</div>`)
	assert.Contains(t, dom, `data-band="protect-enterprise fired"`)
	assert.Contains(t, dom, "protect-enterprise: enterprise &gt; 300 ms", "the threshold drawn")
	assert.NotContains(t, dom, secretKey)
	assert.NotContains(t, dom, publishKey)

	dir := os.Getenv("WAITSTATE_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	}
	require.NoError(t, os.MkdirAll(dir, 0o755))
	shot := filepath.Join(dir, "dashboard.png")
	var err error
	for range 3 {
		if _, err = run("--screenshot="+shot, "--window-size=1280,1500", "--hide-scrollbars", srv.URL+"/"); err == nil {
			break
		}
	}
	require.NoError(t, err)
	info, err := os.Stat(shot)
	require.NoError(t, err)
	assert.Greater(t, info.Size(), int64(20_000), "a screenshot with something on it")
	t.Logf("screenshot: %s (%d bytes)", shot, info.Size())
}
