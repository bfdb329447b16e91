// Package wire holds the parts of the WaitState protocol that the SDK and the
// reference control plane share: header names, the canonical strings that
// are signed, and the HMAC helpers. It knows nothing of policies or pulses.
package wire

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// Header names of the protocol (SPEC §4).
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

// signaturePrefix marks version 1 of the signature scheme.
const signaturePrefix = "v1="

// MaxClockSkewSeconds is how far a signed request's timestamp may be from
// the control plane's clock.
const MaxClockSkewSeconds = 300

// BodyHash is the lowercase hex SHA-256 of body.
func BodyHash(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

// RequestCanonical is the string a signed request's signature covers.
func RequestCanonical(method, path, timestamp, nonce string, body []byte) string {
	return strings.Join([]string{"v1", method, path, timestamp, nonce, BodyHash(body)}, "\n")
}

// ResponseCanonical is the string a signed response's signature covers.
// path and nonce are those of the request it answers.
func ResponseCanonical(path, nonce string, body []byte) string {
	return strings.Join([]string{"v1", "RESPONSE", path, nonce, BodyHash(body)}, "\n")
}

// Sign returns the X-WaitState-Signature header value for canonical.
func Sign(secret, canonical string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(canonical))
	return signaturePrefix + hex.EncodeToString(m.Sum(nil))
}

// Verify reports whether header is the signature of canonical, comparing in
// constant time. A header of another scheme or a malformed one is false.
func Verify(secret, canonical, header string) bool {
	got, ok := strings.CutPrefix(header, signaturePrefix)
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
