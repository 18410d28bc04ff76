package vm

import (
	"context"
	"slices"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// supervise waits for the VMM to exit and records why, within moments of
// the exit: the driver's Done is pushed by the kernel (pidfd), not polled.
func (s *Service) supervise(row store.VM, m vmm.Machine) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		<-m.Done()
		unlock := s.lock(row.ID)
		defer unlock()
		if s.machine(row.ID) != m {
			return // a stop, kill or delete already handled this exit
		}
		s.handleExitLocked(context.Background(), row, m)
	}()
}

// handleExitLocked records a VMM's exit: stopped when the guest powered off
// or a stop was requested, error otherwise; and frees what a running VM
// holds (process, forwarded port or tap, runtime directory, relays).
func (s *Service) handleExitLocked(ctx context.Context, row store.VM, m vmm.Machine) {
	s.setMachine(row.ID, nil)
	s.deactivateAll(row.ID)
	exit := m.Exit()
	_ = m.Close()
	log := s.Log.With("vm", row.Name, "id", row.ID)
	cur, err := s.Store.GetVMByID(ctx, row.ID)
	if err != nil {
		log.Error("vmm exited; vm row unreadable", "err", err)
		return
	}
	state, reason := api.VMStopped, ""
	switch {
	case cur.State == string(api.VMStopping):
	case exit.GuestPoweroff:
		reason = "the guest powered off"
	default:
		state, reason = api.VMError, "the VMM exited unexpectedly: "+exit.Reason
	}
	if err := s.release(ctx, row.ID, runtimeKinds...); err != nil {
		log.Error("release runtime resources", "err", err)
	}
	if rt, err := decodeRuntime(cur.Runtime); err == nil {
		rt.clearProcess()
		_ = s.saveRuntime(ctx, row.ID, rt)
	}
	if !slices.Contains([]string{string(api.VMDeleting), string(api.VMCreating)}, cur.State) {
		_ = s.setState(ctx, row, state, reason)
	}
	log.Info("vmm exited", "state", state, "reason", reason, "code", exit.Code)
	if s.OnStopped != nil {
		s.OnStopped(row.Name)
	}
}
