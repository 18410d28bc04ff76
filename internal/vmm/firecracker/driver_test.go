package firecracker

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// reap kills m when the test ends and waits for its exit, so the
// machine's last log line lands before the test is over.
func reap(t *testing.T, m vmm.Machine) {
	t.Cleanup(func() {
		_ = m.Kill()
		select {
		case <-m.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("pid %d survived SIGKILL", m.Handle().PID)
		}
	})
}

func waitDone(t *testing.T, m vmm.Machine, within time.Duration, what string) {
	t.Helper()
	select {
	case <-m.Done():
	case <-time.After(within):
		t.Fatalf("%s: process still running after %s", what, within)
	}
}

func assertGone(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still exists after the process ended (err %v)", p, err)
		}
	}
}

// Start boots the fake of every supported version end to end (spawn,
// socket wait, configuration, InstanceStart), pause and resume reach the
// VM, and Ctrl-Alt-Del ends it as a guest power-off with its sockets
// removed.
func TestStartPauseResumeShutdown(t *testing.T) {
	for _, version := range fcfake.Versions() {
		t.Run(version, func(t *testing.T) {
			d := fakeDriver(t, version)
			dir := shortDir(t)
			cfg := testConfig(t, dir)
			m, err := d.Start(t.Context(), cfg, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			reap(t, m)
			fm := m.(*Machine)
			if got := fm.Client().Capabilities().Version.String(); got != version {
				t.Errorf("negotiated version %s, want %s", got, version)
			}
			if h := m.Handle(); h.Kind != vmm.Firecracker || h.PID <= 0 || h.StartTime == 0 || h.ControlSocket != filepath.Join(dir, SocketName) {
				t.Errorf("handle %+v", h)
			}
			steps := []struct {
				name string
				do   func(context.Context) error
				want vmm.RunState
			}{
				{"after start", nil, vmm.Running},
				{"pause", m.Pause, vmm.Paused},
				{"pause again (no-op)", m.Pause, vmm.Paused},
				{"resume", m.Resume, vmm.Running},
			}
			for _, s := range steps {
				if s.do != nil {
					if err := s.do(t.Context()); err != nil {
						t.Fatalf("%s: %v", s.name, err)
					}
				}
				got, err := m.State(t.Context())
				if err != nil || got != s.want {
					t.Fatalf("%s: state %q, %v; want %q", s.name, got, err, s.want)
				}
			}
			// The vsock device is bound by Firecracker at PUT time.
			if fi, err := os.Lstat(cfg.Vsock.Path); err != nil || fi.Mode().Type() != fs.ModeSocket {
				t.Errorf("vsock socket %s not bound: %v", cfg.Vsock.Path, err)
			}
			if err := m.Shutdown(t.Context()); err != nil {
				t.Fatal(err)
			}
			waitDone(t, m, 10*time.Second, "after ctrl-alt-del")
			if ex := m.Exit(); !ex.GuestPoweroff || ex.Code != 0 {
				t.Errorf("exit %+v, want a guest power-off with code 0", ex)
			}
			assertGone(t, filepath.Join(dir, SocketName), cfg.Vsock.Path)
			if _, err := m.State(t.Context()); !errors.Is(err, vmm.ErrGone) {
				t.Errorf("State after exit: %v, want ErrGone", err)
			}
			// Firecracker's own log went to the file the driver created;
			// the serial console went to the console log.
			logb, _ := os.ReadFile(filepath.Join(dir, LogName))
			if !strings.Contains(string(logb), "Firecracker exiting successfully. exit_code=0") {
				t.Errorf("firecracker log lacks the exit line:\n%s", logb)
			}
			testutil.WaitFor(t, 5*time.Second, "serial console in the console log", func() bool {
				b, _ := os.ReadFile(cfg.ConsoleLog)
				return strings.Contains(string(b), "Command line: console=ttyS0 panic=1 reboot=k pci=off root=/dev/vda rw")
			})
		})
	}
}

// Kill ends the VM within a second and the exit says it was killed, not a
// guest power-off.
func TestKill(t *testing.T) {
	d := fakeDriver(t, "1.14.2")
	m, err := d.Start(t.Context(), testConfig(t, shortDir(t)), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m, time.Second, "after SIGKILL")
	if ex := m.Exit(); ex.GuestPoweroff || ex.Code != 137 {
		t.Errorf("exit %+v, want killed with 137", ex)
	}
	if err := m.Kill(); err != nil {
		t.Errorf("second Kill: %v, want nil", err)
	}
	if err := m.Shutdown(t.Context()); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("Shutdown after exit: %v, want ErrGone", err)
	}
}

