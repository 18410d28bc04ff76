package qemu

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/vmm"
)

// DefaultExecutable is the QEMU binary used when Config.Executable is empty.
const DefaultExecutable = "qemu-system-x86_64"

// QMPSocketName is the QMP socket's name inside Config.RunDir.
const QMPSocketName = "qmp.sock"

// maxSocketPath is sun_path's size less its NUL.
const maxSocketPath = 107

// x86 kernels read at most 2048 bytes of command line (COMMAND_LINE_SIZE).
const maxCmdline = 2047

// HostInfo is what the command line depends on besides the Config.
type HostInfo struct {
	// TSCkHz is the host's TSC frequency, 0 when unknown. Under TCG the
	// guest's TSC is the host's (QEMU's rdtsc returns host ticks), and
	// telling the guest with tsc_early_khz= spares it a calibration against
	// the emulated PIT that fails on a loaded host: the Debian kernel then
	// marks the TSC unusable and hangs in early boot. Measured on a 2-core
	// machine under load: 4 boots of 4 hung without it, 4 of 4 booted with it.
	TSCkHz int64
}

var (
	hostOnce sync.Once
	hostInfo HostInfo
)

// DetectHost measures the host once per process (about 50 ms).
func DetectHost() HostInfo {
	hostOnce.Do(func() { hostInfo = HostInfo{TSCkHz: measureTSCkHz(50 * time.Millisecond)} })
	return hostInfo
}

// BuildArgv turns a Config into QEMU's command line. It is a pure function
// of its inputs; every value from cfg is validated first, and values inside
// QEMU's comma-separated options are escaped, so no field can add options.
//
// Choices that must stay true:
//   - microvm with ACPI: the Debian cloud kernel has no
//     CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and finds virtio-mmio devices only
//     through ACPI; x-option-roms=off boots the kernel straight from qboot.
//   - virtio-mmio in modern (1.0) mode, as the QEMU microvm docs recommend.
//   - the serial console (ttyS0) on stdout, which vmm.Spawn sends to the
//     capped console log; QEMU's own errors land there too.
//   - -no-reboot: a guest reboot ends QEMU (SHUTDOWN reason guest-reset);
//     the daemon decides whether to start the VM again.
//   - kernel parameters appended unless the caller set them: console=ttyS0
//     (the ISA serial port), reboot=t (see below) and, under TCG,
//     tsc_early_khz (see HostInfo).
//   - disks use cache=writeback: guest flushes reach the host disk (fsync),
//     so a guest that syncs loses nothing on a host crash, and unlike
//     cache=none it needs no O_DIRECT, which tmpfs and some file systems
//     refuse. discard=unmap lets the guest's fstrim shrink sparse and qcow2
//     clones again.
func BuildArgv(cfg vmm.Config, host HostInfo) ([]string, error) {
	if err := validate(cfg); err != nil {
		return nil, err
	}
	exe := cfg.Executable
	if exe == "" {
		exe = DefaultExecutable
	}
	a := []string{exe,
		"-name", cfg.ID,
		"-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on",
	}
	cmdline := cfg.Cmdline
	switch cfg.Accel {
	case vmm.KVM:
		a = append(a, "-accel", "kvm", "-cpu", "host")
	case vmm.TCG:
		a = append(a, "-accel", "tcg", "-cpu", "max")
		if host.TSCkHz > 0 && !hasParam(cmdline, "tsc_early_khz") {
			cmdline = appendParam(cmdline, "tsc_early_khz="+strconv.FormatInt(host.TSCkHz, 10))
		}
	}
	if !hasParam(cmdline, "console") {
		cmdline = appendParam(cmdline, "console=ttyS0")
	}
	// Linux's default reboot path on microvm writes the ACPI reset register
	// and, when QEMU has not acted on it yet, falls through to a jump into
	// the firmware, which boots the guest again inside the same QEMU: 2 of
	// 10 guest reboots here never ended QEMU. A triple fault is handled by
	// the vCPU itself, so -no-reboot ends QEMU every time (10 of 10), with
	// SHUTDOWN reason guest-reset. It also covers panic=N restarts.
	if !hasParam(cmdline, "reboot") {
		cmdline = appendParam(cmdline, "reboot=t")
	}
	a = append(a,
		"-m", strconv.Itoa(cfg.MemoryMiB),
		"-smp", strconv.Itoa(cfg.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,path="+optEscape(QMPSocket(cfg.RunDir))+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", cfg.Kernel,
	)
	if cfg.Initrd != "" {
		a = append(a, "-initrd", cfg.Initrd)
	}
	a = append(a, "-append", cmdline)
	for _, d := range cfg.Disks {
		format := d.Format
		if format == "" {
			format = "raw"
		}
		drive := "id=" + d.ID + ",file=" + optEscape(d.Path) + ",format=" + format +
			",if=none,cache=writeback,discard=unmap"
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		// serial= gives the guest /dev/disk/by-id/virtio-<ID>.
		a = append(a, "-drive", drive, "-device", "virtio-blk-device,drive="+d.ID+",serial="+d.ID)
	}
	for _, n := range cfg.NICs {
		var netdev string
		if n.Tap != "" {
			netdev = "tap,id=" + n.ID + ",ifname=" + n.Tap + ",script=no,downscript=no"
		} else {
			netdev = "user,id=" + n.ID
			for _, f := range n.Forwards {
				netdev += ",hostfwd=" + hostfwdRule(f)
			}
		}
		dev := "virtio-net-device,netdev=" + n.ID
		if n.MAC != "" {
			dev += ",mac=" + n.MAC
		}
		a = append(a, "-netdev", netdev, "-device", dev)
	}
	a = append(a,
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-device,rng=rng0",
	)
	// vhost-vsock needs KVM's ioeventfd; under TCG the guest gets no vsock
	// (Start logs it).
	if cfg.Vsock != nil && cfg.Accel == vmm.KVM {
		a = append(a, "-device", "vhost-vsock-device,guest-cid="+strconv.FormatUint(uint64(cfg.Vsock.CID), 10))
	}
	return a, nil
}

// QMPSocket is the QMP socket of a VM whose RunDir is runDir.
func QMPSocket(runDir string) string { return filepath.Join(runDir, QMPSocketName) }

// optEscape escapes a value inside a QEMU option string, where a comma
// separates options and ",," stands for a literal comma.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func hasParam(cmdline, name string) bool {
	for _, f := range strings.Fields(cmdline) {
		if f == name || strings.HasPrefix(f, name+"=") {
			return true
		}
	}
	return false
}

