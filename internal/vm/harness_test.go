package vm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
	"github.com/bangerhq/banger/internal/vmm/qemu"
)

// The test binary also serves as the VMM console logger (vmm.Spawn re-execs
// the running executable for it), as a fake Firecracker (fcfake, when its
// environment says so) and as the fake jailer (when run under its name).
func TestMain(m *testing.M) {
	vmm.ConsoleLoggerMain()
	fcfake.JailerMain() // a copy named "jailer" (jail_test.go)
	fcfake.Main()
	code := m.Run()
	if jailBins.dir != "" {
		_ = os.RemoveAll(jailBins.dir)
	}
	os.Exit(code)
}

// env is a VM service over a real store, a real imported default image and
// the real QEMU driver.
type env struct {
	svc    *Service
	images *image.Service
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newService builds a VM service over images without importing anything.
func newService(t testing.TB, images *image.Service) *Service {
	t.Helper()
	cfg := config.Default()
	cfg.VM.StopTimeout = config.Duration(60 * time.Second)
	probe := sync.OnceValue(func() vmm.ProbeResult {
		return vmm.ProbeKVM(context.Background(), vmm.ProbeOptions{CacheFile: filepath.Join(testutil.TestCacheDir(t), "kvm-probe.json")})
	})
	return &Service{
		Store:   images.Store,
		Layout:  images.Layout,
		Config:  cfg,
		Images:  ImageStore(images),
		Drivers: map[vmm.Kind]vmm.Driver{vmm.QEMU: qemu.New()},
		// Like the daemon, probe once per service.
		KVM:    func(context.Context) vmm.ProbeResult { return probe() },
		Limits: HostLimits(),
		Events: &events.Bus{},
		Log:    testLogger(t),
	}
}

// newEnv needs QEMU and the cached default image; it skips under -short.
func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.SkipShort(t, "boots real VMs")
	testutil.RequireCommand(t, "qemu-system-x86_64", "qemu-img")
	images := imagetest.NewService(t)
	imagetest.ImportDefault(t, images, image.DefaultImageName)
	e := &env{svc: newService(t, images), images: images}
	t.Cleanup(func() {
		vms, _ := e.svc.List(context.Background())
		for _, v := range vms {
			_ = e.svc.Delete(context.Background(), v.Name, true)
		}
		e.svc.Close()
	})
	return e
}

func (e *env) create(t *testing.T, name string, mod ...func(*api.VMCreateRequest)) api.VM {
	t.Helper()
	req := api.VMCreateRequest{Name: name, CPUs: 1, MemoryBytes: 512 * api.MiB}
	for _, m := range mod {
		m(&req)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	t0 := time.Now()
	v, err := e.svc.Create(ctx, req, func(ev api.Event) {
		if ev.Message != "" {
			t.Logf("%s: %s", name, ev.Message)
		}
	})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	t.Logf("created %s in %s", name, time.Since(t0).Round(time.Millisecond))
	return v
}

// run executes a shell command in the VM over SSH with the pinned key.
func (e *env) run(t *testing.T, name, cmd string) string {
	t.Helper()
	out, err := e.tryRun(name, cmd)
	if err != nil {
		t.Fatalf("run %q in %s: %v\n%s", cmd, name, err, out)
	}
	return out
}

func (e *env) tryRun(name, cmd string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	row, err := e.svc.row(ctx, name)
	if err != nil {
		return "", err
	}
	rt, err := decodeRuntime(row.Runtime)
	if err != nil {
		return "", err
	}
	target, err := e.svc.sshTarget(row, rt)
	if err != nil {
		return "", err
	}
	c, err := guest.Dial(ctx, target)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.Close() }()
	sess, err := c.NewSession()
	if err != nil {
		return "", err
	}
	defer func() { _ = sess.Close() }()
	out, err := sess.CombinedOutput(cmd)
	return string(out), err
}

// leftovers lists what of a VM remains on the host and in the store.
func (e *env) leftovers(t *testing.T, id string, pid int) []string {
	t.Helper()
	var left []string
	if pid > 0 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			if st, _ := vmm.ProcStartTime(pid); st != 0 {
				left = append(left, fmt.Sprintf("process %d", pid))
			}
		}
	}
	for _, dir := range []string{e.svc.Layout.VMDir(id), e.svc.Layout.VMRunDir(id)} {
		if _, err := os.Stat(dir); err == nil {
			left = append(left, "dir "+dir)
		}
	}
	if _, err := e.svc.Store.GetVMByID(context.Background(), id); err == nil {
		left = append(left, "vm row")
	}
	if rs, _ := e.svc.Store.ListResources(context.Background(), id); len(rs) > 0 {
		left = append(left, fmt.Sprintf("%d resource rows", len(rs)))
	}
	if kh, err := os.ReadFile(e.svc.Layout.KnownHosts()); err == nil {
		for _, line := range strings.Split(string(kh), "\n") {
			if strings.Contains(line, ".banger ") && strings.Contains(line, id) {
				left = append(left, "known_hosts entry")
			}
		}
	}
	return left
}
