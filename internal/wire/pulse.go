package wire

// PulseBody is the body of POST /v1/pulse: the SDK encodes it, the control
// plane decodes it.
type PulseBody struct {
	InstanceID  string `json:"instanceId"`
	Incarnation string `json:"incarnation,omitempty"` // 128 random bits in hex, drawn once per process
	SiteID      string `json:"siteId,omitempty"`
	SDK         string `json:"sdk"`
	Seq         uint64 `json:"seq"`
	WindowEndMs int64  `json:"windowEndMs"` // Unix ms when the window was cut
	WindowMs    int64  `json:"windowMs"`    // the time it covered
	// OwnIntervalMs is the instance's own pulse interval, which it keeps
	// when answers set none: what a control plane speeds up from in an
	// incident. 0 (absent) from an instance that does not say.
	OwnIntervalMs int64               `json:"ownPulseIntervalMs,omitempty"`
	Mode          string              `json:"mode"`
	PolicyVersion int64               `json:"policyVersion"`
	Shadow        bool                `json:"shadow"`
	LocalRules    []string            `json:"localRules,omitempty"` // in safe mode with local rules: the rules the instance holds fired
	Restored      bool                `json:"restored,omitempty"`   // the policy in force came from the instance's policy store
	UsageDelta    uint64              `json:"usageDelta"`
	BouncedDelta  uint64              `json:"bouncedDelta"`
	UsageTotal    uint64              `json:"usageTotal"`
	BouncedTotal  uint64              `json:"bouncedTotal"`
	Tags          map[string]TagCount `json:"tags"`
	Health        *Health             `json:"health,omitempty"`  // every sample of the window; nil without samples
	Metrics       map[string]Metric   `json:"metrics,omitempty"` // site-wide custom metrics
	Trimmed       *Trimmed            `json:"trimmed,omitempty"` // detail shed to fit MaxBody; nil when none was
}

// Trimmed says what detail a pulse shed to fit within MaxBody. Its counts
// are whole: a folded tag's calls are counted under "_other".
type Trimmed struct {
	Histograms uint64 `json:"histograms"` // tags whose latency histogram was left out (their quantiles stay)
	Metrics    uint64 `json:"metrics"`    // tags whose custom metrics were left out
	Tags       uint64 `json:"tags"`       // tags folded into "_other", their health and metrics left out
}

// TagCount is one tag's part of a pulse: its counts, and its health and
// custom metrics when it had samples.
type TagCount struct {
	Usage   uint64            `json:"usage"`
	Bounced uint64            `json:"bounced"`
	Health  *Health           `json:"health,omitempty"`
	Metrics map[string]Metric `json:"metrics,omitempty"`
}

// Health is the health of a window's samples.
type Health struct {
	Requests  uint64     `json:"requests"`
	Errors    uint64     `json:"errors"`
	LatencyMs Latency    `json:"latencyMs"`
	Histogram *Histogram `json:"histogram,omitempty"`
}

// Latency is a window's latency quantiles, in milliseconds.
type Latency struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// Metric is a custom metric's aggregate over a window.
type Metric struct {
	Count uint64  `json:"count"`
	Sum   float64 `json:"sum"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
}

// MaxMetricNameBytes bounds a custom metric's name.
const MaxMetricNameBytes = 64

// MaxTagNameBytes bounds a tag's name: the SDK counts a longer one under
// "_other", and the control plane refuses a pulse that names one.
const MaxTagNameBytes = 256

// MaxIDBytes bounds an InstanceID and a SiteID, in options and in the
// headers that carry them.
const MaxIDBytes = 256

// ValidMetricName reports whether name can name a custom metric: 1 to
// MaxMetricNameBytes bytes of [a-z0-9_.].
func ValidMetricName(name string) bool {
	if len(name) == 0 || len(name) > MaxMetricNameBytes {
		return false
	}
	for i := 0; i < len(name); i++ {
		switch b := name[i]; {
		case b >= 'a' && b <= 'z', b >= '0' && b <= '9', b == '_', b == '.':
		default:
			return false
		}
	}
	return true
}
