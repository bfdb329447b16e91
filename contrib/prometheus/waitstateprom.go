// Package waitstateprom exports a waitstate.Client's figures to Prometheus:
// a prometheus.Collector that reads Client.Stats when scraped, so it adds
// no work to Gate.
//
//	reg.MustRegister(waitstateprom.NewCollector(client, waitstateprom.Options{}))
//
// Its label values are bounded: reasons, modes and outcomes are fixed
// sets, and no metric has a tag label unless Options.Tags names the tags to
// export.
package waitstateprom

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/waitstate/waitstate-go"
)

// Options configures a Collector.
type Options struct {
	// Namespace prefixes every metric name; "" is "waitstate".
	Namespace string

	// ConstLabels are added to every metric, such as the service's name.
	ConstLabels prometheus.Labels

	// Tags lists the tags whose decisions are exported with a tag label,
	// as waitstate_tag_decisions_total{tag, decision}. It is an allow-list
	// so that the number of series stays bounded whatever tags the
	// traffic carries; nil exports none.
	Tags []string
}

// Collector is a prometheus.Collector over one client.
type Collector struct {
	client *waitstate.Client
	tags   []string

	decisions, tagDecisions, shadowDenials         *prometheus.Desc
	pulses, syncsFailed, policyErrors, metricsDrop *prometheus.Desc
	healthRequests, healthErrors                   *prometheus.Desc
	policyVersion, mode, shadow, lease             *prometheus.Desc
	pulseInterval, syncInterval                    *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// reasons are every reason Gate gives, in a fixed order.
var reasons = []waitstate.Reason{
	waitstate.ReasonAllowed, waitstate.ReasonFailOpen, waitstate.ReasonGlobalMaxWeight, waitstate.ReasonTagMaxWeight,
	waitstate.ReasonThrottled, waitstate.ReasonSafeMode, waitstate.ReasonSafeModeLimit,
}

// allowing are the reasons of allowed calls.
var allowing = []waitstate.Reason{waitstate.ReasonAllowed, waitstate.ReasonFailOpen, waitstate.ReasonSafeMode}

var modes = []waitstate.Mode{waitstate.ModeFailOpen, waitstate.ModeEnforcing, waitstate.ModeSafeMode}

// NewCollector returns a Collector of client's figures. Register it with a
// prometheus.Registerer.
func NewCollector(client *waitstate.Client, opts Options) *Collector {
	ns := opts.Namespace
	if ns == "" {
		ns = "waitstate"
	}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(ns, "", name), help, labels, opts.ConstLabels)
	}
	return &Collector{
		client: client,
		tags:   slices.Clone(opts.Tags),

		decisions:     desc("decisions_total", "Gate calls by decision (allowed or denied) and reason; in shadow mode, the decision Gate would have made.", "decision", "reason"),
		tagDecisions:  desc("tag_decisions_total", "Gate calls of the allow-listed tags by decision, the live window included, as the totals.", "tag", "decision"),
		shadowDenials: desc("shadow_denials_total", "Calls allowed only because the client is in shadow mode: those the policy would have denied."),
		pulses:        desc("pulses_total", "Pulses by outcome: sent (acknowledged), failed (an attempt, resent), dropped (refused with a 4xx).", "outcome"),
		syncsFailed:   desc("syncs_failed_total", "Policy syncs that failed."),
		policyErrors:  desc("policy_errors_total", "Verified answers whose body or policy was refused."),
		metricsDrop:   desc("metrics_dropped_total", "Custom-metric samples refused: a bad name or value, or a name beyond a tag's limit."),

		healthRequests: desc("health_requests_total", "Health samples in the windows already sent."),
		healthErrors:   desc("health_errors_total", "Failed health samples in the windows already sent."),

		policyVersion: desc("policy_version", "Version of the policy in force; 0 before the first."),
		mode:          desc("mode", "1 for the mode Gate answers in, 0 for the others.", "mode"),
		shadow:        desc("shadow", "1 when the client decides in shadow mode."),
		lease:         desc("lease_remaining_seconds", "Time until the policy's lease expires; 0 without one or once expired."),
		pulseInterval: desc("pulse_interval_seconds", "The pulse interval in force: the client's, or the control plane's."),
		syncInterval:  desc("sync_interval_seconds", "The sync interval in force."),
	}
}

// Describe sends the descriptions of every metric the Collector exports.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.decisions, c.shadowDenials, c.pulses, c.syncsFailed, c.policyErrors, c.metricsDrop,
		c.healthRequests, c.healthErrors, c.policyVersion, c.mode, c.shadow, c.lease, c.pulseInterval, c.syncInterval} {
		ch <- d
	}
	if len(c.tags) > 0 {
		ch <- c.tagDecisions
	}
}

// Collect reads the client's Stats and sends every metric.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.client.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, r := range reasons {
		decision := "denied"
		if slices.Contains(allowing, r) {
			decision = "allowed"
		}
		counter(c.decisions, st.Decisions[r], decision, r.String())
	}
	var shadowDenied uint64
	if st.Shadow {
		shadowDenied = st.Bounced
	}
	counter(c.shadowDenials, shadowDenied)
	counter(c.pulses, st.PulsesSent, "sent")
	counter(c.pulses, st.PulsesFailed, "failed")
	counter(c.pulses, st.PulsesDropped, "dropped")
	counter(c.syncsFailed, st.SyncsFailed)
	counter(c.policyErrors, st.PolicyErrors)
	counter(c.metricsDrop, st.MetricsDropped)
	counter(c.healthRequests, st.HealthRequests)
	counter(c.healthErrors, st.HealthErrors)

	gauge(c.policyVersion, float64(st.PolicyVersion))
	for _, m := range modes {
		v := 0.0
		if m == st.Mode {
			v = 1
		}
		gauge(c.mode, v, m.String())
	}
	gauge(c.shadow, boolGauge(st.Shadow))
	gauge(c.lease, st.LeaseRemaining.Seconds())
	gauge(c.pulseInterval, st.PulseInterval.Seconds())
	gauge(c.syncInterval, st.SyncInterval.Seconds())
	for _, tag := range c.tags {
		ts := c.client.TagStats(tag)
		counter(c.tagDecisions, ts.Usage, tag, "allowed")
		counter(c.tagDecisions, ts.Bounced, tag, "denied")
	}
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
