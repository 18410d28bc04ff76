package helperapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 2 * time.Minute

// Client calls banger-helper. Set Socket (the daemon takes it from
// paths.Layout.HelperSocket); the rest may stay zero. A Client is safe for
// concurrent use: every call is its own connection.
type Client struct {
	// Socket is the path of the helper's unix socket.
	Socket string
	// Timeout bounds a call whose ctx has no deadline; zero means
	// DefaultTimeout.
	Timeout time.Duration
}

// EnsureBridge creates or converges the bridge.
func (c *Client) EnsureBridge(ctx context.Context, op EnsureBridge) (EnsureBridgeResult, error) {
	var res EnsureBridgeResult
	err := c.call(ctx, op, &res)
	return res, err
}

// DeleteBridge removes the bridge.
func (c *Client) DeleteBridge(ctx context.Context, op DeleteBridge) error {
	return c.call(ctx, op, nil)
}

// CreateTap creates a VM's tap.
func (c *Client) CreateTap(ctx context.Context, op CreateTap) error {
	return c.call(ctx, op, nil)
}

// DeleteTap removes a VM's tap.
func (c *Client) DeleteTap(ctx context.Context, op DeleteTap) error {
	return c.call(ctx, op, nil)
}

// EnsureNAT installs or converges masquerading and forwarding.
func (c *Client) EnsureNAT(ctx context.Context, op EnsureNAT) error {
	return c.call(ctx, op, nil)
}

// RemoveNAT deletes banger's nftables table.
func (c *Client) RemoveNAT(ctx context.Context) error {
	return c.call(ctx, RemoveNAT{}, nil)
}

// EnsureDNSRedirect installs or converges the DNS redirect.
func (c *Client) EnsureDNSRedirect(ctx context.Context, op EnsureDNSRedirect) (EnsureDNSRedirectResult, error) {
	var res EnsureDNSRedirectResult
	err := c.call(ctx, op, &res)
	return res, err
}

// AttachLoop attaches a VM file to a loop device and returns the opened
// device. The loop detaches once f and every copy of it are closed.
func (c *Client) AttachLoop(ctx context.Context, op AttachLoop) (res AttachLoopResult, f *os.File, err error) {
	files, err := c.send(ctx, op, &res, 1)
	if err != nil {
		return AttachLoopResult{}, nil, err
	}
	return res, files[0], nil
}

// DetachLoop detaches a loop device.
func (c *Client) DetachLoop(ctx context.Context, op DetachLoop) error {
	return c.call(ctx, op, nil)
}

// CreateSnapshot builds a VM's dm-snapshot and returns the opened device.
func (c *Client) CreateSnapshot(ctx context.Context, op CreateSnapshot) (res CreateSnapshotResult, f *os.File, err error) {
	files, err := c.send(ctx, op, &res, 1)
	if err != nil {
		return CreateSnapshotResult{}, nil, err
	}
	return res, files[0], nil
}

// RemoveSnapshot removes a VM's dm-snapshot.
func (c *Client) RemoveSnapshot(ctx context.Context, op RemoveSnapshot) error {
	return c.call(ctx, op, nil)
}

// LaunchJailed starts a VM's Firecracker under the jailer.
func (c *Client) LaunchJailed(ctx context.Context, op LaunchJailed) (LaunchJailedResult, error) {
	var res LaunchJailedResult
	err := c.call(ctx, op, &res)
	return res, err
}

// KillJailed kills a VM's jailed Firecracker and removes its jail.
func (c *Client) KillJailed(ctx context.Context, op KillJailed) error {
	return c.call(ctx, op, nil)
}

// ListOwned lists banger's kernel objects.
func (c *Client) ListOwned(ctx context.Context) (ListOwnedResult, error) {
	var res ListOwnedResult
	err := c.call(ctx, ListOwned{}, &res)
	return res, err
}

// call is send for operations that return no descriptor.
func (c *Client) call(ctx context.Context, op Op, result any) error {
	_, err := c.send(ctx, op, result, 0)
	return err
}

