// Package firecracker drives Firecracker microVMs through their HTTP API on
// a unix socket: a small hand-written client (client.go, api.go), a table of
// what each supported version accepts (versions.go), the vmm.Driver that
// spawns and boots a VM (driver.go, boot.go) and the vmm.Machine that
// controls it (machine.go). A jailed Firecracker is started by the root
// helper (package jail plans it) and only configured and booted here
// (jailed.go). The contract is the published swagger of v1.14.2, v1.16.1
// and 1.17.0-dev, which fcfake serves in the tests.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// Files the driver keeps in Config.RunDir.
const (
	SocketName = "fc.sock"         // the API socket
	LogName    = "firecracker.log" // Firecracker's own log (the serial console goes to Config.ConsoleLog)
)

// DefaultReadyTimeout bounds the wait for a freshly spawned Firecracker to
// answer on its socket. It takes a few milliseconds; the margin is for
// loaded CI machines.
const DefaultReadyTimeout = 10 * time.Second

// Driver starts and re-attaches Firecracker VMMs. The zero value is ready to
// use.
type Driver struct {
	// Executable is the firecracker binary used when Config.Executable is
	// empty; "" means "firecracker" from PATH.
	Executable string
	// MTU, when non-zero, is advertised to guests on every NIC. Only
	// Firecracker 1.16+ knows the field; with older versions it is left out
	// and the guest keeps its default (1500).
	MTU int
	// ReadyTimeout bounds the wait for the API socket; 0 means
	// DefaultReadyTimeout.
	ReadyTimeout time.Duration
}

var _ vmm.Driver = (*Driver)(nil)

// Kind returns vmm.Firecracker.
func (*Driver) Kind() vmm.Kind { return vmm.Firecracker }

// Start spawns Firecracker, configures the VM from cfg and boots it. Every
// input is checked before anything is created; once the process runs, any
// failure kills it and removes its sockets before Start returns.
func (d *Driver) Start(ctx context.Context, cfg vmm.Config, log *slog.Logger) (vmm.Machine, error) {
	plan, err := newPlan(cfg, d.MTU)
	if err != nil {
		return nil, err
	}
	m, err := d.launch(ctx, cfg, plan.vsockPath(), log, plan.apply)
	if err != nil {
		// A nil *Machine in the interface would not compare equal to nil.
		return nil, err
	}
	return m, nil
}

// Restore is a snapshot to load into a fresh Firecracker process.
type Restore struct {
	SnapshotPath string // the VM state file written by Machine.CreateSnapshot
	MemFilePath  string // the guest memory file
	// Resume starts the vCPUs right after the load; otherwise the VM stays
	// paused until Machine.Resume.
	Resume          bool
	TrackDirtyPages bool
	// NetworkOverrides moves restored interfaces to other taps.
	NetworkOverrides []NetworkOverride
	// VsockPath, when set, moves the vsock device to another unix socket
	// (Firecracker 1.16+). Without it the device binds the path it had when
	// the snapshot was taken, which must not exist.
	VsockPath string
}

// Restore spawns Firecracker in cfg.RunDir and loads a snapshot into it.
// Only cfg.ID, RunDir, ConsoleLog, ConsoleLogMax and Executable are used:
// the machine shape comes from the snapshot.
func (d *Driver) Restore(ctx context.Context, cfg vmm.Config, r Restore, log *slog.Logger) (*Machine, error) {
	if err := checkRunDir(cfg.RunDir); err != nil {
		return nil, err
	}
	if err := checkSocketPath(filepath.Join(cfg.RunDir, SocketName), "api socket"); err != nil {
		return nil, err
	}
	for _, p := range []string{r.SnapshotPath, r.MemFilePath} {
		if err := checkReadable(p, "snapshot file"); err != nil {
			return nil, err
		}
	}
	if r.VsockPath != "" {
		if err := checkSocketPath(r.VsockPath, "vsock socket"); err != nil {
			return nil, err
		}
	}
	load := SnapshotLoad{
		SnapshotPath:     r.SnapshotPath,
		MemBackend:       &MemoryBackend{BackendType: "File", BackendPath: r.MemFilePath},
		TrackDirtyPages:  r.TrackDirtyPages,
		ResumeVM:         r.Resume,
		NetworkOverrides: r.NetworkOverrides,
	}
	if r.VsockPath != "" {
		load.VsockOverride = &VsockOverride{UDSPath: r.VsockPath}
	}
	return d.launch(ctx, cfg, r.VsockPath, log, func(ctx context.Context, m *Machine) error {
		if err := m.client.LoadSnapshot(ctx, load); err != nil {
			return fmt.Errorf("load snapshot %q: %w", r.SnapshotPath, err)
		}
		return nil
	})
}

