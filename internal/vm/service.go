// Package vm owns the VM lifecycle: validation, the state machine, create,
// start, stop, delete, supervision and reconciliation after a restart.
//
// States (store.VM.State, api.VMState):
//
//	creating ─▶ starting ─▶ running ─▶ stopping ─▶ stopped
//	    │           │          │                     │  ▲
//	    └─(fail: rolled back)  └───────▶ error ◀─────┘  │
//	                                       └─ start ────┘
//	any stable state ─▶ deleting ─▶ (row gone)
//
// Transitions are compare-and-set in the store, so concurrent requests on
// one VM cannot both win. Every host resource is recorded before it is
// created (ledger.go), which is what Reconcile relies on after a crash.
package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// Images is what the VM service needs of the image store.
type Images interface {
	// Ensure returns the image, building the default one on first use.
	Ensure(ctx context.Context, name string, progress func(api.Event)) (api.Image, error)
	// BootFiles returns the absolute paths of an image's files.
	BootFiles(ctx context.Context, name string) (BootFiles, error)
}

// BootFiles are an image's files on disk.
type BootFiles struct {
	Kernel  string // bzImage (QEMU)
	Vmlinux string // ELF (Firecracker)
	Initrd  string // may be empty
	Rootfs  string // ext4
}

// ProgressFunc receives progress of a long operation.
type ProgressFunc = func(api.Event)

// Service is the VM lifecycle.
type Service struct {
	Store   *store.Store
	Layout  paths.Layout
	Config  config.Config
	Images  Images
	Drivers map[vmm.Kind]vmm.Driver
	// KVM reports whether KVM guests really run here (a cached probe).
	KVM    func(ctx context.Context) vmm.ProbeResult
	Limits Limits
	Events *events.Bus
	Log    *slog.Logger
	// Snapshots, when set, lets disks be dm-snapshots through the helper.
	Snapshots image.SnapshotBackend
	// OnReady, when set, runs after a VM created with waiting answered SSH
	// (file sync). Its error is reported as a warning: the VM stays.
	OnReady func(ctx context.Context, name string, progress ProgressFunc) error
	// OnStopped, when set, runs after a VM's VMM exited or the VM was
	// deleted (to drop pooled SSH connections).
	OnStopped func(name string)
	// Bridge, when set, is bridge networking through banger-helper, used
	// for new VMs whenever the helper answers (EnableBridge); without it
	// VMs get QEMU's user-mode networking.
	Bridge *BridgeConfig

	mu       sync.Mutex // guards locks, machines, tcgNoted
	locks    map[string]*sync.Mutex
	machines map[string]vmm.Machine
	tcgNoted bool
	wg       sync.WaitGroup // supervisors

	listMu sync.Mutex // guards list
	list   listCache

	netMu     sync.Mutex // guards net and lastProbe
	net       *bridgeNet // bridge networking in use; nil in user mode
	lastProbe time.Time  // when the helper was last tried

	fwdMu sync.Mutex // guards fwds
	// fwds holds the forwards being served, per VM id and forward ref: a
	// relay in bridge mode, nil where QEMU serves the forward itself.
	fwds map[string]map[string]io.Closer
}

// listCache holds the VM list and its JSON encoding as of a store
// generation: `banger vm list` and the TUI ask often, the list rarely changes.
type listCache struct {
	gen  uint64
	ok   bool
	vms  []api.VM
	json []byte
}

// lock serialises operations on one VM; the returned func unlocks.
func (s *Service) lock(id string) func() {
	s.mu.Lock()
	if s.locks == nil {
		s.locks = map[string]*sync.Mutex{}
	}
	l, ok := s.locks[id]
	if !ok {
		l = &sync.Mutex{}
		s.locks[id] = l
	}
	s.mu.Unlock()
	l.Lock()
	return l.Unlock
}

func (s *Service) machine(id string) vmm.Machine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.machines[id]
}

func (s *Service) setMachine(id string, m vmm.Machine) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.machines == nil {
		s.machines = map[string]vmm.Machine{}
	}
	if m == nil {
		delete(s.machines, id)
	} else {
		s.machines[id] = m
	}
}

