package waitstatetest

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/waitstate/waitstate-go/internal/controlplane"
)

// Metric names what a Rule watches, measured over the rule window on the
// traffic of the rule's MetricTag.
type Metric string

// The metrics a Rule can watch. A custom metric recorded with
// Client.Record is "metric:<name>" (its mean over the window) or
// "metric:<name>:max" (its maximum).
const (
	MetricLatencyP50 Metric = "latency_p50_ms" // median latency in ms, of the pooled requests
	MetricLatencyP95 Metric = "latency_p95_ms" // 95th percentile latency in ms
	MetricLatencyP99 Metric = "latency_p99_ms" // 99th percentile latency in ms
	MetricErrorRate  Metric = "error_rate"     // failed samples over all samples, 0 to 1
	MetricRPS        Metric = "rps"            // offered Gate calls per second, allowed and denied
)

// Action is what a fired Rule does to its tag.
type Action string

// The actions of a Rule. A rule with no action caps its tag's weight at
// MaxWeight.
const (
	ActionBlock    Action = "block"    // shed every call of the tag
	ActionThrottle Action = "throttle" // admit AdmitPercent % of the tag's calls, shed the rest
	ActionCap      Action = "cap"      // lower the tag's weight limit to MaxWeight
)

// Rule is a reflex rule: while Metric, measured on MetricTag's traffic
// ("" is the whole site) over the rule window, is on the wrong side of
// Threshold, Action applies to TagName ("" is every tag). A fired rule
// clears once the metric has stayed on the good side for CooldownSeconds.
// Of several fired rules on one tag the strictest wins (the lowest weight
// limit, the highest shed), and a tag rule never loosens a global one.
//
// A Rule unmarshals from the control plane's JSON schema:
//
//	{"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
//	 "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30}
//
// A rule with "maxWeight" and no "action" is a cap; "gt", "gte", "lt" and
// "lte" are accepted for the operators. A throttle's AdmitPercent is the
// share it admits, "percent" in JSON ("admitPercent" is read too); the
// policy's shed percents are the share shed, so a throttle admitting 20
// sheds 80 %. A key the schema does not have is an error that names it.
type Rule struct {
	Name            string  `json:"name"`
	MetricTag       string  `json:"metricTag,omitempty"`
	Metric          Metric  `json:"metric"`
	Operator        string  `json:"operator"` // ">", ">=", "<" or "<="
	Threshold       float64 `json:"threshold"`
	TagName         string  `json:"tagName"`
	Action          Action  `json:"action,omitempty"`
	AdmitPercent    float64 `json:"percent,omitempty"`   // ActionThrottle: the share admitted, above 0, at most 100
	MaxWeight       float64 `json:"maxWeight,omitempty"` // ActionCap: the weight limit
	CooldownSeconds float64 `json:"cooldownSeconds"`
}

// UnmarshalJSON reads a rule in the schema above, refusing a key the schema
// does not have, a rule that says neither what to do nor a weight limit,
// and a throttle without a percent.
func (r *Rule) UnmarshalJSON(data []byte) error {
	var cr controlplane.Rule
	if err := json.Unmarshal(data, &cr); err != nil {
		return err
	}
	*r = ruleFrom(cr)
	return nil
}

// Validate reports what is wrong with r, if anything.
func (r Rule) Validate() error { return r.internal().Validate() }

func (r Rule) internal() controlplane.Rule {
	return controlplane.Rule{Name: r.Name, MetricTag: r.MetricTag, Metric: controlplane.Metric(r.Metric), Operator: r.Operator,
		Threshold: r.Threshold, TagName: r.TagName, Action: controlplane.Action(r.Action), AdmitPercent: r.AdmitPercent, MaxWeight: r.MaxWeight,
		CooldownSeconds: r.CooldownSeconds}
}

func ruleFrom(r controlplane.Rule) Rule {
	return Rule{Name: r.Name, MetricTag: r.MetricTag, Metric: Metric(r.Metric), Operator: r.Operator, Threshold: r.Threshold,
		TagName: r.TagName, Action: Action(r.Action), AdmitPercent: r.AdmitPercent, MaxWeight: r.MaxWeight, CooldownSeconds: r.CooldownSeconds}
}

