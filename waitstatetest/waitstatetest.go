// Package waitstatetest runs a WaitState control plane on loopback, in the
// spirit of net/http/httptest: start one in a test (or an example, or a
// demo) in a line, point a waitstate.Client at it with Options, set
// policies and reflex rules, read the pulses it received, and script faults
// and recovery.
//
// The control plane is the project's reference implementation: it speaks
// the whole protocol, verifies every signature and token, counts each
// (instance, seq) once, aggregates pulses per site and runs reflex rules on
// them. Nothing in it is mocked; it is a real HTTP server.
//
//	srv := waitstatetest.NewTestServer(t)
//	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: 10})
//	client, err := waitstate.New(srv.Options())
package waitstatetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/dashboard"
)

// Intervals of the Options a Server hands out: short, so tests are quick.
const (
	PulseInterval = 100 * time.Millisecond
	SyncInterval  = 200 * time.Millisecond
	// RuleWindow is how far back the rules look: five pulse intervals.
	RuleWindow = 5 * PulseInterval
)

// Server is a control plane on loopback. Its methods are safe for
// concurrent use.
type Server struct {
	// URL is the control plane's base URL, for Options.BaseURL.
	URL string

	// The control plane and the keys sit behind atomic pointers, which fmt
	// prints as addresses whatever the verb: a Server printed by value (a
	// copy's fields, which no method of Server can format) shows no key.
	// A plain pointer is not enough: fmt prints what it points to for a
	// verb such as %s.
	state atomic.Pointer[state]

	uiOnce sync.Once
	ui     http.Handler
	uiStop context.CancelFunc
	uiDone chan struct{}
}

// state is what a Server holds besides its URL.
type state struct {
	cp                    *controlplane.Server
	publishKey, secretKey string
}

// st is the Server's state.
func (s *Server) st() *state { return s.state.Load() }

// DefaultPolicy is the policy a Server serves until SetPolicy: version 1,
// unlimited, nothing shed. So a client becomes Ready against a server a
// test set up with no policy, instead of waiting for one silently.
func DefaultPolicy() *waitstate.Policy {
	return &waitstate.Policy{Version: 1, GlobalMaxWeight: math.Inf(1)}
}

// NewServer starts a control plane on loopback with a fresh key pair,
// serving DefaultPolicy until SetPolicy. Close it when done.
func NewServer() *Server {
	st := &state{cp: controlplane.New(), publishKey: "pk_test_" + randomHex(), secretKey: "sk_test_" + randomHex()}
	s := &Server{URL: st.cp.URL}
	s.state.Store(st)
	st.cp.AddKey(st.publishKey, st.secretKey)
	s.st().cp.SetRuleWindow(RuleWindow)
	s.st().cp.SetLogLimit(LogLimit)
	s.SetPolicy("", DefaultPolicy())
	return s
}

// NewTestServer is NewServer, closed when tb's test ends.
func NewTestServer(tb testing.TB) *Server {
	tb.Helper()
	s := NewServer()
	tb.Cleanup(s.Close)
	return s
}

// Close stops the server. Hung requests are released first.
func (s *Server) Close() {
	s.st().cp.Close()
	s.uiOnce.Do(func() {}) // no UI after Close
	if s.uiStop != nil {
		s.uiStop()
		<-s.uiDone
	}
}

// UI returns the control plane's live page, as examples/controlplane
// serves it: per site, the instances by mode, each tag's calls allowed and
// denied a second and its p95, the policy in force, each rule's state and
// timeline, and charts of the last five minutes. Serve it on an address of
// your own (the control plane's own serves only the protocol). It samples
// the server once a second from its first call until Close; it shows no
// key. Call it before Close.
func (s *Server) UI() http.Handler {
	s.uiOnce.Do(func() {
		d := dashboard.New(s.st().cp)
		ctx, cancel := context.WithCancel(context.Background())
		s.ui, s.uiStop, s.uiDone = d.Handler(), cancel, make(chan struct{})
		go func() {
			defer close(s.uiDone)
			d.Run(ctx)
		}()
	})
	if s.ui == nil {
		return http.NotFoundHandler()
	}
	return s.ui
}

