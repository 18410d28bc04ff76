package helperapi

import (
	"errors"
	"fmt"
)

// Op is one helper operation. The set is closed: only this package's types
// implement it, and the helper serves exactly those.
type Op interface {
	// OpName is the operation's name on the wire.
	OpName() string
	// Validate rejects anything that is not one of banger's own names. The
	// helper runs it on every decoded request; clients may run it early.
	Validate() error
	isOp()
}

// Operation names on the wire.
const (
	OpEnsureBridge      = "ensure_bridge"
	OpDeleteBridge      = "delete_bridge"
	OpCreateTap         = "create_tap"
	OpDeleteTap         = "delete_tap"
	OpEnsureNAT         = "ensure_nat"
	OpRemoveNAT         = "remove_nat"
	OpEnsureDNSRedirect = "ensure_dns_redirect"
	OpAttachLoop        = "attach_loop"
	OpDetachLoop        = "detach_loop"
	OpCreateSnapshot    = "create_snapshot"
	OpRemoveSnapshot    = "remove_snapshot"
	OpLaunchJailed      = "launch_jailed"
	OpKillJailed        = "kill_jailed"
	OpListOwned         = "list_owned"
)

// EnsureBridge creates the bridge when it is missing, gives it the gateway
// address CIDR (and no other) and sets it up. Running it again changes
// nothing.
type EnsureBridge struct {
	Name string `json:"name"` // "banger0"
	CIDR string `json:"cidr"` // the gateway address and prefix: "172.30.0.1/24"
}

// DeleteBridge removes the bridge; a missing bridge is not an error.
// Taps still attached to it are detached by the kernel, not deleted.
type DeleteBridge struct {
	Name string `json:"name"`
}

// CreateTap creates a persistent tap device owned by OwnerUID (so the
// unprivileged VMM can open it), attaches it to Bridge and sets it up. It
// fails with ErrExists when the tap already exists.
type CreateTap struct {
	Name     string `json:"name"`      // TapName(vm id)
	Bridge   string `json:"bridge"`    // "banger0"
	OwnerUID uint32 `json:"owner_uid"` // must be the helper's configured owner
}

// DeleteTap removes a tap; a missing tap is not an error.
type DeleteTap struct {
	Name string `json:"name"`
}

// EnsureNAT makes the nftables table "inet banger" masquerade traffic from
// the bridge's subnet leaving through any other interface, accept forwarding
// from the bridge and replies to it, drop other forwarded traffic to it (no
// host on the LAN opens connections to guests), and turns on IPv4
// forwarding. Rules
// outside the table are never touched. Running it again replaces the NAT
// chains' rules atomically with the same rules.
type EnsureNAT struct {
	Bridge string `json:"bridge"`
	CIDR   string `json:"cidr"` // the bridge's CIDR, as in EnsureBridge
}

// RemoveNAT deletes the whole "inet banger" table: NAT, forwarding and the
// DNS redirect. A missing table is not an error. It leaves IPv4 forwarding
// on, since something else on the host may rely on it by now.
type RemoveNAT struct{}

// EnsureDNSRedirect redirects DNS (udp and tcp port 53) sent to BridgeIP,
// from guests on the bridge and from the host itself, to Port on the same
// address, where the daemon's DNS server listens. When systemd-resolved runs
// on the host it also routes the "~banger" domain to the bridge, so
// "<vm>.banger" resolves on the host; the result says whether it did.
type EnsureDNSRedirect struct {
	Bridge   string `json:"bridge"`
	BridgeIP string `json:"bridge_ip"` // the bridge's gateway address: "172.30.0.1"
	Port     uint16 `json:"port"`      // the daemon's DNS port, >= MinDNSPort
}

// AttachLoop attaches <state dir>/vms/<VMID>/<File> to a free loop device
// with autoclear set, and hands the opened device back as a file
// descriptor: the loop detaches by itself once every holder (the daemon, the
// VMM it passed the descriptor to) has closed it, so nothing leaks when
// either dies.
type AttachLoop struct {
	VMID     string `json:"vm_id"`
	File     string `json:"file"` // a basename inside the VM's directory
	ReadOnly bool   `json:"read_only"`
}

// DetachLoop detaches a loop device whose backing file lies under the
// helper's state dir; the detach completes when its last holder closes it.
// A device that is already detached is not an error.
type DetachLoop struct {
	Device string `json:"device"` // "/dev/loop7"
}

