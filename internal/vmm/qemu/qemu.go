// Package qemu drives QEMU microVMs: `qemu-system-x86_64 -M microvm` with
// virtio-mmio devices, controlled over QMP, its serial console in the capped
// console log.
//
// QEMU runs detached from the daemon (vmm.Spawn) so VMs survive a daemon
// restart; Attach finds a running QEMU again from its Handle and reconnects
// to its QMP socket. The QMP SHUTDOWN event, combined with the process's
// exit, tells a guest poweroff from a crash or a kill, whether or not this
// daemon is QEMU's parent.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerhq/banger/internal/vmm"
)

// DefaultStartTimeout bounds Start's wait for QEMU's QMP socket. QEMU
// answers in well under a second; the margin is for loaded CI machines.
const DefaultStartTimeout = 30 * time.Second

// DefaultAttachTimeout bounds Attach's QMP handshake when ctx has no
// deadline. A QEMU whose monitor is held by another client never greets.
const DefaultAttachTimeout = 10 * time.Second

// exitEventGrace is how long the exit watcher waits, once the process is
// gone, for the QMP reader to finish: QEMU sends SHUTDOWN before it exits
// and its socket closes with it, so this is normally immediate.
const exitEventGrace = 500 * time.Millisecond

// Driver starts and re-attaches QEMU VMs. The zero value is ready to use.
type Driver struct {
	// StartTimeout bounds the wait for QMP after spawning (default
	// DefaultStartTimeout).
	StartTimeout time.Duration
	// Host returns host facts for the command line (default DetectHost).
	Host func() HostInfo
}

var _ vmm.Driver = (*Driver)(nil)

// New returns a Driver with defaults.
func New() *Driver { return &Driver{} }

// Kind is vmm.QEMU.
func (d *Driver) Kind() vmm.Kind { return vmm.QEMU }

// Start spawns QEMU, waits for QMP and checks the guest is running. On any
// failure the process is killed and its socket removed.
func (d *Driver) Start(ctx context.Context, cfg vmm.Config, log *slog.Logger) (_ vmm.Machine, err error) {
	host := DetectHost
	if d.Host != nil {
		host = d.Host
	}
	var hi HostInfo
	if cfg.Accel == vmm.TCG {
		hi = host()
	}
	argv, err := BuildArgv(cfg, hi)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("vm", cfg.ID, "vmm", vmm.QEMU)
	if st, err := os.Stat(cfg.RunDir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("start qemu: run dir %s is not a directory", cfg.RunDir)
	}
	for _, p := range append([]string{cfg.Kernel, cfg.Initrd}, diskPaths(cfg)...) {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
	}
	if cfg.Vsock != nil && cfg.Accel != vmm.KVM {
		log.Warn("vsock needs KVM; the guest gets no vsock device under TCG")
	}
	sock := QMPSocket(cfg.RunDir)
	if c, err := net.Dial("unix", sock); err == nil {
		_ = c.Close()
		return nil, fmt.Errorf("start qemu: %s is served by a running QEMU (hint: attach to it or stop it first)", sock)
	}
	// A socket left by a QEMU that was killed would make QEMU fail to bind.
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("start qemu: remove stale %s: %w", sock, err)
	}

	timeout := d.StartTimeout
	if timeout <= 0 {
		timeout = DefaultStartTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	log.Debug("spawning qemu", "argv", argv)
	proc, err := vmm.Spawn(vmm.SpawnOptions{
		Argv:          argv,
		Dir:           cfg.RunDir,
		ConsoleLog:    cfg.ConsoleLog,
		ConsoleLogMax: cfg.ConsoleLogMax,
	})
	if err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	w := watch(proc)
	defer func() {
		if err == nil {
			return
		}
		// Undo: nothing may keep running, nor the socket stay behind.
		if kerr := proc.Signal(syscall.SIGKILL); kerr != nil && !errors.Is(kerr, vmm.ErrGone) {
			log.Error("kill qemu after failed start", "pid", proc.PID, "err", kerr)
		}
		select {
		case <-w.exited:
		case <-time.After(5 * time.Second):
			log.Error("qemu did not exit after SIGKILL", "pid", proc.PID)
		}
		_ = os.Remove(sock)
	}()

	c, err := dialQMP(ctx, sock, w.exited)
	if err != nil {
		return nil, d.startError(cfg, w, err)
	}
	// Events arriving meanwhile wait in the client's queue for the Machine.
	st, err := c.QueryStatus(ctx)
	if err != nil {
		_ = c.Close()
		return nil, d.startError(cfg, w, err)
	}
	if st.Status != "running" {
		_ = c.Close()
		return nil, fmt.Errorf("start qemu: guest is %q after start, want running", st.Status)
	}
	log.Info("qemu started", "pid", proc.PID, "qemu", c.Greeting().VersionString(), "accel", cfg.Accel)
	return newMachine(proc, w, c, sock, cfg.ConsoleLog, filepath.Base(argv[0]), log), nil
}

