// Package corral is a small Go client for Corral's gRPC API, over the stubs generated from
// protos/ (package corral.dev/client/gen/...): it signs in, sends the access token with every
// call, and follows a session's events across reconnects by sequence.
package corral

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	identityv1 "corral.dev/client/gen/corral/identity/v1"
	sessionv1 "corral.dev/client/gen/corral/session/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Client reaches every service through one address: the edge (127.0.0.1:8080 under make run).
type Client struct {
	conn     *grpc.ClientConn
	Identity identityv1.IdentityServiceClient
	Sessions sessionv1.SessionServiceClient

	mu    sync.Mutex
	token string
}

// bearer implements credentials.PerRPCCredentials: the access token, once signed in.
type bearer struct{ client *Client }

func (b bearer) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	b.client.mu.Lock()
	defer b.client.mu.Unlock()
	if b.client.token == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + b.client.token}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// Dial connects to target (plaintext unless opts say otherwise, e.g. grpc.WithTransportCredentials).
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	c := &Client{}
	opts = append([]grpc.DialOption{grpc.WithInsecure(), grpc.WithPerRPCCredentials(bearer{c})}, opts...)
	conn, err := grpc.Dial(target, opts...)
	if err != nil {
		return nil, err
	}
	c.conn = conn
	c.Identity = identityv1.NewIdentityServiceClient(conn)
	c.Sessions = sessionv1.NewSessionServiceClient(conn)
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Login signs in with email and password; later calls carry the access token.
func (c *Client) Login(ctx context.Context, email, password string) (*identityv1.LoginResponse, error) {
	reply, err := c.Identity.Login(ctx, &identityv1.LoginRequest{Email: email, Password: password})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.token = reply.GetToken().GetAccessToken()
	c.mu.Unlock()
	return reply, nil
}

// RequestID is a fresh UUID4 for request_id fields (a retried create or send is then answered
// with the first result instead of doing it twice).
func RequestID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// Reason is the google.rpc.ErrorInfo reason every Corral error carries ("" if err has none).
func Reason(err error) string {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

// Events calls handle with every event of session after sequence after, then live ones, until
// handle returns Stop (or an error), ctx ends, or the server ends the stream. A stream dropped
// with UNAVAILABLE is reopened after the last sequence seen: nothing is missed or repeated.
func (c *Client) Events(ctx context.Context, session string, after int64, handle func(*sessionv1.SessionEvent) error) error {
	failures := 0
	for {
		stream, err := c.Sessions.StreamSessionEvents(ctx, &sessionv1.StreamSessionEventsRequest{Session: session, AfterSequence: after})
		for err == nil {
			var reply *sessionv1.StreamSessionEventsResponse
			reply, err = stream.Recv()
			if err != nil {
				break
			}
			failures = 0
			event := reply.GetEvent()
			if event.GetHeartbeat() != nil || event.GetSequence() <= after {
				continue
			}
			after = event.GetSequence()
			if herr := handle(event); herr == Stop {
				return nil
			} else if herr != nil {
				return herr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if status.Code(err) != codes.Unavailable || failures >= 5 {
			return err
		}
		failures++
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(failures) * 200 * time.Millisecond):
		}
	}
}

// Stop, returned by an Events handler, ends the stream without an error.
var Stop = errors.New("stop")
