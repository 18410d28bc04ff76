package firecracker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// Jailed is a Firecracker that banger-helper started under the jailer
// (helperapi.LaunchJailedResult in the driver's terms): running as a uid
// of its own, chrooted in Root, nothing configured yet.
type Jailed struct {
	// PID and StartTime identify the Firecracker process by its host pid.
	PID       int
	StartTime uint64
	// Socket is the API socket as this process reaches it (the helper's
	// hard link in the jail's instance dir).
	Socket string
	// Root is the jail's root on the host: what Firecracker opens as
	// "/x" is Root/x here.
	Root string
	// Log is Firecracker's log as this process reads it; Firecracker
	// itself writes jail.JailLog.
	Log string
	// ConsoleLog is the serial console, quoted when the boot fails; ""
	// when unknown.
	ConsoleLog string
	// Kill ends the process: this process may not signal another uid's,
	// so the daemon passes a call to banger-helper's KillJailed. Required.
	Kill func() error
}

func (j Jailed) check() error {
	var errs []error
	if j.PID <= 0 {
		errs = append(errs, fmt.Errorf("pid %d", j.PID))
	}
	for _, p := range []struct{ name, path string }{{"socket", j.Socket}, {"root", j.Root}, {"log", j.Log}} {
		if !filepath.IsAbs(p.path) {
			errs = append(errs, fmt.Errorf("%s %q: must be an absolute path", p.name, p.path))
		}
	}
	if j.Kill == nil {
		errs = append(errs, errors.New("no kill function (hint: pass one that calls banger-helper's KillJailed)"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("jailed firecracker: %w", err)
	}
	return nil
}

// BootJailed configures and starts the VM in a Firecracker that
// banger-helper launched under the jailer. cfg is the VM as Start takes it,
// with its files on the host (in the VM's directory, which the helper
// placed in the jail): they are checked here as Start checks them, and the
// requests carry the paths Firecracker sees in the jail
// (jail.JailLayout.Jailed). The boot sequence is Start's. The vsock
// socket, if any, is bound in the jail: its host path is
// Root+jail.JailVsock, whatever cfg.Vsock.Path says. cfg.RunDir,
// ConsoleLog and Executable are not used.
//
// On error the process is killed through j.Kill before BootJailed
// returns.
func (d *Driver) BootJailed(ctx context.Context, j Jailed, cfg vmm.Config, log *slog.Logger) (*Machine, error) {
	if err := j.check(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("vm", cfg.ID, "vmm", vmm.Firecracker, "jailed", true)
	if cfg.Vsock != nil {
		v := *cfg.Vsock
		v.Path = filepath.Join(j.Root, jail.JailVsock)
		cfg.Vsock = &v
	}
	p, err := buildPlan(cfg, d.MTU, false)
	if err != nil {
		return nil, err
	}
	inJail, _, err := jail.JailLayout{Root: j.Root}.Jailed(cfg)
	if err != nil {
		return nil, fmt.Errorf("firecracker config for vm %q: %w", cfg.ID, err)
	}
	p = p.relocated(inJail)
	proc, err := vmm.Find(j.PID, j.StartTime)
	if err != nil {
		return nil, fmt.Errorf("boot jailed firecracker pid %d: %w", j.PID, err)
	}
	h := vmm.Handle{Kind: vmm.Firecracker, PID: j.PID, StartTime: j.StartTime, ControlSocket: j.Socket}
	vsockHost := ""
	if cfg.Vsock != nil {
		vsockHost = cfg.Vsock.Path
	}
	m := newMachine(proc, NewClient(j.Socket, log), h, log, j.Log, j.ConsoleLog, vsockHost)
	m.kill = j.Kill
	if err := d.setUp(ctx, m, jail.JailLog, p.apply); err != nil {
		m.abort()
		return nil, err
	}
	return m, nil
}

// AttachJailed is Attach for a Firecracker that banger-helper runs in a
// jail: kill is how the Machine kills it (see Jailed.Kill).
func (d *Driver) AttachJailed(ctx context.Context, h vmm.Handle, kill func() error, log *slog.Logger) (*Machine, error) {
	if kill == nil {
		return nil, errors.New("attach jailed firecracker: no kill function (hint: pass one that calls banger-helper's KillJailed)")
	}
	return d.attach(ctx, h, kill, log)
}

// relocated returns the plan with the file paths of inJail, a config that
// differs from the planned one only in where the files are (the result of
// jail.JailLayout.Jailed).
func (p plan) relocated(inJail vmm.Config) plan {
	p.boot.KernelImagePath = inJail.Kernel
	p.boot.InitrdPath = inJail.Initrd
	paths := make(map[string]string, len(inJail.Disks))
	for _, d := range inJail.Disks {
		paths[d.ID] = d.Path
	}
	drives := make([]Drive, len(p.drives))
	for i, dr := range p.drives {
		dr.PathOnHost = paths[dr.DriveID]
		drives[i] = dr
	}
	p.drives = drives
	if p.vsock != nil && inJail.Vsock != nil {
		v := *p.vsock
		v.UDSPath = inJail.Vsock.Path
		p.vsock = &v
	}
	return p
}