// startError explains a failed start, with QEMU's own complaint from the
// console log when it exited.
func (d *Driver) startError(cfg vmm.Config, w *waiter, err error) error {
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		// QMP failed (a reset connection, a hang-up): QEMU is most likely
		// on its way out; let its exit be seen so its complaint is told.
		select {
		case <-w.exited:
		case <-time.After(2 * time.Second):
		}
	}
	select {
	case <-w.exited:
	default:
		return fmt.Errorf("start qemu: %w", err)
	}
	msg := ""
	if cfg.ConsoleLog != "" {
		msg = qemuComplaint(cfg.ConsoleLog, filepath.Base(argv0(cfg)))
	}
	if msg != "" {
		return fmt.Errorf("start qemu: %s before QMP was ready: %s", describeCode(w.code), msg)
	}
	return fmt.Errorf("start qemu: %s before QMP was ready", describeCode(w.code))
}

func describeCode(code int) string {
	switch {
	case code < 0:
		return "exited"
	case code > 128:
		return fmt.Sprintf("died of signal %d (%s)", code-128, syscall.Signal(code-128))
	default:
		return fmt.Sprintf("exited with status %d", code)
	}
}

func argv0(cfg vmm.Config) string {
	if cfg.Executable != "" {
		return cfg.Executable
	}
	return DefaultExecutable
}

func diskPaths(cfg vmm.Config) []string {
	var ps []string
	for _, d := range cfg.Disks {
		ps = append(ps, d.Path)
	}
	return ps
}

