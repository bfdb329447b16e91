package controlplane

import (
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/reflex/reflexcases"
	"github.com/waitstate/waitstate-go/internal/wire"
)

// TestRuleCases runs the one table of rule cases on the control plane:
// each step is a pulse of its traffic, signed and sent to the handler, one
// every reflexcases.Gap, and the rules read the merged pulses of the
// window as they do for a fleet.
func TestRuleCases(t *testing.T) {
	for _, c := range reflexcases.Cases {
		t.Run(c.Name, func(t *testing.T) {
			s := NewUnstarted()
			defer s.Close()
			s.AddKey("pk", "sk")
			s.SetLogLimit(0)
			s.SetRuleWindow(reflexcases.Window)
			s.SetPolicy("", c.Base)
			require.NoError(t, s.SetRules("", c.Rules...))
			start := time.Now()
			for i, step := range c.Steps {
				time.Sleep(time.Until(start.Add(time.Duration(i) * reflexcases.Gap)))
				body, err := json.Marshal(casePulse(step.Traffic, uint64(i+1)))
				require.NoError(t, err)
				req := signed(http.MethodPost, wire.PathPulse, "sk", wire.Identity{PublishKey: "pk", InstanceID: "i"}, body)
				require.Equal(t, http.StatusOK, serve(s, req))

				st := s.site("pk", "")
				st.mu.Lock()
				var fired []string
				for name, rs := range st.firing {
					if rs.Fired {
						fired = append(fired, name)
					}
				}
				st.mu.Unlock()
				if len(fired) > 0 {
					slices.Sort(fired)
				}
				assert.Equal(t, step.Fired, fired, "step %d: fired", i)
				p, ok := s.Policy("")
				require.True(t, ok)
				assert.Equal(t, reflexcases.Normalize(step.Want), reflexcases.Normalize(p), "step %d", i)
			}
		})
	}
}

// casePulse is one pulse carrying a step's traffic, as a client sends it:
// each tag's counts, health and metrics; every sample in the site-wide
// health; the untagged metrics site-wide.
func casePulse(traffic map[string]reflexcases.Traffic, seq uint64) *wire.PulseBody {
	p := &wire.PulseBody{InstanceID: "i", Seq: seq, WindowEndMs: time.Now().UnixMilli(), WindowMs: reflexcases.Window.Milliseconds(),
		Tags: map[string]wire.TagCount{}}
	var all []uint64
	var errors int
	health := func(ms []float64, errs int) *Health {
		if len(ms) == 0 {
			return nil
		}
		us := make([]uint64, len(ms))
		for i, v := range ms {
			us[i] = uint64(v * 1000)
		}
		h := instanceHealth(us)
		h.Errors = uint64(min(errs, len(ms)))
		return h
	}
	for tag, tr := range traffic {
		p.UsageDelta += tr.Calls
		for _, v := range tr.LatencyMs {
			all = append(all, uint64(v*1000))
		}
		errors += min(tr.Errors, len(tr.LatencyMs))
		metrics := map[string]MetricAgg{}
		for name, vs := range tr.Metrics {
			metrics[name] = reflexcases.Aggregate(vs)
		}
		if tag == "" {
			p.Metrics = metrics
			continue
		}
		tc := TagCount{Usage: tr.Calls, Health: health(tr.LatencyMs, tr.Errors)}
		if len(metrics) > 0 {
			tc.Metrics = metrics
		}
		p.Tags[tag] = tc
	}
	if len(all) > 0 {
		p.Health = instanceHealth(all)
		p.Health.Errors = uint64(errors)
	}
	return p
}
