package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/google/go-cmp/cmp"
)

func TestMain(m *testing.M) {
	// vmm.Spawn starts the test binary itself as the console logger.
	vmm.ConsoleLoggerMain()
	code := m.Run()
	if fixtureDir != "" {
		_ = os.RemoveAll(fixtureDir)
	}
	os.Exit(code)
}

// Boots are bounded but generous: TCG on a loaded 2-core CI machine. The
// test guest reaches userspace in 2–10 s on the machines banger is built on.
const (
	bootTimeout = 3 * time.Minute
	exitTimeout = 2 * time.Minute
)

// guestInit is the test guest's /init script after the modules are loaded.
// The ACPI power button reaches userspace as an input event (button.ko +
// evdev.ko); busybox acpid maps it to PWRF and runs /etc/acpi/poweroff.
// acpid runs in the foreground (-d, logging to the console) because, as a
// daemon, it logs to /var/log/acpid.log and dies when it cannot open it.
// banger.test=poweroff|reboot on the kernel command line makes the guest
// end itself right away.
const guestInit = `
echo BANGER-INIT-UP
acpid -d -c /etc/acpi -a /etc/acpid.conf &
case " $(cat /proc/cmdline) " in
*" banger.test=poweroff "*) echo BANGER-POWERING-OFF; sync; poweroff -f ;;
*" banger.test=reboot "*) echo BANGER-REBOOTING; sync; reboot -f ;;
esac
for b in /sys/block/vd*; do
	[ -e "$b" ] && echo "disk ${b##*/} $(cat $b/size) $(cat $b/serial)"
done
if ip link set eth0 up 2>/dev/null; then
	ip link set lo up
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
	echo "nic eth0 $(cat /sys/class/net/eth0/address)"
fi
httpd -p 80 -h /www
echo BANGER-GUEST-READY
while :; do sleep 3600; done
`

var (
	fixtureMu  sync.Mutex
	fixtureDir string
	fixture    *testGuest
)

type testGuest struct{ kernel, initrd string }

