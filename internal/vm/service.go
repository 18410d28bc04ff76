// Package vm owns the VM lifecycle: validation, the state machine, create,
// start, stop, delete, supervision and reconciliation after a restart.
package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
)

// Service is the VM lifecycle, backed by the store.
type Service struct {
	Store *store.Store
	Log   *slog.Logger
}

// Runtime is the observed part of a VM kept in the vms.runtime column.
type Runtime struct {
	Network api.VMNetwork `json:"network"`
}

// List returns every VM as the API shows it.
func (s *Service) List(ctx context.Context) ([]api.VM, error) {
	rows, err := s.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.VM, 0, len(rows))
	for _, r := range rows {
		v, err := toAPI(r)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

func toAPI(r store.VM) (api.VM, error) {
	var rt Runtime
	if len(r.Runtime) > 0 {
		if err := json.Unmarshal(r.Runtime, &rt); err != nil {
			return api.VM{}, fmt.Errorf("vm %s: decode runtime: %w", r.Name, err)
		}
	}
	rt.Network.Mode = r.NetMode
	return api.VM{
		ID: r.ID, Name: r.Name, Image: r.ImageName, VMM: r.VMM,
		CPUs: r.CPUs, MemoryBytes: r.MemoryBytes, DiskBytes: r.DiskBytes,
		State: api.VMState(r.State), StateReason: r.StateReason,
		Network:   rt.Network,
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt,
	}, nil
}
