package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"
)

// Client talks to one Firecracker process over its API socket: HTTP/1.1 on
// a unix socket, JSON bodies, 204 for a successful PUT/PATCH and 200 with a
// body for a GET. The zero value is not usable; use NewClient.
type Client struct {
	socket string
	log    *slog.Logger

	// caps gates the fields and endpoints that not every version accepts.
	// It is set by Negotiate; until then only what every supported version
	// accepts may be sent.
	caps Capabilities

	httpc *http.Client
}

// NewClient returns a client for the API socket at socket. log receives
// Firecracker's deprecation warnings; nil discards them.
func NewClient(socket string, log *slog.Logger) *Client {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dialer := &net.Dialer{}
	return &Client{
		socket: socket,
		log:    log,
		caps:   capabilityTable[0].Caps,
		httpc: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return dialer.DialContext(ctx, "unix", socket)
			},
			DisableCompression: true,
			// Firecracker serves a handful of connections at most; one
			// idle connection is plenty, and it is not held for days.
			MaxIdleConns:    1,
			IdleConnTimeout: 30 * time.Second,
		}},
	}
}

// Capabilities returns what the running version accepts, as learnt by
// Negotiate.
func (c *Client) Capabilities() Capabilities { return c.caps }

// Close drops idle connections; the process keeps running.
func (c *Client) Close() {
	c.httpc.CloseIdleConnections()
}

// APIError is a non-2xx answer of the Firecracker API. FaultMessage is
// Firecracker's own text (the fault_message of the Error definition), or the
// raw body when it was not the documented JSON.
type APIError struct {
	Method       string
	Path         string
	Status       int
	FaultMessage string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d %s: %s", e.Method, e.Path, e.Status, http.StatusText(e.Status), e.FaultMessage)
}

// Is matches the sentinels below by Firecracker's fixed message texts
// (rpc_interface.rs VmmActionError), so callers can use errors.Is.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrNotAfterStart:
		return e.FaultMessage == msgNotAfterStart
	case ErrNotBeforeStart:
		return e.FaultMessage == msgNotBeforeStart
	}
	return false
}

// Firecracker's fixed texts for requests sent in the wrong phase.
const (
	msgNotAfterStart  = "The requested operation is not supported after starting the microVM."
	msgNotBeforeStart = "The requested operation is not supported before starting the microVM."
)

var (
	// ErrNotAfterStart matches an APIError for a pre-boot-only request sent
	// after InstanceStart.
	ErrNotAfterStart = errors.New("firecracker: operation not supported after the microVM started")
	// ErrNotBeforeStart matches an APIError for a post-boot-only request
	// sent before InstanceStart.
	ErrNotBeforeStart = errors.New("firecracker: operation not supported before the microVM started")
	// ErrNotSupported is returned, without sending anything, for a field or
	// endpoint the running version does not know.
	ErrNotSupported = errors.New("not supported by this firecracker version")
)

// ValidID checks a drive or interface id the way Firecracker's checked_id
// does, restricted to ASCII so it is also safe in a URL path: non-empty,
// letters, digits and '_' only.
func ValidID(id string) error {
	if id == "" {
		return errors.New("empty resource id")
	}
	for _, r := range id {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '_' {
			return fmt.Errorf("resource id %q: only letters, digits and '_' are allowed", id)
		}
	}
	return nil
}

// maxResponse caps what is read from the socket: Firecracker's largest
// answers (GET /vm/config, /mmds) are a few KiB.
const maxResponse = 1 << 20

// send is the one funnel every request goes through. body, when non-nil, is
// encoded as JSON; want, when non-nil, receives the decoded 200 body.
func (c *Client) send(ctx context.Context, method, path string, body, want any) error {
	if err := c.allows(body); err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("encode %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	// The Host header is ignored by Firecracker; localhost is conventional.
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return fmt.Errorf("build %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.httpc.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return fmt.Errorf("read firecracker %s %s: %w", method, path, err)
	}
	if len(raw) > maxResponse {
		return fmt.Errorf("firecracker %s %s: response larger than %d bytes", method, path, maxResponse)
	}
	if d := resp.Header.Get("Deprecation"); d != "" {
		c.log.Warn("firecracker marks a request as deprecated", "method", method, "path", path, "deprecation", d)
	}
	return decodeResponse(method, path, resp.StatusCode, raw, want)
}

// decodeResponse turns a status and body into the caller's value or an
// *APIError. It is separate from send so the fuzz target can reach it.
func decodeResponse(method, path string, status int, raw []byte, want any) error {
	if status < 200 || status > 299 {
		e := &APIError{Method: method, Path: path, Status: status}
		var f faultBody
		if err := json.Unmarshal(raw, &f); err == nil && f.FaultMessage != "" {
			e.FaultMessage = f.FaultMessage
		} else {
			e.FaultMessage = strings.TrimSpace(string(raw))
			if len(e.FaultMessage) > 512 {
				e.FaultMessage = e.FaultMessage[:512] + "…"
			}
			if e.FaultMessage == "" {
				e.FaultMessage = "(empty body)"
			}
		}
		return e
	}
	if want == nil {
		// PUT/PATCH answer 204 with no body; the balloon hinting actions of
		// v1.14 answer 200 instead. Neither body carries anything we need.
		return nil
	}
	if status == http.StatusNoContent || len(bytes.TrimSpace(raw)) == 0 {
		return fmt.Errorf("firecracker %s %s: status %d without the expected JSON body", method, path, status)
	}
	if err := json.Unmarshal(raw, want); err != nil {
		return fmt.Errorf("decode firecracker %s %s: %w", method, path, err)
	}
	return nil
}

// Negotiate asks the process for its version and sets the capabilities
// every later request is checked against. It fails with
// ErrUnsupportedVersion for Firecracker older than MinVersion.
func (c *Client) Negotiate(ctx context.Context) (Capabilities, error) {
	s, err := c.Version(ctx)
	if err != nil {
		return Capabilities{}, err
	}
	v, err := ParseVersion(s)
	if err != nil {
		return Capabilities{}, err
	}
	caps, err := CapabilitiesFor(v)
	if err != nil {
		return Capabilities{}, err
	}
	c.caps = caps
	return caps, nil
}

// Version returns GET /version's firecracker_version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v versionInfo
	if err := c.send(ctx, http.MethodGet, "/version", nil, &v); err != nil {
		return "", err
	}
	if v.FirecrackerVersion == "" {
		return "", errors.New("firecracker GET /version: empty firecracker_version")
	}
	return v.FirecrackerVersion, nil
}

