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
// fleet's pulses, runs reflex rules ("when enterprise p95 > 300 ms, block
// free, throttle pro to 50 %") and answers with a [Policy]: weight limits and
// shed percents, global and per tag.
//
// Health is measured per tag: [Client.StartTimer] and [Timer.Stop], or
// [Client.ObserveTag], record one sample of a tag's traffic (its latency and
// whether it failed); [Client.Observe] records a site-wide one.
// [Client.Record] records a sample of a custom metric, such as a queue depth.
// [Client.HTTPMiddleware] gates net/http handlers and records each served
// request under its tag.
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
// has none, and it is not among the calls shed at the tag's shed percent
// ([Policy.TagShedPercents], else [Policy.GlobalShedPercent]). Shedding is
// even, not random: at 50 % every other call is shed ([ReasonThrottled]).
// [Policy.Gate] is the weight check as a pure function, for use without a
// client.
//
// The client answers in one of three modes ([Mode]):
//
//   - [ModeFailOpen] from New until the first policy is applied, and as long
//     as the control plane is unreachable, refuses the keys or answers
//     garbage: everything is allowed. The SDK's own trouble never fails a
//     request.
//   - [ModeEnforcing] while a policy is held and its lease is valid. Every
//     authenticated answer renews the lease, measured on the monotonic clock.
//   - [ModeSafeMode] when the lease expires without renewal, until a renewal
//     returns the client to enforcing. [Options.SafeMode] chooses what Gate
//     does then: [SafeModeFixedRPS] (the default) admits
//     [Options.SafeModeMaxRPS] calls per second whatever the tag or weight,
//     [SafeModeLastPolicy] keeps answering with the last policy,
//     [SafeModeOpen] allows everything, and [SafeModeLocalRules] runs the
//     control plane's reflex rules ([Client.Rules]) on the client's own
//     samples.
//
// [Options.Shadow] makes a dry run: Gate decides and counts as usual but
// always allows, marking would-be denials with [GateResult.Shadowed].
// [Options.InitialPolicy] enforces a policy from New until the control
// plane's first one; [Options.Offline] runs without a control plane at all.
// [Options.PolicyStore] keeps the last verified answer across restarts
// ([FileStore] keeps it in a file): a process restarted while the control
// plane is away enforces the policy it had from its first call.
// [Options.OnModeChange] and [Options.OnPolicyApplied] report changes, off
// the Gate path.
//
// # Telemetry and signing
//
// Every Gate call is counted exactly once, globally and per tag (up to
// [MaxWindowTags] distinct tags per window, the rest under [OtherTag], as are
// tags longer than [MaxTagNameBytes] or not valid UTF-8). Each health sample
// lands whole in one window, so every pulse has errors <= requests. A window
// is cut into a pulse with a sequence number, carrying per-tag counts,
// health with a latency histogram, and custom metrics; a pulse whose outcome
// is unknown is sent again, unchanged, until it is acknowledged, and the
// control plane counts each (instance, seq) once. A pulse always fits in
// the 1 MiB a control plane accepts: a window too detailed for that leaves
// out, in turn, its tags' histograms, their custom metrics, and then its
// tags with the fewest calls, whose calls it counts under [OtherTag] — never
// a call ([Stats].PulsesTrimmed). The control plane may set the pulse and
// sync intervals in its answers.
//
// Requests to the control plane are signed with HMAC-SHA256 over a canonical
// string that binds method, path, timestamp, a fresh nonce, the publish key,
// the instance, the site and the body's hash. Answers are signed too, bound
// to the request's nonce, instance and site, and verified in constant time:
// a forged, replayed, relayed or oversized answer is refused and changes
// nothing. Tokens are HS256 JWTs validated with
// github.com/golang-jwt/jwt/v5. The secret key is never sent, logged or put
// in an error, and values that hold it print it as [REDACTED].
//
// # Glossary
//
//   - Allowed, denied: what Gate answers. On the wire, and in Stats and the
//     control plane's totals, allowed calls are "usage" and denied calls
//     "bounced".
//   - Tag: the class of traffic a call belongs to, such as a plan or a
//     tenant tier; limits, shedding and health are per tag.
//   - Weight: what a call costs; a weight limit denies calls heavier than it.
//   - Shed: denied by a policy's shed percent for its tag, evenly (1 of 2
//     at 50 %). A shed call's reason is [ReasonThrottled].
//   - Throttled: a tag whose shed percent is between 0 and 100, or a call
//     shed by one.
//   - Blocked: a tag shed at 100 %: every call denied.
//   - Pulse: a window's counts, health and metrics, sent to the control
//     plane; sync: the fetch of the current policy.
//   - Lease: how long a policy holds without a successful pulse or sync;
//     past it, the client is in safe mode.
//   - Shadow: a dry run; every call is allowed and the ones the policy
//     would deny are counted as denied.
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
