package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/vmm"
)

// QMP is QEMU's JSON control protocol (docs/interop/qmp-spec.rst): one JSON
// object per line. The server greets, the client negotiates capabilities
// with qmp_capabilities, then sends {"execute", "arguments", "id"} and gets
// {"return"} or {"error": {"class", "desc"}} echoing the id, in order.
// Asynchronous {"event", "data", "timestamp"} objects may come at any time.

// maxMessage bounds one QMP line; the largest replies banger asks for
// (human-monitor-command output) are a few kilobytes.
const maxMessage = 4 << 20

// maxQueuedEvents bounds events waiting for a reader that does not keep up;
// the oldest are dropped beyond it.
const maxQueuedEvents = 1024

// ErrClosed means the QMP connection ended (QEMU exited, or Close).
var ErrClosed = errors.New("qmp connection closed")

// Error is an error QEMU returned for a command.
type Error struct {
	Class string `json:"class"` // GenericError, CommandNotFound, DeviceNotFound …
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Desc + " (" + e.Class + ")" }

// Greeting is the server's first message.
type Greeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

// VersionString is "major.minor.micro".
func (g Greeting) VersionString() string {
	v := g.Version.QEMU
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
}

// Event is an asynchronous QMP event.
type Event struct {
	Name string          // "SHUTDOWN", "STOP", "RESUME", "POWERDOWN" …
	Data json.RawMessage // event-specific; may be empty
	Time time.Time       // QEMU's timestamp
}

// ShutdownData is the data of a SHUTDOWN event.
type ShutdownData struct {
	// Guest is true when the guest initiated the shutdown.
	Guest bool `json:"guest"`
	// Reason is QEMU's ShutdownCause: guest-shutdown, guest-reset,
	// guest-panic, host-qmp-quit, host-qmp-system-reset, host-signal,
	// host-ui, host-error, subsystem-reset, snapshot-load, none.
	Reason string `json:"reason"`
}

// Shutdown decodes a SHUTDOWN event's data.
func (e Event) Shutdown() (ShutdownData, bool) {
	var d ShutdownData
	if e.Name != "SHUTDOWN" || json.Unmarshal(e.Data, &d) != nil {
		return d, false
	}
	return d, true
}

// Status is query-status's answer.
type Status struct {
	Status     string `json:"status"` // running, paused, prelaunch, shutdown, internal-error …
	Running    bool   `json:"running"`
	Singlestep bool   `json:"singlestep"`
}

// Client is one QMP connection. Commands may be issued from several
// goroutines; QEMU answers them in order.
type Client struct {
	conn     net.Conn
	greeting Greeting

	writeMu sync.Mutex // serialises whole command lines on conn

	mu      sync.Mutex // guards the fields below
	nextID  uint64
	pending map[string]chan message
	order   []string // pending ids in the order sent
	err     error    // why the reader stopped; set once
	queue   []Event  // events not yet delivered, at most maxQueuedEvents

	wake    chan struct{} // nudges the event pump; capacity 1
	events  chan Event
	done    chan struct{} // closed when the reader has stopped
	closing chan struct{} // closed by Close
	close   sync.Once
}

// Dial connects to a QMP socket, reads the greeting and negotiates
// capabilities. ctx bounds the whole handshake.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect qmp %s: %w", path, err)
	}
	c, err := newClient(ctx, conn)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("qmp handshake on %s: %w", path, err)
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		pending: map[string]chan message{},
		wake:    make(chan struct{}, 1),
		events:  make(chan Event),
		done:    make(chan struct{}),
		closing: make(chan struct{}),
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	// A QEMU whose monitor is busy with another client accepts the
	// connection but never greets; the deadline turns that into an error.
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetReadDeadline(dl)
	} else {
		_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	}
	line, err := readLine(r)
	if err != nil {
		return nil, fmt.Errorf("read greeting: %w", err)
	}
	m, err := decodeMessage(line)
	if err != nil {
		return nil, fmt.Errorf("read greeting: %w", err)
	}
	if m.kind != kindGreeting {
		return nil, fmt.Errorf("read greeting: got a %s", m.kind)
	}
	c.greeting = m.greeting
	_ = conn.SetReadDeadline(time.Time{})
	go c.readLoop(r)
	go c.pumpEvents()
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// Greeting returns the server's greeting.
func (c *Client) Greeting() Greeting { return c.greeting }

