package waitstate

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewRefusesInvalidOptions(t *testing.T) {
	valid := Options{PublishKey: "pk_live", SecretKey: testSecretKey, BaseURL: "http://127.0.0.1:1"}
	tests := []struct {
		name string
		edit func(*Options)
		want string // in the message
	}{
		{"missing publish key", func(o *Options) { o.PublishKey = "" }, "PublishKey is required"},
		{"publish key with space", func(o *Options) { o.PublishKey = "pk live" }, "PublishKey"},
		{"publish key with newline", func(o *Options) { o.PublishKey = "pk\nX-Evil: 1" }, "PublishKey"},
		{"missing secret key", func(o *Options) { o.SecretKey = "" }, "SecretKey is required"},
		{"base URL does not parse", func(o *Options) { o.BaseURL = "http://user:" + testSecretKey + "@[::1" }, "does not parse"},
		{"base URL not http", func(o *Options) { o.BaseURL = "ftp://example.com" }, "scheme"},
		{"base URL relative", func(o *Options) { o.BaseURL = "/v1" }, "scheme"},
		{"base URL without host", func(o *Options) { o.BaseURL = "http://" }, "no host"},
		{"base URL with query", func(o *Options) { o.BaseURL = "http://example.com/?a=1" }, "query"},
		{"negative pulse interval", func(o *Options) { o.PulseInterval = -time.Second }, "PulseInterval"},
		{"negative sync interval", func(o *Options) { o.SyncInterval = -1 }, "SyncInterval"},
		{"pulse interval of 20 ns", func(o *Options) { o.PulseInterval = 20 }, "PulseInterval 20ns is less than MinInterval (100ms)"},
		{"sync interval of 99 ms", func(o *Options) { o.SyncInterval = 99 * time.Millisecond }, "SyncInterval 99ms is less than MinInterval (100ms)"},
		{"site too long", func(o *Options) { o.SiteID = strings.Repeat("s", 257) }, "SiteID"},
		{"site with control character", func(o *Options) { o.SiteID = "eu\r1" }, "SiteID"},
		{"instance with space", func(o *Options) { o.InstanceID = "pod 3" }, "InstanceID"},
		{"instance too long", func(o *Options) { o.InstanceID = strings.Repeat("i", 257) }, "InstanceID"},
		{"unknown safe-mode strategy", func(o *Options) { o.SafeMode = SafeModeStrategy(7) }, "SafeMode"},
		{"negative safe-mode strategy", func(o *Options) { o.SafeMode = -1 }, "SafeMode"},
		{"initial policy with a negative weight", func(o *Options) { o.InitialPolicy = &Policy{GlobalMaxWeight: -1} }, "InitialPolicy"},
		{"initial policy with a NaN weight", func(o *Options) {
			o.InitialPolicy = &Policy{GlobalMaxWeight: 1, TagMaxWeights: map[string]float64{"a": math.NaN()}}
		}, "InitialPolicy"},
		{"initial policy shedding 101 %", func(o *Options) { o.InitialPolicy = &Policy{GlobalMaxWeight: 1, GlobalShedPercent: 101} }, "InitialPolicy"},
		{"initial policy with a long tag", func(o *Options) {
			o.InitialPolicy = &Policy{GlobalMaxWeight: 1, TagShedPercents: map[string]float64{strings.Repeat("t", 257): 1}}
		}, "InitialPolicy"},
		{"offline with a bad publish key", func(o *Options) { o.Offline, o.PublishKey = true, "pk live" }, "PublishKey"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := valid
			tt.edit(&o)
			c, err := New(o)
			require.Error(t, err)
			assert.Nil(t, c)
			assert.True(t, errors.Is(err, ErrInvalidOptions), "%v does not wrap ErrInvalidOptions", err)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), testSecretKey)
		})
	}
}

func TestOptionsDefaults(t *testing.T) {
	o, u, err := Options{PublishKey: "pk", SecretKey: "sk"}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, DefaultBaseURL, o.BaseURL)
	assert.Equal(t, "https://api.waitstate.io", u.String())
	assert.Equal(t, 20*time.Second, o.PulseInterval)
	assert.Equal(t, 30*time.Second, o.SyncInterval)
	assert.EqualValues(t, 50, o.SafeModeMaxRPS)
	assert.NotNil(t, o.Logger)

	o, u, err = Options{PublishKey: "pk", SecretKey: "sk", BaseURL: "http://127.0.0.1:8080/waitstate/", SafeModeMaxRPS: 7}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, "/waitstate", u.Path, "a trailing slash is dropped so paths join cleanly")
	assert.EqualValues(t, 7, o.SafeModeMaxRPS)
}