// Options returns Options for waitstate.New that point at s with its key
// pair and short intervals (PulseInterval, SyncInterval). The lease is
// three times the sync interval unless SetLeaseTTL says otherwise.
func (s *Server) Options() waitstate.Options {
	return waitstate.Options{
		PublishKey:    s.st().publishKey,
		SecretKey:     s.st().secretKey,
		BaseURL:       s.URL,
		PulseInterval: PulseInterval,
		SyncInterval:  SyncInterval,
	}
}

// String describes the server by its URL and publish key; it never shows
// the secret key.
func (s *Server) String() string {
	return fmt.Sprintf("waitstatetest.Server{URL:%q PublishKey:%q SecretKey:[REDACTED]}", s.URL, s.st().publishKey)
}

// Format prints s as String does, whatever the verb.
func (s *Server) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(s.String())) }

// AddKey makes another key pair known, for clients of other keys. Each key
// keeps books of its own, as a real control plane does: its clients' counts,
// rule state and policy versions never mix with another key's, and Totals,
// Metrics and Policy report on the key of Options.
func (s *Server) AddKey(publishKey, secretKey string) { s.st().cp.AddKey(publishKey, secretKey) }

// SetPolicy sets the base policy of site; "" is the default for sites
// without one of their own. Clients receive it, with the limits of the
// site's firing rules applied, at their next pulse or sync. It panics on a
// policy that waitstate.Policy.Validate refuses, as a test's mistake.
func (s *Server) SetPolicy(site string, p *waitstate.Policy) {
	if err := p.Validate(); err != nil {
		panic("waitstatetest: SetPolicy: " + err.Error())
	}
	s.st().cp.SetPolicy(site, controlplane.Policy{Version: p.Version, GlobalMaxWeight: p.GlobalMaxWeight, TagMaxWeights: p.TagMaxWeights,
		GlobalShedPercent: p.GlobalShedPercent, TagShedPercents: p.TagShedPercents})
}

// SetPolicyJSON sets a policy as raw JSON, served as it is, for testing how
// a client treats a policy it must refuse.
func (s *Server) SetPolicyJSON(site, raw string) { s.st().cp.SetPolicyJSON(site, raw) }

// Policy returns the policy served to site now, rules applied; false when
// there is none.
func (s *Server) Policy(site string) (*waitstate.Policy, bool) {
	p, ok := s.st().cp.Policy(site)
	if !ok {
		return nil, false
	}
	return &waitstate.Policy{Version: p.Version, GlobalMaxWeight: p.GlobalMaxWeight, TagMaxWeights: p.TagMaxWeights,
		GlobalShedPercent: p.GlobalShedPercent, TagShedPercents: p.TagShedPercents}, true
}

// SetRules sets the reflex rules of site ("" is the default for sites
// without rules of their own). They are evaluated as pulses arrive, over
// the site's pulses of the last RuleWindow: a rule measures its Metric on
// its MetricTag's traffic ("" is the whole site) and, while the metric is on
// the wrong side of its Threshold, applies its Action to its TagName ("" is
// every tag): ActionBlock sheds every call, ActionThrottle admits AdmitPercent %,
// ActionCap (or no action) lowers the weight limit to MaxWeight. Each change
// raises the policy's version. A rule clears after its metric has stayed
// good for its cooldown. Rules unmarshal from JSON:
//
//	{"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
//	 "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30}
func (s *Server) SetRules(site string, rules ...Rule) error {
	return s.st().cp.SetRules(site, convert(rules, Rule.internal)...)
}

// SetIncidentPulseInterval sets the pulse interval site's clients are told
// to use while one of its rules is fired ("" is the default for sites
// without their own), so that the fleet reports faster during an incident.
// Unset, it is a quarter of the normal interval (that of SetIntervals, else
// the one the site's clients were pulsing at when the incident began), but
// at least 250 ms and never more than the normal one. Once every rule has
// cleared, clients are told the normal interval again; one learned from
// the clients is no longer sent a lease later, so that clients that join
// later keep their own.
func (s *Server) SetIncidentPulseInterval(site string, d time.Duration) {
	s.st().cp.SetIncidentPulseInterval(site, d)
}

