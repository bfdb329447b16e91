// Package wire holds every detail of the WaitState protocol that the SDK and
// the reference control plane share: header names, the canonical strings
// that are signed, the HMAC helpers, the pulse body, the latency histogram
// scheme and the encoding of weights. Matching another control plane is a
// change to this package.
package wire

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// Header names of the protocol.
const (
	HeaderKey       = "X-WaitState-Key"
	HeaderInstance  = "X-WaitState-Instance"
	HeaderNonce     = "X-WaitState-Nonce"
	HeaderSite      = "X-WaitState-Site"
	HeaderTimestamp = "X-WaitState-Timestamp"
	HeaderSignature = "X-WaitState-Signature"
)

// Endpoint paths.
const (
	PathToken  = "/v1/token"
	PathPolicy = "/v1/policy"
	PathPulse  = "/v1/pulse"
)

// Issuer is the JWT "iss" claim of every token.
const Issuer = "waitstate"

// signatureVersion names the signature scheme; it opens every canonical
// string and prefixes every signature header as "v2=".
const signatureVersion = "v2"

// MaxClockSkewSeconds is how far a signed request's timestamp may be from
// the control plane's clock; the control plane remembers nonces this long.
const MaxClockSkewSeconds = 300

// MaxBody is the largest request or response body either side accepts.
const MaxBody = 1 << 20

// BodyHash is the lowercase hex SHA-256 of body.
func BodyHash(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

// Identity is what a request says about who sends it: the publish key, the
// instance and the site ("" when unset). Both directions of signing bind it,
// so an answer meant for another instance or site cannot be passed off as
// this one's.
type Identity struct {
	PublishKey string
	InstanceID string
	SiteID     string
}

// RequestCanonical is the string a signed request's signature covers. path
// is the request URI as sent, with its query if any.
func RequestCanonical(method, path, timestamp, nonce string, id Identity, body []byte) string {
	return strings.Join([]string{signatureVersion, method, path, timestamp, nonce,
		id.PublishKey, id.InstanceID, id.SiteID, BodyHash(body)}, "\n")
}

// ResponseCanonical is the string a signed response's signature covers.
// path, nonce and the identity are those of the request it answers.
func ResponseCanonical(path, nonce string, id Identity, body []byte) string {
	return strings.Join([]string{signatureVersion, "RESPONSE", path, nonce,
		id.InstanceID, id.SiteID, BodyHash(body)}, "\n")
}

// Sign returns the X-WaitState-Signature header value for canonical.
func Sign(secret, canonical string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(canonical))
	return signatureVersion + "=" + hex.EncodeToString(m.Sum(nil))
}

// Verify reports whether header is the signature of canonical, comparing in
// constant time. A header of another scheme or a malformed one is false.
func Verify(secret, canonical, header string) bool {
	got, ok := strings.CutPrefix(header, signatureVersion+"=")
	if !ok {
		return false
	}
	gotMAC, err := hex.DecodeString(got)
	if err != nil {
		return false
	}
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(canonical))
	return hmac.Equal(gotMAC, m.Sum(nil))
}

// RandomHex returns 128 random bits as 32 lowercase hex digits.
func RandomHex() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// RandomUUID returns a random UUID version 4 in its canonical form:
// 8-4-4-4-12 lowercase hex digits.
func RandomUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // variant 10
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}
