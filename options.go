package waitstate

import (
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// Defaults applied by New to zero-valued Options fields.
const (
	DefaultBaseURL        = "https://api.waitstate.io"
	DefaultPulseInterval  = 20 * time.Second
	DefaultSyncInterval   = 30 * time.Second
	DefaultSafeModeMaxRPS = 50
)

// MinInterval is the shortest PulseInterval or SyncInterval New accepts,
// and the shortest a control plane can set: a shorter cadence would spend
// the service's CPU and the control plane's capacity on requests, not
// protection.
const MinInterval = 100 * time.Millisecond

// Options configures a Client. The zero value of every optional field
// selects its default; New refuses invalid values instead of clamping them.
type Options struct {
	// PublishKey identifies the key pair. Required. It is sent in every
	// request's X-WaitState-Key header, so it must be a valid header value.
	PublishKey string

	// SecretKey signs requests and verifies responses and tokens. Required.
	// It is never sent, logged or included in an error, and Options prints
	// it as [REDACTED] with every verb, in slog and in JSON. One case is
	// beyond its reach: fmt prints an unexported struct field of type
	// Options field by field, without calling its methods, so do not print
	// a struct that keeps Options in an unexported field.
	SecretKey string

	// BaseURL is the control plane's address, http or https.
	// If empty, DefaultBaseURL.
	BaseURL string

	// SiteID is an optional shard key that isolates sites within one
	// organisation. If empty, no site is sent.
	SiteID string

	// PulseInterval is the time between two pulses of telemetry, unless
	// the control plane's last answer set another; one that sets none
	// returns the client to it. If zero, DefaultPulseInterval. Less than
	// MinInterval, negative included, is an error.
	PulseInterval time.Duration

	// SyncInterval is the time between two policy fetches, unless the
	// control plane's last answer set another, as for PulseInterval. If
	// zero, DefaultSyncInterval. Less than MinInterval, negative included,
	// is an error.
	SyncInterval time.Duration

	// SafeModeMaxRPS is the rate of SafeModeFixedRPS: admissions per second
	// once a lease has expired, with a burst of one second's worth. If
	// zero, DefaultSafeModeMaxRPS.
	SafeModeMaxRPS uint64

	// HTTPClient sends the requests. If nil, the client uses its own
	// transport, whose idle connections Shutdown closes. Per-request
	// timeouts are set by the SDK through the request context.
	HTTPClient *http.Client

	// Logger receives state changes and errors. If nil, nothing is logged.
	Logger *slog.Logger

	// InstanceID is a name to read in the control plane's figures: it
	// names this client in every request and pulse. A stable name (pod,
	// host) makes a fleet's pulses readable; it must be at most 256 bytes
	// of printable ASCII without spaces. If empty, a random UUID version 4.
	//
	// It need not be unique. Each New also draws a random incarnation that
	// names the process's own pulses, so two processes sharing an
	// InstanceID (two replicas on one host, a blue/green pair) and a
	// process restarted under the same name are each counted exactly once;
	// a control plane that sees two processes pulse under one InstanceID
	// at once says so in its log.
	InstanceID string

	// SafeMode says how Gate answers once a lease has expired without
	// renewal. The zero value is SafeModeFixedRPS.
	SafeMode SafeModeStrategy

	// Shadow runs the client as a dry run: Gate decides and counts as usual
	// but always allows, marking a call it would have denied with
	// GateResult.Shadowed; pulses say so, so a control plane can tell a dry
	// run's denials from real ones. If false, Gate enforces.
	Shadow bool

	// InitialPolicy, when set, is in force from New, enforcing and without
	// a lease, until the control plane's first policy replaces it whatever
	// either version is. It never expires into safe mode, Ready returns at
	// once, and OnPolicyApplied is not called for it. If nil, the client
	// fails open until the first policy. It must pass Policy.Validate.
	InitialPolicy *Policy

	// Offline starts no goroutine and sends nothing: Gate answers from
	// InitialPolicy, or fails open, and counts show in Stats. The keys are
	// not required. If false, the client talks to the control plane.
	Offline bool

	// OnModeChange, if set, is called on each change of mode, with the
	// mode before and after. Callbacks run one at a time, in the order of
	// the changes, on the client's background goroutines, never under a
	// lock and never on the Gate path; a panic in one is recovered and
	// logged. Keep them short, and do not call Shutdown or Close from one.
	OnModeChange func(from, to Mode)

	// OnPolicyApplied, if set, is called with a copy of each policy applied
	// from the control plane (or restored from the PolicyStore), as
	// OnModeChange is.
	OnPolicyApplied func(p *Policy)

	// PolicyStore, when set, keeps the last verified answer of the control
	// plane that brought a policy or reflex rules, so that a process
	// restarted while the control plane is away enforces what it enforced
	// before. The client saves an answer off the Gate path, one save at a
	// time, when the policy or the rules changed (and renews the snapshot
	// every quarter of SnapshotMaxAge while they stay the same). New loads
	// it once, waiting at most one second; a snapshot sealed with this
	// SecretKey, answered to this PublishKey and SiteID and younger than
	// SnapshotMaxAge is put in force: enforcing, with the lease New gives,
	// Stats().Restored set and Ready returning at once, until the control
	// plane's first policy replaces it whatever its version. Any other
	// snapshot is logged and ignored, and a store that fails is logged and
	// counted in Stats().StoreErrors: the client then starts as it would
	// without one. FileStore keeps it in a file. If nil, nothing is kept.
	// An Offline client neither loads nor saves.
	PolicyStore PolicyStore

	// SnapshotMaxAge is the age past which a snapshot is not restored. If
	// zero, DefaultSnapshotMaxAge (24 hours). Negative is an error.
	SnapshotMaxAge time.Duration
}

// Environment variables read by OptionsFromEnv.
const (
	EnvPublishKey     = "WAITSTATE_PUBLISH_KEY"       // Options.PublishKey
	EnvSecretKey      = "WAITSTATE_SECRET_KEY"        // Options.SecretKey
	EnvBaseURL        = "WAITSTATE_BASE_URL"          // Options.BaseURL
	EnvSiteID         = "WAITSTATE_SITE_ID"           // Options.SiteID
	EnvInstanceID     = "WAITSTATE_INSTANCE_ID"       // Options.InstanceID
	EnvPulseInterval  = "WAITSTATE_PULSE_INTERVAL"    // Options.PulseInterval, a Go duration such as "20s"
	EnvSyncInterval   = "WAITSTATE_SYNC_INTERVAL"     // Options.SyncInterval, a Go duration
	EnvSafeMode       = "WAITSTATE_SAFE_MODE"         // Options.SafeMode: fixed_rps, last_policy, open or local_rules
	EnvSafeModeMaxRPS = "WAITSTATE_SAFE_MODE_MAX_RPS" // Options.SafeModeMaxRPS, a whole number
	EnvShadow         = "WAITSTATE_SHADOW"            // Options.Shadow: true or false (as strconv.ParseBool)
	EnvPolicyFile     = "WAITSTATE_POLICY_FILE"       // Options.PolicyStore: a FileStore at this path
)

// OptionsFromEnv returns Options filled from the WAITSTATE_* variables
// above; an unset or empty variable leaves its field zero, so New applies
// its default. It returns an error wrapping ErrInvalidOptions, naming the
// variable, when either key is unset (the error is also ErrNoKeys) or a
// value does not parse. The error never quotes the secret key.
func OptionsFromEnv() (Options, error) {
	opts := Options{
		PublishKey: os.Getenv(EnvPublishKey),
		SecretKey:  os.Getenv(EnvSecretKey),
		BaseURL:    os.Getenv(EnvBaseURL),
		SiteID:     os.Getenv(EnvSiteID),
		InstanceID: os.Getenv(EnvInstanceID),
	}
	switch {
	case opts.PublishKey == "":
		return Options{}, noKeyError{EnvPublishKey}
	case opts.SecretKey == "":
		return Options{}, noKeyError{EnvSecretKey}
	}
	var err error
	for _, d := range []struct {
		name string
		dst  *time.Duration
	}{{EnvPulseInterval, &opts.PulseInterval}, {EnvSyncInterval, &opts.SyncInterval}} {
		if v := os.Getenv(d.name); v != "" {
			if *d.dst, err = time.ParseDuration(v); err != nil || *d.dst != 0 && *d.dst < MinInterval {
				return Options{}, optionError("%s=%q is not a duration of at least %v, such as 20s", d.name, v, MinInterval)
			}
		}
	}
	if v := os.Getenv(EnvSafeMode); v != "" {
		if err := opts.SafeMode.UnmarshalText([]byte(v)); err != nil {
			return Options{}, optionError("%s=%q is not fixed_rps, last_policy, open or local_rules", EnvSafeMode, v)
		}
	}
	if v := os.Getenv(EnvSafeModeMaxRPS); v != "" {
		if opts.SafeModeMaxRPS, err = strconv.ParseUint(v, 10, 64); err != nil {
			return Options{}, optionError("%s=%q is not a whole number", EnvSafeModeMaxRPS, v)
		}
	}
	if v := os.Getenv(EnvPolicyFile); v != "" {
		opts.PolicyStore = FileStore(v)
	}
	if v := os.Getenv(EnvShadow); v != "" {
		if opts.Shadow, err = strconv.ParseBool(v); err != nil {
			return Options{}, optionError("%s=%q is not true or false", EnvShadow, v)
		}
	}
	return opts, nil
}

// maxSiteIDLen bounds SiteID and InstanceID, like a policy's tag names.
const maxSiteIDLen = wire.MaxIDBytes

// withDefaults validates o and returns it with every default applied.
// Errors wrap ErrInvalidOptions and never quote the secret key.
func (o Options) withDefaults() (Options, *url.URL, error) {
	if o.PublishKey == "" && !o.Offline {
		return o, nil, optionError("PublishKey is required")
	}
	if !validHeaderValue(o.PublishKey) {
		return o, nil, optionError("PublishKey must be printable ASCII without spaces")
	}
	if o.SecretKey == "" && !o.Offline {
		return o, nil, optionError("SecretKey is required")
	}
	if len(o.InstanceID) > maxSiteIDLen || !validHeaderValue(o.InstanceID) {
		return o, nil, optionError("InstanceID must be at most %d bytes of printable ASCII without spaces", maxSiteIDLen)
	}
	if o.SafeMode < SafeModeFixedRPS || o.SafeMode > SafeModeLocalRules {
		return o, nil, optionError("SafeMode %d is not a SafeModeStrategy", int(o.SafeMode))
	}
	if o.InitialPolicy != nil {
		if err := o.InitialPolicy.Validate(); err != nil {
			return o, nil, optionError("InitialPolicy: %v", err)
		}
		o.InitialPolicy = o.InitialPolicy.Clone()
	}
	if len(o.SiteID) > maxSiteIDLen || !validHeaderValue(o.SiteID) {
		return o, nil, optionError("SiteID must be at most %d bytes of printable ASCII without spaces", maxSiteIDLen)
	}
	if o.PulseInterval != 0 && o.PulseInterval < MinInterval {
		return o, nil, optionError("PulseInterval %v is less than MinInterval (%v)", o.PulseInterval, MinInterval)
	}
	if o.SyncInterval != 0 && o.SyncInterval < MinInterval {
		return o, nil, optionError("SyncInterval %v is less than MinInterval (%v)", o.SyncInterval, MinInterval)
	}
	if o.SnapshotMaxAge < 0 {
		return o, nil, optionError("SnapshotMaxAge is negative (%v)", o.SnapshotMaxAge)
	}
	if fs, ok := o.PolicyStore.(*fileStore); ok && fs.path == "" {
		return o, nil, optionError("PolicyStore: FileStore has an empty path")
	}
	if o.BaseURL == "" {
		o.BaseURL = DefaultBaseURL
	}
	u, err := url.Parse(o.BaseURL)
	if err != nil {
		// url.Parse quotes the input, which may hold userinfo: say less.
		return o, nil, optionError("BaseURL does not parse")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return o, nil, optionError("BaseURL scheme must be http or https, not %q", u.Scheme)
	}
	if u.Host == "" {
		return o, nil, optionError("BaseURL has no host")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return o, nil, optionError("BaseURL must not have a query or fragment")
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	if o.PulseInterval == 0 {
		o.PulseInterval = DefaultPulseInterval
	}
	if o.SyncInterval == 0 {
		o.SyncInterval = DefaultSyncInterval
	}
	if o.SafeModeMaxRPS == 0 {
		o.SafeModeMaxRPS = DefaultSafeModeMaxRPS
	}
	if o.SnapshotMaxAge == 0 {
		o.SnapshotMaxAge = DefaultSnapshotMaxAge
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.InstanceID == "" {
		o.InstanceID = wire.RandomUUID()
	}
	return o, u, nil
}

// validHeaderValue reports whether s is printable ASCII with no spaces, so
// it can travel in a header unchanged.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}
