package waitstate

import (
	"errors"
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
		{"site too long", func(o *Options) { o.SiteID = strings.Repeat("s", 257) }, "SiteID"},
		{"site with control character", func(o *Options) { o.SiteID = "eu\r1" }, "SiteID"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := valid
			tt.edit(&o)
			start := time.Now()
			c, err := New(o)
			require.Error(t, err)
			assert.Nil(t, c)
			assert.True(t, errors.Is(err, ErrInvalidOptions), "%v does not wrap ErrInvalidOptions", err)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), testSecretKey)
			assert.Less(t, time.Since(start), time.Second)
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
	assert.Contains(t, err.Error(), EnvSecretKey)

	t.Setenv(EnvPublishKey, "")
	_, err = OptionsFromEnv()
	require.ErrorIs(t, err, ErrInvalidOptions)
	assert.Contains(t, err.Error(), EnvPublishKey)
}