// Close detaches from running VMs without stopping them: they keep running
// and the next daemon re-attaches. The relays of bridge-mode port forwards
// and the DNS server stop with the daemon; the next one starts them again.
func (s *Service) Close() {
	s.mu.Lock()
	ms := s.machines
	s.machines = nil
	s.mu.Unlock()
	for _, m := range ms {
		_ = m.Close()
	}
	s.deactivateAll("")
	s.closeBridge()
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
	rows, err := s.Store.ListVMs(ctx)
	if err != nil {
		return listCache{}, err
	}
	vms := make([]api.VM, 0, len(rows))
	for _, r := range rows {
		v, err := toAPI(r)
		if err != nil {
			return listCache{}, err
		}
		vms = append(vms, v)
	}
	b, err := json.Marshal(vms)
	if err != nil {
		return listCache{}, err
	}
	s.list = listCache{gen: gen, ok: true, vms: vms, json: append(b, '\n')}
	return s.list, nil
}

// Get returns one VM.
func (s *Service) Get(ctx context.Context, name string) (api.VM, error) {
	r, err := s.row(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	return toAPI(r)
}

// row loads a VM by name, mapping "not found" to an API error with a hint.
func (s *Service) row(ctx context.Context, name string) (store.VM, error) {
	if err := ValidateName(name); err != nil {
		return store.VM{}, err
	}
	r, err := s.Store.GetVM(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return store.VM{}, api.Errorf(api.CodeNotFound, "no VM named %q", name).WithHint("banger vm list shows your VMs")
	}
	return r, err
}

func toAPI(r store.VM) (api.VM, error) {
	rt, err := decodeRuntime(r.Runtime)
	if err != nil {
		return api.VM{}, fmt.Errorf("vm %s: %w", r.Name, err)
	}
	rt.Network.Mode = r.NetMode
	vmmName := r.VMM
	if rt.VMM != "" {
		vmmName = string(rt.VMM)
		if rt.Accel == vmm.TCG {
			vmmName += "/tcg"
		}
		if rt.Jailed {
			vmmName += "/jailed" // set only while it runs
		}
	}
	return api.VM{
		ID: r.ID, Name: r.Name, Image: r.ImageName, VMM: vmmName,
		CPUs: r.CPUs, MemoryBytes: r.MemoryBytes, DiskBytes: r.DiskBytes,
		State: api.VMState(r.State), StateReason: r.StateReason,
		Network:   rt.Network,
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt,
	}, nil
}

// setState records a transition and publishes it.
func (s *Service) setState(ctx context.Context, r store.VM, state api.VMState, reason string, from ...api.VMState) error {
	fs := make([]string, len(from))
	for i, f := range from {
		fs[i] = string(f)
	}
	if err := s.Store.SetVMState(ctx, r.ID, string(state), reason, fs...); err != nil {
		if errors.Is(err, store.ErrStateConflict) {
			cur, _ := s.Store.GetVMByID(ctx, r.ID)
			return api.Errorf(api.CodeConflict, "vm %q is %s", r.Name, cur.State)
		}
		return err
	}
	s.publish(r.Name, "vm.state", string(state)+stateSuffix(reason))
	return nil
}

func stateSuffix(reason string) string {
	if reason == "" {
		return ""
	}
	return ": " + reason
}

func (s *Service) publish(name, typ, msg string) {
	if s.Events != nil {
		s.Events.Publish(api.Event{Type: typ, Kind: "vm", Name: name, Message: msg})
	}
}

// changeVM applies a batched state change and publishes a new state.
func (s *Service) changeVM(ctx context.Context, r store.VM, c store.VMChange) error {
	if err := s.Store.ChangeVM(ctx, r.ID, c); err != nil {
		if errors.Is(err, store.ErrStateConflict) {
			cur, _ := s.Store.GetVMByID(ctx, r.ID)
			return api.Errorf(api.CodeConflict, "vm %q is %s", r.Name, cur.State)
		}
		return err
	}
	if c.State != "" {
		s.publish(r.Name, "vm.state", c.State+stateSuffix(c.Reason))
	}
	return nil
}

func (s *Service) saveRuntime(ctx context.Context, id string, rt Runtime) error {
	return s.Store.SetVMRuntime(ctx, id, encodeRuntime(rt))
}
