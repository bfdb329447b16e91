// Package waitstategrpc gates gRPC servers with a waitstate.Client: unary
// and stream server interceptors that call Gate before the handler, answer
// a denied call with codes.ResourceExhausted and a RetryInfo detail, and
// record each served call as one health sample of its tag's traffic.
//
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(waitstategrpc.UnaryServerInterceptor(client, opts)),
//		grpc.ChainStreamInterceptor(waitstategrpc.StreamServerInterceptor(client, opts)),
//	)
package waitstategrpc

import (
	"context"
	"slices"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/waitstate/waitstate-go"
)

// Options configures the interceptors.
type Options struct {
	// Tag returns a call's tag, from its context (its metadata, its
	// peer's identity) and its full method name, such as
	// "/search.v1.Search/Query". If nil, every call has tag "".
	Tag func(ctx context.Context, fullMethod string) string

	// Weight returns a call's weight. If nil, every call weighs 1.
	Weight func(ctx context.Context, fullMethod string) float64

	// FailedCodes are the status codes that make a call's health sample a
	// failure. If nil, those of DefaultFailedCodes.
	FailedCodes []codes.Code

	// Skip, if set, lets the calls it returns true for through ungated and
	// unmeasured, such as health checks and reflection.
	Skip func(ctx context.Context, fullMethod string) bool
}

// DefaultFailedCodes returns the codes that count as a failure unless
// Options.FailedCodes says otherwise: the server's own faults, not the
// caller's. Each call returns a fresh slice, which the caller may change.
func DefaultFailedCodes() []codes.Code { return slices.Clone(defaultFailedCodes) }

// defaultFailedCodes is what DefaultFailedCodes returns; never changed.
var defaultFailedCodes = []codes.Code{codes.Internal, codes.Unavailable, codes.DeadlineExceeded}

type resultKey struct{}

// ResultFromContext returns the Gate decision the interceptor made for the
// call whose context this is, and whether there was one.
func ResultFromContext(ctx context.Context) (waitstate.GateResult, bool) {
	r, ok := ctx.Value(resultKey{}).(waitstate.GateResult)
	return r, ok
}

// gate makes the decision for one call. It returns the context the handler
// gets, the call's tag, and the error to answer a denied call with.
func (o Options) gate(ctx context.Context, c *waitstate.Client, method string) (context.Context, string, error) {
	tag, weight := "", 1.0
	if o.Tag != nil {
		tag = o.Tag(ctx, method)
	}
	if o.Weight != nil {
		weight = o.Weight(ctx, method)
	}
	res := c.Gate(tag, weight)
	ctx = context.WithValue(ctx, resultKey{}, res)
	if res.Allowed {
		return ctx, tag, nil
	}
	st := status.New(codes.ResourceExhausted, "waitstate: "+res.Reason.String())
	if detailed, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(c.RetryAfter(res))}); err == nil {
		st = detailed
	}
	return ctx, tag, st.Err()
}

// failed reports whether err's code counts as a failure.
func (o Options) failed(err error) bool {
	failed := o.FailedCodes
	if failed == nil {
		failed = defaultFailedCodes
	}
	return err != nil && slices.Contains(failed, status.Code(err))
}

// UnaryServerInterceptor gates each unary call before its handler runs and
// records the served ones as health samples of their tag.
func UnaryServerInterceptor(c *waitstate.Client, opts Options) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if opts.Skip != nil && opts.Skip(ctx, info.FullMethod) {
			return handler(ctx, req)
		}
		ctx, tag, denied := opts.gate(ctx, c, info.FullMethod)
		if denied != nil {
			return nil, denied
		}
		start := time.Now()
		resp, err := handler(ctx, req)
		c.ObserveTag(tag, time.Since(start), opts.failed(err))
		return resp, err
	}
}

// StreamServerInterceptor gates each stream before its handler runs and
// records the served ones, over their whole life, as health samples of
// their tag.
func StreamServerInterceptor(c *waitstate.Client, opts Options) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if opts.Skip != nil && opts.Skip(ss.Context(), info.FullMethod) {
			return handler(srv, ss)
		}
		ctx, tag, denied := opts.gate(ss.Context(), c, info.FullMethod)
		if denied != nil {
			return denied
		}
		start := time.Now()
		err := handler(srv, &stream{ServerStream: ss, ctx: ctx})
		c.ObserveTag(tag, time.Since(start), opts.failed(err))
		return err
	}
}

// stream is a ServerStream whose context carries the decision.
type stream struct {
	grpc.ServerStream
	ctx context.Context
}

// Context returns the stream's context, with the decision.
func (s *stream) Context() context.Context { return s.ctx }
