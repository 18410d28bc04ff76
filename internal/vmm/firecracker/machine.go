package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/bangerhq/banger/internal/vmm"
)

// controlTimeout bounds the short control requests (state, pause, resume,
// Ctrl-Alt-Del) when the caller's context has no deadline of its own.
const controlTimeout = 10 * time.Second

// Machine is one running Firecracker. It implements vmm.Machine and adds
// snapshots.
type Machine struct {
	client     *Client
	proc       *vmm.Process
	handle     vmm.Handle
	log        *slog.Logger
	logPath    string   // Firecracker's own log, read back for the exit code after a re-attach
	consoleLog string   // serial console, quoted when Firecracker dies during start
	sockets    []string // removed once the process is gone, before done closes
	// kill, when set, is how Kill ends a process this one may not signal:
	// a jailed Firecracker runs as a uid of its own, and banger-helper
	// kills it. Set before the Machine is handed out, never changed.
	kill func() error

	shutdownAsked atomic.Bool // Shutdown delivered Ctrl-Alt-Del
	killed        atomic.Bool // Kill sent SIGKILL

	done chan struct{}
	mu   sync.Mutex
	exit vmm.Exit // guarded by mu; final once done is closed
}

var _ vmm.Machine = (*Machine)(nil)

// newMachine starts the goroutine that waits for the process. The pidfd or
// wait(2) behind proc.Wait is pushed by the kernel; nothing polls.
func newMachine(proc *vmm.Process, c *Client, h vmm.Handle, log *slog.Logger, logPath, consoleLog, vsockPath string) *Machine {
	m := &Machine{
		client: c, proc: proc, handle: h, log: log,
		logPath: logPath, consoleLog: consoleLog,
		sockets: []string{h.ControlSocket},
		done:    make(chan struct{}),
	}
	if vsockPath != "" {
		m.sockets = append(m.sockets, vsockPath)
	}
	go m.wait()
	return m
}

func (m *Machine) wait() {
	code := m.proc.Wait()
	exit := classifyExit(code, m.killed.Load(), m.shutdownAsked.Load(), lastExitCode(m.logPath))
	// Firecracker leaves its sockets behind. Removing them here, before done
	// closes, means a caller that waited for Done can start the VM again on
	// the same paths without racing this cleanup.
	for _, s := range m.sockets {
		if fi, err := os.Lstat(s); err == nil && fi.Mode().Type() == fs.ModeSocket {
			_ = os.Remove(s)
		}
	}
	m.client.Close()
	m.mu.Lock()
	m.exit = exit
	m.mu.Unlock()
	m.log.Info("firecracker exited", "code", exit.Code, "guest_poweroff", exit.GuestPoweroff, "reason", exit.Reason)
	close(m.done)
}

// Handle returns what the daemon records to re-attach later.
func (m *Machine) Handle() vmm.Handle { return m.handle }

// Client returns the API client, for requests the Machine does not wrap.
func (m *Machine) Client() *Client { return m.client }

