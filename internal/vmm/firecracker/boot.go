package firecracker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// Firecracker's own limits that the driver checks before spawning, so a bad
// config fails with a clear error and leaves nothing behind.
const (
	maxVCPUs = 32 // MachineConfiguration.vcpu_count maximum
	minCID   = 3  // Vsock.guest_cid minimum (0-2 are reserved)
	maxIfLen = 15 // IFNAMSIZ-1: the longest tap name TUNSETIFF takes
	maxSock  = jail.MaxSocketPath
)

// plan is a validated vmm.Config turned into request bodies. It does not
// depend on the Firecracker version; calls does.
type plan struct {
	kernel  kernelFormat
	machine MachineConfig
	boot    BootSource
	drives  []Drive
	nics    []NetworkInterface
	vsock   *Vsock
}

func (p plan) vsockPath() string {
	if p.vsock == nil {
		return ""
	}
	return p.vsock.UDSPath
}

// call is one API request of the boot sequence.
type call struct {
	what         string // for errors: "configure drive \"root\""
	method, path string
	body         any
}

// newPlan checks cfg against what Firecracker can do and builds the request
// bodies. mtu, when non-zero, is advertised on every NIC where the version
// allows it.
func newPlan(cfg vmm.Config, mtu int) (plan, error) {
	return buildPlan(cfg, mtu, true)
}

// buildPlan is newPlan; spawning checks that cfg.RunDir can hold the API
// socket, which a Firecracker started by someone else does not need.
func buildPlan(cfg vmm.Config, mtu int, spawning bool) (plan, error) {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if spawning {
		if err := checkRunDir(cfg.RunDir); err != nil {
			errs = append(errs, err)
		} else if err := checkSocketPath(filepath.Join(cfg.RunDir, SocketName), "api socket"); err != nil {
			errs = append(errs, err)
		}
	}
	if cfg.Accel != "" && cfg.Accel != vmm.KVM {
		fail("firecracker runs guests only with kvm, not %q (hint: use --vmm qemu for software emulation)", cfg.Accel)
	}
	if cfg.CPUs < 1 || cfg.CPUs > maxVCPUs {
		fail("firecracker takes 1 to %d vCPUs, not %d", maxVCPUs, cfg.CPUs)
	}
	if cfg.MemoryMiB < 1 {
		fail("memory size %d MiB: must be at least 1 MiB", cfg.MemoryMiB)
	}
	if mtu != 0 && (mtu < 68 || mtu > 65535) {
		fail("mtu %d: must be between 68 and 65535", mtu)
	}

	p := plan{machine: MachineConfig{VCPUCount: cfg.CPUs, MemSizeMiB: cfg.MemoryMiB}}
	if cfg.Kernel == "" {
		fail("no kernel given")
	} else if f, err := detectKernel(cfg.Kernel, runtime.GOARCH); err != nil {
		errs = append(errs, err)
	} else {
		p.kernel = f
	}
	if cfg.Initrd != "" {
		if err := checkReadable(cfg.Initrd, "initrd"); err != nil {
			errs = append(errs, err)
		}
	}
	p.boot = BootSource{KernelImagePath: cfg.Kernel, InitrdPath: cfg.Initrd, BootArgs: bootArgs(cfg.Cmdline)}

	seen := map[string]bool{}
	for i, d := range cfg.Disks {
		if err := ValidID(d.ID); err != nil {
			fail("disk %d: %w", i, err)
			continue
		}
		if seen[d.ID] {
			fail("disk %q: given twice", d.ID)
		}
		seen[d.ID] = true
		switch d.Format {
		case "", "raw":
		case "qcow2":
			fail("disk %q is qcow2: firecracker reads only raw images (hint: qemu-img convert -O raw, or use --vmm qemu)", d.ID)
			continue
		default:
			fail("disk %q: unknown format %q (firecracker reads only raw images)", d.ID, d.Format)
			continue
		}
		if err := checkDisk(d); err != nil {
			errs = append(errs, err)
			continue
		}
		p.drives = append(p.drives, Drive{DriveID: d.ID, PathOnHost: d.Path, IsRootDevice: i == 0, IsReadOnly: d.ReadOnly})
	}

	seen = map[string]bool{}
	for i, n := range cfg.NICs {
		if err := ValidID(n.ID); err != nil {
			fail("nic %d: %w", i, err)
			continue
		}
		if seen[n.ID] {
			fail("nic %q: given twice", n.ID)
		}
		seen[n.ID] = true
		switch {
		case n.Tap == "":
			fail("nic %q has no tap: firecracker has no user-mode networking (hint: use bridge networking through banger-helper, or --vmm qemu)", n.ID)
			continue
		case len(n.Forwards) > 0:
			fail("nic %q: port forwards need user-mode networking, which firecracker lacks (the guest is reachable on the bridge)", n.ID)
			continue
		}
		if err := checkTapName(n.Tap); err != nil {
			fail("nic %q: %w", n.ID, err)
			continue
		}
		if n.MAC != "" {
			if hw, err := net.ParseMAC(n.MAC); err != nil || len(hw) != 6 || len(n.MAC) != 17 || strings.Count(n.MAC, ":") != 5 {
				fail("nic %q: guest mac %q is not of the form 52:54:00:12:34:56", n.ID, n.MAC)
				continue
			}
		}
		p.nics = append(p.nics, NetworkInterface{IfaceID: n.ID, HostDevName: n.Tap, GuestMAC: n.MAC, MTU: mtu})
	}

	if v := cfg.Vsock; v != nil {
		if v.CID < minCID {
			fail("vsock cid %d: must be %d or more (0-2 are reserved)", v.CID, minCID)
		}
		if err := checkSocketPath(v.Path, "vsock socket"); err != nil {
			errs = append(errs, err)
		}
		p.vsock = &Vsock{GuestCID: v.CID, UDSPath: v.Path}
	}
	if err := errors.Join(errs...); err != nil {
		return plan{}, fmt.Errorf("firecracker config for vm %q: %w", cfg.ID, err)
	}
	return p, nil
}