func appendParam(cmdline, p string) string {
	if strings.TrimSpace(cmdline) == "" {
		return p
	}
	return cmdline + " " + p
}

// validate rejects a Config that QEMU would misread or that banger never
// produces. It reports every problem at once.
func validate(cfg vmm.Config) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !vmID.MatchString(cfg.ID) {
		bad("vm id %q: want 1-64 letters, digits, '-', '.' or '_'", cfg.ID)
	}
	if cfg.CPUs < 1 || cfg.CPUs > 255 {
		bad("cpus %d: want 1-255", cfg.CPUs)
	}
	if cfg.MemoryMiB < 16 {
		bad("memory %d MiB: want at least 16", cfg.MemoryMiB)
	}
	if cfg.Accel != vmm.KVM && cfg.Accel != vmm.TCG {
		bad("accel %q: want kvm or tcg", cfg.Accel)
	}
	checkPath := func(what, p string, required bool) {
		switch {
		case p == "" && !required:
		case p == "":
			bad("%s: missing", what)
		case !filepath.IsAbs(p):
			bad("%s %q: want an absolute path", what, p)
		case strings.ContainsAny(p, "\x00\n"):
			bad("%s %q: control characters in path", what, p)
		}
	}
	checkPath("kernel", cfg.Kernel, true)
	checkPath("initrd", cfg.Initrd, false)
	checkPath("run dir", cfg.RunDir, true)
	if cfg.RunDir != "" && len(QMPSocket(cfg.RunDir)) > maxSocketPath {
		bad("run dir %q: the QMP socket path would exceed %d bytes", cfg.RunDir, maxSocketPath)
	}
	if len(cfg.Cmdline) > maxCmdline {
		bad("kernel command line: %d bytes, the kernel reads at most %d", len(cfg.Cmdline), maxCmdline)
	}
	if strings.ContainsAny(cfg.Cmdline, "\x00\n") {
		bad("kernel command line: control characters")
	}
	if cfg.Executable != "" && strings.ContainsAny(cfg.Executable, "\x00\n") {
		bad("executable %q: control characters", cfg.Executable)
	}
	disks := map[string]bool{}
	for i, d := range cfg.Disks {
		if !qemuID.MatchString(d.ID) || len(d.ID) > 20 {
			bad("disk %d id %q: want a letter then up to 19 letters, digits, '-', '.' or '_'", i, d.ID)
		}
		if disks[d.ID] {
			bad("disk id %q: used twice", d.ID)
		}
		disks[d.ID] = true
		checkPath(fmt.Sprintf("disk %q path", d.ID), d.Path, true)
		if d.Format != "" && d.Format != "raw" && d.Format != "qcow2" {
			bad("disk %q format %q: want raw or qcow2", d.ID, d.Format)
		}
	}
	nics := map[string]bool{}
	forwards := map[string]string{}
	for i, n := range cfg.NICs {
		if !qemuID.MatchString(n.ID) {
			bad("nic %d id %q: want a letter then letters, digits, '-', '.' or '_'", i, n.ID)
		}
		if nics[n.ID] {
			bad("nic id %q: used twice", n.ID)
		}
		nics[n.ID] = true
		if n.MAC != "" {
			hw, err := net.ParseMAC(n.MAC)
			if err != nil || len(hw) != 6 || hw.String() != n.MAC {
				bad("nic %q mac %q: want six lower-case hex pairs separated by colons", n.ID, n.MAC)
			} else if hw[0]&1 == 1 {
				bad("nic %q mac %q: a multicast address", n.ID, n.MAC)
			}
		}
		if n.Tap != "" {
			if !validIfname(n.Tap) {
				bad("nic %q tap %q: want an interface name of 1-15 letters, digits, '-', '.' or '_'", n.ID, n.Tap)
			}
			if len(n.Forwards) > 0 {
				bad("nic %q: port forwards need user-mode networking, not tap %q", n.ID, n.Tap)
			}
		}
		for _, f := range n.Forwards {
			if err := validForward(n.ID, f); err != nil {
				bad("nic %q: %w", n.ID, err)
				continue
			}
			key := fmt.Sprintf("%s:%s:%d", f.Proto, f.HostIP, f.HostPort)
			if other, ok := forwards[key]; ok {
				bad("nic %q: host port %s is already forwarded on nic %q", n.ID, key, other)
			}
			forwards[key] = n.ID
		}
	}
	if cfg.Vsock != nil && cfg.Vsock.CID < 3 {
		bad("vsock cid %d: want 3 or more (0-2 are reserved)", cfg.Vsock.CID)
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid qemu config: %w", errors.Join(errs...))
	}
	return nil
}

// vmID is what -name accepts here: no comma (an option separator), nothing
// a log reader could mistake for structure.
var vmID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func validIfname(s string) bool {
	if len(s) == 0 || len(s) > 15 {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-' && r != '.' && r != '_' {
			return false
		}
	}
	return true
}
