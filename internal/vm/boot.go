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
	"github.com/bangerhq/banger/internal/helperapi"
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

// bootOptions tune bootLocked.
type bootOptions struct {
	// wait for the guest to answer SSH before returning.
	wait bool
	// finishCreate clears Runtime.Creating in the commit that records the
	// running VMM (a create that does not wait ends there).
	finishCreate bool
}

// bootLocked starts the VMM for a VM whose disk and identity exist, moving
// it from one of from to starting and then running, and waits for SSH when
// asked. Each step is one commit: starting with the intents of the runtime
// directory and forwarded port, then running with the process and runtime.
// On failure the VMM and the runtime resources are gone; the VM goes to
// error unless it was being created (the caller rolls that back).
func (s *Service) bootLocked(ctx context.Context, row store.VM, rt Runtime, opt bootOptions, progress ProgressFunc, from ...api.VMState) (err error) {
	log := s.Log.With("vm", row.Name, "id", row.ID)
	drv, ok := s.Drivers[rt.VMM]
	if !ok {
		return api.Errorf(api.CodeFailedPrecondition, "no %s driver on this host", rt.VMM)
	}
	if row.NetMode == NetBridge {
		// Checked before the VM leaves its state: without the helper no
		// tap can be made, and the VM stays as it was.
		if _, err := s.bridge(ctx); err != nil {
			return bridgeUnavailable(row.Name, err)
		}
	}
	files, err := s.Images.BootFiles(ctx, row.ImageName)
	if err != nil {
		return err
	}
	fromStates := make([]string, len(from))
	for i, f := range from {
		fromStates[i] = string(f)
	}
	runDir := s.Layout.VMRunDir(row.ID)
	rt.clearProcess()
	jd, notJailed := s.jailable(row, rt)
	port, err := s.markStarting(ctx, row, rt, runDir, fromStates, jd != nil)
	if err != nil {
		return err
	}
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
			_ = m.Close()
		}
		s.deactivateAll(row.ID)
		if rerr := s.release(bg, row.ID, runtimeKinds...); rerr != nil {
			log.Error("release after failed boot", "err", rerr)
		}
		if len(from) == 1 && from[0] == api.VMCreating {
			return // Create rolls the whole VM back
		}
		rt.clearProcess()
		_ = s.changeVM(bg, row, store.VMChange{State: string(api.VMError), Reason: shortReason(err), Runtime: encodeRuntime(rt)})
	}()
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	if row.NetMode == NetBridge {
		crashpoint("start:tap")
		if err := s.makeTap(ctx, row.Name, row.ID); err != nil {
			return err
		}
	}
	console := consoleLogPath(s.Layout.VMDir(row.ID))
	var offset int64
	if st, err := os.Stat(console); err == nil {
		offset = st.Size()
	}

	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "boot"}, Message: fmt.Sprintf("starting %s (%s)", rt.VMM, rt.Accel)})
	if jd != nil {
		crashpoint("start:spawn")
		var res helperapi.LaunchJailedResult
		m, res, err = s.launchJailed(ctx, row, rt, jd, files, s.vmmConfig(row, rt, files, runDir, console, port, nil), log)
		switch {
		case err == nil:
			rt.Jailed = true
			log.Info("firecracker runs jailed", "uid", res.UID, "root", res.Root, "cgroup", res.Cgroup, "limits", res.Limits)
		case errors.Is(err, helperapi.ErrUnsupported):
			// The helper runs no jails, or cannot here (no cgroup v2, the
			// disk on another file system than its jail dir): the VMM runs
			// as the daemon's user, as without a helper.
			m, jd, notJailed = nil, nil, err
		default:
			return err
		}
	}
	if jd == nil && rt.VMM == vmm.Firecracker {
		log.Warn("firecracker runs unjailed, as the daemon's user", "why", notJailed)
		progress(api.Event{Type: "vm.notice", Name: row.Name, Message: "firecracker runs unjailed: " + notJailed.Error()})
	}
	var userFwds []api.PortForwardRequest
	for attempt, launched := 0, m != nil; !launched; attempt++ {
		crashpoint("start:spawn")
		if row.NetMode != NetBridge {
			// Forwards whose port another program holds are left out
			// (and reported) rather than failing the boot.
			userFwds = s.userForwards(ctx, row, progress)
		}
		m, err = drv.Start(ctx, s.vmmConfig(row, rt, files, runDir, console, port, userFwds), log)
		if err == nil {
			break
		}
		// A port found free can be taken by another program before the
		// VMM binds it; then move to another.
		if attempt < 2 && strings.Contains(err.Error(), "hostfwd") {
			log.Warn("forwarded port was taken; retrying", "port", port, "err", err)
			if port, err = s.movePort(ctx, row.ID, port); err != nil {
				return err
			}
			continue
		}
		return fmt.Errorf("start %s: %w", rt.VMM, err)
	}
	h := m.Handle()
	now := time.Now().UTC()
	rt.Handle, rt.StartedAt = &h, &now
	if row.NetMode == NetBridge {
		rt.Network.SSHHost, rt.Network.SSHPort = rt.Network.IP, 22
	} else {
		rt.Network.SSHHost, rt.Network.SSHPort = "127.0.0.1", port
	}
	if opt.finishCreate {
		rt.Creating = false
	}
	// The process is recorded once it exists; until then the runtime
	// directory's intent lets a restarted daemon find and kill it. A
	// jailed process is the jail's, recorded already: only the helper
	// may kill it.
	var intents []store.Resource
	if !rt.Jailed {
		intents = []store.Resource{{Kind: resProcess, Ref: processRef(h), Data: mustJSON(h)}}
	}
	if err := s.changeVM(ctx, row, store.VMChange{
		From: []string{string(api.VMStarting)}, State: string(api.VMRunning), Runtime: encodeRuntime(rt),
		Intents: intents, MarkCreated: true,
	}); err != nil {
		return err
	}
	crashpoint("start:spawned")
	s.setMachine(row.ID, m)
	s.supervise(row, m)
	if row.NetMode == NetBridge {
		s.startForwards(ctx, row, rt, m, false, progress)
	} else {
		s.markForwardsActive(row.ID, userFwds)
	}
	log.Info("vmm started", "pid", h.PID, "jailed", rt.Jailed, "ssh", net.JoinHostPort(rt.Network.SSHHost, strconv.Itoa(rt.Network.SSHPort)))
	if !opt.wait {
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

// markStarting moves the VM to starting and records the intents of its
// runtime directory and, in bridge mode, its tap (and its jail, when
// jailed), or in user mode a free port for SSH, in one commit. The UNIQUE
// constraint on resources keeps two VMs from taking the same port.
func (s *Service) markStarting(ctx context.Context, row store.VM, rt Runtime, runDir string, from []string, jailed bool) (int, error) {
	if row.NetMode == NetBridge {
		// Released newest first: the jail, which holds the tap, goes
		// before the tap.
		intents := []store.Resource{{Kind: resRunDir, Ref: runDir}, {Kind: resTap, Ref: network.TapName(row.ID)}}
		if jailed {
			intents = append(intents, store.Resource{Kind: resJail, Ref: row.ID})
		}
		return 0, s.changeVM(ctx, row, store.VMChange{
			From: from, State: string(api.VMStarting), Runtime: encodeRuntime(rt), Intents: intents,
		})
	}
	for range 20 {
		port, err := s.freeSSHPort(ctx)
		if err != nil {
			return 0, err
		}
		err = s.changeVM(ctx, row, store.VMChange{
			From: from, State: string(api.VMStarting), Runtime: encodeRuntime(rt),
			Intents: []store.Resource{{Kind: resRunDir, Ref: runDir}, {Kind: resPort, Ref: portRef(port)}},
		})
		if errors.Is(err, store.ErrExists) {
			continue // another VM holds that port
		}
		return port, err
	}
	return 0, errors.New("find a free port: every candidate was taken")
}

// movePort swaps the VM's recorded port for another free one.
func (s *Service) movePort(ctx context.Context, vmID string, old int) (int, error) {
	if err := s.Store.DeleteResource(ctx, vmID, resPort, portRef(old)); err != nil {
		return 0, err
	}
	for range 20 {
		port, err := s.freeSSHPort(ctx)
		if err != nil {
			return 0, err
		}
		err = s.Store.AddResourceIntent(ctx, vmID, resPort, portRef(port), nil)
		if errors.Is(err, store.ErrExists) {
			continue
		}
		return port, err
	}
	return 0, errors.New("find a free port: every candidate was taken")
}

func portRef(port int) string { return "tcp:127.0.0.1:" + strconv.Itoa(port) }

// freeSSHPort is a free loopback port that no VM forwards: a stopped VM's
// forward is not bound, yet its port is promised to it.
func (s *Service) freeSSHPort(ctx context.Context) (int, error) {
	for range 20 {
		port, err := freePort()
		if err != nil {
			return 0, err
		}
		held, err := s.Store.ResourceHeld(ctx, resForward, forwardRef(api.ProtoTCP, port))
		if err != nil {
			return 0, err
		}
		if !held {
			return port, nil
		}
	}
	return 0, errors.New("find a free port: every candidate is forwarded")
}

// freePort asks the kernel for a free loopback TCP port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// vmmConfig describes the VM to its driver. A bridge-mode VM's NIC is its
// tap; a user-mode VM's NIC carries SSH and the port forwards as QEMU
// hostfwd rules.
func (s *Service) vmmConfig(row store.VM, rt Runtime, files BootFiles, runDir, console string, sshPort int, fwds []api.PortForwardRequest) vmm.Config {
	kernel := files.Kernel
	if rt.VMM == vmm.Firecracker {
		kernel = files.Vmlinux
	}
	disks := []vmm.Disk{{ID: "root", Path: rt.Disk.Path, Format: string(rt.Disk.Format)}}
	if rt.Seed != "" {
		disks = append(disks, vmm.Disk{ID: "seed", Path: rt.Seed, Format: "raw", ReadOnly: true})
	}
	nic := vmm.NIC{ID: nicID, MAC: network.MAC(row.ID).String()}
	if row.NetMode == NetBridge {
		nic.Tap = network.TapName(row.ID)
	} else {
		nic.Forwards = []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: sshPort, GuestPort: 22}}
		for _, f := range fwds {
			nic.Forwards = append(nic.Forwards, toVMMForward(f))
		}
	}
	cmdline := strings.Join([]string{
		"console=ttyS0", "root=/dev/vda", "rw", "panic=-1",
		"systemd.hostname=" + row.Name,
		"systemd.machine_id=" + rt.MachineID,
	}, " ")
	return vmm.Config{
		ID:            row.ID,
		CPUs:          row.CPUs,
		MemoryMiB:     int(row.MemoryBytes / api.MiB),
		Kernel:        kernel,
		Initrd:        files.Initrd,
		Cmdline:       cmdline,
		Disks:         disks,
		NICs:          []vmm.NIC{nic},
		RunDir:        runDir,
		ConsoleLog:    console,
		ConsoleLogMax: consoleLogMax,
		Accel:         rt.Accel,
	}
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
