package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// Start boots a stopped (or failed) VM and, unless noWait, waits for SSH.
func (s *Service) Start(ctx context.Context, name string, noWait bool, progress ProgressFunc) (api.VM, error) {
	if progress == nil {
		progress = func(api.Event) {}
	}
	row, err := s.row(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	unlock := s.lock(row.ID)
	defer unlock()
	if row, err = s.Store.GetVMByID(ctx, row.ID); err != nil {
		return api.VM{}, err
	}
	switch api.VMState(row.State) {
	case api.VMStopped, api.VMError:
	case api.VMRunning:
		return api.VM{}, api.Errorf(api.CodeConflict, "vm %q is already running", name)
	default:
		return api.VM{}, api.Errorf(api.CodeConflict, "vm %q is %s", name, row.State).WithHint("wait for it to finish, then retry")
	}
	rt, err := decodeRuntime(row.Runtime)
	if err != nil {
		return api.VM{}, err
	}
	// Leftovers of an earlier failed run go first.
	if err := s.release(ctx, row.ID, runtimeKinds...); err != nil {
		return api.VM{}, err
	}
	if err := s.bootLocked(ctx, row, rt, bootOptions{wait: !noWait}, progress, api.VMStopped, api.VMError); err != nil {
		return api.VM{}, err
	}
	return s.Get(ctx, name)
}

// Stop asks the guest to power off and waits up to timeout (0: the
// configured stop_timeout) before killing the VMM; force kills at once.
func (s *Service) Stop(ctx context.Context, name string, force bool, timeout time.Duration) (api.VM, error) {
	row, err := s.row(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	unlock := s.lock(row.ID)
	defer unlock()
	if err := s.stopLocked(ctx, row, force, timeout); err != nil {
		return api.VM{}, err
	}
	return s.Get(ctx, name)
}

func (s *Service) stopLocked(ctx context.Context, row store.VM, force bool, timeout time.Duration) error {
	cur, err := s.Store.GetVMByID(ctx, row.ID)
	if err != nil {
		return err
	}
	if cur.State == string(api.VMStopped) {
		return nil
	}
	m := s.machine(row.ID)
	if m == nil || cur.State != string(api.VMRunning) {
		return api.Errorf(api.CodeConflict, "vm %q is %s, not running", row.Name, cur.State)
	}
	if timeout <= 0 {
		timeout = time.Duration(s.Config.VM.StopTimeout)
	}
	if err := s.setState(ctx, row, api.VMStopping, "", api.VMRunning); err != nil {
		return err
	}
	log := s.Log.With("vm", row.Name)
	if !force {
		if err := m.Shutdown(ctx); err != nil {
			log.Warn("graceful shutdown request failed; killing", "err", err)
		} else {
			select {
			case <-m.Done():
			case <-time.After(timeout):
				log.Warn("guest did not power off in time; killing", "timeout", timeout)
			case <-ctx.Done():
				log.Warn("stop cancelled; killing so the VM does not stay half-stopped")
			}
		}
	}
	if err := m.Kill(); err != nil && !errors.Is(err, vmm.ErrGone) {
		return fmt.Errorf("kill %s: %w", row.Name, err)
	}
	<-m.Done()
	s.handleExitLocked(context.WithoutCancel(ctx), row, m)
	return nil
}

// Kill ends the VMM at once.
func (s *Service) Kill(ctx context.Context, name string) (api.VM, error) {
	return s.Stop(ctx, name, true, 0)
}

// Restart stops a running VM gracefully and starts it again.
func (s *Service) Restart(ctx context.Context, name string, noWait bool, progress ProgressFunc) (api.VM, error) {
	v, err := s.Get(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	if v.State == api.VMRunning {
		if _, err := s.Stop(ctx, name, false, 0); err != nil {
			return api.VM{}, err
		}
	}
	return s.Start(ctx, name, noWait, progress)
}

// Delete removes a VM and everything it holds. A running VM needs force.
func (s *Service) Delete(ctx context.Context, name string, force bool) error {
	row, err := s.row(ctx, name)
	if err != nil {
		return err
	}
	unlock := s.lock(row.ID)
	defer unlock()
	if row, err = s.Store.GetVMByID(ctx, row.ID); err != nil {
		return err
	}
	switch api.VMState(row.State) {
	case api.VMRunning:
		if !force {
			return api.Errorf(api.CodeConflict, "vm %q is running", name).WithHint("banger vm stop " + name + ", or delete with --force")
		}
		if err := s.stopLocked(ctx, row, true, 0); err != nil {
			return err
		}
	case api.VMStopped, api.VMError:
	default:
		return api.Errorf(api.CodeConflict, "vm %q is %s", name, row.State).WithHint("wait for it to finish, then retry")
	}
	if err := s.setState(ctx, row, api.VMDeleting, "", api.VMStopped, api.VMError); err != nil {
		return err
	}
	crashpoint("delete:marked")
	return s.destroyLocked(context.WithoutCancel(ctx), row)
}

// destroyLocked kills whatever still runs for the VM, releases every
// resource it holds and deletes its row. It is the undo of Create and the
// end of Delete, and is safe to repeat after a crash.
func (s *Service) destroyLocked(ctx context.Context, row store.VM) error {
	if m := s.machine(row.ID); m != nil {
		s.setMachine(row.ID, nil)
		_ = m.Kill()
		<-m.Done()
		_ = m.Close()
	}
	s.deactivateAll(row.ID)
	if err := s.release(ctx, row.ID); err != nil {
		return err
	}
	// Paths derived from the id, in case a crash came between creating
	// one and recording it.
	killProcessesUsing(s.Layout.VMRunDir(row.ID))
	for _, dir := range []string{s.Layout.VMRunDir(row.ID), s.Layout.VMDir(row.ID)} {
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	crashpoint("delete:released")
	if err := s.Store.DeleteVM(ctx, row.ID); err != nil {
		return err
	}
	s.publish(row.Name, "vm.deleted", "")
	if s.OnStopped != nil {
		s.OnStopped(row.Name)
	}
	s.Log.Info("vm deleted", "vm", row.Name, "id", row.ID)
	return nil
}

// SSH returns how to reach a running VM.
func (s *Service) SSH(ctx context.Context, name string) (api.SSHInfo, error) {
	row, err := s.row(ctx, name)
	if err != nil {
		return api.SSHInfo{}, err
	}
	rt, err := decodeRuntime(row.Runtime)
	if err != nil {
		return api.SSHInfo{}, err
	}
	if row.State != string(api.VMRunning) || rt.Network.SSHPort == 0 {
		return api.SSHInfo{}, api.Errorf(api.CodeConflict, "vm %q is %s", name, row.State).WithHint("banger vm start " + name)
	}
	return api.SSHInfo{
		Name: name, User: "root", Host: rt.Network.SSHHost, Port: rt.Network.SSHPort,
		IdentityFile: s.Layout.SSHKey(), KnownHostsFile: s.Layout.KnownHosts(), HostKeyAlias: alias(name),
	}, nil
}

// ConsolePath returns the VM's console log file.
func (s *Service) ConsolePath(ctx context.Context, name string) (string, error) {
	row, err := s.row(ctx, name)
	if err != nil {
		return "", err
	}
	return consoleLogPath(s.Layout.VMDir(row.ID)), nil
}

// SSHTarget returns how the daemon itself reaches a running VM (exec, copy,
// sync), with the owner's key and the VM's pinned host keys.
func (s *Service) SSHTarget(ctx context.Context, name string) (guest.Target, error) {
	row, err := s.row(ctx, name)
	if err != nil {
		return guest.Target{}, err
	}
	rt, err := decodeRuntime(row.Runtime)
	if err != nil {
		return guest.Target{}, err
	}
	if row.State != string(api.VMRunning) || rt.Network.SSHPort == 0 {
		return guest.Target{}, api.Errorf(api.CodeConflict, "vm %q is %s", name, row.State).WithHint("banger vm start " + name)
	}
	return s.sshTarget(row, rt)
}
