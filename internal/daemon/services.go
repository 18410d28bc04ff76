package daemon

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vm"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker"
	"github.com/bangerhq/banger/internal/vmm/qemu"
)

// services are the daemon's domain services, wired together.
type services struct {
	images *image.Service
	vms    *vm.Service
	guest  *guest.Service
}

func newServices(st *store.Store, layout paths.Layout, cfg config.Config, bus *events.Bus, log *slog.Logger) *services {
	images := &image.Service{Store: st, Layout: layout, Defaults: cfg.Image, Events: bus, Log: log.With("service", "image")}
	drivers := map[vmm.Kind]vmm.Driver{vmm.QEMU: qemu.New()}
	if p, err := exec.LookPath("firecracker"); err == nil {
		drivers[vmm.Firecracker] = &firecracker.Driver{Executable: p}
	}
	probe := &kvmProbe{cacheFile: filepath.Join(layout.CacheDir(), "kvm-probe.json"), log: log}
	vms := &vm.Service{
		Store: st, Layout: layout, Config: cfg,
		Images:  vm.ImageStore(images),
		Drivers: drivers,
		KVM:     probe.result,
		Limits:  vm.HostLimits(),
		Events:  bus,
		Log:     log.With("service", "vm"),
	}
	vms.Bridge = bridgeConfig(layout, cfg, log)
	gs := newGuestService(layout, cfg, vms, log.With("service", "guest"))
	// File sync runs once a VM created with waiting answers SSH; a VM that
	// stops or goes loses its pooled connections.
	vms.OnReady = gs.OnReady
	vms.OnStopped = gs.Stopped
	return &services{images: images, vms: vms, guest: gs}
}

// newGuestService wires exec and file sync: connections resolved through
// the VM service (the address changes per boot, the pinned keys do not),
// host paths confined to the owner's home, and each VM's sync manifest in
// its state directory, so it goes with the VM.
func newGuestService(layout paths.Layout, cfg config.Config, vms *vm.Service, log *slog.Logger) *guest.Service {
	gs := &guest.Service{
		Pool: &guest.Pool{Resolve: vms.SSHTarget, Log: log},
		ManifestPath: func(ctx context.Context, name string) (string, error) {
			v, err := vms.Get(ctx, name)
			if err != nil {
				return "", err
			}
			return filepath.Join(layout.VMDir(v.ID), "file-sync.json"), nil
		},
		Log: log,
	}
	for _, e := range cfg.FileSync {
		gs.Entries = append(gs.Entries, guest.SyncEntry{Host: e.Host, Guest: e.Guest})
	}
	home, err := guest.OwnerHome(layout.Mode == paths.SystemMode)
	if err == nil {
		gs.Home, err = guest.OpenHome(home)
	}
	if err != nil {
		gs.HomeErr = err
		if len(gs.Entries) > 0 {
			log.Warn("file sync is unavailable: cannot open the owner's home", "err", err)
		}
	}
	return gs
}

// bridgeConfig is bridge networking as configured; the VM service uses it
// whenever banger-helper answers on its socket. It is nil, and every VM
// gets user-mode networking, when [network] names a bridge or subnet the
// helper would refuse.
func bridgeConfig(layout paths.Layout, cfg config.Config, log *slog.Logger) *vm.BridgeConfig {
	sub, err := network.ParseSubnet(cfg.Network.Subnet)
	if err == nil {
		err = helperapi.ValidateBridgeName(cfg.Network.Bridge)
	}
	if err != nil {
		log.Error("bridge networking is off: banger-helper would refuse the [network] configuration", "err", err)
		return nil
	}
	sock := layout.HelperSocket()
	return &vm.BridgeConfig{
		Helper:   &helperapi.Client{Socket: sock},
		Bridge:   cfg.Network.Bridge,
		Subnet:   sub,
		DNSPort:  uint16(cfg.Network.DNSPort),
		OwnerUID: helperOwner(sock),
		// A system install's helper works in the daemon's state dir; a
		// user-mode daemon's is its own.
		SharedStateDir: layout.Mode == paths.SystemMode,
	}
}

// helperOwner is the uid taps are made for: the one owner the helper
// serves, whose uid its socket carries (the daemon's own, unless the daemon
// runs as root). Without a socket it is the daemon's uid.
func helperOwner(sock string) uint32 {
	var st syscall.Stat_t
	if err := syscall.Stat(sock, &st); err == nil && st.Uid != 0 {
		return st.Uid
	}
	return uint32(os.Getuid())
}

// kvmProbe runs the KVM probe once per daemon (its verdict is also cached
// on disk across restarts, keyed by kernel, QEMU and boot).
type kvmProbe struct {
	cacheFile string
	log       *slog.Logger
	once      sync.Once
	res       vmm.ProbeResult
}

func (p *kvmProbe) result(ctx context.Context) vmm.ProbeResult {
	p.once.Do(func() {
		p.res = vmm.ProbeKVM(context.WithoutCancel(ctx), vmm.ProbeOptions{CacheFile: p.cacheFile, Log: p.log})
		p.log.Info("kvm probe", "usable", p.res.Usable, "reason", p.res.Reason, "cached", p.res.Cached)
	})
	return p.res
}