// Shutdown sends Ctrl-Alt-Del. A guest with an i8042 driver reboots, which
// Firecracker turns into its own exit; the daemon kills the VMM if Done does
// not close in time.
func (m *Machine) Shutdown(ctx context.Context) error {
	if m.exited() {
		return vmm.ErrGone
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	m.shutdownAsked.Store(true)
	if err := m.client.Action(ctx, ActionSendCtrlAltDel); err != nil {
		if m.exited() {
			return vmm.ErrGone
		}
		return fmt.Errorf("send ctrl-alt-del: %w", err)
	}
	return nil
}

// Kill sends SIGKILL: Firecracker has no handler for it (nor for SIGTERM),
// so it ends at once. A jailed Firecracker is killed through the function
// given to BootJailed or AttachJailed instead. Killing a process that is
// already gone is not an error.
func (m *Machine) Kill() error {
	m.killed.Store(true)
	if m.kill != nil {
		if err := m.kill(); err != nil {
			return fmt.Errorf("kill jailed firecracker pid %d: %w", m.handle.PID, err)
		}
		return nil
	}
	err := m.proc.Signal(syscall.SIGKILL)
	switch {
	case err == nil, errors.Is(err, vmm.ErrGone):
		return nil
	case errors.Is(err, syscall.EPERM):
		return fmt.Errorf("kill firecracker pid %d: %w (hint: a jailed firecracker runs as a uid of its own; banger-helper's KillJailed ends it)", m.handle.PID, err)
	default:
		return fmt.Errorf("kill firecracker pid %d: %w", m.handle.PID, err)
	}
}

// Pause stops the vCPUs (PATCH /vm Paused).
func (m *Machine) Pause(ctx context.Context) error {
	return m.control(ctx, "pause vm", m.client.Pause)
}

// Resume restarts the vCPUs (PATCH /vm Resumed).
func (m *Machine) Resume(ctx context.Context) error {
	return m.control(ctx, "resume vm", m.client.Resume)
}

// State maps GET /'s state: Running, Paused, and Other for "Not started".
func (m *Machine) State(ctx context.Context) (vmm.RunState, error) {
	var info InstanceInfo
	err := m.control(ctx, "get vm state", func(ctx context.Context) error {
		var err error
		info, err = m.client.InstanceInfo(ctx)
		return err
	})
	if err != nil {
		return "", err
	}
	return runState(info.State), nil
}

func runState(s string) vmm.RunState {
	switch s {
	case StateRunning:
		return vmm.Running
	case StatePaused:
		return vmm.Paused
	default:
		return vmm.Other
	}
}

// CreateSnapshot writes a full snapshot of a paused VM: the VM state to
// snapshotPath and the guest memory to memPath (both overwritten). Disks
// are not included; copy them while the VM stays paused.
func (m *Machine) CreateSnapshot(ctx context.Context, snapshotPath, memPath string) error {
	if m.exited() {
		return vmm.ErrGone
	}
	err := m.client.CreateSnapshot(ctx, SnapshotCreate{SnapshotPath: snapshotPath, MemFilePath: memPath, SnapshotType: "Full"})
	if err != nil {
		return fmt.Errorf("create snapshot %q: %w", snapshotPath, err)
	}
	return nil
}

// Done is closed once the process has exited and its sockets are removed.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Exit says why the process ended; it is final once Done is closed.
func (m *Machine) Exit() vmm.Exit {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.exit
}

// Close drops idle API connections; the VM keeps running.
func (m *Machine) Close() error {
	m.client.Close()
	return nil
}

func (m *Machine) exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// control runs a short API request and turns "the process is gone" into
// vmm.ErrGone.
func (m *Machine) control(ctx context.Context, what string, f func(context.Context) error) error {
	if m.exited() {
		return vmm.ErrGone
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	if err := f(ctx); err != nil {
		if m.exited() || !m.proc.Alive() {
			return vmm.ErrGone
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, controlTimeout)
}

// waitReady waits until the new process answers GET /version, then learns
// its capabilities. It backs off from 2 ms to 50 ms between attempts, and
// gives up when the process exits, the context ends or timeout passes.
func (m *Machine) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 2 * time.Millisecond
	for {
		_, err := m.client.Negotiate(ctx)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			// It answered, but not as a supported Firecracker does.
			return fmt.Errorf("firecracker on %s: %w", m.handle.ControlSocket, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-m.done:
			t.Stop()
			return fmt.Errorf("firecracker exited before its API socket answered (%s)%s", m.Exit().Reason, consoleTail(m.consoleLog))
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for firecracker api socket %s: %w", m.handle.ControlSocket, context.Cause(ctx))
		case <-t.C:
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// abort is the undo of a failed start: kill, wait (bounded) for the wait
// goroutine, which removes the sockets.
func (m *Machine) abort() {
	_ = m.Kill()
	select {
	case <-m.done:
	case <-time.After(5 * time.Second):
		m.log.Error("firecracker did not exit after SIGKILL", "pid", m.handle.PID)
	}
}

// consoleTail quotes the end of a console log: before the logger is
// configured Firecracker writes its own errors to stdout, which is where
// the console goes. The console logger is a separate process, so its copy
// may trail the exit by a moment.
func consoleTail(path string) string {
	if path == "" {
		return ""
	}
	var b []byte
	for deadline := time.Now().Add(500 * time.Millisecond); ; time.Sleep(20 * time.Millisecond) {
		b = tail(path, 1024)
		if len(b) > 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(b) == 0 {
		return ""
	}
	return ": console: " + string(bytes.TrimSpace(b))
}

func tail(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(-n, io.SeekEnd)
	}
	b, _ := io.ReadAll(io.LimitReader(f, n))
	return b
}

// exitLine matches Firecracker's last log line (main.rs): "Firecracker
// exiting successfully. exit_code=0" or "Firecracker exiting with error.
// exit_code=N".
var exitLine = regexp.MustCompile(`Firecracker exiting (?:successfully|with error)\. exit_code=(\d+)`)

// lastExitCode reads the exit code Firecracker logged, or -1. It is how a
// daemon that is not the parent (after a restart) still learns it.
func lastExitCode(logPath string) int {
	if logPath == "" {
		return -1
	}
	ms := exitLine.FindAllSubmatch(tail(logPath, 4096), -1)
	if len(ms) == 0 {
		return -1
	}
	n, err := strconv.Atoi(string(ms[len(ms)-1][1]))
	if err != nil {
		return -1
	}
	return n
}

// fcExitReasons are Firecracker's own exit codes (FcExitCode, src/vmm/src/lib.rs).
var fcExitReasons = map[int]string{
	1:   "firecracker failed (generic error; see its log)",
	2:   "firecracker failed (unexpected error)",
	148: "firecracker was stopped by seccomp (bad syscall)",
	149: "firecracker crashed (SIGBUS)",
	150: "firecracker crashed (SIGSEGV)",
	151: "firecracker exceeded its file size limit (SIGXFSZ)",
	152: "firecracker rejected its configuration",
	153: "firecracker rejected its arguments",
	154: "firecracker exceeded its CPU time limit (SIGXCPU)",
	155: "firecracker got SIGPIPE",
	156: "firecracker got SIGHUP",
	157: "firecracker got SIGILL",
}

// classifyExit turns what is known about the end of the process into a
// vmm.Exit. code is the wait status (128+signal when signalled), or -1 when
// this daemon is not the parent; logged is the code from Firecracker's log,
// or -1.
func classifyExit(code int, killed, shutdownAsked bool, logged int) vmm.Exit {
	if code == -1 && logged >= 0 {
		code = logged
	}
	switch {
	case code == 0:
		// Firecracker exits 0 when the guest resets the CPU: a reboot or
		// poweroff with reboot=k, the end of a Ctrl-Alt-Del, and also a
		// kernel panic with panic=N.
		return vmm.Exit{GuestPoweroff: true, Code: 0, Reason: "guest reset the machine (poweroff or reboot)"}
	case killed:
		return vmm.Exit{Code: code, Reason: "killed"}
	case code == 128+int(syscall.SIGKILL):
		return vmm.Exit{Code: code, Reason: "killed by SIGKILL"}
	case code == 128+int(syscall.SIGTERM):
		return vmm.Exit{Code: code, Reason: "terminated by SIGTERM"}
	case code == -1 && shutdownAsked:
		// The exit status is unknown (not our child, no log line), but a
		// Ctrl-Alt-Del was delivered: the guest most likely shut down.
		return vmm.Exit{GuestPoweroff: true, Code: -1, Reason: "exited after ctrl-alt-del (status unknown)"}
	case code == -1:
		return vmm.Exit{Code: -1, Reason: "exited (status unknown: not started by this daemon)"}
	}
	if r, ok := fcExitReasons[code]; ok {
		return vmm.Exit{Code: code, Reason: r}
	}
	if code > 128 && code < 128+65 {
		return vmm.Exit{Code: code, Reason: "killed by " + syscall.Signal(code-128).String()}
	}
	return vmm.Exit{Code: code, Reason: fmt.Sprintf("exited with status %d", code)}
}
