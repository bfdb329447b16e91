package wire

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCanonicalStrings(t *testing.T) {
	body := []byte(`{"a":1}`)
	assert.Equal(t,
		"v1\nPOST\n/v1/pulse?x=1\n1764230400\nabc\n"+BodyHash(body),
		RequestCanonical("POST", "/v1/pulse?x=1", "1764230400", "abc", body))
	assert.Equal(t, "v1\nRESPONSE\n/v1/policy\nabc\n"+BodyHash(nil), ResponseCanonical("/v1/policy", "abc", nil))
	// SHA-256 of the empty string.
	assert.Equal(t, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", BodyHash(nil))
}

func TestSignVerify(t *testing.T) {
	// HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), a
	// published test vector.
	sig := Sign("key", "The quick brown fox jumps over the lazy dog")
	assert.Equal(t, "v1=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8", sig)
	assert.True(t, Verify("key", "The quick brown fox jumps over the lazy dog", sig))
	for _, bad := range []string{"", "v1=", "v2=" + sig[3:], sig[3:], sig[:len(sig)-1] + "0", "v1=zz", sig + "00"} {
		assert.False(t, Verify("key", "The quick brown fox jumps over the lazy dog", bad), bad)
	}
	assert.False(t, Verify("other", "The quick brown fox jumps over the lazy dog", sig))
}

func TestRandomHex(t *testing.T) {
	a, b := RandomHex(), RandomHex()
	assert.Regexp(t, `^[0-9a-f]{32}$`, a)
	assert.NotEqual(t, a, b)
}
