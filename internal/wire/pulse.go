package wire

// PulseBody is the body of POST /v1/pulse (SPEC §4): the SDK encodes it,
// the control plane decodes it.
type PulseBody struct {
	InstanceID    string              `json:"instanceId"`
	SiteID        string              `json:"siteId,omitempty"`
	SDK           string              `json:"sdk"`
	Seq           uint64              `json:"seq"`
	WindowEndMs   int64               `json:"windowEndMs"` // Unix ms when the window was cut
	WindowMs      int64               `json:"windowMs"`    // the time it covered
	Mode          string              `json:"mode"`
	PolicyVersion int64               `json:"policyVersion"`
	UsageDelta    uint64              `json:"usageDelta"`
	BouncedDelta  uint64              `json:"bouncedDelta"`
	UsageTotal    uint64              `json:"usageTotal"`
	BouncedTotal  uint64              `json:"bouncedTotal"`
	Tags          map[string]TagCount `json:"tags"`
	Health        *Health             `json:"health,omitempty"` // nil without samples
}

// TagCount is one tag's counts in a pulse.
type TagCount struct {
	Usage   uint64 `json:"usage"`
	Bounced uint64 `json:"bounced"`
}

// Health is a pulse's health object.
type Health struct {
	Requests  uint64  `json:"requests"`
	Errors    uint64  `json:"errors"`
	LatencyMs Latency `json:"latencyMs"`
}

// Latency is a pulse's latency quantiles, in milliseconds.
type Latency struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}