// Events delivers asynchronous events in order. It is closed once the
// connection has ended and every queued event was delivered, or on Close.
func (c *Client) Events() <-chan Event { return c.events }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection. QEMU keeps running.
func (c *Client) Close() error {
	var err error
	c.close.Do(func() {
		close(c.closing)
		err = c.conn.Close()
	})
	return err
}

// Execute runs one command. args is marshalled as "arguments" (nil: none);
// the "return" value is unmarshalled into out unless out is nil. QEMU's
// errors are returned as *Error.
func (c *Client) Execute(ctx context.Context, command string, args, out any) error {
	ch := make(chan message, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	c.nextID++
	id := "banger-" + strconv.FormatUint(c.nextID, 10)
	c.pending[id] = ch
	c.order = append(c.order, id)
	c.mu.Unlock()

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		c.forget(id, false)
		return fmt.Errorf("qmp %s: encode arguments: %w", command, err)
	}
	if err := c.write(ctx, append(b, '\n')); err != nil {
		// A partly written line would leave QEMU's parser confused; the
		// connection is not worth keeping.
		c.forget(id, false)
		_ = c.conn.Close()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case m := <-ch:
		return m.result(command, out)
	case <-ctx.Done():
		// The answer still comes, in order; the reader drops it.
		c.forget(id, true)
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	case <-c.done:
		// The reader may have delivered our answer just before stopping.
		select {
		case m := <-ch:
			return m.result(command, out)
		default:
		}
		c.mu.Lock()
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
}

func (c *Client) write(ctx context.Context, b []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetWriteDeadline(dl)
	} else {
		_ = c.conn.SetWriteDeadline(time.Time{})
	}
	_, err := c.conn.Write(b)
	if err != nil {
		select {
		case <-c.done:
			return ErrClosed
		default:
		}
	}
	return err
}

// forget stops waiting for id's answer. A command that was sent stays in
// the order list: QEMU still answers it, and an id-less answer must not be
// given to the next command.
func (c *Client) forget(id string, sent bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.pending, id)
	if !sent {
		c.order = removeID(c.order, id)
	}
}

func removeID(ids []string, id string) []string {
	for i, o := range ids {
		if o == id {
			return append(ids[:i:i], ids[i+1:]...)
		}
	}
	return ids
}

// readLoop dispatches answers to their commands and queues events until
// the connection ends.
func (c *Client) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = readLine(r)
		if err != nil {
			break
		}
		var m message
		m, err = decodeMessage(line)
		if err != nil {
			break
		}
		switch m.kind {
		case kindEvent:
			c.mu.Lock()
			if len(c.queue) >= maxQueuedEvents {
				c.queue = c.queue[1:]
			}
			c.queue = append(c.queue, m.event)
			c.mu.Unlock()
			c.nudge()
		case kindResponse:
			c.deliver(m)
		case kindGreeting:
			err = errors.New("unexpected second greeting")
		}
		if err != nil {
			break
		}
	}
	select {
	case <-c.closing:
		err = ErrClosed
	default:
		if errors.Is(err, net.ErrClosed) || errors.Is(err, errEOF) {
			err = ErrClosed
		} else {
			err = fmt.Errorf("%w: %w", ErrClosed, err)
		}
	}
	_ = c.conn.Close()
	c.mu.Lock()
	c.err = err
	c.pending = map[string]chan message{}
	c.order = nil
	c.mu.Unlock()
	close(c.done)
	c.nudge()
}

// deliver hands a response to the command that waits for it: by id, or
// (for the id-less error QEMU sends when it cannot parse a line) to the
// oldest outstanding command, since answers come in order.
func (c *Client) deliver(m message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := m.id
	if id == "" && len(c.order) > 0 {
		id = c.order[0]
	}
	c.order = removeID(c.order, id)
	if ch, ok := c.pending[id]; ok {
		delete(c.pending, id)
		ch <- m
	}
}

