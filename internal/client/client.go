// Package client is the typed client of the daemon's API over its unix
// socket. The CLI, the TUI and the tests talk to bangerd only through it.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"

	"github.com/bangerhq/banger/internal/api"
)

// Client talks to one daemon. The zero value is not usable: Socket must be
// set. It is safe for concurrent use.
type Client struct {
	// Socket is the daemon's unix socket path.
	Socket string
	// HTTP overrides the transport (tests); by default requests dial Socket.
	HTTP *http.Client

	once sync.Once
	hc   *http.Client
}

// New returns a client for the daemon listening on socket.
func New(socket string) *Client { return &Client{Socket: socket} }

// ErrNoDaemon means nothing is listening on the socket.
var ErrNoDaemon = errors.New("daemon is not running")

func (c *Client) http() *http.Client {
	c.once.Do(func() {
		if c.HTTP != nil {
			c.hc = c.HTTP
			return
		}
		var d net.Dialer
		c.hc = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", c.Socket)
			},
			MaxIdleConns:      4,
			DisableKeepAlives: false,
		}}
	})
	return c.hc
}

// do sends one request and returns the response, having turned transport
// failures and error bodies into Go errors. The caller closes the body.
func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://bangerd"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http().Do(req)
	if err != nil {
		if isNoDaemon(err) {
			return nil, fmt.Errorf("%w (socket %s)", ErrNoDaemon, c.Socket)
		}
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 400 {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp, nil
}

func isNoDaemon(err error) bool {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "no such file or directory") || strings.Contains(s, "connection refused")
}

// readError decodes an error response into *api.Error.
func readError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var er api.ErrorResponse
	if err := json.Unmarshal(b, &er); err == nil && er.Error != nil && er.Error.Code != "" {
		return er.Error
	}
	return &api.Error{Code: api.CodeInternal, Message: fmt.Sprintf("daemon answered %s: %s", resp.Status, strings.TrimSpace(string(b)))}
}

// send is the funnel of every plain request: it encodes body, decodes the
// response into want (when not nil) and returns *api.Error for API errors.
func (c *Client) send(ctx context.Context, method, path string, body, want any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if want == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(want); err != nil {
		return fmt.Errorf("decode %s %s: %w", method, path, err)
	}
	return nil
}

// Health checks that the daemon answers.
func (c *Client) Health(ctx context.Context) (api.Health, error) {
	var h api.Health
	return h, c.send(ctx, http.MethodGet, "/v1/health", nil, &h)
}

// Version returns the daemon's build and process facts.
func (c *Client) Version(ctx context.Context) (api.VersionInfo, error) {
	var v api.VersionInfo
	return v, c.send(ctx, http.MethodGet, "/v1/version", nil, &v)
}

// Shutdown asks the daemon to stop.
func (c *Client) Shutdown(ctx context.Context, req api.ShutdownRequest) (api.ShutdownResponse, error) {
	var r api.ShutdownResponse
	return r, c.send(ctx, http.MethodPost, "/v1/shutdown", req, &r)
}

// ListVMs returns every VM.
func (c *Client) ListVMs(ctx context.Context) ([]api.VM, error) {
	var vms []api.VM
	return vms, c.send(ctx, http.MethodGet, "/v1/vms", nil, &vms)
}

// ListImages returns every image.
func (c *Client) ListImages(ctx context.Context) ([]api.Image, error) {
	var ims []api.Image
	return ims, c.send(ctx, http.MethodGet, "/v1/images", nil, &ims)
}

// EventStream reads NDJSON values from a streamed response.
type EventStream struct {
	body io.ReadCloser
	sc   *bufio.Scanner
}

// Events subscribes to the daemon's event stream until ctx ends or Close.
func (c *Client) Events(ctx context.Context) (*EventStream, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/events", nil)
	if err != nil {
		return nil, err
	}
	return newEventStream(resp.Body), nil
}

func newEventStream(body io.ReadCloser) *EventStream {
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	return &EventStream{body: body, sc: sc}
}

// Next returns the next event; io.EOF when the stream ended.
func (s *EventStream) Next() (api.Event, error) {
	for s.sc.Scan() {
		line := bytes.TrimSpace(s.sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e api.Event
		if err := json.Unmarshal(line, &e); err != nil {
			return api.Event{}, fmt.Errorf("decode event: %w", err)
		}
		return e, nil
	}
	if err := s.sc.Err(); err != nil {
		return api.Event{}, err
	}
	return api.Event{}, io.EOF
}

// Close ends the stream.
func (s *EventStream) Close() error { return s.body.Close() }
