package waitstate

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Sentinel errors. Test for them with errors.Is.
var (
	// ErrInvalidOptions is wrapped by every error New returns for bad Options.
	ErrInvalidOptions = errors.New("waitstate: invalid options")

	// ErrNoKeys is wrapped, with ErrInvalidOptions, by the error
	// OptionsFromEnv returns when WAITSTATE_PUBLISH_KEY or
	// WAITSTATE_SECRET_KEY is unset. A service that must also run without
	// keys, on a developer's machine, tests for it and starts Offline (or
	// against a waitstatetest server) instead; any other error means a
	// deployment's configuration is wrong.
	ErrNoKeys = errors.New("waitstate: keys not set")

	// ErrClosed is returned by Ready once the client has been shut down
	// before a policy was applied.
	ErrClosed = errors.New("waitstate: client closed")

	// ErrBadSignature wraps a response whose X-WaitState-Signature is
	// missing or does not verify. The response is discarded.
	ErrBadSignature = errors.New("waitstate: response signature missing or invalid")

	// ErrBadPolicy wraps a policy that was refused whole; the one in force stays.
	ErrBadPolicy = errors.New("waitstate: invalid policy")

	// ErrBadToken wraps a token that failed validation; it is dropped and never sent.
	ErrBadToken = errors.New("waitstate: invalid token")

	// ErrResponseTooLarge wraps a response whose body exceeds 1 MiB.
	ErrResponseTooLarge = errors.New("waitstate: response body over 1 MiB")

	// ErrBadResponse wraps a signed 2xx response whose body does not parse.
	ErrBadResponse = errors.New("waitstate: malformed response body")
)

// StatusError is a non-2xx answer from the control plane.
type StatusError struct {
	Op         string        // "token", "policy" or "pulse"
	StatusCode int           // the HTTP status
	RetryAfter time.Duration // the Retry-After header, capped at 10 minutes; 0 if none
}

// Error says which request got which status; it quotes nothing else.
func (e *StatusError) Error() string {
	return fmt.Sprintf("waitstate: %s: control plane answered %d %s", e.Op, e.StatusCode, http.StatusText(e.StatusCode))
}

// noKeyError is OptionsFromEnv's error for an unset key variable: it is
// both ErrInvalidOptions and ErrNoKeys.
type noKeyError struct{ name string }

func (e noKeyError) Error() string {
	return fmt.Sprintf("%v: %s is not set", ErrInvalidOptions, e.name)
}

func (e noKeyError) Is(target error) bool { return target == ErrInvalidOptions || target == ErrNoKeys }

// optionError builds an error wrapping ErrInvalidOptions.
func optionError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidOptions, fmt.Sprintf(format, args...))
}
