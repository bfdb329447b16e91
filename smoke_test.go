package waitstate

import (
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

func TestSmoke(t *testing.T) {
	cp := newPlane(t)
	cp.SetPolicy("", controlplane.Policy{Version: 3, GlobalMaxWeight: 5, TagMaxWeights: map[string]float64{"free": 0, "ent": math.Inf(1)}})
	c, logs := startClient(t, testOptions(cp))
	waitReady(t, c)
	require.Equal(t, ModeEnforcing, c.Mode())
	require.False(t, c.Gate("free", 1).Allowed)
	require.True(t, c.Gate("ent", 100).Allowed)
	require.True(t, c.Gate("x", 5).Allowed)
	require.False(t, c.Gate("x", 6).Allowed)
	eventually(t, func() bool { return len(cp.Pulses()) >= 2 }, "pulses")
	t.Log(logs.String())
	t.Logf("%+v", c.Stats())
	t.Logf("%s", cp.Pulses()[0].Raw)
}
