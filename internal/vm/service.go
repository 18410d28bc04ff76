// Package vm owns the VM lifecycle: validation, the state machine, create,
// start, stop, delete, supervision and reconciliation after a restart.
package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
)

// Service is the VM lifecycle, backed by the store.
type Service struct {
	Store *store.Store
	Log   *slog.Logger

	listMu sync.Mutex // guards list
	list   listCache
}

// listCache holds the VM list and its JSON encoding as of a store
// generation: `banger vm list` and the TUI ask often, the list rarely changes.
type listCache struct {
	gen  uint64
	ok   bool
	vms  []api.VM
	json []byte
}

// Runtime is the observed part of a VM kept in the vms.runtime column.
type Runtime struct {
	Network api.VMNetwork `json:"network"`
}

// List returns every VM as the API shows it.
func (s *Service) List(ctx context.Context) ([]api.VM, error) {
	c, err := s.cachedList(ctx)
	return c.vms, err
}

// ListJSON returns List encoded as a JSON array.
func (s *Service) ListJSON(ctx context.Context) ([]byte, error) {
	c, err := s.cachedList(ctx)
	return c.json, err
}

func (s *Service) cachedList(ctx context.Context) (listCache, error) {
	s.listMu.Lock()
	defer s.listMu.Unlock()
	gen := s.Store.Generation()
	if s.list.ok && s.list.gen == gen {
		return s.list, nil
	}
	vms, err := s.load(ctx)
	if err != nil {
		return listCache{}, err
	}
	b, err := json.Marshal(vms)
	if err != nil {
		return listCache{}, err
	}
	s.list = listCache{gen: gen, ok: true, vms: vms, json: append(b, '\n')}
	return s.list, nil
}

func (s *Service) load(ctx context.Context) ([]api.VM, error) {
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