// send is the one funnel every call goes through: validate, connect, write
// the request, half-close, read the response and the descriptors that come
// with it. It returns exactly wantFDs files or an error, never both.
func (c *Client) send(ctx context.Context, op Op, result any, wantFDs int) (files []*os.File, err error) {
	if err := op.Validate(); err != nil {
		return nil, err
	}
	if c.Socket == "" {
		return nil, errors.New("helper client: no socket path set")
	}
	req, err := EncodeRequest(op)
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		timeout := c.Timeout
		if timeout == 0 {
			timeout = DefaultTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.Socket)
	if err != nil {
		return nil, fmt.Errorf("connect to helper %s: %w", c.Socket, err)
	}
	conn := nc.(*net.UnixConn)
	defer func() { _ = conn.Close() }()
	// Unblock reads and writes when ctx ends.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()

	_, werr := conn.Write(req)
	if werr == nil {
		werr = conn.CloseWrite()
	}
	// Read even when the write failed: a helper that refuses a peer answers
	// without reading the request, and the answer says why.
	body, fds, err := readResponse(conn)
	defer func() {
		if err != nil {
			for _, fd := range fds {
				_ = syscall.Close(fd)
			}
		}
	}()
	if werr != nil && (err != nil || len(body) == 0) {
		return nil, fmt.Errorf("helper %s: send request: %w", op.OpName(), ctxErr(ctx, werr))
	}
	if err != nil {
		return nil, fmt.Errorf("helper %s: read response: %w", op.OpName(), ctxErr(ctx, err))
	}
	var resp Response
	if err := json.Unmarshal(body, &resp); err != nil {
		return nil, fmt.Errorf("helper %s: decode response: %w", op.OpName(), err)
	}
	if !resp.OK {
		if resp.Error == nil {
			resp.Error = &Error{Code: CodeInternal, Message: "error response without an error"}
		}
		return nil, fmt.Errorf("helper %s: %w", op.OpName(), resp.Error)
	}
	if resp.FDs != len(fds) || len(fds) != wantFDs {
		return nil, fmt.Errorf("helper %s: got %d descriptors (response says %d), want %d", op.OpName(), len(fds), resp.FDs, wantFDs)
	}
	if result != nil && len(resp.Result) > 0 {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			return nil, fmt.Errorf("helper %s: decode result: %w", op.OpName(), err)
		}
	}
	for _, fd := range fds {
		files = append(files, os.NewFile(uintptr(fd), op.OpName()))
	}
	return files, nil
}

// readResponse reads the whole response and the descriptors sent with it
// (received close-on-exec). On error it still returns the descriptors it
// received so that the caller closes them.
func readResponse(conn *net.UnixConn) (body []byte, fds []int, err error) {
	buf := make([]byte, 0, 4096)
	oob := make([]byte, syscall.CmsgSpace(MaxFDs*4))
	for {
		if len(buf) == cap(buf) {
			if len(buf) > MaxResponseSize {
				return nil, fds, fmt.Errorf("response exceeds %d bytes", MaxResponseSize)
			}
			buf = append(buf, make([]byte, len(buf))...)[:len(buf)]
		}
		n, oobn, flags, _, rerr := conn.ReadMsgUnix(buf[len(buf):cap(buf)], oob)
		if oobn > 0 {
			got, perr := parseRights(oob[:oobn])
			fds = append(fds, got...)
			if perr != nil {
				return nil, fds, perr
			}
		}
		if flags&syscall.MSG_CTRUNC != 0 {
			return nil, fds, errors.New("descriptors truncated")
		}
		if n > 0 {
			buf = buf[:len(buf)+n]
		}
		if errors.Is(rerr, io.EOF) || (rerr == nil && n == 0 && oobn == 0) {
			return buf, fds, nil
		}
		// A helper that stopped reading a request (refused, or too large)
		// resets the connection after its answer; the answer is complete.
		if errors.Is(rerr, syscall.ECONNRESET) && len(buf) > 0 {
			return buf, fds, nil
		}
		if rerr != nil {
			return nil, fds, rerr
		}
	}
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := syscall.ParseUnixRights(&m)
		if err != nil {
			return fds, fmt.Errorf("parse control message: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// ctxErr prefers ctx's error to the i/o timeout its deadline caused.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}