// calls returns the boot sequence for a version: logger aside (launch sends
// it first), everything up to and including InstanceStart. dropped names
// optional features left out because the version lacks them.
func (p plan) calls(caps Capabilities) (calls []call, dropped []string, err error) {
	if p.kernel == kernelBzImage && !caps.KernelBzImage {
		return nil, nil, fmt.Errorf("kernel %q is a bzImage; firecracker %s boots only an uncompressed ELF vmlinux (hint: banger image build extracts one)",
			p.boot.KernelImagePath, caps.Version)
	}
	calls = append(calls,
		call{"configure machine", "PUT", "/machine-config", p.machine},
		call{"configure boot source", "PUT", "/boot-source", p.boot},
	)
	for _, d := range p.drives {
		calls = append(calls, call{fmt.Sprintf("configure drive %q", d.DriveID), "PUT", "/drives/" + d.DriveID, d})
	}
	for _, n := range p.nics {
		if n.MTU != 0 && !caps.NetMTU {
			n.MTU = 0
			dropped = append(dropped, "network interface mtu")
		}
		calls = append(calls, call{fmt.Sprintf("configure network interface %q", n.IfaceID), "PUT", "/network-interfaces/" + n.IfaceID, n})
	}
	if p.vsock != nil {
		calls = append(calls, call{"configure vsock", "PUT", "/vsock", *p.vsock})
	}
	// A virtio-rng device spares the guest an entropy stall in early boot
	// (measured with QEMU: see reference/guest-boot.md).
	if caps.Entropy {
		calls = append(calls, call{"configure entropy device", "PUT", "/entropy", EntropyDevice{}})
	} else {
		dropped = append(dropped, "entropy device")
	}
	calls = append(calls, call{"start instance", "PUT", "/actions", instanceAction{ActionType: ActionInstanceStart}})
	return calls, dropped, nil
}

// apply sends the boot sequence for the version m runs, leaving out the
// optional features it lacks (and saying so).
func (p plan) apply(ctx context.Context, m *Machine) error {
	calls, dropped, err := p.calls(m.client.Capabilities())
	if err != nil {
		return err
	}
	for _, note := range dropped {
		m.log.Info("firecracker version lacks an optional feature; leaving it out", "feature", note, "version", m.client.Capabilities().Version.String())
	}
	return runCalls(ctx, m.client, calls)
}

// runCalls sends calls in order and stops at the first failure.
func runCalls(ctx context.Context, c *Client, calls []call) error {
	for _, cl := range calls {
		if err := c.send(ctx, cl.method, cl.path, cl.body, nil); err != nil {
			return fmt.Errorf("%s: %w", cl.what, err)
		}
	}
	return nil
}

