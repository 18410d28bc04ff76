package daemon

import (
	"context"
	"log/slog"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/image"
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
	return &services{images: images, vms: vms}
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