// CreateSnapshot builds the device-mapper snapshot "banger-<VMID>": Origin
// (read-only, usually a hard link to the image's rootfs) and COW (a
// pre-sized, initially zeroed file that receives the VM's writes), both in
// <state dir>/vms/<VMID>/, each attached to an autoclear loop device held
// only by the snapshot. The opened snapshot device is handed back as a file
// descriptor.
type CreateSnapshot struct {
	VMID   string `json:"vm_id"`
	Origin string `json:"origin"`
	COW    string `json:"cow"`
}

// RemoveSnapshot removes "banger-<VMID>" (deferred while the device is still
// open); its loop devices detach with it. A missing device is not an error.
type RemoveSnapshot struct {
	VMID string `json:"vm_id"`
}

// LaunchJailed starts Firecracker for VM VMID under the jailer, running as
// a uid and gid of its own, chrooted, in a new pid namespace and in a
// cgroup of its own with limits derived from CPUs and MemoryMiB, and
// returns once its API socket is bound and only the owner may connect to
// it. The helper decides every path: the binaries are the ones it was
// configured with, the jail lies under its jail dir, and the files are
// <state dir>/vms/<VMID>/<name>: Kernel and Initrd are copied into the
// jail, each disk is hard-linked there (the VM's own file: its writes land
// in it). Firecracker is started but not configured: the daemon boots it
// through the socket. It fails with ErrExists while a jail for VMID
// exists; KillJailed removes it.
type LaunchJailed struct {
	VMID      string     `json:"vm_id"`
	CPUs      int        `json:"cpus"`       // the guest's vCPUs, 1 to MaxJailCPUs
	MemoryMiB int        `json:"memory_mib"` // the guest's memory, 1 to MaxJailMemoryMiB
	Kernel    string     `json:"kernel"`     // a basename inside the VM's directory
	Initrd    string     `json:"initrd"`     // likewise, or "" for none
	Disks     []JailDisk `json:"disks"`      // at most MaxJailDisks
	// Tap gives the jailed Firecracker the VM's tap, TapName(VMID), made
	// by CreateTap: the tap's owner becomes the jail's uid until
	// KillJailed gives it back to the owner.
	Tap bool `json:"tap"`
}

// JailDisk is one disk of a LaunchJailed VM.
type JailDisk struct {
	// ID is the drive id the daemon will configure; the disk is at
	// "/drive_<ID>" in the jail.
	ID       string `json:"id"`
	File     string `json:"file"` // a basename inside the VM's directory
	ReadOnly bool   `json:"read_only"`
}

// KillJailed kills VM VMID's jailed Firecracker and everything else in
// its cgroup, gives the disks and the tap back to the owner, and removes
// the jail and the cgroup. A VM without a jail is not an error.
type KillJailed struct {
	VMID string `json:"vm_id"`
}

// ListOwned reports every kernel object the helper would recognise as
// banger's, for the daemon's reconciliation.
type ListOwned struct{}

func (EnsureBridge) OpName() string      { return OpEnsureBridge }
func (DeleteBridge) OpName() string      { return OpDeleteBridge }
func (CreateTap) OpName() string         { return OpCreateTap }
func (DeleteTap) OpName() string         { return OpDeleteTap }
func (EnsureNAT) OpName() string         { return OpEnsureNAT }
func (RemoveNAT) OpName() string         { return OpRemoveNAT }
func (EnsureDNSRedirect) OpName() string { return OpEnsureDNSRedirect }
func (AttachLoop) OpName() string        { return OpAttachLoop }
func (DetachLoop) OpName() string        { return OpDetachLoop }
func (CreateSnapshot) OpName() string    { return OpCreateSnapshot }
func (RemoveSnapshot) OpName() string    { return OpRemoveSnapshot }
func (LaunchJailed) OpName() string      { return OpLaunchJailed }
func (KillJailed) OpName() string        { return OpKillJailed }
func (ListOwned) OpName() string         { return OpListOwned }

