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

// post sends a signed request the way the SDK does, as instance i1.
func post(t *testing.T, s *Server, path, key, secret string, body []byte) *http.Response {
	t.Helper()
	id := wire.Identity{PublishKey: key, InstanceID: "i1"}
	return postAs(t, s, path, secret, id, id, body)
}

// postAs sends a request signed for signed that says it is sent by sent.
func postAs(t *testing.T, s *Server, path, secret string, signed, sent wire.Identity, body []byte) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL+path, bytes.NewReader(body))
	require.NoError(t, err)
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	nonce := wire.RandomHex()
	req.Header.Set(wire.HeaderKey, sent.PublishKey)
	req.Header.Set(wire.HeaderInstance, sent.InstanceID)
	if sent.SiteID != "" {
		req.Header.Set(wire.HeaderSite, sent.SiteID)
	}
	req.Header.Set(wire.HeaderNonce, nonce)
	req.Header.Set(wire.HeaderTimestamp, ts)
	req.Header.Set(wire.HeaderSignature, wire.Sign(secret, wire.RequestCanonical(http.MethodPost, path, ts, nonce, signed, body)))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		assert.True(t, wire.Verify(secret, wire.ResponseCanonical(path, nonce, sent, data), resp.Header.Get(wire.HeaderSignature)), "signed answer")
	}
	return resp
}

// TestSignatureBindsIdentity: a request signed for one instance and site
// and sent as another is refused; the answer is signed for the sender.
func TestSignatureBindsIdentity(t *testing.T) {
	s := New()
	defer s.Close()
	s.AddKey("pk", "sk")
	s.SetPolicy("", Policy{Version: 1, GlobalMaxWeight: 1})
	eu := wire.Identity{PublishKey: "pk", InstanceID: "i1", SiteID: "eu-1"}
	body := []byte(`{"instanceId":"i1","siteId":"eu-1","seq":1,"usageDelta":1,"tags":{}}`)
	for name, sent := range map[string]wire.Identity{
		"another site":     {PublishKey: "pk", InstanceID: "i1", SiteID: "us-1"},
		"no site":          {PublishKey: "pk", InstanceID: "i1"},
		"another instance": {PublishKey: "pk", InstanceID: "i2", SiteID: "eu-1"},
	} {
		assert.Equal(t, http.StatusUnauthorized, postAs(t, s, wire.PathPulse, "sk", eu, sent, body).StatusCode, name)
	}
	assert.Zero(t, s.Totals("eu-1").Pulses)
	assert.Equal(t, http.StatusOK, postAs(t, s, wire.PathPulse, "sk", eu, eu, body).StatusCode)
	assert.Equal(t, 1, s.Totals("eu-1").Pulses)
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