func TestOptionsFromEnv(t *testing.T) {
	t.Setenv(EnvPublishKey, "pk_env")
	t.Setenv(EnvSecretKey, "sk_env")
	t.Setenv(EnvBaseURL, "http://127.0.0.1:9")
	t.Setenv(EnvSiteID, "eu-1")
	o, err := OptionsFromEnv()
	require.NoError(t, err)
	assert.Equal(t, Options{PublishKey: "pk_env", SecretKey: "sk_env", BaseURL: "http://127.0.0.1:9", SiteID: "eu-1"}, o)

	t.Setenv(EnvSecretKey, "")
	_, err = OptionsFromEnv()
	require.ErrorIs(t, err, ErrInvalidOptions)
	require.ErrorIs(t, err, ErrNoKeys, "a development fallback can tell missing keys from bad values")
	assert.Equal(t, "waitstate: invalid options: WAITSTATE_SECRET_KEY is not set", err.Error())

	t.Setenv(EnvPublishKey, "")
	_, err = OptionsFromEnv()
	require.ErrorIs(t, err, ErrInvalidOptions)
	require.ErrorIs(t, err, ErrNoKeys)
	assert.Contains(t, err.Error(), EnvPublishKey)

	// A bad value with the keys set is not ErrNoKeys: it stops the service.
	t.Setenv(EnvPublishKey, "pk_env")
	t.Setenv(EnvSecretKey, "sk_env")
	t.Setenv(EnvSyncInterval, "soon")
	_, err = OptionsFromEnv()
	require.ErrorIs(t, err, ErrInvalidOptions)
	assert.NotErrorIs(t, err, ErrNoKeys)
}

func TestOptionsFromEnvDeployment(t *testing.T) {
	t.Setenv(EnvPublishKey, "pk_env")
	t.Setenv(EnvSecretKey, testSecretKey)
	t.Setenv(EnvInstanceID, "checkout-3")
	t.Setenv(EnvPulseInterval, "5s")
	t.Setenv(EnvSyncInterval, "1m")
	t.Setenv(EnvSafeMode, "last_policy")
	t.Setenv(EnvSafeModeMaxRPS, "200")
	t.Setenv(EnvShadow, "true")
	o, err := OptionsFromEnv()
	require.NoError(t, err)
	assert.Equal(t, Options{PublishKey: "pk_env", SecretKey: testSecretKey, InstanceID: "checkout-3", PulseInterval: 5 * time.Second,
		SyncInterval: time.Minute, SafeMode: SafeModeLastPolicy, SafeModeMaxRPS: 200, Shadow: true}, o)
	_, _, err = o.withDefaults()
	assert.NoError(t, err, "they are valid Options")

	t.Setenv(EnvSafeMode, "local_rules")
	o, err = OptionsFromEnv()
	require.NoError(t, err)
	assert.Equal(t, SafeModeLocalRules, o.SafeMode)
}

func TestOptionsFromEnvRefusesBadValues(t *testing.T) {
	t.Run("interval below MinInterval", func(t *testing.T) {
		t.Setenv(EnvPublishKey, "pk_env")
		t.Setenv(EnvSecretKey, testSecretKey)
		t.Setenv(EnvPulseInterval, "50ms")
		_, err := OptionsFromEnv()
		require.ErrorIs(t, err, ErrInvalidOptions)
		assert.Contains(t, err.Error(), `WAITSTATE_PULSE_INTERVAL="50ms" is not a duration of at least 100ms`)
	})
	for name, value := range map[string]string{
		EnvPulseInterval:  "20",
		EnvSyncInterval:   "-1s",
		EnvSafeMode:       "closed",
		EnvSafeModeMaxRPS: "-5",
		EnvShadow:         "maybe",
	} {
		t.Run(name, func(t *testing.T) {
			t.Setenv(EnvPublishKey, "pk_env")
			t.Setenv(EnvSecretKey, testSecretKey)
			t.Setenv(name, value)
			_, err := OptionsFromEnv()
			require.ErrorIs(t, err, ErrInvalidOptions)
			assert.Contains(t, err.Error(), name, "the error names the variable")
			assert.NotContains(t, err.Error(), testSecretKey)
		})
	}
}

func TestOptionsV2Defaults(t *testing.T) {
	o, _, err := Options{PublishKey: "pk", SecretKey: "sk"}.withDefaults()
	require.NoError(t, err)
	assert.Regexp(t, uuidPattern, o.InstanceID, "a random UUID v4")
	o2, _, _ := Options{PublishKey: "pk", SecretKey: "sk"}.withDefaults()
	assert.NotEqual(t, o.InstanceID, o2.InstanceID)
	assert.Equal(t, SafeModeFixedRPS, o.SafeMode)
	o, _, err = Options{PublishKey: "pk", SecretKey: "sk", InstanceID: "pod-3"}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, "pod-3", o.InstanceID, "a stable name is kept")
	_, _, err = Options{Offline: true}.withDefaults()
	assert.NoError(t, err, "no keys needed offline")
}
