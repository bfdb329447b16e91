package wire

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCanonicalStrings(t *testing.T) {
	body := []byte(`{"a":1}`)
	id := Identity{PublishKey: "pk", InstanceID: "i-1", SiteID: "eu-1"}
	assert.Equal(t,
		"v2\nPOST\n/v1/pulse?x=1\n1764230400\nabc\npk\ni-1\neu-1\n"+BodyHash(body),
		RequestCanonical("POST", "/v1/pulse?x=1", "1764230400", "abc", id, body))
	assert.Equal(t, "v2\nRESPONSE\n/v1/policy\nabc\ni-1\neu-1\n"+BodyHash(nil), ResponseCanonical("/v1/policy", "abc", id, nil))
	assert.Equal(t, "v2\nRESPONSE\n/v1/policy\nabc\ni-1\n\n"+BodyHash(nil),
		ResponseCanonical("/v1/policy", "abc", Identity{InstanceID: "i-1"}, nil), "no site: an empty line")
	// SHA-256 of the empty string.
	assert.Equal(t, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", BodyHash(nil))
}

func TestSignVerify(t *testing.T) {
	// HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), a
	// published test vector.
	sig := Sign("key", "The quick brown fox jumps over the lazy dog")
	assert.Equal(t, "v2=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8", sig)
	assert.True(t, Verify("key", "The quick brown fox jumps over the lazy dog", sig))
	for _, bad := range []string{"", "v2=", "v1=" + sig[3:], sig[3:], sig[:len(sig)-1] + "0", "v2=zz", sig + "00"} {
		assert.False(t, Verify("key", "The quick brown fox jumps over the lazy dog", bad), bad)
	}
	assert.False(t, Verify("other", "The quick brown fox jumps over the lazy dog", sig))
}

func TestRandomHexAndUUID(t *testing.T) {
	a, b := RandomHex(), RandomHex()
	assert.Regexp(t, `^[0-9a-f]{32}$`, a)
	assert.NotEqual(t, a, b)
	u := RandomUUID()
	assert.Regexp(t, `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`, u)
	assert.NotEqual(t, u, RandomUUID())
}

// TestHistogramScheme checks the bucket index against the scheme's
// definition, and that every bucket's midpoint is within 6.25 % of the
// values in it.
func TestHistogramScheme(t *testing.T) {
	for us := uint64(0); us < 8; us++ {
		assert.Equal(t, int(us), HistIndex(us))
	}
	cases := map[uint64]int{8: 8, 15: 15, 16: 16, 17: 16, 18: 17, 31: 23, 32: 24, 1000: 7*8 + 7, 1 << 20: 18 * 8}
	for us, want := range cases {
		assert.Equal(t, want, HistIndex(us), "%d µs", us)
	}
	for i := range 8 * 61 { // up to 2^63 µs: the last bucket's end would overflow
		lo, next := HistLower(i), HistLower(i+1)
		assert.Equal(t, i, HistIndex(lo), "bucket %d starts at %d", i, lo)
		assert.Equal(t, i, HistIndex(next-1), "bucket %d ends before %d", i, next)
		assert.Equal(t, i+1, HistIndex(next))
		mid := HistMid(i)
		for _, us := range []uint64{lo, next - 1} {
			if us > 0 {
				assert.LessOrEqual(t, abs(mid-float64(us))/float64(us), 0.0625, "bucket %d, %d µs", i, us)
			}
		}
	}
}

func abs(x float64) float64 { return max(x, -x) }

func TestPolicyEncoding(t *testing.T) {
	inf := math.Inf(1)
	b, err := Policy{Version: 3, GlobalMaxWeight: inf, TagMaxWeights: map[string]float64{"z": 0, "a": 2.5},
		GlobalShedPercent: 10, TagShedPercents: map[string]float64{"pro": 50}}.MarshalJSON()
	assert.NoError(t, err)
	assert.JSONEq(t, `{"version":3,"globalMaxWeight":"Infinity","tagMaxWeights":{"a":2.5,"z":0},"globalShedPercent":10,"tagShedPercents":{"pro":50}}`, string(b))
	assert.Contains(t, string(b), `{"a":2.5,"z":0}`, "sorted tags")
	b, err = Policy{Version: 1, GlobalMaxWeight: 1}.MarshalJSON()
	assert.NoError(t, err)
	assert.Equal(t, `{"version":1,"globalMaxWeight":1,"tagMaxWeights":{}}`, string(b), "shed fields only when set")
	for _, bad := range []Policy{{GlobalMaxWeight: -1}, {GlobalMaxWeight: math.NaN()}, {GlobalShedPercent: 101}, {TagShedPercents: map[string]float64{"a": -1}}} {
		_, err := bad.MarshalJSON()
		assert.ErrorIs(t, err, ErrUnencodable)
	}
}