func (c *Client) nudge() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// pumpEvents moves queued events to the Events channel, so a slow event
// reader never stalls command answers.
func (c *Client) pumpEvents() {
	defer close(c.events)
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			ev := c.queue[0]
			c.queue = c.queue[1:]
			c.mu.Unlock()
			select {
			case c.events <- ev:
			case <-c.closing:
				return
			}
			continue
		}
		stopped := c.err != nil
		c.mu.Unlock()
		if stopped {
			return
		}
		select {
		case <-c.wake:
		case <-c.closing:
			return
		}
	}
}

// QueryStatus runs query-status.
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// SystemPowerdown presses the ACPI power button.
func (c *Client) SystemPowerdown(ctx context.Context) error {
	return c.Execute(ctx, "system_powerdown", nil, nil)
}

// Stop pauses the guest's vCPUs.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the guest's vCPUs.
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit ends QEMU at once. QEMU may close the connection before its answer
// arrives; that counts as success.
func (c *Client) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// HumanMonitorCommand runs an HMP command line and returns its output.
// HMP commands report most failures in that output, not as QMP errors.
func (c *Client) HumanMonitorCommand(ctx context.Context, line string) (string, error) {
	var out string
	err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": line}, &out)
	return out, err
}

// ErrNoSuchForward means RemoveHostForward found no matching rule.
var ErrNoSuchForward = errors.New("no such host forwarding rule")

// AddHostForward publishes a guest port through a running user-mode
// (slirp) netdev, as hostfwd= does at start.
func (c *Client) AddHostForward(ctx context.Context, netdev string, f vmm.Forward) error {
	if err := validForward(netdev, f); err != nil {
		return err
	}
	rule := hostfwdRule(f)
	out, err := c.HumanMonitorCommand(ctx, "hostfwd_add "+netdev+" "+rule)
	if err != nil {
		return fmt.Errorf("add host forward %s on %s: %w", rule, netdev, err)
	}
	// Success prints nothing; every failure prints a line.
	if msg := strings.TrimSpace(out); msg != "" {
		return fmt.Errorf("add host forward %s on %s: %s", rule, netdev, msg)
	}
	return nil
}

// RemoveHostForward withdraws a forward added at start or by
// AddHostForward; the rule is named by protocol, host address and port.
func (c *Client) RemoveHostForward(ctx context.Context, netdev string, f vmm.Forward) error {
	if f.GuestPort == 0 {
		f.GuestPort = 1 // not part of the removal key; keeps validation simple
	}
	if err := validForward(netdev, f); err != nil {
		return err
	}
	key := fmt.Sprintf("%s:%s:%d", f.Proto, f.HostIP, f.HostPort)
	out, err := c.HumanMonitorCommand(ctx, "hostfwd_remove "+netdev+" "+key)
	if err != nil {
		return fmt.Errorf("remove host forward %s on %s: %w", key, netdev, err)
	}
	msg := strings.TrimSpace(out)
	switch {
	case strings.HasSuffix(msg, " removed"):
		return nil
	case strings.HasSuffix(msg, " not found"):
		return fmt.Errorf("remove host forward %s on %s: %w", key, netdev, ErrNoSuchForward)
	default:
		return fmt.Errorf("remove host forward %s on %s: %s", key, netdev, msg)
	}
}

// hostfwdRule renders a forward in QEMU's hostfwd syntax. The guest address
// is left to slirp (its first DHCP address, 10.0.2.15).
func hostfwdRule(f vmm.Forward) string {
	return fmt.Sprintf("%s:%s:%d-:%d", f.Proto, f.HostIP, f.HostPort, f.GuestPort)
}