// dialQMP connects once QEMU has created its socket. There is no signal for
// that, so it retries every 10 ms, bounded by ctx and by QEMU's exit.
func dialQMP(ctx context.Context, sock string, exited <-chan struct{}) (*Client, error) {
	for {
		c, err := Dial(ctx, sock)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, err
		}
		select {
		case <-exited:
			return nil, errors.New("qemu exited")
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for qmp socket %s: %w", sock, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Attach reconnects to a QEMU an earlier daemon started.
func (d *Driver) Attach(ctx context.Context, h vmm.Handle, log *slog.Logger) (vmm.Machine, error) {
	if h.Kind != vmm.QEMU {
		return nil, fmt.Errorf("attach qemu: handle is for %q", h.Kind)
	}
	if !filepath.IsAbs(h.ControlSocket) {
		return nil, fmt.Errorf("attach qemu: control socket %q is not an absolute path", h.ControlSocket)
	}
	proc, err := vmm.Find(h.PID, h.StartTime)
	if err != nil {
		return nil, err
	}
	// The pid and start time match; make sure it is the QEMU that owns this
	// socket before sending it commands.
	exe, ok := ownsSocket(h.PID, h.ControlSocket)
	if !ok {
		return nil, fmt.Errorf("attach qemu: pid %d does not serve %s", h.PID, h.ControlSocket)
	}
	if _, has := ctx.Deadline(); !has {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultAttachTimeout)
		defer cancel()
	}
	// QEMU listens for its whole life, so one try is enough: a refusal or
	// a missing socket means it is going away (or the socket was removed).
	c, err := Dial(ctx, h.ControlSocket)
	if err != nil {
		if !proc.Alive() {
			return nil, vmm.ErrGone
		}
		return nil, fmt.Errorf("attach qemu pid %d: %w", h.PID, err)
	}
	if _, err := c.QueryStatus(ctx); err != nil {
		_ = c.Close()
		if !proc.Alive() {
			return nil, vmm.ErrGone
		}
		return nil, fmt.Errorf("attach qemu pid %d: %w", h.PID, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("vmm", vmm.QEMU, "pid", h.PID)
	log.Info("re-attached to qemu", "qemu", c.Greeting().VersionString())
	// A process that ended since Find makes Wait return at once.
	return newMachine(proc, watch(proc), c, h.ControlSocket, "", exe, log), nil
}

// ownsSocket reports whether pid's command line names sock as its QMP
// socket, and returns its program name.
func ownsSocket(pid int, sock string) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return "", false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	want := "path=" + optEscape(sock) + ","
	for _, a := range args {
		if strings.HasPrefix(a, "socket,id=qmp,") && strings.Contains(a, want) {
			return filepath.Base(args[0]), true
		}
	}
	return "", false
}

// waiter reaps or watches the process once, for every party interested.
type waiter struct {
	exited chan struct{} // closed when the process has ended
	code   int           // valid once exited is closed
}

func watch(p *vmm.Process) *waiter {
	w := &waiter{exited: make(chan struct{})}
	go func() {
		w.code = p.Wait()
		close(w.exited)
	}()
	return w
}

// qemuComplaint returns what QEMU itself wrote to the console log about
// why it stopped ("qemu-system-x86_64: -drive …: Could not open …"). The
// console logger is a separate process, so it gives it a moment to catch up.
func qemuComplaint(consoleLog, exe string) string {
	deadline := time.Now().Add(time.Second)
	for {
		if msg := complaint(consoleLog, exe+":"); msg != "" || time.Now().After(deadline) {
			return msg
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// complaint picks, among the console's last lines that start with prefix,
// the last "error:" line (an abort prints the cause, then an assertion), else
// the last line that is not a warning, else the last line.
func complaint(path, prefix string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const tail = 8 << 10
	if st, err := f.Stat(); err == nil && st.Size() > tail {
		if _, err := f.Seek(st.Size()-tail, io.SeekStart); err != nil {
			return "" // reading from the start would pick a stale line
		}
	}
	b, _ := io.ReadAll(io.LimitReader(f, tail))
	var errLine, plain, last string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		last = l
		switch {
		case strings.Contains(l, ": error: "):
			errLine = l
		case !strings.Contains(l, ": warning: "):
			plain = l
		}
	}
	for _, l := range []string{errLine, plain, last} {
		if l != "" {
			return l
		}
	}
	return ""
}

// Machine is one running QEMU.
type Machine struct {
	log        *slog.Logger
	proc       *vmm.Process
	w          *waiter
	qmp        *Client
	sock       string
	consoleLog string // "" after Attach: the log may be a different file by now
	exe        string

	eventsDone chan struct{} // closed when the event loop has drained QMP
	done       chan struct{} // closed when exit is final

	mu        sync.Mutex // guards the fields below
	shutdown  *ShutdownData
	powerdown bool // Shutdown pressed the power button
	killed    bool // Kill sent SIGKILL
	exit      vmm.Exit
}

var _ vmm.Machine = (*Machine)(nil)

func newMachine(proc *vmm.Process, w *waiter, c *Client, sock, consoleLog, exe string, log *slog.Logger) *Machine {
	m := &Machine{
		log: log, proc: proc, w: w, qmp: c, sock: sock, consoleLog: consoleLog, exe: exe,
		eventsDone: make(chan struct{}),
		done:       make(chan struct{}),
	}
	go m.events()
	go m.supervise()
	return m
}

func (m *Machine) events() {
	defer close(m.eventsDone)
	for ev := range m.qmp.Events() {
		switch ev.Name {
		case "SHUTDOWN":
			sd, ok := ev.Shutdown()
			if !ok {
				m.log.Warn("undecodable SHUTDOWN event", "data", string(ev.Data))
				continue
			}
			m.log.Info("qemu shutting down", "guest", sd.Guest, "reason", sd.Reason)
			m.mu.Lock()
			m.shutdown = &sd
			m.mu.Unlock()
		case "STOP", "RESUME", "POWERDOWN", "RESET":
			m.log.Debug("qemu event", "event", ev.Name)
		}
	}
}

// supervise waits for the process to end, then settles Exit from the exit
// status and the SHUTDOWN event. pidfd/wait push the exit, so Done closes
// within exitEventGrace of the process ending.
func (m *Machine) supervise() {
	<-m.w.exited
	select {
	case <-m.eventsDone:
	case <-time.After(exitEventGrace):
		m.log.Warn("qmp still open after qemu exited")
	}
	_ = m.qmp.Close()
	// QEMU unlinks its socket on a clean exit, not when killed.
	_ = os.Remove(m.sock)
	m.mu.Lock()
	m.exit = m.exitLocked(m.w.code)
	exit := m.exit
	m.mu.Unlock()
	m.log.Info("qemu exited", "poweroff", exit.GuestPoweroff, "code", exit.Code, "reason", exit.Reason)
	close(m.done)
}

// Reasons in Exit.Reason that callers may want to tell apart.
const (
	ReasonPoweroff       = "guest powered off"
	ReasonPoweroffButton = "guest powered off after the ACPI power button"
	ReasonReboot         = "guest rebooted (-no-reboot ends the VM)"
	ReasonPanic          = "guest kernel panicked"
	ReasonKilled         = "killed (SIGKILL)"
)

func (m *Machine) exitLocked(code int) vmm.Exit {
	e := vmm.Exit{Code: code}
	if sd := m.shutdown; sd != nil {
		switch sd.Reason {
		case "guest-shutdown":
			e.GuestPoweroff = true
			e.Reason = ReasonPoweroff
			if m.powerdown {
				e.Reason = ReasonPoweroffButton
			}
		case "guest-reset":
			e.Reason = ReasonReboot
		case "guest-panic":
			e.Reason = ReasonPanic
		case "host-signal":
			e.Reason = "qemu ended by a signal"
		case "host-qmp-quit":
			e.Reason = "qemu quit on request"
		default:
			e.Reason = "qemu shut down: " + sd.Reason
		}
		return e
	}
	if m.killed {
		e.Reason = ReasonKilled
		return e
	}
	switch {
	case code < 0:
		e.Reason = "qemu ended without a shutdown event (killed or crashed)"
	case code > 128:
		e.Reason = fmt.Sprintf("qemu killed by signal %d (%s)", code-128, syscall.Signal(code-128))
	default:
		e.Reason = fmt.Sprintf("qemu exited with status %d without a shutdown event", code)
		if m.consoleLog != "" {
			if msg := complaint(m.consoleLog, m.exe+":"); msg != "" {
				e.Reason += ": " + msg
			}
		}
	}
	return e
}

// Handle identifies this QEMU for Attach.
func (m *Machine) Handle() vmm.Handle {
	return vmm.Handle{Kind: vmm.QEMU, PID: m.proc.PID, StartTime: m.proc.StartTime, ControlSocket: m.sock}
}

// Shutdown presses the ACPI power button; the guest decides what to do.
func (m *Machine) Shutdown(ctx context.Context) error {
	if m.exited() {
		return vmm.ErrGone
	}
	m.mu.Lock()
	m.powerdown = true
	m.mu.Unlock()
	if err := m.qmp.SystemPowerdown(ctx); err != nil {
		return m.gone(fmt.Errorf("shutdown: %w", err))
	}
	return nil
}

// Kill sends SIGKILL. Killing a QEMU that already ended is not an error.
func (m *Machine) Kill() error {
	if m.exited() {
		return nil
	}
	m.mu.Lock()
	m.killed = true
	m.mu.Unlock()
	if err := m.proc.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, vmm.ErrGone) {
		return fmt.Errorf("kill qemu: %w", err)
	}
	return nil
}

// Pause stops the guest's vCPUs.
func (m *Machine) Pause(ctx context.Context) error {
	return m.gone(m.wrap("pause", m.qmp.Stop(ctx)))
}

// Resume restarts the guest's vCPUs.
func (m *Machine) Resume(ctx context.Context) error {
	return m.gone(m.wrap("resume", m.qmp.Cont(ctx)))
}

// State asks QEMU whether the guest runs.
func (m *Machine) State(ctx context.Context) (vmm.RunState, error) {
	st, err := m.qmp.QueryStatus(ctx)
	if err != nil {
		return "", m.gone(fmt.Errorf("query status: %w", err))
	}
	switch st.Status {
	case "running":
		return vmm.Running, nil
	case "paused":
		return vmm.Paused, nil
	default:
		return vmm.Other, nil
	}
}

// AddHostForward publishes a guest port through the user-mode NIC nicID.
func (m *Machine) AddHostForward(ctx context.Context, nicID string, f vmm.Forward) error {
	return m.gone(m.qmp.AddHostForward(ctx, nicID, f))
}

// RemoveHostForward withdraws a forward from the user-mode NIC nicID.
func (m *Machine) RemoveHostForward(ctx context.Context, nicID string, f vmm.Forward) error {
	return m.gone(m.qmp.RemoveHostForward(ctx, nicID, f))
}

// QMP returns the control connection, for commands Machine does not wrap.
func (m *Machine) QMP() *Client { return m.qmp }

// Done is closed when QEMU has exited and Exit is final.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Exit says why QEMU ended; valid once Done is closed.
func (m *Machine) Exit() vmm.Exit {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.exit
}

// Close drops the QMP connection; QEMU keeps running. Done still closes
// when the process ends, but without QMP its cause is not known.
func (m *Machine) Close() error { return m.qmp.Close() }

func (m *Machine) exited() bool {
	select {
	case <-m.w.exited:
		return true
	default:
		return false
	}
}

func (m *Machine) wrap(verb string, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", verb, err)
	}
	return nil
}

// gone turns a failure into vmm.ErrGone when the process has ended, so the
// caller can tell "the VM is not there" from "the command failed".
func (m *Machine) gone(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ErrClosed) && !m.proc.Alive() {
		return fmt.Errorf("%w: %w", vmm.ErrGone, err)
	}
	return err
}