// SetRuleWindow changes how far back the rules look.
func (s *Server) SetRuleWindow(d time.Duration) { s.st().cp.SetRuleWindow(d) }

// SetLeaseTTL sets the lease of every answer; 0 lets clients use their
// default of three times their longer interval.
func (s *Server) SetLeaseTTL(d time.Duration) { s.st().cp.SetLeaseTTL(d) }

// SetIntervals sets the pulse and sync intervals every answer carries;
// clients adopt them from their next tick, clamped to [100 ms, 10 min]. 0
// leaves an interval out of the answers.
func (s *Server) SetIntervals(pulse, sync time.Duration) { s.st().cp.SetIntervals(pulse, sync) }

// SetLogger sets where the server says what its operator should know, such
// as two processes pulsing under one InstanceID; nil (the default)
// discards it.
func (s *Server) SetLogger(l *slog.Logger) { s.st().cp.SetLogger(l) }

// SetFaults makes the control plane misbehave as f says, until the next
// SetFaults or Heal.
func (s *Server) SetFaults(f Faults) { s.st().cp.SetFaults(f.internal()) }

// Heal ends every fault.
func (s *Server) Heal() { s.st().cp.SetFaults(controlplane.Faults{}) }

// RevokeTokens makes every token issued so far invalid.
func (s *Server) RevokeTokens() { s.st().cp.RevokeTokens() }

// Pulses returns the pulses counted so far, in order of arrival, each
// (instance, seq) once: the last LogLimit of them.
func (s *Server) Pulses() []Pulse { return convert(s.st().cp.Pulses(), pulseFrom) }

// Totals adds up what site's instances reported, since the server started.
func (s *Server) Totals(site string) Totals { return totalsFrom(s.st().cp.Totals(site)) }

// Metrics returns site's figures over the rule window, as its rules see
// them.
func (s *Server) Metrics(site string) Metrics { return metricsFrom(s.st().cp.Metrics(site)) }

// TagMetrics returns the figures of one tag's traffic on site over the rule
// window, for a tag that one of the site's rules measures (its MetricTag);
// other tags are not aggregated and have none.
func (s *Server) TagMetrics(site, tag string) Metrics {
	return metricsFrom(s.st().cp.MetricsOf(s.st().publishKey, site, tag))
}

// Events returns the rules' firings and clearings so far (the last
// LogLimit of them), in order.
func (s *Server) Events() []Event {
	return convert(s.st().cp.Events(), func(e controlplane.Event) Event {
		return Event{Seq: e.Seq, At: e.At, Site: e.Site, Rule: e.Rule, Fired: e.Fired, Value: e.Value, Version: e.Version}
	})
}

// Requests returns the requests received so far (the last LogLimit of
// them), in order.
func (s *Server) Requests() []Request { return convert(s.st().cp.Requests(), requestFrom) }

// LogLimit is how many pulses, requests and events a Server keeps for
// Pulses, Requests and Events; Totals count every pulse regardless.
const LogLimit = 10_000

// WaitForPolicy waits until client enforces a policy of at least version,
// or ctx ends. It is how a test waits for a SetPolicy, or a rule's firing,
// to reach a client; Event.Version is the version a rule made.
func WaitForPolicy(ctx context.Context, client *waitstate.Client, version int64) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if p := client.Policy(); p != nil && p.Version >= version {
			return nil
		}
		select {
		case <-ctx.Done():
			have := "none"
			if p := client.Policy(); p != nil {
				have = fmt.Sprintf("version %d", p.Version)
			}
			return fmt.Errorf("waitstatetest: waiting for policy version %d (the client has %s): %w", version, have, ctx.Err())
		case <-t.C:
		}
	}
}

func randomHex() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