// qemuID matches QEMU's rule for option ids (util/id.c: id_wellformed),
// which also keeps them safe inside HMP command lines and -netdev options.
var qemuID = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]{0,63}$`)

func validForward(netdev string, f vmm.Forward) error {
	if !qemuID.MatchString(netdev) {
		return fmt.Errorf("netdev id %q: want a letter then letters, digits, '-', '.' or '_'", netdev)
	}
	if f.Proto != "tcp" && f.Proto != "udp" {
		return fmt.Errorf("forward protocol %q: want tcp or udp", f.Proto)
	}
	if f.HostIP != "" {
		ip, err := netip.ParseAddr(f.HostIP)
		if err != nil || !ip.Is4() {
			return fmt.Errorf("forward host address %q: want an IPv4 address", f.HostIP)
		}
	}
	if f.HostPort < 1 || f.HostPort > 65535 {
		return fmt.Errorf("forward host port %d: want 1-65535", f.HostPort)
	}
	if f.GuestPort < 1 || f.GuestPort > 65535 {
		return fmt.Errorf("forward guest port %d: want 1-65535", f.GuestPort)
	}
	return nil
}

// Message decoding.

type messageKind int

const (
	kindGreeting messageKind = iota + 1
	kindResponse
	kindEvent
)

func (k messageKind) String() string {
	switch k {
	case kindGreeting:
		return "greeting"
	case kindResponse:
		return "response"
	case kindEvent:
		return "event"
	}
	return "unknown message"
}

// message is one decoded QMP line.
type message struct {
	kind     messageKind
	greeting Greeting
	id       string          // response: the echoed id ("" when absent or not ours)
	ret      json.RawMessage // response: "return"
	err      *Error          // response: "error"
	event    Event
}

func (m message) result(command string, out any) error {
	if m.err != nil {
		return fmt.Errorf("qmp %s: %w", command, m.err)
	}
	if out != nil {
		if err := json.Unmarshal(m.ret, out); err != nil {
			return fmt.Errorf("qmp %s: decode return: %w", command, err)
		}
	}
	return nil
}

var errEOF = errors.New("eof")

// readLine reads one line of at most maxMessage bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > maxMessage {
			return nil, fmt.Errorf("qmp message longer than %d bytes", maxMessage)
		}
		switch {
		case err == nil:
			return buf, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case len(bytes.TrimSpace(buf)) == 0 && isEOF(err):
			return nil, errEOF
		default:
			return nil, err
		}
	}
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}

// decodeMessage classifies one line from QEMU. Exactly one of "QMP",
// "return", "error" and "event" must be present.
func decodeMessage(line []byte) (message, error) {
	var raw struct {
		QMP       json.RawMessage `json:"QMP"`
		Return    json.RawMessage `json:"return"`
		Error     json.RawMessage `json:"error"`
		Event     *string         `json:"event"`
		Data      json.RawMessage `json:"data"`
		ID        json.RawMessage `json:"id"`
		Timestamp *struct {
			Seconds      int64 `json:"seconds"`
			Microseconds int64 `json:"microseconds"`
		} `json:"timestamp"`
	}
	line = bytes.TrimSpace(line)
	if err := json.Unmarshal(line, &raw); err != nil {
		return message{}, fmt.Errorf("decode qmp message: %w", err)
	}
	n := 0
	for _, present := range []bool{raw.QMP != nil, raw.Return != nil, raw.Error != nil, raw.Event != nil} {
		if present {
			n++
		}
	}
	if n != 1 {
		return message{}, fmt.Errorf("decode qmp message: want exactly one of QMP, return, error, event; got %d", n)
	}
	var m message
	switch {
	case raw.QMP != nil:
		m.kind = kindGreeting
		if err := json.Unmarshal(raw.QMP, &m.greeting); err != nil {
			return message{}, fmt.Errorf("decode qmp greeting: %w", err)
		}
	case raw.Event != nil:
		m.kind = kindEvent
		if *raw.Event == "" {
			return message{}, errors.New("decode qmp event: empty name")
		}
		m.event = Event{Name: *raw.Event, Data: raw.Data}
		if ts := raw.Timestamp; ts != nil && ts.Seconds >= 0 && ts.Microseconds >= 0 && ts.Microseconds < 1e6 {
			m.event.Time = time.Unix(ts.Seconds, ts.Microseconds*1000)
		}
	default:
		m.kind = kindResponse
		// Our ids are strings; anything else is not an answer to us.
		if raw.ID != nil {
			var id string
			if json.Unmarshal(raw.ID, &id) == nil {
				m.id = id
			}
		}
		if raw.Error != nil {
			var e Error
			if err := json.Unmarshal(raw.Error, &e); err != nil {
				return message{}, fmt.Errorf("decode qmp error: %w", err)
			}
			if e.Class == "" {
				e.Class = "GenericError"
			}
			m.err = &e
		} else {
			m.ret = raw.Return
		}
	}
	return m, nil
}
