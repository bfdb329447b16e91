package reflex_test

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/waitstate/waitstate-go/internal/reflex"
	"github.com/waitstate/waitstate-go/internal/reflex/reflexcases"
)

// TestCases runs the table of rule cases on the engine alone, over the
// figures the table computes for each step.
func TestCases(t *testing.T) {
	for _, c := range reflexcases.Cases {
		t.Run(c.Name, func(t *testing.T) {
			states := map[string]*reflex.State{}
			now := time.Unix(1_764_230_400, 0)
			for i, step := range c.Steps {
				reflex.Evaluate(c.Rules, states, func(scope string) reflex.Figures {
					return reflexcases.Figures(step.Traffic, scope)
				}, now)
				var fired []string
				for name, st := range states {
					if st.Fired {
						fired = append(fired, name)
					}
				}
				assert.Equal(t, step.Fired, sortedOrNil(fired), "step %d: fired", i)
				assert.Equal(t, reflexcases.Normalize(step.Want), reflexcases.Normalize(reflex.Overlay(c.Base, c.Rules, reflex.FiredIn(states))), "step %d", i)
				now = now.Add(reflexcases.Gap)
			}
		})
	}
}

// sortedOrNil sorts names, nil when empty, as the table writes them.
func sortedOrNil(names []string) []string {
	if len(names) == 0 {
		return nil
	}
	return slices.Sorted(slices.Values(names))
}