// guest returns the Debian cloud kernel and a busybox initramfs running
// guestInit, built once per test binary.
func guest(t testing.TB) testGuest {
	t.Helper()
	testutil.SkipShort(t, "boots a QEMU guest")
	testutil.RequireCommand(t, DefaultExecutable)
	fixtureMu.Lock()
	defer fixtureMu.Unlock()
	if fixture != nil {
		return *fixture
	}
	kernel, modules := testutil.DebianKernel(t)
	busybox := testutil.Busybox(t)
	dir, err := os.MkdirTemp("", "banger-qemu-test-")
	if err != nil {
		t.Fatal(err)
	}
	fixtureDir = dir
	initrd := filepath.Join(dir, "initramfs.cpio.gz")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = testutil.WriteInitramfs(f, testutil.Initramfs{
		Busybox:    busybox,
		ModulesDir: modules,
		Modules:    append(append([]string{}, testutil.GuestModules...), "button", "evdev", "virtio-rng"),
		Script:     guestInit,
		Files: []testutil.InitramfsFile{
			{Path: "/etc/acpid.conf", Mode: 0o644, Data: []byte("PWRF poweroff\n")},
			{Path: "/etc/acpi/poweroff", Mode: 0o755, Data: []byte("#!/bin/sh\necho BANGER-POWER-BUTTON\nsync\npoweroff -f\n")},
			{Path: "/www/index.html", Mode: 0o644, Data: []byte("hello-from-guest\n")},
		},
	})
	if err == nil {
		err = f.Close()
	}
	if err != nil {
		t.Fatalf("build test initramfs: %v", err)
	}
	fixture = &testGuest{kernel: kernel, initrd: initrd}
	return *fixture
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// testConfig is a small TCG VM with its run dir and console log in a
// temporary directory.
func testConfig(t testing.TB, g testGuest, id string) vmm.Config {
	t.Helper()
	dir := t.TempDir()
	run := filepath.Join(dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	return vmm.Config{
		ID: id, CPUs: 1, MemoryMiB: 256,
		Kernel: g.kernel, Initrd: g.initrd,
		Cmdline:       "panic=-1",
		RunDir:        run,
		ConsoleLog:    filepath.Join(dir, "console.log"),
		ConsoleLogMax: 1 << 20,
		Accel:         vmm.TCG,
	}
}

func start(t *testing.T, cfg vmm.Config) *Machine {
	t.Helper()
	m, err := New().Start(t.Context(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("start: %v\nconsole:\n%s", err, tail(cfg.ConsoleLog))
	}
	qm := m.(*Machine)
	t.Cleanup(func() {
		_ = qm.Kill()
		select {
		case <-qm.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("qemu pid %d still running at cleanup", qm.Handle().PID)
		}
	})
	return qm
}

// waitConsole waits for marker in the console log, failing early when the
// VM ends.
func waitConsole(t *testing.T, m vmm.Machine, log, marker string) {
	t.Helper()
	deadline := time.After(bootTimeout)
	for {
		b, _ := os.ReadFile(log)
		if bytes.Contains(b, []byte(marker)) {
			return
		}
		select {
		case <-m.Done():
			b, _ := os.ReadFile(log)
			if bytes.Contains(b, []byte(marker)) {
				return
			}
			t.Fatalf("vm exited (%+v) before %q; console:\n%s", m.Exit(), marker, tail(log))
		case <-deadline:
			t.Fatalf("no %q on the console after %s; console:\n%s", marker, bootTimeout, tail(log))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func waitExit(t *testing.T, m vmm.Machine, log string, within time.Duration) vmm.Exit {
	t.Helper()
	select {
	case <-m.Done():
		return m.Exit()
	case <-time.After(within):
		t.Fatalf("vm still running %s later; console:\n%s", within, tail(log))
		return vmm.Exit{}
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port
}

// httpGet fetches the guest's index page through a forwarded port. slirp
// accepts the connection before the guest listens, so it retries until the
// page comes back.
func httpGet(t *testing.T, port int) string {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var last error
	deadline := time.Now().Add(bootTimeout)
	for time.Now().Before(deadline) {
		resp, err := client.Get(url)
		if err == nil {
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusOK {
				return string(b)
			}
			last = fmt.Errorf("status %s, read %w", resp.Status, err)
		} else {
			last = err
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("GET %s: %v", url, last)
	return ""
}

// The whole life of a VM through the driver: the guest boots with a raw and
// a qcow2 disk (paths with commas) and a user-mode NIC, its console lands in
// the capped log, QMP reports running/paused/running across Pause and
// Resume, a guest web server answers through a start-time forward and a
// forward added and removed at run time, and the ACPI power button powers
// the guest off, which Exit reports as a guest poweroff.
func TestLifecycle(t *testing.T) {
	g := guest(t)
	testutil.RequireCommand(t, "qemu-img")
	cfg := testConfig(t, g, "life")
	cfg.CPUs = 2
	dir := t.TempDir()
	cfg.RunDir = filepath.Join(dir, "run,dir")
	if err := os.Mkdir(cfg.RunDir, 0o700); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(dir, "data,1.raw")
	if err := os.WriteFile(raw, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(raw, 8<<20); err != nil {
		t.Fatal(err)
	}
	qcow := filepath.Join(dir, "scratch.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", qcow, "16M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	cfg.Disks = []vmm.Disk{{ID: "data1", Path: raw, Format: "raw"}, {ID: "scratch", Path: qcow, Format: "qcow2"}}
	bootPort, runPort := freePort(t), freePort(t)
	cfg.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:aa:bb:01", Forwards: []vmm.Forward{
		{Proto: "tcp", HostIP: "127.0.0.1", HostPort: bootPort, GuestPort: 80},
	}}}

	m := start(t, cfg)
	ctx := t.Context()
	waitConsole(t, m, cfg.ConsoleLog, "BANGER-GUEST-READY")
	console, _ := os.ReadFile(cfg.ConsoleLog)
	for _, want := range []string{"disk vda 16384 data1", "disk vdb 32768 scratch", "nic eth0 52:54:00:aa:bb:01", "Linux version"} {
		if !bytes.Contains(console, []byte(want)) {
			t.Errorf("console lacks %q", want)
		}
	}

	if h := m.Handle(); h.Kind != vmm.QEMU || h.ControlSocket != QMPSocket(cfg.RunDir) || h.PID <= 0 || h.StartTime == 0 {
		t.Errorf("handle %+v", h)
	}
	for _, step := range []struct {
		do   func(context.Context) error
		want vmm.RunState
	}{
		{nil, vmm.Running},
		{m.Pause, vmm.Paused},
		{m.Resume, vmm.Running},
	} {
		if step.do != nil {
			if err := step.do(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if st, err := m.State(ctx); err != nil || st != step.want {
			t.Fatalf("state %q, %v; want %q", st, err, step.want)
		}
	}

	if got := httpGet(t, bootPort); got != "hello-from-guest\n" {
		t.Errorf("page through the start-time forward: %q", got)
	}
	runFwd := vmm.Forward{Proto: "tcp", HostIP: "127.0.0.1", HostPort: runPort, GuestPort: 80}
	if err := m.AddHostForward(ctx, "eth0", runFwd); err != nil {
		t.Fatal(err)
	}
	if got := httpGet(t, runPort); got != "hello-from-guest\n" {
		t.Errorf("page through the run-time forward: %q", got)
	}
	if err := m.RemoveHostForward(ctx, "eth0", runFwd); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", runPort), 2*time.Second); err == nil {
		_ = c.Close()
		t.Error("removed forward still accepts connections")
	}
	if err := m.RemoveHostForward(ctx, "eth0", runFwd); !errors.Is(err, ErrNoSuchForward) {
		t.Errorf("second removal: %v, want ErrNoSuchForward", err)
	}

	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	exit := waitExit(t, m, cfg.ConsoleLog, exitTimeout)
	if diff := cmp.Diff(vmm.Exit{GuestPoweroff: true, Code: 0, Reason: ReasonPoweroffButton}, exit); diff != "" {
		t.Errorf("exit (-want +got):\n%s\nconsole:\n%s", diff, tail(cfg.ConsoleLog))
	}
	if _, err := os.Stat(QMPSocket(cfg.RunDir)); !os.IsNotExist(err) {
		t.Errorf("qmp socket left behind: %v", err)
	}
	if _, err := m.State(ctx); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("State after exit: %v, want ErrGone", err)
	}
	if err := m.Shutdown(ctx); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Shutdown after exit: %v, want ErrGone", err)
	}
	if err := m.Kill(); err != nil {
		t.Errorf("Kill after exit: %v", err)
	}
	if st, err := os.Stat(cfg.ConsoleLog); err != nil || st.Size() > cfg.ConsoleLogMax {
		t.Errorf("console log: %v, size over the cap", err)
	}
}

// However QEMU ends without the guest's say (Kill, a SIGKILL or SIGTERM from
// elsewhere), Done closes within a second of the signal and Exit does not
// call it a poweroff.
func TestKilledIsNotAPoweroff(t *testing.T) {
	g := guest(t)
	tests := []struct {
		name string
		kill func(m *Machine) error
		want vmm.Exit
	}{
		{"Kill", func(m *Machine) error { return m.Kill() }, vmm.Exit{Code: 137, Reason: ReasonKilled}},
		{"external SIGKILL", func(m *Machine) error { return syscall.Kill(m.Handle().PID, syscall.SIGKILL) },
			vmm.Exit{Code: 137, Reason: "qemu killed by signal 9 (killed)"}},
		{"external SIGTERM", func(m *Machine) error { return syscall.Kill(m.Handle().PID, syscall.SIGTERM) },
			vmm.Exit{Code: 0, Reason: "qemu ended by a signal"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, g, "kill")
			m := start(t, cfg)
			if err := tt.kill(m); err != nil {
				t.Fatal(err)
			}
			signalled := time.Now()
			exit := waitExit(t, m, cfg.ConsoleLog, 10*time.Second)
			if took := time.Since(signalled); took > time.Second {
				t.Errorf("Done closed %s after the signal, want within 1s", took)
			}
			if diff := cmp.Diff(tt.want, exit); diff != "" {
				t.Errorf("exit (-want +got):\n%s", diff)
			}
			if _, err := vmm.Find(m.Handle().PID, m.Handle().StartTime); !errors.Is(err, vmm.ErrGone) {
				t.Errorf("process still there: %v", err)
			}
			if _, err := os.Stat(QMPSocket(cfg.RunDir)); !os.IsNotExist(err) {
				t.Errorf("qmp socket left behind: %v", err)
			}
		})
	}
}

// A guest that powers itself off is a poweroff; a guest that reboots ends
// the VM (-no-reboot) and is reported as a reboot, not a poweroff.
func TestGuestInitiatedExit(t *testing.T) {
	g := guest(t)
	tests := []struct {
		param string
		want  vmm.Exit
	}{
		{"poweroff", vmm.Exit{GuestPoweroff: true, Code: 0, Reason: ReasonPoweroff}},
		{"reboot", vmm.Exit{GuestPoweroff: false, Code: 0, Reason: ReasonReboot}},
	}
	for _, tt := range tests {
		t.Run(tt.param, func(t *testing.T) {
			cfg := testConfig(t, g, tt.param)
			cfg.Cmdline += " banger.test=" + tt.param
			m := start(t, cfg)
			exit := waitExit(t, m, cfg.ConsoleLog, bootTimeout)
			if diff := cmp.Diff(tt.want, exit); diff != "" {
				t.Errorf("exit (-want +got):\n%s\nconsole:\n%s", diff, tail(cfg.ConsoleLog))
			}
		})
	}
}

// A restarted daemon re-attaches to the running QEMU from its Handle alone,
// controls it, and still tells the guest's poweroff from a kill although it
// is not QEMU's parent. A wrong start time or a dead process is ErrGone.
func TestAttachAfterDaemonRestart(t *testing.T) {
	g := guest(t)
	cfg := testConfig(t, g, "attach")
	first := start(t, cfg)
	waitConsole(t, first, cfg.ConsoleLog, "BANGER-GUEST-READY")
	h := first.Handle()
	// The daemon dies: its QMP connection goes, QEMU stays.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}

	ctx := t.Context()
	log := testLogger(t)
	stale := h
	stale.StartTime++
	if _, err := New().Attach(ctx, stale, log); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("attach with a recycled pid's start time: %v, want ErrGone", err)
	}
	other := h
	other.ControlSocket = filepath.Join(t.TempDir(), "qmp.sock")
	if _, err := New().Attach(ctx, other, log); err == nil || !strings.Contains(err.Error(), "does not serve") {
		t.Errorf("attach naming another socket: %v", err)
	}

	mm, err := New().Attach(ctx, h, log)
	if err != nil {
		t.Fatal(err)
	}
	m := mm.(*Machine)
	if diff := cmp.Diff(h, m.Handle()); diff != "" {
		t.Errorf("handle after attach (-want +got):\n%s", diff)
	}
	if st, err := m.State(ctx); err != nil || st != vmm.Running {
		t.Fatalf("state after attach: %q, %v", st, err)
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	exit := waitExit(t, m, cfg.ConsoleLog, exitTimeout)
	if diff := cmp.Diff(vmm.Exit{GuestPoweroff: true, Code: -1, Reason: ReasonPoweroffButton}, exit); diff != "" {
		t.Errorf("exit seen by the re-attached daemon (-want +got):\n%s", diff)
	}
	if _, err := New().Attach(ctx, h, log); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("attach after exit: %v, want ErrGone", err)
	}
}

// A failed start explains itself with QEMU's own words and leaves no
// process and no socket behind, including when QEMU never opens QMP.
func TestStartFailureLeavesNothing(t *testing.T) {
	g := guest(t)
	notQcow := filepath.Join(t.TempDir(), "root.img")
	if err := os.WriteFile(notQcow, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	silent := filepath.Join(t.TempDir(), "silent-qemu")
	if err := os.WriteFile(silent, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cfg     func(*vmm.Config)
		timeout time.Duration
		want    string
	}{
		{"qemu rejects the disk", func(c *vmm.Config) {
			c.Disks = []vmm.Disk{{ID: "root", Path: notQcow, Format: "qcow2"}}
		}, 0, "qcow2"},
		{"missing kernel", func(c *vmm.Config) { c.Kernel = "/nonexistent/vmlinuz" }, 0, "no such file"},
		{"missing executable", func(c *vmm.Config) { c.Executable = "/nonexistent/qemu" }, 0, "/nonexistent/qemu"},
		{"qmp never comes", func(c *vmm.Config) { c.Executable = silent }, 500 * time.Millisecond, "wait for qmp socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, g, "fail")
			tt.cfg(&cfg)
			d := &Driver{StartTimeout: tt.timeout}
			m, err := d.Start(t.Context(), cfg, testLogger(t))
			if err == nil {
				_ = m.Kill()
				t.Fatal("start succeeded")
			}
			t.Logf("start error: %v", err)
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			if pids := processesUsing(cfg.RunDir); len(pids) > 0 {
				t.Errorf("processes left running: %v", pids)
			}
			if _, err := os.Stat(QMPSocket(cfg.RunDir)); !os.IsNotExist(err) {
				t.Errorf("qmp socket left behind: %v", err)
			}
		})
	}
}

// processesUsing lists live processes whose command line mentions s.
func processesUsing(s string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, []byte(s)) {
			continue
		}
		if _, err := vmm.ProcStartTime(pid); err == nil { // not a zombie
			pids = append(pids, pid)
		}
	}
	return pids
}

// The KVM probe's verdict agrees with a real boot: when it says KVM guests
// run, the test guest boots under QEMU+KVM through the driver; when it says
// they do not, the same boot fails or never reaches userspace.
func TestProbeAgreesWithKVMBoot(t *testing.T) {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm on this host")
	}
	g := guest(t)
	probe := vmm.ProbeKVM(t.Context(), vmm.ProbeOptions{})
	t.Logf("%s", probe.Explain())
	cfg := testConfig(t, g, "kvm")
	cfg.Accel = vmm.KVM
	m, err := New().Start(t.Context(), cfg, testLogger(t))
	if err != nil {
		if probe.Usable {
			t.Fatalf("the probe says KVM works, but a KVM start failed: %v", err)
		}
		t.Logf("KVM start failed as the probe predicted: %v", err)
		return
	}
	defer func() { _ = m.Kill(); <-m.Done() }()
	if probe.Usable {
		waitConsole(t, m, cfg.ConsoleLog, "BANGER-INIT-UP")
		return
	}
	// Not usable: the guest must not reach userspace in a time that TCG
	// easily makes (its boot to userspace takes a few seconds).
	limit := 30 * time.Second
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(cfg.ConsoleLog)
		if bytes.Contains(b, []byte("BANGER-INIT-UP")) {
			t.Fatalf("the probe says KVM does not work (%s), yet a KVM guest reached userspace", probe.Reason)
		}
		select {
		case <-m.Done():
			t.Logf("KVM guest ended as the probe predicted: %+v", m.Exit())
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Logf("KVM guest did not reach userspace in %s, as the probe predicted", limit)
}

// BenchmarkStartToQMPReady measures Driver.Start (spawn through the console
// logger, QMP handshake, query-status) against a hand-written QEMU command
// line for the same kernel and initramfs that does the same handshake by
// hand, in the same run, and reports their ratio.
func BenchmarkStartToQMPReady(b *testing.B) {
	g := guest(b)
	log := slog.New(slog.DiscardHandler)
	DetectHost() // once per process; not part of a start
	var driverTotal, handTotal time.Duration
	for i := 0; b.Loop(); i++ {
		cfg := testConfig(b, g, "bench")
		t0 := time.Now()
		m, err := New().Start(b.Context(), cfg, log)
		if err != nil {
			b.Fatal(err)
		}
		driverTotal += time.Since(t0)
		_ = m.Kill()
		<-m.Done()

		dir := b.TempDir()
		sock := filepath.Join(dir, "qmp.sock")
		t0 = time.Now()
		cmd := exec.Command(DefaultExecutable, "-M", "microvm", "-accel", "tcg", "-cpu", "max",
			"-m", "256", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
			"-serial", "file:"+filepath.Join(dir, "console.log"),
			"-kernel", g.kernel, "-initrd", g.initrd, "-append", "console=ttyS0 panic=-1",
			"-qmp", "unix:"+sock+",server=on,wait=off")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		if err := handQMPReady(sock); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			b.Fatal(err)
		}
		handTotal += time.Since(t0)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	n := float64(b.N)
	b.ReportMetric(float64(driverTotal.Milliseconds())/n, "driver-ms/op")
	b.ReportMetric(float64(handTotal.Milliseconds())/n, "hand-ms/op")
	b.ReportMetric(float64(driverTotal)/float64(handTotal), "driver/hand")
}

// handQMPReady is the minimal hand-rolled equivalent of Start's readiness
// check: connect, greeting, qmp_capabilities, query-status.
func handQMPReady(sock string) error {
	deadline := time.Now().Add(30 * time.Second)
	var conn net.Conn
	var err error
	for {
		conn, err = net.Dial("unix", sock)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
	defer func() { _ = conn.Close() }()
	r := bufio.NewReader(conn)
	if _, err := r.ReadString('\n'); err != nil {
		return err
	}
	for _, cmd := range []string{`{"execute":"qmp_capabilities"}`, `{"execute":"query-status"}`} {
		if _, err := conn.Write([]byte(cmd + "\n")); err != nil {
			return err
		}
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return err
			}
			if strings.Contains(line, `"return"`) {
				break
			}
		}
	}
	return nil
}
