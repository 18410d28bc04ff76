package vm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/qemu"
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

// BenchmarkCreateToCommand boots the same image two ways in one run and
// reports the ratio of their medians: banger (`vm create`, waiting for SSH,
// then one command) against a hand-written QEMU command line (the one in
// ../shared/reference/guest-boot.md, plus the same identity seed) polled
// over SSH until the same command runs. Under TCG a boot takes a minute or
// more on a busy two-core machine: run it with -benchtime 2x or so.
func BenchmarkCreateToCommand(b *testing.B) {
	images := imagetest.NewService(b)
	imagetest.ImportDefault(b, images, image.DefaultImageName)
	svc := newService(b, images)
	svc.Log = slog.New(slog.DiscardHandler)
	ctx := context.Background()
	b.Cleanup(func() {
		vms, _ := svc.List(ctx)
		for _, v := range vms {
			_ = svc.Delete(ctx, v.Name, true)
		}
	})
	files, err := svc.Images.BootFiles(ctx, image.DefaultImageName)
	if err != nil {
		b.Fatal(err)
	}
	// The raw peer boots a disk banger prepared (created, never started),
	// as a throwaway snapshot each time.
	if _, err := svc.Create(ctx, api.VMCreateRequest{Name: "peer", CPUs: 1, MemoryBytes: 512 * api.MiB, NoStart: true}, nil); err != nil {
		b.Fatal(err)
	}
	peer, _ := svc.Store.GetVM(ctx, "peer")
	prt, _ := decodeRuntime(peer.Runtime)
	runTrue := func(target guest.Target) error {
		c, err := guest.Dial(ctx, target)
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }()
		sess, err := c.NewSession()
		if err != nil {
			return err
		}
		defer func() { _ = sess.Close() }()
		return sess.Run("true")
	}
	var bangerDs, rawDs []time.Duration
	for i := range b.N {
		name := fmt.Sprintf("c%d", i)
		t0 := time.Now()
		if _, err := svc.Create(ctx, api.VMCreateRequest{Name: name, CPUs: 1, MemoryBytes: 512 * api.MiB}, nil); err != nil {
			b.Fatal(err)
		}
		target, err := svc.SSHTarget(ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		if err := runTrue(target); err != nil {
			b.Fatal(err)
		}
		bangerDs = append(bangerDs, time.Since(t0))
		_ = svc.Delete(ctx, name, true)

		d, err := rawBoot(ctx, files, peer.ID, prt, func(port int) error {
			t := target
			t.Addr, t.Alias = fmt.Sprintf("127.0.0.1:%d", port), alias("peer")
			hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			c, err := guest.Dial(hctx, t)
			if err != nil {
				return err
			}
			_ = c.Close()
			return runTrue(t)
		})
		if err != nil {
			b.Fatal(err)
		}
		rawDs = append(rawDs, d)
	}
	slices.Sort(bangerDs)
	slices.Sort(rawDs)
	bm, rm := bangerDs[len(bangerDs)/2], rawDs[len(rawDs)/2]
	b.ReportMetric(bm.Seconds(), "banger-s")
	b.ReportMetric(rm.Seconds(), "raw-qemu-s")
	b.ReportMetric(float64(bm)/float64(rm), "banger/raw")
}

// rawBoot runs QEMU by hand on a snapshot of the peer's disk and its seed,
// polls ready until it succeeds, and returns the time to that point. The
// guest finds its seed disk by the serial and configures the NIC that has
// its MAC, as under banger.
func rawBoot(ctx context.Context, files BootFiles, id string, rt Runtime, ready func(port int) error) (time.Duration, error) {
	port, err := freePort()
	if err != nil {
		return 0, err
	}
	console, err := os.CreateTemp("", "banger-raw-console-")
	if err != nil {
		return 0, err
	}
	defer func() { _ = os.Remove(console.Name()) }()
	defer console.Close()
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-M", "microvm", "-m", "512", "-smp", "1",
		"-nographic", "-no-reboot", "-kernel", files.Kernel, "-initrd", files.Initrd,
		"-append", "console=ttyS0 root=/dev/vda rw panic=-1 systemd.hostname=peer systemd.machine_id="+rt.MachineID+" "+tscArg(),
		"-drive", "id=root,file="+rt.Disk.Path+",format=qcow2,if=none,snapshot=on", "-device", "virtio-blk-device,drive=root,serial=root",
		"-drive", "id=seed,file="+rt.Seed+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=seed,serial=seed",
		"-netdev", fmt.Sprintf("user,id=n0,hostfwd=tcp:127.0.0.1:%d-:22", port), "-device", "virtio-net-device,netdev=n0,mac="+network.MAC(id).String(),
		"-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0")
	cmd.Stdout, cmd.Stderr = console, console
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	deadline := time.Now().Add(ReadyTimeout)
	for {
		if err := ready(port); err == nil {
			return time.Since(t0), nil
		} else if time.Now().After(deadline) {
			out, _ := os.ReadFile(console.Name())
			return 0, fmt.Errorf("raw qemu never answered: %w; console ends:\n%s", err, out[max(0, len(out)-3000):])
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// tscArg is what the QEMU driver adds under TCG so the guest's early timer
// calibration does not hang on a loaded host; the peer gets it too.
func tscArg() string {
	h := qemu.DetectHost()
	if h.TSCkHz <= 0 {
		return ""
	}
	return fmt.Sprintf("tsc_early_khz=%d", h.TSCkHz)
}

// BenchmarkParallelCreates starts 8 creates at once and reports the p50 and
// p99 of their latency to a running VMM (NoWait: eight emulated guests
// booting to SSH on two cores measure the host, not banger).
func BenchmarkParallelCreates(b *testing.B) {
	images := imagetest.NewService(b)
	imagetest.ImportDefault(b, images, image.DefaultImageName)
	svc := newService(b, images)
	svc.Log = slog.New(slog.DiscardHandler)
	ctx := context.Background()
	svc.KVM(ctx)
	var ds []time.Duration
	var mu sync.Mutex
	for i := range b.N {
		var wg sync.WaitGroup
		for j := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				_, err := svc.Create(ctx, api.VMCreateRequest{Name: fmt.Sprintf("p%d-%d", i, j), CPUs: 1, MemoryBytes: 256 * api.MiB, NoWait: true}, nil)
				if err != nil {
					b.Error(err)
					return
				}
				mu.Lock()
				ds = append(ds, time.Since(t0))
				mu.Unlock()
			}()
		}
		wg.Wait()
		b.StopTimer()
		vms, _ := svc.List(ctx)
		for _, v := range vms {
			_ = svc.Delete(ctx, v.Name, true)
		}
		b.StartTimer()
	}
	slices.Sort(ds)
	if len(ds) == 0 {
		b.Fatal("no create finished")
	}
	b.ReportMetric(float64(ds[len(ds)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(ds[len(ds)*99/100].Milliseconds()), "p99-ms")
}
