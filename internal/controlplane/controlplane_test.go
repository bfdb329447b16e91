package controlplane

import (
	"bytes"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/waitstate/waitstate-go/internal/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// post sends a signed request the way the SDK does.
func post(t *testing.T, s *Server, path, key, secret string, body []byte) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL+path, bytes.NewReader(body))
	require.NoError(t, err)
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	nonce := wire.RandomHex()
	req.Header.Set(wire.HeaderKey, key)
	req.Header.Set(wire.HeaderInstance, "i1")
	req.Header.Set(wire.HeaderNonce, nonce)
	req.Header.Set(wire.HeaderTimestamp, ts)
	req.Header.Set(wire.HeaderSignature, wire.Sign(secret, wire.RequestCanonical(http.MethodPost, path, ts, nonce, wire.Identity{PublishKey: key, InstanceID: "i1"}, body)))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		assert.True(t, wire.Verify(secret, wire.ResponseCanonical(path, nonce, wire.Identity{PublishKey: key, InstanceID: "i1"}, data), resp.Header.Get(wire.HeaderSignature)), "signed answer")
	}
	return resp
}

func TestServerCountsEachPulseOnce(t *testing.T) {
	s := New()
	defer s.Close()
	s.AddKey("pk", "sk")
	body := []byte(`{"instanceId":"i1","seq":1,"usageDelta":3,"bouncedDelta":1,"tags":{"a":{"usage":3,"bounced":1}}}`)
	assert.Equal(t, http.StatusOK, post(t, s, wire.PathPulse, "pk", "sk", body).StatusCode)
	assert.Equal(t, http.StatusOK, post(t, s, wire.PathPulse, "pk", "sk", body).StatusCode, "a repeat is acknowledged")
	assert.Equal(t, Totals{Usage: 3, Bounced: 1, Pulses: 1, Instances: 1, Tags: map[string]TagCount{"a": {Usage: 3, Bounced: 1}}}, s.Totals(""))

	assert.Equal(t, http.StatusUnauthorized, post(t, s, wire.PathPulse, "pk", "wrong", body).StatusCode)
	assert.Equal(t, http.StatusUnauthorized, post(t, s, wire.PathPulse, "nope", "sk", body).StatusCode)
	assert.Equal(t, http.StatusBadRequest, post(t, s, wire.PathPulse, "pk", "sk", []byte(`{}`)).StatusCode)
}

func TestPolicyJSON(t *testing.T) {
	data, err := json.Marshal(Policy{Version: 2, GlobalMaxWeight: math.Inf(1), TagMaxWeights: map[string]float64{"free": 0}})
	require.NoError(t, err)
	assert.JSONEq(t, `{"version":2,"globalMaxWeight":"Infinity","tagMaxWeights":{"free":0}}`, string(data))
}
