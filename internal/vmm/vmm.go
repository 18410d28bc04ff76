// Package vmm defines the interface every virtual machine monitor driver
// implements (vmm/qemu, vmm/firecracker) and the process plumbing they share.
//
// A driver spawns its VMM detached from the daemon (own session, no pipes to
// the daemon), so VMs outlive a daemon restart; Attach finds them again from a
// Handle recorded in the state database.
package vmm

import (
	"context"
	"errors"
	"log/slog"
)

// Kind names a VMM.
type Kind string

const (
	Firecracker Kind = "firecracker"
	QEMU        Kind = "qemu"
)

// Accel is the CPU virtualisation a VMM uses.
type Accel string

const (
	KVM Accel = "kvm"
	TCG Accel = "tcg" // software emulation (QEMU only)
)

// Config is everything a driver needs to boot one VM.
type Config struct {
	ID        string // VM id; drivers use it in names
	CPUs      int
	MemoryMiB int
	// Kernel is a bzImage for QEMU and an uncompressed ELF vmlinux for
	// Firecracker; Initrd is optional.
	Kernel string
	Initrd string
	// Cmdline is the kernel command line. Drivers append only what their
	// device model needs (Firecracker adds its own virtio_mmio entries).
	Cmdline string
	Disks   []Disk // Disks[0] is the root disk (/dev/vda)
	NICs    []NIC
	Vsock   *Vsock
	// RunDir is a private (0700) directory for sockets and pid files. It is
	// short enough for unix socket paths.
	RunDir string
	// ConsoleLog receives the serial console, capped at ConsoleLogMax bytes
	// per file (one rotated file, ConsoleLog+".1", is kept).
	ConsoleLog    string
	ConsoleLogMax int64
	Accel         Accel // QEMU: kvm or tcg; Firecracker always uses KVM
	// Executable overrides the VMM binary (tests, unusual installs).
	Executable string
}

// Disk is a block device given to the guest.
type Disk struct {
	ID       string // "root", "data1" …
	Path     string
	Format   string // "raw" or "qcow2" (QEMU only)
	ReadOnly bool
}

// NIC is one guest network interface.
type NIC struct {
	ID  string // "eth0"
	MAC string // "52:54:00:…" lower-case, colon separated
	// Tap is the host tap device in bridge mode. When empty the NIC uses
	// user-mode networking (QEMU slirp) with Forwards.
	Tap      string
	Forwards []Forward
}

// Forward publishes a guest port on the host in user-mode networking.
type Forward struct {
	Proto     string // "tcp" or "udp"
	HostIP    string // "127.0.0.1"
	HostPort  int
	GuestPort int
}

// Vsock is a virtio-vsock device.
type Vsock struct {
	CID  uint32
	Path string // host-side unix socket (Firecracker)
}

// Handle identifies a running VMM across daemon restarts. The pid alone is
// not enough (pids are reused); StartTime is /proc/<pid>/stat's starttime.
type Handle struct {
	Kind          Kind   `json:"kind"`
	PID           int    `json:"pid"`
	StartTime     uint64 `json:"start_time"`
	ControlSocket string `json:"control_socket"` // QMP or Firecracker API socket
}

// RunState is what the VMM reports about the guest.
type RunState string

const (
	Running RunState = "running"
	Paused  RunState = "paused"
	// Other covers VMM states banger does not act on (QEMU "prelaunch", …).
	Other RunState = "other"
)

// Exit says why a VMM process ended.
type Exit struct {
	// GuestPoweroff is true when the guest shut itself down (or a graceful
	// Shutdown completed), as opposed to a crash or a kill.
	GuestPoweroff bool
	// Code is the exit status when known (the daemon was the parent), else -1.
	Code   int
	Reason string
}

// Driver starts and re-attaches VMMs of one kind.
type Driver interface {
	Kind() Kind
	// Start spawns the VMM detached from the daemon, configures the machine
	// and boots the guest. On error nothing keeps running.
	Start(ctx context.Context, cfg Config, log *slog.Logger) (Machine, error)
	// Attach re-attaches to a VMM an earlier daemon started. It returns
	// ErrGone when no process matches the handle any more.
	Attach(ctx context.Context, h Handle, log *slog.Logger) (Machine, error)
}

// Machine controls one running VMM.
type Machine interface {
	Handle() Handle
	// Shutdown asks the guest to power off (ACPI power button, Ctrl-Alt-Del)
	// and returns once the request was delivered; wait on Done for the exit.
	Shutdown(ctx context.Context) error
	// Kill ends the VMM at once (SIGKILL).
	Kill() error
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	State(ctx context.Context) (RunState, error)
	// Done is closed when the VMM process has exited; Exit is valid then.
	Done() <-chan struct{}
	Exit() Exit
	// Close releases control connections; the VMM keeps running.
	Close() error
}

// ErrGone means the VMM process a handle names no longer exists.
var ErrGone = errors.New("vmm process is gone")