// bootArgs returns the kernel command line. Firecracker implements no ACPI
// power-off: a guest leaves only by resetting the CPU through the i8042
// controller, which makes Firecracker exit. reboot=k makes the guest's
// reboot and poweroff take that path, so it is added unless the command
// line already says how to reboot. An empty command line keeps
// Firecracker's default, which already has it.
func bootArgs(cmdline string) string {
	cmdline = strings.TrimSpace(cmdline)
	if cmdline == "" {
		return ""
	}
	for _, f := range strings.Fields(cmdline) {
		if strings.HasPrefix(f, "reboot=") {
			return cmdline
		}
	}
	return cmdline + " reboot=k"
}

type kernelFormat int

const (
	kernelELF kernelFormat = iota + 1
	kernelBzImage
	kernelPE // arm64 Image
)

// detectKernel reads the kernel's header and checks that Firecracker can
// boot it on goarch: an ELF vmlinux (or, from 1.17, a bzImage) on x86_64, a
// PE Image on aarch64.
func detectKernel(path, goarch string) (kernelFormat, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("open kernel: %w", err)
	}
	defer f.Close()
	hdr := make([]byte, 0x210)
	n, err := io.ReadFull(f, hdr)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return 0, fmt.Errorf("read kernel %q: %w", path, err)
	}
	hdr = hdr[:n]
	isELF := len(hdr) >= 64 && string(hdr[:4]) == "\x7fELF"
	switch goarch {
	case "amd64":
		if isELF {
			const emX8664 = 62
			if hdr[4] != 2 || hdr[5] != 1 || binary.LittleEndian.Uint16(hdr[18:]) != emX8664 {
				return 0, fmt.Errorf("kernel %q is an ELF file but not a 64-bit x86_64 one", path)
			}
			return kernelELF, nil
		}
		if len(hdr) >= 0x206 && string(hdr[0x202:0x206]) == "HdrS" {
			return kernelBzImage, nil
		}
		return 0, fmt.Errorf("kernel %q is neither an ELF vmlinux nor a bzImage (hint: firecracker needs an uncompressed vmlinux)", path)
	case "arm64":
		if len(hdr) >= 0x3c && string(hdr[0x38:0x3c]) == "ARM\x64" {
			return kernelPE, nil
		}
		return 0, fmt.Errorf("kernel %q is not an arm64 Image", path)
	default:
		return 0, fmt.Errorf("firecracker runs only on x86_64 and aarch64 hosts, not %s", goarch)
	}
}

func checkRunDir(dir string) error {
	if dir == "" || !filepath.IsAbs(dir) {
		return fmt.Errorf("run dir %q: must be an absolute path", dir)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("run dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("run dir %s is not a directory", dir)
	}
	return nil
}

func checkSocketPath(path, what string) error {
	if path == "" || !filepath.IsAbs(path) {
		return fmt.Errorf("%s %q: must be an absolute path", what, path)
	}
	if len(path) > maxSock {
		return fmt.Errorf("%s %s: %d bytes, longer than a unix socket path may be (%d)", what, path, len(path), maxSock)
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || !fi.IsDir() {
		return fmt.Errorf("%s %s: parent directory does not exist", what, path)
	}
	return nil
}

func checkReadable(path, what string) error {
	if path == "" {
		return fmt.Errorf("no %s given", what)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %w", what, err)
	}
	return f.Close()
}

// checkDisk opens the disk the way Firecracker will (read-write unless
// read-only), so a permission problem is reported before the spawn.
func checkDisk(d vmm.Disk) error {
	fi, err := os.Stat(d.Path)
	if err != nil {
		return fmt.Errorf("disk %q: %w", d.ID, err)
	}
	if !fi.Mode().IsRegular() && fi.Mode().Type() != fs.ModeDevice {
		return fmt.Errorf("disk %q: %s is neither a regular file nor a block device", d.ID, d.Path)
	}
	flag := os.O_RDWR
	if d.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(d.Path, flag, 0)
	if err != nil {
		return fmt.Errorf("disk %q: %w", d.ID, err)
	}
	return f.Close()
}

// checkTapName applies the kernel's interface name rules: 1 to 15 bytes, no
// '/', ':' or white space, not "." or "..".
func checkTapName(name string) error {
	if name == "" || len(name) > maxIfLen || name == "." || name == ".." {
		return fmt.Errorf("tap name %q: must be 1 to %d characters", name, maxIfLen)
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r == ':' || r > '~' {
			return fmt.Errorf("tap name %q: has a character interface names cannot hold", name)
		}
	}
	return nil
}
