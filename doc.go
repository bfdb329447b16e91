// Package waitstate is the Go SDK of WaitState: fleet-wide traffic
// intelligence on top of a service's existing infrastructure.
//
// # Overview
//
// A service calls [Client.Gate] before expensive work:
//
//	if r := client.Gate("free", 1); !r.Allowed {
//		return errBusy // r.Reason says why
//	}
//
// Gate answers from memory — one atomic load of an immutable snapshot, a
// table lookup, a compare and an atomic add — in nanoseconds, with no lock,
// no allocation and no I/O. Two background goroutines talk to the control
// plane: the pulse goroutine sends usage and health telemetry every
// [Options.PulseInterval], and the sync goroutine refreshes a JWT and fetches
// the policy every [Options.SyncInterval]. The control plane aggregates the
// fleet's pulses, runs reflex rules ("p95 latency above 500 ms: block tag
// free") and answers with a [Policy]: a global maximum weight and per-tag
// maximum weights.
//
// [HTTPMiddleware] gates net/http handlers and records each served request as
// a health sample; [Client.Observe] records samples for other work.
//
// # Lifecycle
//
// [New] validates [Options] and starts both goroutines; it never waits on the
// network. [Client.Ready] waits for the first policy if a caller wants to.
// [Client.Shutdown] (or [Client.Close], bounded by 5 seconds) stops the
// goroutines, waits for them, and flushes the pending pulse and the last
// window. Gate keeps answering after Shutdown, from the last state, and
// counts nothing more.
//
// # Policies and modes
//
// A Gate call of weight w for tag t is allowed when w is at most the tag's
// entry in [Policy.TagMaxWeights], or [Policy.GlobalMaxWeight] when the tag
// has none. [Policy.Gate] is the same decision as a pure function, for use
// without a client.
//
// The client answers in one of three modes ([Mode]):
//
//   - [ModeFailOpen] from New until the first policy is applied, and as long
//     as the control plane is unreachable, refuses the keys or answers
//     garbage: everything is allowed. The SDK's own trouble never fails a
//     request.
//   - [ModeEnforcing] while a policy is held and its lease is valid. Every
//     authenticated answer renews the lease, measured on the monotonic clock.
//   - [ModeSafeMode] when the lease expires without renewal: at most
//     [Options.SafeModeMaxRPS] admissions per second, whatever the tag or
//     weight, until a renewal returns the client to enforcing.
//
// # Telemetry and signing
//
// Every Gate call is counted exactly once, globally and per tag (up to
// [MaxWindowTags] distinct tags per window, the rest under [OtherTag]). A
// window is cut into a pulse with a sequence number; a pulse whose outcome is
// unknown is sent again, unchanged, until it is acknowledged, and the control
// plane counts each (instance, seq) once.
//
// Requests to the control plane are signed with HMAC-SHA256 over a canonical
// string that binds method, path, timestamp, a fresh nonce and the body's
// hash. Answers are signed too, bound to the request's nonce, and verified
// in constant time: a forged, replayed or oversized answer is refused and
// changes nothing. Tokens are HS256 JWTs validated with
// github.com/golang-jwt/jwt/v5. The secret key is never sent, logged or put
// in an error.
//
// # Testing
//
// Package waitstatetest starts the project's reference control plane on
// loopback, in the spirit of net/http/httptest: a real HTTP server that
// speaks the whole protocol, runs reflex rules, and can be told to fail in
// every way the SDK must survive (down, hanging, 5xx, garbage, forged
// signatures, bad tokens, bad policies). Its Options method returns Options
// for New. The SDK's own tests run against the same server with -race; none
// uses a mocked transport.
package waitstate