// Faults script how the control plane misbehaves. The zero value is a
// healthy control plane; SetFaults replaces the faults in force.
type Faults struct {
	Down          bool          // answer every request 503
	RetryAfter    time.Duration // with Down, or a 429/503 status below: the Retry-After header
	Hang          bool          // never answer, until the client gives up or Close
	Delay         time.Duration // answer every request this late
	PulseStatus   int           // answer pulses with this status, not counting them
	PolicyStatus  int           // answer policy requests with this status
	TokenStatus   int           // answer token requests with this status
	CountThenHang bool          // count a pulse, then never answer: a lost acknowledgement
	Garbage       bool          // answer with a correctly signed body that is not JSON
	ForgeSig      bool          // sign answers with the wrong secret
	NoSig         bool          // send answers unsigned
	Replay        bool          // replay an earlier answer to the same path
	Oversize      bool          // answer with a correctly signed body over 1 MiB
	BadToken      TokenFault    // issue this kind of bad token
	NullPolicy    bool          // answer with "policy": null
}

// TokenFault makes the control plane issue tokens a client must refuse.
type TokenFault int

// The bad tokens the control plane can issue.
const (
	TokenOK           TokenFault = iota
	TokenWrongKey                // signed with another secret
	TokenAlgNone                 // "alg": "none", no signature
	TokenHS512                   // the right secret, the wrong algorithm
	TokenExpired                 // expired two minutes ago
	TokenNoExpiry                // no expiry
	TokenWrongSubject            // issued to another key
	TokenWrongIssuer             // not issued by "waitstate"
	TokenWrongSite               // for another site
	TokenGarbage                 // not a JWT at all
)

func (f Faults) internal() controlplane.Faults {
	return controlplane.Faults{Down: f.Down, RetryAfter: f.RetryAfter, Hang: f.Hang, Delay: f.Delay, PulseStatus: f.PulseStatus,
		PolicyStatus: f.PolicyStatus, TokenStatus: f.TokenStatus, CountThenHang: f.CountThenHang, Garbage: f.Garbage,
		ForgeSig: f.ForgeSig, NoSig: f.NoSig, Replay: f.Replay, Oversize: f.Oversize, BadToken: controlplane.TokenFault(f.BadToken),
		NullPolicy: f.NullPolicy}
}

// Pulse is a pulse as the control plane received it: one window of one
// client's counts and health.
type Pulse struct {
	InstanceID    string
	Incarnation   string // random, drawn once per process: two processes sharing an InstanceID differ here
	SiteID        string
	SDK           string // the client's name and version
	Seq           uint64 // 1, 2, …: a resent pulse keeps its seq
	WindowEnd     time.Time
	Window        time.Duration
	Mode          string // "fail_open", "enforcing" or "safe_mode"
	PolicyVersion int64
	Shadow        bool   // Gate decided in shadow: denials were counted, not enforced
	Usage         uint64 // calls allowed in the window
	Bounced       uint64 // calls denied in the window
	UsageTotal    uint64 // since the client started
	BouncedTotal  uint64
	Tags          map[string]TagCount
	Health        *Health           // every health sample of the window; nil without samples
	Metrics       map[string]Record // site-wide custom metrics
	Raw           []byte            // the body as it arrived
}

// TagCount is one tag's part of a pulse, or of Totals (which keep the
// counts only).
type TagCount struct {
	Usage   uint64
	Bounced uint64
	Health  *Health           // the tag's own samples (ObserveTag, the middleware)
	Metrics map[string]Record // the tag's custom metrics (Record)
}

// Health sums a window's health samples.
type Health struct {
	Requests  uint64
	Errors    uint64
	LatencyMs Latency
	Histogram map[int]uint64 // latency bucket → samples, in the wire's loglinear-us-8 scheme; nil without one
}

// Latency is a window's latency quantiles, in milliseconds.
type Latency struct {
	P50, P95, P99, Max float64
}

// Record sums the samples of one custom metric in a window.
type Record struct {
	Count         uint64
	Sum, Min, Max float64
}

