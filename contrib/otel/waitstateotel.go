// Package waitstateotel exports a waitstate.Client's figures as
// OpenTelemetry metrics: observable instruments whose one callback reads
// Client.Stats when the meter's reader collects, so they add no work to
// Gate.
//
//	reg, err := waitstateotel.Register(client, otel.Meter("waitstate"), waitstateotel.Options{})
//	defer reg.Unregister()
//
// Attribute values are bounded: reasons, modes and outcomes are fixed
// sets, and no instrument has a tag attribute unless Options.Tags names the
// tags to export.
package waitstateotel

import (
	"context"
	"errors"
	"slices"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/waitstate/waitstate-go"
)

// Options configures Register.
type Options struct {
	// Prefix starts every instrument's name; "" is "waitstate.".
	Prefix string

	// Tags lists the tags whose decisions are exported with a tag
	// attribute, as waitstate.tag.decisions. It is an allow-list so that
	// the number of series stays bounded whatever tags the traffic
	// carries; nil exports none.
	Tags []string
}

// reasons are every reason Gate gives, in a fixed order.
var reasons = []waitstate.Reason{
	waitstate.ReasonAllowed, waitstate.ReasonFailOpen, waitstate.ReasonGlobalMaxWeight, waitstate.ReasonTagMaxWeight,
	waitstate.ReasonThrottled, waitstate.ReasonSafeMode, waitstate.ReasonSafeModeLimit,
}

var modes = []waitstate.Mode{waitstate.ModeFailOpen, waitstate.ModeEnforcing, waitstate.ModeSafeMode}

// Register creates the instruments on meter and registers the callback
// that observes client. Unregister the returned registration when the
// client is closed.
func Register(client *waitstate.Client, meter metric.Meter, opts Options) (metric.Registration, error) {
	p := opts.Prefix
	if p == "" {
		p = "waitstate."
	}
	var errs []error
	counter := func(name, unit, desc string) metric.Int64ObservableCounter {
		c, err := meter.Int64ObservableCounter(p+name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	gauge := func(name, unit, desc string) metric.Float64ObservableGauge {
		g, err := meter.Float64ObservableGauge(p+name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return g
	}
	var (
		decisions = counter("decisions", "{call}",
			"Gate calls by decision (allowed or denied) and reason; in shadow mode, the decision Gate would have made.")
		tagDecisions  = counter("tag.decisions", "{call}", "Gate calls of the allow-listed tags by decision, the live window included, as the totals.")
		shadowDenials = counter("shadow.denials", "{call}",
			"Calls allowed only because the client is in shadow mode: those the policy would have denied.")
		pulses         = counter("pulses", "{pulse}", "Pulses by outcome: sent (acknowledged), failed (an attempt, resent), dropped (refused with a 4xx).")
		syncsFailed    = counter("syncs.failed", "{sync}", "Policy syncs that failed.")
		policyErrors   = counter("policy.errors", "{answer}", "Verified answers whose body or policy was refused.")
		metricsDropped = counter("metrics.dropped", "{sample}", "Custom-metric samples refused.")
		healthRequests = counter("health.requests", "{sample}", "Health samples in the windows already sent.")
		healthErrors   = counter("health.errors", "{sample}", "Failed health samples in the windows already sent.")
		policyVersion  = gauge("policy.version", "1", "Version of the policy in force; 0 before the first.")
		mode           = gauge("mode", "1", "1 for the mode Gate answers in, 0 for the others.")
		shadow         = gauge("shadow", "1", "1 when the client decides in shadow mode.")
		lease          = gauge("lease.remaining", "s", "Time until the policy's lease expires; 0 without one or once expired.")
		pulseInterval  = gauge("pulse.interval", "s", "The pulse interval in force.")
		syncInterval   = gauge("sync.interval", "s", "The sync interval in force.")
	)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	tags := slices.Clone(opts.Tags)
	instruments := []metric.Observable{decisions, shadowDenials, pulses, syncsFailed, policyErrors, metricsDropped, healthRequests,
		healthErrors, policyVersion, mode, shadow, lease, pulseInterval, syncInterval}
	if len(tags) > 0 {
		instruments = append(instruments, tagDecisions)
	}
	return meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := client.Stats()
		count := func(c metric.Int64ObservableCounter, v uint64, attrs ...attribute.KeyValue) {
			o.ObserveInt64(c, int64(min(v, 1<<63-1)), metric.WithAttributes(attrs...))
		}
		for _, r := range reasons {
			decision := "denied"
			if r == waitstate.ReasonAllowed || r == waitstate.ReasonFailOpen || r == waitstate.ReasonSafeMode {
				decision = "allowed"
			}
			count(decisions, st.Decisions[r], attribute.String("decision", decision), attribute.String("reason", r.String()))
		}
		var shadowDenied uint64
		if st.Shadow {
			shadowDenied = st.Bounced
		}
		count(shadowDenials, shadowDenied)
		count(pulses, st.PulsesSent, attribute.String("outcome", "sent"))
		count(pulses, st.PulsesFailed, attribute.String("outcome", "failed"))
		count(pulses, st.PulsesDropped, attribute.String("outcome", "dropped"))
		count(syncsFailed, st.SyncsFailed)
		count(policyErrors, st.PolicyErrors)
		count(metricsDropped, st.MetricsDropped)
		count(healthRequests, st.HealthRequests)
		count(healthErrors, st.HealthErrors)
		for _, tag := range tags {
			ts := client.TagStats(tag)
			count(tagDecisions, ts.Usage, attribute.String("tag", tag), attribute.String("decision", "allowed"))
			count(tagDecisions, ts.Bounced, attribute.String("tag", tag), attribute.String("decision", "denied"))
		}

		o.ObserveFloat64(policyVersion, float64(st.PolicyVersion))
		for _, m := range modes {
			v := 0.0
			if m == st.Mode {
				v = 1
			}
			o.ObserveFloat64(mode, v, metric.WithAttributes(attribute.String("mode", m.String())))
		}
		v := 0.0
		if st.Shadow {
			v = 1
		}
		o.ObserveFloat64(shadow, v)
		o.ObserveFloat64(lease, st.LeaseRemaining.Seconds())
		o.ObserveFloat64(pulseInterval, st.PulseInterval.Seconds())
		o.ObserveFloat64(syncInterval, st.SyncInterval.Seconds())
		return nil
	}, instruments...)
}
