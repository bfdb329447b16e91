package waitstate

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/url"
)

// redacted stands in for a secret wherever a value holding one is printed,
// logged or marshalled.
const redacted = "[REDACTED]"

// String describes o without its secret key, and with any password in
// BaseURL's userinfo masked.
func (o Options) String() string {
	return fmt.Sprintf("waitstate.Options{PublishKey:%q SecretKey:%s BaseURL:%q SiteID:%q InstanceID:%q PulseInterval:%v SyncInterval:%v SafeMode:%v SafeModeMaxRPS:%d Shadow:%t Offline:%t InitialPolicy:%t PolicyStore:%s SnapshotMaxAge:%v}",
		o.PublishKey, o.secretShown(), redactURL(o.BaseURL), o.SiteID, o.InstanceID, o.PulseInterval, o.SyncInterval,
		o.SafeMode, o.SafeModeMaxRPS, o.Shadow, o.Offline, o.InitialPolicy != nil, storeShown(o.PolicyStore), o.SnapshotMaxAge)
}

// storeShown names a PolicyStore without printing it: a store of the
// user's may hold a password. A FileStore shows its path.
func storeShown(s PolicyStore) string {
	switch s := s.(type) {
	case nil:
		return "nil"
	case *fileStore:
		return s.String()
	default:
		return fmt.Sprintf("%T", s)
	}
}

func (o Options) secretShown() string {
	if o.SecretKey == "" {
		return `""`
	}
	return redacted
}

// GoString is String, for code that asks for a Go-syntax description (fmt
// itself calls Format for every verb, %#v included).
func (o Options) GoString() string { return o.String() }

// Format prints o as String does, whatever the verb, so that no verb
// reaches the secret key through reflection.
func (o Options) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(o.String())) }

// LogValue logs o without its secret key.
func (o Options) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("publish_key", o.PublishKey),
		slog.String("secret_key", o.secretShown()),
		slog.String("base_url", redactURL(o.BaseURL)),
		slog.String("site_id", o.SiteID),
		slog.String("instance_id", o.InstanceID),
		slog.Duration("pulse_interval", o.PulseInterval),
		slog.Duration("sync_interval", o.SyncInterval),
		slog.String("safe_mode", o.SafeMode.String()),
		slog.Bool("shadow", o.Shadow),
		slog.Bool("offline", o.Offline),
		slog.String("policy_store", storeShown(o.PolicyStore)),
		slog.Duration("snapshot_max_age", o.SnapshotMaxAge),
	)
}

// MarshalJSON encodes the settings of o that are data, with the secret key
// redacted and the policy store named as String names it; the HTTP client,
// logger, initial policy and callbacks are left out.
func (o Options) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		PublishKey     string
		SecretKey      string
		BaseURL        string
		SiteID         string
		InstanceID     string
		PulseInterval  string
		SyncInterval   string
		SafeMode       SafeModeStrategy
		SafeModeMaxRPS uint64
		Shadow         bool
		Offline        bool
		PolicyStore    string
		SnapshotMaxAge string
	}{o.PublishKey, o.secretShown(), redactURL(o.BaseURL), o.SiteID, o.InstanceID, o.PulseInterval.String(),
		o.SyncInterval.String(), o.SafeMode, o.SafeModeMaxRPS, o.Shadow, o.Offline, storeShown(o.PolicyStore),
		o.SnapshotMaxAge.String()})
}

// redactURL masks the password of a URL's userinfo.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return redacted // it may hold userinfo we cannot find
	}
	return u.Redacted()
}

// String describes the client by its instance and mode; it holds the
// secret key and never shows it.
func (c *Client) String() string {
	return fmt.Sprintf("waitstate.Client{InstanceID:%q Mode:%v PolicyVersion:%d}", c.opts.InstanceID, c.Mode(), c.view.Load().policy.Version)
}

// GoString is String, for code that asks for a Go-syntax description (fmt
// itself calls Format for every verb, %#v included).
func (c *Client) GoString() string { return c.String() }

// Format prints c as String does, whatever the verb.
func (c *Client) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(c.String())) }

// LogValue logs the client by its instance and mode.
func (c *Client) LogValue() slog.Value {
	return slog.GroupValue(slog.String("instance_id", c.opts.InstanceID), slog.String("mode", c.Mode().String()))
}

// MarshalJSON encodes the client's Stats: what a status page wants, and
// nothing secret.
func (c *Client) MarshalJSON() ([]byte, error) { return json.Marshal(c.Stats()) }