func pulseFrom(p controlplane.Pulse) Pulse {
	out := Pulse{InstanceID: p.InstanceID, Incarnation: p.Incarnation, SiteID: p.SiteID, SDK: p.SDK, Seq: p.Seq, WindowEnd: time.UnixMilli(p.WindowEndMs),
		Window: time.Duration(p.WindowMs) * time.Millisecond, Mode: p.Mode, PolicyVersion: p.PolicyVersion, Shadow: p.Shadow,
		Usage: p.UsageDelta, Bounced: p.BouncedDelta, UsageTotal: p.UsageTotal, BouncedTotal: p.BouncedTotal,
		Tags: make(map[string]TagCount, len(p.Tags)), Health: healthFrom(p.Health), Metrics: recordsFrom(p.Metrics), Raw: p.Raw}
	for tag, tc := range p.Tags {
		out.Tags[tag] = TagCount{Usage: tc.Usage, Bounced: tc.Bounced, Health: healthFrom(tc.Health), Metrics: recordsFrom(tc.Metrics)}
	}
	return out
}

func healthFrom(h *controlplane.Health) *Health {
	if h == nil {
		return nil
	}
	out := &Health{Requests: h.Requests, Errors: h.Errors, LatencyMs: Latency(h.LatencyMs)}
	if h.Histogram != nil {
		out.Histogram = make(map[int]uint64, len(h.Histogram.Counts))
		for k, c := range h.Histogram.Counts {
			if i, err := strconv.Atoi(k); err == nil {
				out.Histogram[i] = c
			}
		}
	}
	return out
}

func recordsFrom(m map[string]controlplane.MetricAgg) map[string]Record {
	if m == nil {
		return nil
	}
	out := make(map[string]Record, len(m))
	for name, a := range m {
		out[name] = Record(a)
	}
	return out
}

// Totals are a site's counts over every pulse counted.
type Totals struct {
	Usage, Bounced uint64
	Pulses         int // pulses counted, each (instance, incarnation, seq) once
	Instances      int // distinct instance IDs that sent them and are remembered
	Tags           map[string]TagCount
}

func totalsFrom(t controlplane.Totals) Totals {
	out := Totals{Usage: t.Usage, Bounced: t.Bounced, Pulses: t.Pulses, Instances: t.Instances, Tags: make(map[string]TagCount, len(t.Tags))}
	for tag, tc := range t.Tags {
		out.Tags[tag] = TagCount{Usage: tc.Usage, Bounced: tc.Bounced}
	}
	return out
}

// Metrics are a site's figures over the rule window: what its rules read.
type Metrics struct {
	Pulses       int     // pulses in the window
	Instances    int     // distinct processes among them: instance IDs with their incarnations
	RPS          float64 // offered Gate calls per second
	Requests     uint64  // health samples
	ErrorRate    float64 // NaN without samples
	LatencyP50Ms float64 // NaN without samples
	LatencyP95Ms float64 // NaN without samples
	LatencyP99Ms float64 // NaN without samples
	Custom       map[string]Record
}

func metricsFrom(m controlplane.Metrics) Metrics {
	return Metrics{Pulses: m.Pulses, Instances: m.Instances, RPS: m.RPS, Requests: m.Requests, ErrorRate: m.ErrorRate,
		LatencyP50Ms: m.LatencyP50Ms, LatencyP95Ms: m.LatencyP95Ms, LatencyP99Ms: m.LatencyP99Ms, Custom: recordsFrom(m.Custom)}
}

// Event is a rule firing or clearing.
type Event struct {
	Seq     uint64 // 1 for the first event of the server
	At      time.Time
	Site    string
	Rule    string
	Fired   bool    // false: cleared
	Value   float64 // the metric when it happened; NaN without data
	Version int64   // the policy version it made
}

// Request is what the control plane saw of one request.
type Request struct {
	Method   string
	Path     string
	Header   http.Header
	Body     []byte // what the control plane read of it
	Status   int    // the status it answered
	At       time.Time
	Duration time.Duration
}

func requestFrom(r controlplane.Request) Request {
	return Request{Method: r.Method, Path: r.Path, Header: r.Header, Body: r.Body, Status: r.Status, At: r.At, Duration: r.Duration}
}

// convert maps a slice of the control plane's values to this package's.
func convert[T, U any](in []T, f func(T) U) []U {
	out := make([]U, 0, len(in))
	for _, v := range in {
		out = append(out, f(v))
	}
	return out
}