func (EnsureBridge) isOp()      {}
func (DeleteBridge) isOp()      {}
func (CreateTap) isOp()         {}
func (DeleteTap) isOp()         {}
func (EnsureNAT) isOp()         {}
func (RemoveNAT) isOp()         {}
func (EnsureDNSRedirect) isOp() {}
func (AttachLoop) isOp()        {}
func (DetachLoop) isOp()        {}
func (CreateSnapshot) isOp()    {}
func (RemoveSnapshot) isOp()    {}
func (LaunchJailed) isOp()      {}
func (KillJailed) isOp()        {}
func (ListOwned) isOp()         {}

// invalid wraps a validation failure with the operation's name and the
// ErrInvalid code.
func invalid(op Op, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Code: CodeInvalid, Message: op.OpName() + ": " + err.Error()}
}

func (o EnsureBridge) Validate() error {
	_, err := ParseBridgeCIDR(o.CIDR)
	return invalid(o, errors.Join(ValidateBridgeName(o.Name), err))
}

func (o DeleteBridge) Validate() error { return invalid(o, ValidateBridgeName(o.Name)) }

func (o CreateTap) Validate() error {
	return invalid(o, errors.Join(ValidateTapName(o.Name), ValidateBridgeName(o.Bridge), ValidateOwnerUID(o.OwnerUID)))
}

func (o DeleteTap) Validate() error { return invalid(o, ValidateTapName(o.Name)) }

func (o EnsureNAT) Validate() error {
	_, err := ParseBridgeCIDR(o.CIDR)
	return invalid(o, errors.Join(ValidateBridgeName(o.Bridge), err))
}

func (o RemoveNAT) Validate() error { return nil }

func (o EnsureDNSRedirect) Validate() error {
	var portErr error
	if o.Port < MinDNSPort {
		portErr = fmt.Errorf("dns port %d: want %d-65535 (the daemon is unprivileged)", o.Port, MinDNSPort)
	}
	_, ipErr := parseBridgeIP(o.BridgeIP)
	return invalid(o, errors.Join(ValidateBridgeName(o.Bridge), ipErr, portErr))
}

func (o AttachLoop) Validate() error {
	return invalid(o, errors.Join(ValidateVMID(o.VMID), ValidateFileName(o.File)))
}

func (o DetachLoop) Validate() error { return invalid(o, ValidateLoopDevice(o.Device)) }

func (o CreateSnapshot) Validate() error {
	var same error
	if o.Origin == o.COW {
		same = fmt.Errorf("origin and cow are the same file %q", o.Origin)
	}
	return invalid(o, errors.Join(ValidateVMID(o.VMID), ValidateFileName(o.Origin), ValidateFileName(o.COW), same))
}

func (o RemoveSnapshot) Validate() error { return invalid(o, ValidateVMID(o.VMID)) }

func (o LaunchJailed) Validate() error {
	errs := []error{ValidateVMID(o.VMID)}
	if o.CPUs < 1 || o.CPUs > MaxJailCPUs {
		errs = append(errs, fmt.Errorf("cpus %d: want 1-%d", o.CPUs, MaxJailCPUs))
	}
	if o.MemoryMiB < 1 || o.MemoryMiB > MaxJailMemoryMiB {
		errs = append(errs, fmt.Errorf("memory %d MiB: want 1-%d", o.MemoryMiB, MaxJailMemoryMiB))
	}
	// Each file goes into the jail once: a name given twice would be
	// linked, re-owned and restored twice.
	used := make(map[string]string)
	use := func(what, name string) {
		if err := ValidateFileName(name); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
			return
		}
		if other, ok := used[name]; ok {
			errs = append(errs, fmt.Errorf("%s: file %q is already the %s", what, name, other))
			return
		}
		used[name] = what
	}
	use("kernel", o.Kernel)
	if o.Initrd != "" {
		use("initrd", o.Initrd)
	}
	if len(o.Disks) > MaxJailDisks {
		errs = append(errs, fmt.Errorf("%d disks: at most %d", len(o.Disks), MaxJailDisks))
	}
	ids := make(map[string]bool)
	for i, d := range o.Disks {
		if err := ValidateDiskID(d.ID); err != nil {
			errs = append(errs, fmt.Errorf("disk %d: %w", i, err))
		} else if ids[d.ID] {
			errs = append(errs, fmt.Errorf("disk %d: id %q given twice", i, d.ID))
		}
		ids[d.ID] = true
		use(fmt.Sprintf("disk %q", d.ID), d.File)
	}
	return invalid(o, errors.Join(errs...))
}

