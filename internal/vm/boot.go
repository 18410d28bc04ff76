package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// consoleLogMax caps each VM console log file (one older file is kept).
const consoleLogMax = 2 << 20

// ReadyTimeout bounds the wait for a booting guest to answer SSH. It is
// generous: without KVM, QEMU emulates the CPU and a slow, busy host can
// take minutes.
var ReadyTimeout = 5 * time.Minute

func consoleLogPath(dir string) string { return filepath.Join(dir, "console.log") }

// bootLocked starts the VMM for a VM whose disk and identity exist, moving
// it from one of from to starting and then running, and waits for SSH when
// wait is set. On failure the VMM and the runtime resources are gone; the VM
// goes to error unless it was being created (the caller rolls that back).
func (s *Service) bootLocked(ctx context.Context, row store.VM, rt Runtime, wait bool, progress ProgressFunc, from ...api.VMState) (err error) {
	if err := s.setState(ctx, row, api.VMStarting, "", from...); err != nil {
		return err
	}
	log := s.Log.With("vm", row.Name, "id", row.ID)
	var m vmm.Machine
	defer func() {
		if err == nil {
			return
		}
		bg := context.WithoutCancel(ctx)
		if m != nil {
			s.setMachine(row.ID, nil)
			_ = m.Kill()
			<-m.Done()
			m.Close()
		}
		if rerr := s.release(bg, row.ID, runtimeKinds...); rerr != nil {
			log.Error("release after failed boot", "err", rerr)
		}
		rt.Handle, rt.StartedAt = nil, nil
		rt.Network.SSHHost, rt.Network.SSHPort = "", 0
		_ = s.saveRuntime(bg, row.ID, rt)
		if len(from) == 1 && from[0] == api.VMCreating {
			return // Create rolls the whole VM back
		}
		_ = s.setState(bg, row, api.VMError, shortReason(err))
	}()

	drv, ok := s.Drivers[rt.VMM]
	if !ok {
		return api.Errorf(api.CodeFailedPrecondition, "no %s driver on this host", rt.VMM)
	}
	files, err := s.Images.BootFiles(ctx, row.ImageName)
	if err != nil {
		return err
	}
	runDir := s.Layout.VMRunDir(row.ID)
	if err := s.acquire(ctx, row.ID, resRunDir, runDir, nil, func() error { return os.MkdirAll(runDir, 0o700) }); err != nil {
		return err
	}
	vmDir := s.Layout.VMDir(row.ID)
	console := consoleLogPath(vmDir)
	var offset int64
	if st, err := os.Stat(console); err == nil {
		offset = st.Size()
	}

	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "boot"}, Message: fmt.Sprintf("starting %s (%s)", rt.VMM, rt.Accel)})
	// A port found free can be taken by someone else before the VMM binds
	// it; then try another.
	for attempt := 0; ; attempt++ {
		port, err := s.allocPort(ctx, row.ID)
		if err != nil {
			return err
		}
		cfg := s.vmmConfig(row, rt, files, runDir, console, port)
		crashpoint("start:spawn")
		m, err = drv.Start(ctx, cfg, log)
		if err == nil {
			rt.Network.SSHHost, rt.Network.SSHPort = "127.0.0.1", port
			break
		}
		_ = s.release(context.WithoutCancel(ctx), row.ID, resPort)
		if attempt < 2 && strings.Contains(err.Error(), "hostfwd") {
			log.Warn("forwarded port was taken; retrying", "port", port, "err", err)
			continue
		}
		return fmt.Errorf("start %s: %w", rt.VMM, err)
	}
	h := m.Handle()
	if err := s.acquire(ctx, row.ID, resProcess, processRef(h), h, func() error { return nil }); err != nil {
		return err
	}
	now := time.Now().UTC()
	rt.Handle, rt.StartedAt = &h, &now
	if err := s.saveRuntime(ctx, row.ID, rt); err != nil {
		return err
	}
	crashpoint("start:spawned")
	s.setMachine(row.ID, m)
	s.supervise(row, m)
	if err := s.setState(ctx, row, api.VMRunning, "", api.VMStarting); err != nil {
		return err
	}
	log.Info("vmm started", "pid", h.PID, "ssh_port", rt.Network.SSHPort)
	if !wait {
		return nil
	}
	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "ssh"}, Message: "waiting for the guest to answer SSH"})
	t0 := time.Now()
	if err := s.waitReady(ctx, row, rt, m, console, offset); err != nil {
		return err
	}
	log.Info("guest ready", "after", time.Since(t0).Round(time.Millisecond))
	return nil
}

// vmmConfig describes the VM to its driver.
func (s *Service) vmmConfig(row store.VM, rt Runtime, files BootFiles, runDir, console string, sshPort int) vmm.Config {
	kernel := files.Kernel
	if rt.VMM == vmm.Firecracker {
		kernel = files.Vmlinux
	}
	disks := []vmm.Disk{{ID: "root", Path: rt.Disk.Path, Format: string(rt.Disk.Format)}}
	if rt.Seed != "" {
		disks = append(disks, vmm.Disk{ID: "seed", Path: rt.Seed, Format: "raw", ReadOnly: true})
	}
	cmdline := strings.Join([]string{
		"console=ttyS0", "root=/dev/vda", "rw", "panic=-1",
		"systemd.hostname=" + row.Name,
		"systemd.machine_id=" + rt.MachineID,
	}, " ")
	return vmm.Config{
		ID:        row.ID,
		CPUs:      row.CPUs,
		MemoryMiB: int(row.MemoryBytes / api.MiB),
		Kernel:    kernel,
		Initrd:    files.Initrd,
		Cmdline:   cmdline,
		Disks:     disks,
		NICs: []vmm.NIC{{
			ID:       "eth0",
			MAC:      network.MAC(row.ID).String(),
			Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: sshPort, GuestPort: 22}},
		}},
		RunDir:        runDir,
		ConsoleLog:    console,
		ConsoleLogMax: consoleLogMax,
		Accel:         rt.Accel,
	}
}

// allocPort finds a free loopback TCP port and records it for the VM; the
// UNIQUE constraint on resources keeps two VMs from taking the same one.
func (s *Service) allocPort(ctx context.Context, vmID string) (int, error) {
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		err = s.acquire(ctx, vmID, resPort, "tcp:127.0.0.1:"+strconv.Itoa(port), nil, func() error { return nil })
		if err == nil {
			return port, nil
		}
		if !errors.Is(err, store.ErrExists) {
			return 0, err
		}
	}
	return 0, errors.New("find a free port: every candidate was taken")
}

// shortReason keeps a state reason to one readable line.
func shortReason(err error) string {
	msg := err.Error()
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	if len(msg) > 300 {
		msg = msg[:300] + "…"
	}
	return msg
}