// After a daemon restart, Attach finds the VM by pid and start time,
// controls it through the socket, and learns its exit code from
// Firecracker's log even though it is not the parent.
func TestAttachAfterRestart(t *testing.T) {
	d := fakeDriver(t, "1.16.1")
	m1, err := d.Start(t.Context(), testConfig(t, shortDir(t)), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	reap(t, m1)
	h := m1.Handle()
	_ = m1.Close() // the old daemon lets go; the VM keeps running

	m2, err := (&Driver{}).Attach(t.Context(), h, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	reap(t, m2)
	if st, err := m2.State(t.Context()); err != nil || st != vmm.Running {
		t.Fatalf("state %q, %v", st, err)
	}
	if err := m2.Pause(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := m2.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m2, 10*time.Second, "attached machine after ctrl-alt-del")
	if ex := m2.Exit(); !ex.GuestPoweroff || ex.Code != 0 {
		t.Errorf("attached exit %+v, want guest power-off, code 0 from the log", ex)
	}

	// The handle of a process that is gone (or whose pid was reused: the
	// start time differs) no longer attaches.
	if _, err := (&Driver{}).Attach(t.Context(), h, nil); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("attach to a gone process: %v, want ErrGone", err)
	}
}

// Attach refuses a live process whose socket does not answer: it is not
// the Firecracker the handle names.
func TestAttachSocketMustAnswer(t *testing.T) {
	p, err := vmm.Spawn(vmm.SpawnOptions{Argv: []string{"/bin/sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Signal(9); p.Wait() })
	h := vmm.Handle{Kind: vmm.Firecracker, PID: p.PID, StartTime: p.StartTime, ControlSocket: filepath.Join(shortDir(t), SocketName)}
	_, err = (&Driver{}).Attach(t.Context(), h, nil)
	if err == nil || !strings.Contains(err.Error(), "does not answer") {
		t.Fatalf("attach: %v, want a 'does not answer' error", err)
	}
	h.StartTime++
	if _, err := (&Driver{}).Attach(t.Context(), h, nil); !errors.Is(err, vmm.ErrGone) {
		t.Errorf("attach with a wrong start time: %v, want ErrGone", err)
	}
}

// A failure after the spawn (here InstanceStart on a host without KVM)
// kills the process and removes both sockets: nothing keeps running.
func TestStartUndoOnFailure(t *testing.T) {
	d := fakeDriver(t, "1.14.2")
	t.Setenv(fcfake.EnvNoKVM, "1")
	dir := shortDir(t)
	cfg := testConfig(t, dir)
	failed, err := d.Start(t.Context(), cfg, testLogger(t))
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 400 || !strings.Contains(apiErr.FaultMessage, "Kvm error") {
		t.Fatalf("start: %v, want the InstanceStart KVM fault", err)
	}
	if failed != nil { // a typed nil would make callers kill a machine that is not there
		t.Errorf("failed start returned machine %#v, want nil", failed)
	}
	if !strings.HasPrefix(err.Error(), "start instance: ") {
		t.Errorf("error %q does not name the step", err)
	}
	assertGone(t, filepath.Join(dir, SocketName), cfg.Vsock.Path)
	// No fake firecracker of ours is left: the socket paths are free and
	// a new start on the same dir succeeds.
	if err := os.Unsetenv(fcfake.EnvNoKVM); err != nil {
		t.Fatal(err)
	}
	m, err := d.Start(t.Context(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("restart on the same dir: %v", err)
	}
	_ = m.Kill()
	waitDone(t, m, time.Second, "kill")
}

// Start refuses bad configs before spawning anything: no socket, no log
// file, no process.
func TestStartRejectsBeforeSpawn(t *testing.T) {
	d := fakeDriver(t, "1.14.2")
	dir := shortDir(t)
	cfg := testConfig(t, dir)
	cfg.Disks[0].Format = "qcow2"
	_, err := d.Start(t.Context(), cfg, nil)
	if err == nil || !strings.Contains(err.Error(), "qcow2") {
		t.Fatalf("start: %v, want a qcow2 refusal", err)
	}
	assertGone(t, filepath.Join(dir, SocketName), filepath.Join(dir, LogName))
}

// A stale socket from a crashed Firecracker is removed before the spawn; a
// socket that still answers belongs to a live VMM and is left alone.
func TestStaleSocket(t *testing.T) {
	d := fakeDriver(t, "1.17.0-dev")
	dir := shortDir(t)
	cfg := testConfig(t, dir)
	sock := filepath.Join(dir, SocketName)

	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Start(t.Context(), cfg, nil); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("start over a live socket: %v, want 'in use'", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	_ = ln.Close() // now stale: the file stays, nobody listens

	m, err := d.Start(t.Context(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("start over a stale socket: %v", err)
	}
	_ = m.Kill()
	waitDone(t, m, time.Second, "kill")

	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Start(t.Context(), cfg, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("start over a regular file: %v, want 'not a socket'", err)
	}
}

// A binary that is not Firecracker (it exits at once) fails the start
// quickly with its console output, instead of waiting for the timeout.
func TestStartProcessExitsEarly(t *testing.T) {
	dir := shortDir(t)
	script := filepath.Join(dir, "fc")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho 'no kvm here' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, dir)
	cfg.Executable = script
	start := time.Now()
	_, err := (&Driver{ReadyTimeout: 30 * time.Second}).Start(t.Context(), cfg, nil)
	// Depending on timing the exit is seen by the spawn or by the socket
	// wait; both quote the console.
	if err == nil || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "no kvm here") {
		t.Fatalf("start: %v", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Errorf("took %s: the exit was not noticed", time.Since(start))
	}
}

// A snapshot of a paused VM restores into a fresh process, which comes up
// running when asked to resume; the vsock device moves to a new socket
// where the version allows it and the request is refused, without being
// sent, where it does not.
func TestSnapshotRestore(t *testing.T) {
	for _, tc := range []struct {
		version       string
		overrideVsock bool
		wantErr       error
	}{
		{"1.16.1", true, nil},
		{"1.14.2", false, nil},
		{"1.14.2", true, ErrNotSupported},
	} {
		t.Run(tc.version, func(t *testing.T) {
			d := fakeDriver(t, tc.version)
			dir := shortDir(t)
			cfg := testConfig(t, dir)
			m, err := d.Start(t.Context(), cfg, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			fm := m.(*Machine)
			snap, mem := filepath.Join(dir, "vm.snap"), filepath.Join(dir, "vm.mem")
			if err := fm.CreateSnapshot(t.Context(), snap, mem); !errors.Is(err, ErrNotBeforeStart) && !isFault(err, "paused") {
				t.Errorf("snapshot of a running VM: %v, want a refusal", err)
			}
			if err := m.Pause(t.Context()); err != nil {
				t.Fatal(err)
			}
			if err := fm.CreateSnapshot(t.Context(), snap, mem); err != nil {
				t.Fatal(err)
			}
			_ = m.Kill()
			waitDone(t, m, time.Second, "kill")

			r := Restore{SnapshotPath: snap, MemFilePath: mem, Resume: true}
			if tc.overrideVsock {
				r.VsockPath = filepath.Join(dir, "v2.sock")
			}
			rdir := shortDir(t)
			m2, err := d.Restore(t.Context(), vmm.Config{ID: "vm-restored", RunDir: rdir}, r, testLogger(t))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("restore: %v, want %v", err, tc.wantErr)
				}
				assertGone(t, filepath.Join(rdir, SocketName))
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			reap(t, m2)
			if st, err := m2.State(t.Context()); err != nil || st != vmm.Running {
				t.Errorf("restored state %q, %v; want running", st, err)
			}
			want := cfg.Vsock.Path
			if tc.overrideVsock {
				want = r.VsockPath
			}
			if fi, err := os.Lstat(want); err != nil || fi.Mode().Type() != fs.ModeSocket {
				t.Errorf("restored vsock not bound at %s: %v", want, err)
			}
		})
	}
}

func isFault(err error, substr string) bool {
	var e *APIError
	return errors.As(err, &e) && strings.Contains(e.FaultMessage, substr)
}

// With a NIC and an MTU, each version's fake accepts the whole boot, which
// it would not if the v1.16+ mtu field reached v1.14.2, and the interface
// it recorded carries the MTU exactly where the version knows it. (The
// fake opens no tap; like Firecracker as root it would create a missing
// one, so the test needs root.)
func TestStartWithNICAndMTU(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		version string
		wantMTU bool
	}{{"1.14.2", false}, {"1.16.1", true}, {"1.17.0-dev", true}} {
		t.Run(tc.version, func(t *testing.T) {
			d := fakeDriver(t, tc.version)
			d.MTU = 1400
			cfg := testConfig(t, shortDir(t))
			cfg.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:12:34:56", Tap: "bgr-fake0"}}
			m, err := d.Start(t.Context(), cfg, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			reap(t, m)
			var vmCfg struct {
				Nets []map[string]any `json:"network-interfaces"`
			}
			if err := m.(*Machine).Client().send(t.Context(), "GET", "/vm/config", nil, &vmCfg); err != nil {
				t.Fatal(err)
			}
			if len(vmCfg.Nets) != 1 || vmCfg.Nets[0]["host_dev_name"] != "bgr-fake0" {
				t.Fatalf("interfaces %v", vmCfg.Nets)
			}
			if _, got := vmCfg.Nets[0]["mtu"]; got != tc.wantMTU {
				t.Errorf("mtu recorded %v, want %v (%v)", got, tc.wantMTU, vmCfg.Nets[0])
			}
		})
	}
}