func (o KillJailed) Validate() error { return invalid(o, ValidateVMID(o.VMID)) }

func (o ListOwned) Validate() error { return nil }

// DMName is the device-mapper name of a VM's snapshot.
func DMName(vmID string) string { return DMPrefix + vmID }

// EnsureBridgeResult is EnsureBridge's result.
type EnsureBridgeResult struct {
	Created bool `json:"created"` // false when the bridge already existed
}

// EnsureDNSRedirectResult is EnsureDNSRedirect's result.
type EnsureDNSRedirectResult struct {
	// SplitDNS is true when systemd-resolved runs on the host and now sends
	// queries for "~banger" to the bridge; false when resolved is absent and
	// only guests get "<vm>.banger" names.
	SplitDNS bool `json:"split_dns"`
}

// AttachLoopResult is AttachLoop's result; the opened device comes with it.
type AttachLoopResult struct {
	Device string `json:"device"` // "/dev/loop7"
}

// CreateSnapshotResult is CreateSnapshot's result; the opened device comes
// with it.
type CreateSnapshotResult struct {
	Name    string `json:"name"`    // "banger-<vm id>"
	Device  string `json:"device"`  // "/dev/dm-3"
	Sectors uint64 `json:"sectors"` // size in 512-byte sectors (the origin's)
}

// LaunchJailedResult is what the daemon needs to boot and later re-attach
// to a jailed Firecracker.
type LaunchJailedResult struct {
	// PID and StartTime identify the Firecracker process (host pid and
	// /proc/<pid>/stat starttime) across daemon restarts.
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
	// Socket is the API socket, connectable by the owner and nobody else.
	Socket string `json:"socket"`
	// Log is Firecracker's log, readable by the owner; Firecracker writes
	// it as /firecracker.log in the jail (the driver's logger path).
	Log string `json:"log"`
	// ConsoleLog is the serial console, written into the VM's directory by
	// a logger that runs as the owner.
	ConsoleLog string `json:"console_log"`
	// Root is the jail's root on the host. The owner may enter it, and
	// gets read-write access to what Firecracker creates there later (the
	// vsock socket at Root/v.sock, snapshots).
	Root string `json:"root"`
	// UID and GID are what Firecracker runs as.
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	// Cgroup is the VM's cgroup, relative to the cgroup v2 mount; Limits
	// are the limits written there ("memory.max=…"), only those whose
	// controller the host's cgroup v2 offers.
	Cgroup string   `json:"cgroup"`
	Limits []string `json:"limits"`
}

// ListOwnedResult is what ListOwned found.
type ListOwnedResult struct {
	Bridges []string    `json:"bridges"` // bridges named banger<N>
	Taps    []string    `json:"taps"`    // links named bgr-<vm id>
	NFTable bool        `json:"nftable"` // whether table "inet banger" exists
	Loops   []OwnedLoop `json:"loops"`
	// Snapshots are device-mapper devices named banger-<vm id>; empty when
	// the host has no device-mapper.
	Snapshots []OwnedSnapshot `json:"snapshots"`
	// Jails are the jails LaunchJailed made and KillJailed has not removed
	// yet, whole or in part; empty when the helper runs no jails.
	Jails []OwnedJail `json:"jails"`
}

// OwnedJail is a VM's jail, or what is left of it.
type OwnedJail struct {
	VMID   string `json:"vm_id"`
	Dir    string `json:"dir"`    // the jail's instance dir; "" when gone
	Cgroup string `json:"cgroup"` // its cgroup, relative to the cgroup v2 mount; "" when gone
	UID    uint32 `json:"uid"`    // 0 when the record is gone
	// PID and StartTime are Firecracker's; Running says whether that
	// process still exists.
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
	Running   bool   `json:"running"`
}

// OwnedLoop is a loop device backed by a file under <state dir>/vms/.
type OwnedLoop struct {
	Device string `json:"device"`
	VMID   string `json:"vm_id"` // empty when the file is not in a VM's directory
	File   string `json:"file"`  // the backing file's path relative to <state dir>/vms
}

// OwnedSnapshot is a device-mapper device named banger-<vm id>.
type OwnedSnapshot struct {
	Name string `json:"name"`
	VMID string `json:"vm_id"`
	Open int    `json:"open"` // open count: non-zero while a VMM holds it
}
