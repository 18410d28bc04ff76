package vm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
)

// Reconcile runs when the daemon starts. VMs left mid-create or mid-delete
// are rolled back or finished; VMs that were running are re-attached (they
// kept running while the daemon was down, and get their port forwards
// served again; a jailed one with kills through banger-helper) or, if
// their VMM is gone, marked and cleaned up (a jail released with them);
// directories no row knows are removed, and so are the taps, loop devices,
// snapshots and jails the helper lists that no VM holds. After it, the
// store and the host agree.
func (s *Service) Reconcile(ctx context.Context) error {
	rows, err := s.Store.ListVMs(ctx)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	var errs []error
	for _, row := range rows {
		known[row.ID] = true
		if err := s.reconcileOne(ctx, row); err != nil {
			errs = append(errs, err)
		}
	}
	s.removeOrphans(known)
	if err := s.sweepOwned(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Service) reconcileOne(ctx context.Context, row store.VM) error {
	unlock := s.lock(row.ID)
	defer unlock()
	log := s.Log.With("vm", row.Name, "id", row.ID, "state", row.State)
	if rt, err := decodeRuntime(row.Runtime); err == nil && rt.Creating {
		log.Info("rolling back a create the previous daemon did not finish")
		return s.destroyLocked(ctx, row)
	}
	switch api.VMState(row.State) {
	case api.VMCreating, api.VMDeleting:
		log.Info("finishing an interrupted create or delete: removing the vm")
		return s.destroyLocked(ctx, row)
	case api.VMStarting, api.VMRunning, api.VMStopping:
		rt, err := decodeRuntime(row.Runtime)
		if err != nil {
			return err
		}
		if rt.Handle != nil {
			m, err := s.attach(ctx, row, rt, log)
			if err == nil {
				s.setMachine(row.ID, m)
				s.supervise(row, m)
				if row.State != string(api.VMStopping) {
					s.startForwards(ctx, row, rt, m, true, nil)
				}
				if row.State == string(api.VMStopping) {
					s.resumeStop(row, m)
				} else if row.State == string(api.VMStarting) {
					_ = s.setState(ctx, row, api.VMRunning, "", api.VMStarting)
				}
				log.Info("re-attached to running vm", "pid", rt.Handle.PID, "jailed", rt.Jailed)
				return nil
			}
			log.Info("vmm is gone", "err", err)
		}
		if err := s.release(ctx, row.ID, runtimeKinds...); err != nil {
			return err
		}
		killProcessesUsing(s.Layout.VMRunDir(row.ID))
		rt.clearProcess()
		if err := s.saveRuntime(ctx, row.ID, rt); err != nil {
			return err
		}
		if row.State == string(api.VMStopping) {
			return s.setState(ctx, row, api.VMStopped, "")
		}
		return s.setState(ctx, row, api.VMError, "the VMM exited while bangerd was not running")
	default: // stopped, error: nothing may run
		return s.release(ctx, row.ID, runtimeKinds...)
	}
}

// resumeStop finishes a graceful stop the previous daemon began.
func (s *Service) resumeStop(row store.VM, m interface {
	Shutdown(context.Context) error
	Kill() error
	Done() <-chan struct{}
}) {
	go func() {
		ctx := context.Background()
		_ = m.Shutdown(ctx)
		select {
		case <-m.Done():
		case <-time.After(time.Duration(s.Config.VM.StopTimeout)):
			_ = m.Kill()
		}
	}()
}

// removeOrphans deletes VM directories (and kills processes using runtime
// directories) that belong to no VM row.
func (s *Service) removeOrphans(known map[string]bool) {
	for _, base := range []string{s.Layout.VMsDir(), filepath.Dir(s.Layout.VMRunDir("x"))} {
		entries, err := os.ReadDir(base)
		if err != nil {
			continue
		}
		for _, e := range entries {
			if !e.IsDir() || known[e.Name()] {
				continue
			}
			dir := filepath.Join(base, e.Name())
			s.Log.Warn("removing orphaned vm directory", "dir", dir)
			killProcessesUsing(dir)
			_ = os.RemoveAll(dir)
		}
	}
}

// Wait blocks until every supervisor goroutine has returned (tests).
func (s *Service) Wait() { s.wg.Wait() }
