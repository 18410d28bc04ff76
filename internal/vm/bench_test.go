package vm

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/vmm"
)

// instantDriver stands in for the VMM so that a benchmark measures banger's
// own work alone: Start spawns nothing and returns a machine at once.
type instantDriver struct{}

func (instantDriver) Kind() vmm.Kind { return vmm.QEMU }

func (instantDriver) Start(context.Context, vmm.Config, *slog.Logger) (vmm.Machine, error) {
	return &instantMachine{done: make(chan struct{})}, nil
}

func (instantDriver) Attach(context.Context, vmm.Handle, *slog.Logger) (vmm.Machine, error) {
	return nil, vmm.ErrGone
}

type instantMachine struct{ done chan struct{} }

func (m *instantMachine) Handle() vmm.Handle                          { return vmm.Handle{Kind: vmm.QEMU} }
func (m *instantMachine) Shutdown(context.Context) error              { m.stop(); return nil }
func (m *instantMachine) Kill() error                                 { m.stop(); return nil }
func (m *instantMachine) Pause(context.Context) error                 { return nil }
func (m *instantMachine) Resume(context.Context) error                { return nil }
func (m *instantMachine) State(context.Context) (vmm.RunState, error) { return vmm.Running, nil }
func (m *instantMachine) Done() <-chan struct{}                       { return m.done }
func (m *instantMachine) Exit() vmm.Exit                              { return vmm.Exit{GuestPoweroff: true} }
func (m *instantMachine) Close() error                                { return nil }

func (m *instantMachine) stop() {
	select {
	case <-m.done:
	default:
		close(m.done)
	}
}

// BenchmarkCreateOverhead measures banger's own part of `vm create`
// (validation, state, ledger, disk clone, host keys, identity, port) with
// the VMM process start and the guest's boot excluded: the driver returns
// at once. It reports the p50 and p99 of Create with NoWait.
func BenchmarkCreateOverhead(b *testing.B) {
	images := imagetest.NewService(b)
	imagetest.ImportDefault(b, images, image.DefaultImageName)
	svc := newService(b, images)
	svc.Drivers = map[vmm.Kind]vmm.Driver{vmm.QEMU: instantDriver{}}
	svc.Log = slog.New(slog.DiscardHandler)
	ctx := context.Background()
	svc.KVM(ctx) // the probe result is cached per daemon; take it out of the loop
	var ds []time.Duration
	b.ResetTimer()
	for i := range b.N {
		name := fmt.Sprintf("b%d", i)
		t0 := time.Now()
		if _, err := svc.Create(ctx, api.VMCreateRequest{Name: name, CPUs: 1, MemoryBytes: 512 * api.MiB, NoWait: true}, nil); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
		b.StopTimer()
		if err := svc.Delete(ctx, name, true); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds())/1000, "p99-ms")
}
