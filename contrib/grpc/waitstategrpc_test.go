package waitstategrpc_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/waitstate/waitstate-go"
	waitstategrpc "github.com/waitstate/waitstate-go/contrib/grpc"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve starts a gRPC server with the health service behind the
// interceptors, on an in-memory listener, and returns a client of it.
func serve(t *testing.T, client *waitstate.Client, opts waitstategrpc.Options) healthpb.HealthClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(waitstategrpc.UnaryServerInterceptor(client, opts)),
		grpc.ChainStreamInterceptor(waitstategrpc.StreamServerInterceptor(client, opts)),
	)
	hs := health.NewServer()
	hs.SetServingStatus("search", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return lis.Dial() }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return healthpb.NewHealthClient(conn)
}

// plan sends the call as a plan's, in its metadata.
func plan(name string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "x-plan", name)
}

var byPlan = waitstategrpc.Options{Tag: func(ctx context.Context, _ string) string {
	if v := metadata.ValueFromIncomingContext(ctx, "x-plan"); len(v) > 0 {
		return v[0]
	}
	return ""
}}

// newClient starts a client of a test control plane whose policy denies
// plan "free".
func newClient(t *testing.T) (*waitstate.Client, *waitstatetest.Server) {
	t.Helper()
	srv := waitstatetest.NewTestServer(t)
	srv.SetLeaseTTL(time.Minute)
	srv.SetPolicy("", &waitstate.Policy{Version: 2, GlobalMaxWeight: 10, TagMaxWeights: map[string]float64{"free": 0}})
	client, err := waitstate.New(srv.Options())
	require.NoError(t, err)
	t.Cleanup(func() { _ = client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, waitstatetest.WaitForPolicy(ctx, client, 2))
	return client, srv
}

// healthOf adds up the health samples of tag in the pulses received.
func healthOf(srv *waitstatetest.Server, tag string) (requests, errs uint64) {
	for _, p := range srv.Pulses() {
		if h := p.Tags[tag].Health; h != nil {
			requests, errs = requests+h.Requests, errs+h.Errors
		}
	}
	return requests, errs
}

func TestUnary(t *testing.T) {
	client, srv := newClient(t)
	hc := serve(t, client, byPlan)

	_, err := hc.Check(plan("free"), &healthpb.HealthCheckRequest{Service: "search"})
	st := status.Convert(err)
	require.Equal(t, codes.ResourceExhausted, st.Code())
	assert.Equal(t, "waitstate: tag_max_weight", st.Message())
	require.Len(t, st.Details(), 1)
	retry, ok := st.Details()[0].(*errdetails.RetryInfo)
	require.True(t, ok, "a RetryInfo detail")
	assert.Equal(t, waitstatetest.PulseInterval, retry.GetRetryDelay().AsDuration(), "a policy can change at the next pulse")

	resp, err := hc.Check(plan("pro"), &healthpb.HealthCheckRequest{Service: "search"})
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
	_, err = hc.Check(plan("pro"), &healthpb.HealthCheckRequest{Service: "unknown"})
	assert.Equal(t, codes.NotFound, status.Code(err))

	require.Eventually(t, func() bool { r, _ := healthOf(srv, "pro"); return r == 2 }, 15*time.Second, 5*time.Millisecond,
		"one health sample per served call")
	_, errs := healthOf(srv, "pro")
	assert.Zero(t, errs, "NotFound is the caller's fault, not a failure by default")
	r, _ := healthOf(srv, "free")
	assert.Zero(t, r, "a denied call is not served, so not measured")
	assert.Equal(t, waitstate.TagStats{Bounced: 1}, waitForTag(t, client, "free", 1))
}

// waitForTag waits until tag has n calls counted in the windows sent.
func waitForTag(t *testing.T, client *waitstate.Client, tag string, n uint64) waitstate.TagStats {
	t.Helper()
	var ts waitstate.TagStats
	require.Eventually(t, func() bool { ts = client.TagStats(tag); return ts.Usage+ts.Bounced >= n }, 15*time.Second, 5*time.Millisecond)
	return ts
}

func TestFailedCodes(t *testing.T) {
	client, srv := newClient(t)
	opts := byPlan
	opts.FailedCodes = []codes.Code{codes.NotFound}
	hc := serve(t, client, opts)
	_, err := hc.Check(plan("pro"), &healthpb.HealthCheckRequest{Service: "unknown"})
	assert.Equal(t, codes.NotFound, status.Code(err))
	require.Eventually(t, func() bool { _, e := healthOf(srv, "pro"); return e == 1 }, 15*time.Second, 5*time.Millisecond,
		"NotFound counts as a failure when the user says so")
}

func TestDefaultFailedCodesCannotBeChanged(t *testing.T) {
	codesNow := waitstategrpc.DefaultFailedCodes()
	assert.Equal(t, []codes.Code{codes.Internal, codes.Unavailable, codes.DeadlineExceeded}, codesNow)
	codesNow[0] = codes.NotFound
	assert.Equal(t, codes.Internal, waitstategrpc.DefaultFailedCodes()[0], "each call returns a fresh copy")

	// The interceptors' default is untouched: NotFound is not a failure.
	client, srv := newClient(t)
	hc := serve(t, client, byPlan)
	_, err := hc.Check(plan("pro"), &healthpb.HealthCheckRequest{Service: "unknown"})
	assert.Equal(t, codes.NotFound, status.Code(err))
	waitForTag(t, client, "pro", 1)
	require.Eventually(t, func() bool { r, _ := healthOf(srv, "pro"); return r == 1 }, 15*time.Second, 5*time.Millisecond)
	_, e := healthOf(srv, "pro")
	assert.Zero(t, e, "NotFound is not among the default failed codes")
}

func TestStream(t *testing.T) {
	client, srv := newClient(t)
	hc := serve(t, client, byPlan)

	ws, err := hc.Watch(plan("free"), &healthpb.HealthCheckRequest{Service: "search"})
	require.NoError(t, err)
	_, err = ws.Recv()
	assert.Equal(t, codes.ResourceExhausted, status.Code(err))

	ctx, cancel := context.WithCancel(plan("pro"))
	ws, err = hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: "search"})
	require.NoError(t, err)
	resp, err := ws.Recv()
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
	cancel() // the stream ends: its health sample is recorded
	require.Eventually(t, func() bool { r, _ := healthOf(srv, "pro"); return r == 1 }, 15*time.Second, 5*time.Millisecond,
		"one health sample per stream")
}

func TestSkipAndResultFromContext(t *testing.T) {
	client, _ := newClient(t)
	var seen []bool
	opts := byPlan
	opts.Skip = func(_ context.Context, method string) bool { return method == "/grpc.health.v1.Health/Watch" }
	unary := waitstategrpc.UnaryServerInterceptor(client, opts)
	handler := func(ctx context.Context, _ any) (any, error) {
		_, ok := waitstategrpc.ResultFromContext(ctx)
		seen = append(seen, ok)
		return nil, nil
	}
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("x-plan", "pro"))
	_, err := unary(ctx, nil, &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"}, handler)
	require.NoError(t, err)
	opts.Skip = func(context.Context, string) bool { return true }
	_, err = waitstategrpc.UnaryServerInterceptor(client, opts)(ctx, nil, &grpc.UnaryServerInfo{FullMethod: "/x/Y"}, handler)
	require.NoError(t, err)
	assert.Equal(t, []bool{true, false}, seen, "a gated call has a decision in its context; a skipped one has none")
	assert.Equal(t, uint64(1), client.Stats().Usage, "the skipped call was not gated")
}