// InstanceInfo returns GET /.
func (c *Client) InstanceInfo(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.send(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// PutLogger configures Firecracker's own log (pre-boot only).
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.send(ctx, http.MethodPut, "/logger", l, nil)
}

// PutMachineConfig sets vCPUs and memory (pre-boot only).
func (c *Client) PutMachineConfig(ctx context.Context, mc MachineConfig) error {
	return c.send(ctx, http.MethodPut, "/machine-config", mc, nil)
}

// PutBootSource sets kernel, initrd and command line (pre-boot only).
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.send(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutDrive adds or replaces a block device (pre-boot only).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	if err := ValidID(d.DriveID); err != nil {
		return fmt.Errorf("put drive: %w", err)
	}
	return c.send(ctx, http.MethodPut, "/drives/"+d.DriveID, d, nil)
}

// PutNetworkInterface adds a virtio-net device on a tap (pre-boot only).
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	if err := ValidID(n.IfaceID); err != nil {
		return fmt.Errorf("put network interface: %w", err)
	}
	return c.send(ctx, http.MethodPut, "/network-interfaces/"+n.IfaceID, n, nil)
}

// PutVsock adds the vsock device (pre-boot only).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.send(ctx, http.MethodPut, "/vsock", v, nil)
}

// PutEntropy adds the virtio-rng device (pre-boot only).
func (c *Client) PutEntropy(ctx context.Context, e EntropyDevice) error {
	return c.send(ctx, http.MethodPut, "/entropy", e, nil)
}

// Action sends PUT /actions: InstanceStart (once, pre-boot), SendCtrlAltDel
// or FlushMetrics (post-boot).
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.send(ctx, http.MethodPut, "/actions", instanceAction{ActionType: actionType}, nil)
}

// Pause stops the vCPUs (post-boot only; repeating it is a no-op).
func (c *Client) Pause(ctx context.Context) error {
	return c.send(ctx, http.MethodPatch, "/vm", vmState{State: "Paused"}, nil)
}

// Resume restarts the vCPUs (post-boot only; repeating it is a no-op).
func (c *Client) Resume(ctx context.Context) error {
	return c.send(ctx, http.MethodPatch, "/vm", vmState{State: "Resumed"}, nil)
}

// CreateSnapshot writes the VM state and memory; the VM must be paused.
// Disks are not part of a snapshot.
func (c *Client) CreateSnapshot(ctx context.Context, s SnapshotCreate) error {
	return c.send(ctx, http.MethodPut, "/snapshot/create", s, nil)
}

// LoadSnapshot restores a snapshot into a fresh process (nothing but the
// logger and metrics configured). On failure Firecracker exits.
func (c *Client) LoadSnapshot(ctx context.Context, s SnapshotLoad) error {
	for _, o := range s.NetworkOverrides {
		if err := ValidID(o.IfaceID); err != nil {
			return fmt.Errorf("load snapshot: network override: %w", err)
		}
	}
	return c.send(ctx, http.MethodPut, "/snapshot/load", s, nil)
}

// allows refuses a body that sets a field, or names an endpoint, the
// negotiated version does not know. It sits in send so that no request can
// bypass it.
func (c *Client) allows(body any) error {
	caps := c.caps
	var what string
	switch b := body.(type) {
	case NetworkInterface:
		if b.MTU != 0 && !caps.NetMTU {
			what = "network interface mtu"
		}
	case MachineConfig:
		if b.HugePages == "Transparent" && !caps.HugePagesTransparent {
			what = "machine config huge_pages Transparent"
		}
	case EntropyDevice:
		if !caps.Entropy {
			what = "entropy device"
		}
	case SnapshotLoad:
		switch {
		case b.VsockOverride != nil && !caps.SnapshotVsockOverride:
			what = "snapshot load vsock_override"
		case b.ClockRealtime && !caps.SnapshotClockRealtime:
			what = "snapshot load clock_realtime"
		case b.HugePages != "" && !caps.SnapshotHugePages:
			what = "snapshot load huge_pages"
		}
	}
	if what == "" {
		return nil
	}
	return c.unsupported(what)
}

func (c *Client) unsupported(what string) error {
	if c.caps.Version == (Version{}) {
		return fmt.Errorf("%s: %w (version not negotiated yet)", what, ErrNotSupported)
	}
	return fmt.Errorf("%s: %w (running %s)", what, ErrNotSupported, c.caps.Version)
}