// launch is what Start and Restore share: clear stale sockets, create the
// log file, spawn, then bring the process up (setUp). Any failure after
// the spawn kills the process and removes the sockets (Machine.abort).
func (d *Driver) launch(ctx context.Context, cfg vmm.Config, vsockPath string, log *slog.Logger,
	configure func(context.Context, *Machine) error) (*Machine, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("vm", cfg.ID, "vmm", vmm.Firecracker)
	exe, err := d.executable(cfg)
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(cfg.RunDir, SocketName)
	if err := removeStaleSocket(sock); err != nil {
		return nil, err
	}
	if vsockPath != "" {
		if err := removeStaleSocket(vsockPath); err != nil {
			return nil, err
		}
	}
	logPath := filepath.Join(cfg.RunDir, LogName)
	if err := freshLog(logPath); err != nil {
		return nil, err
	}

	argv := []string{exe, "--api-sock", sock}
	if validInstanceID(cfg.ID) {
		argv = append(argv, "--id", cfg.ID) // names the VM in Firecracker's log lines and GET /
	}
	proc, err := vmm.Spawn(vmm.SpawnOptions{
		Argv:          argv,
		Dir:           cfg.RunDir,
		ConsoleLog:    cfg.ConsoleLog,
		ConsoleLogMax: cfg.ConsoleLogMax,
	})
	if errors.Is(err, vmm.ErrGone) {
		// It exited before its start time could be read: Firecracker does
		// that when it rejects its arguments or cannot bind the socket.
		return nil, fmt.Errorf("spawn firecracker: it exited at once%s", consoleTail(cfg.ConsoleLog))
	}
	if err != nil {
		return nil, fmt.Errorf("spawn firecracker: %w", err)
	}
	client := NewClient(sock, log)
	h := vmm.Handle{Kind: vmm.Firecracker, PID: proc.PID, StartTime: proc.StartTime, ControlSocket: sock}
	m := newMachine(proc, client, h, log, logPath, cfg.ConsoleLog, vsockPath)
	if err := d.setUp(ctx, m, logPath, configure); err != nil {
		m.abort()
		return nil, err
	}
	return m, nil
}

// setUp brings up a Firecracker process that is running but not yet
// configured, whoever started it: wait for its socket, negotiate the
// version, point its logger at logPath (a path as Firecracker sees it),
// then run configure. The caller undoes a failure.
func (d *Driver) setUp(ctx context.Context, m *Machine, logPath string, configure func(context.Context, *Machine) error) error {
	timeout := d.ReadyTimeout
	if timeout <= 0 {
		timeout = DefaultReadyTimeout
	}
	if err := m.waitReady(ctx, timeout); err != nil {
		return err
	}
	caps := m.client.Capabilities()
	if caps.Version.Compare(capabilityTable[len(capabilityTable)-1].From) > 0 {
		m.log.Warn("firecracker is newer than the newest API spec banger knows; using that spec's capabilities",
			"version", caps.Version.String(), "table", caps.Table)
	}
	if err := m.client.PutLogger(ctx, Logger{LogPath: logPath, Level: "Info", ShowLevel: true}); err != nil {
		return fmt.Errorf("configure firecracker logger: %w", err)
	}
	if err := configure(ctx, m); err != nil {
		return err
	}
	m.log.Info("firecracker started", "pid", m.handle.PID, "version", caps.Version.String())
	return nil
}

func (d *Driver) executable(cfg vmm.Config) (string, error) {
	exe := cfg.Executable
	if exe == "" {
		exe = d.Executable
	}
	if exe == "" {
		exe = "firecracker"
	}
	p, err := exec.LookPath(exe)
	if err != nil {
		return "", fmt.Errorf("find firecracker binary %q: %w (hint: install firecracker, or use --vmm qemu)", exe, err)
	}
	return p, nil
}

// Attach re-attaches to a Firecracker an earlier daemon started: the pid
// must still carry the recorded start time and the socket must answer
// GET /.
func (d *Driver) Attach(ctx context.Context, h vmm.Handle, log *slog.Logger) (vmm.Machine, error) {
	return d.attach(ctx, h, nil, log)
}

// attach is Attach; kill, when set, is how the Machine kills the process
// (AttachJailed).
func (d *Driver) attach(ctx context.Context, h vmm.Handle, kill func() error, log *slog.Logger) (*Machine, error) {
	if h.Kind != vmm.Firecracker {
		return nil, fmt.Errorf("attach firecracker: handle is for %q", h.Kind)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("vmm", vmm.Firecracker, "pid", h.PID)
	proc, err := vmm.Find(h.PID, h.StartTime)
	if err != nil {
		return nil, err
	}
	client := NewClient(h.ControlSocket, log)
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := client.InstanceInfo(actx); err != nil {
		client.Close()
		return nil, fmt.Errorf("attach firecracker pid %d: socket %s does not answer: %w", h.PID, h.ControlSocket, err)
	}
	if _, err := client.Negotiate(actx); err != nil {
		client.Close()
		return nil, fmt.Errorf("attach firecracker pid %d: %w", h.PID, err)
	}
	// The log sits next to the socket: both live in the VM's RunDir, or
	// for a jailed VM in the jail's instance dir (jail.HostLogName). The
	// vsock socket is not recorded in the handle, so it is left to the
	// daemon's cleanup of RunDir.
	logPath := filepath.Join(filepath.Dir(h.ControlSocket), LogName)
	m := newMachine(proc, client, h, log, logPath, "", "")
	m.kill = kill
	return m, nil
}

// removeStaleSocket removes a socket left by a process that is gone, so
// that Firecracker can bind the path again. It refuses to remove anything
// that is not a socket, and a socket that still accepts connections: that
// one belongs to a running VMM.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket; not removing it", path)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		_ = c.Close()
		return fmt.Errorf("socket %s is in use by a running process (hint: stop the VM first)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// freshLog creates an empty log for this process, keeping the previous
// run's as LogName.1. Firecracker opens the log without O_CREAT, so it must
// exist first; and it must hold only this process's lines, since its last
// line is how a re-attached daemon learns the exit code. The file is kept
// after a failed start: it says why.
func freshLog(path string) error {
	if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
		if err := os.Rename(path, path+".1"); err != nil {
			return fmt.Errorf("rotate firecracker log: %w", err)
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create firecracker log: %w", err)
	}
	return f.Close()
}

// validInstanceID is Firecracker's rule for --id (and the jailer's):
// letters, digits and '-', 1 to 64 characters.
func validInstanceID(id string) bool {
	return jail.ValidateID(id) == nil
}
