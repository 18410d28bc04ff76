package firecracker

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// fakeJail is what banger-helper's LaunchJailed leaves for the daemon, made
// without root: a jail root holding the files where the jailed process
// looks for them, an fcfake serving in process with that root standing in
// for its chroot, and a real process whose pid stands for Firecracker's.
type fakeJail struct {
	j      Jailed
	cfg    vmm.Config // the VM on the host, as the daemon knows it
	srv    *fcfake.Server
	proc   *exec.Cmd
	killed atomic.Int32 // calls of j.Kill
}

func newFakeJail(t *testing.T, version string) *fakeJail {
	t.Helper()
	dir := shortDir(t)
	vmDir, inst := filepath.Join(dir, "vm"), filepath.Join(dir, "j")
	root := filepath.Join(inst, "root")
	for _, d := range []string{vmDir, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testConfig(t, vmDir)
	cfg.Initrd = writeDisk(t, vmDir, "initrd.img")
	cfg.Disks = append(cfg.Disks, vmm.Disk{ID: "data_1", Path: writeDisk(t, vmDir, "data.img"), ReadOnly: true})
	cfg.RunDir = "" // a jailed boot uses none
	// The helper's copies and links, at the paths Jailed plans.
	_, links, err := jail.JailLayout{Root: root}.Jailed(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		b, err := os.ReadFile(l.Source)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(l.Target, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	logPath := filepath.Join(root, strings.TrimPrefix(jail.JailLog, "/"))
	if err := os.WriteFile(logPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	fj := &fakeJail{cfg: cfg}
	fj.proc = exec.Command("sleep", "600")
	if err := fj.proc.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = fj.proc.Wait(); close(exited) }()
	stop := func() {
		_ = fj.proc.Process.Kill()
		<-exited
	}
	t.Cleanup(stop)
	start, err := vmm.ProcStartTime(fj.proc.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}

	spec, err := fcfake.LoadSpec(version)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(inst, jail.HostSocketName)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fj.srv = fcfake.NewServer(spec, fcfake.Options{ID: "vm-test", Root: root, Exit: func(int) { stop() }})
	hs := &http.Server{Handler: fj.srv}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close(); fj.srv.Close() })

	fj.j = Jailed{
		PID: fj.proc.Process.Pid, StartTime: start,
		Socket: sock, Root: root, Log: logPath,
		Kill: func() error { fj.killed.Add(1); stop(); return nil },
	}
	return fj
}

// BootJailed sends Start's boot sequence to a Firecracker someone else
// started, with every file at the path the jailed process sees (vsock
// included), points its logger at the jail's log, and the machine it
// returns reads the exit from that log and is killed through Jailed.Kill.
func TestBootJailed(t *testing.T) {
	for _, version := range fcfake.Versions() {
		t.Run(version, func(t *testing.T) {
			fj := newFakeJail(t, version)
			d := &Driver{}
			m, err := d.BootJailed(t.Context(), fj.j, fj.cfg, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			if st, err := m.State(t.Context()); err != nil || st != vmm.Running {
				t.Fatalf("state %q, %v; want running", st, err)
			}
			var got struct {
				Boot   BootSource `json:"boot-source"`
				Drives []Drive    `json:"drives"`
			}
			if err := m.Client().send(t.Context(), "GET", "/vm/config", nil, &got); err != nil {
				t.Fatal(err)
			}
			want := BootSource{KernelImagePath: jail.JailKernel, InitrdPath: jail.JailInitrd, BootArgs: "console=ttyS0 panic=1 reboot=k"}
			if diff := cmp.Diff(want, got.Boot); diff != "" {
				t.Errorf("boot source (-want +got):\n%s", diff)
			}
			wantDrives := []Drive{
				{DriveID: "root", PathOnHost: jail.DiskPath("root"), IsRootDevice: true},
				{DriveID: "data_1", PathOnHost: jail.DiskPath("data_1"), IsReadOnly: true},
			}
			if diff := cmp.Diff(wantDrives, got.Drives); diff != "" {
				t.Errorf("drives (-want +got):\n%s", diff)
			}
			// The vsock socket is bound in the jail, where the daemon
			// finds it through Root.
			if fi, err := os.Lstat(filepath.Join(fj.j.Root, jail.JailVsock)); err != nil || fi.Mode().Type() != os.ModeSocket {
				t.Errorf("vsock socket in the jail: %v", err)
			}
			if err := m.Shutdown(t.Context()); err != nil {
				t.Fatal(err)
			}
			waitDone(t, m, 5*time.Second, "after ctrl-alt-del")
			if exit := m.Exit(); !exit.GuestPoweroff {
				t.Errorf("exit %+v, want a guest power-off read from the jail's log", exit)
			}
		})
	}
}

// The jailed boot is Start's sequence: the same requests in the same
// order, differing only in the file paths.
func TestJailedSequenceIsStarts(t *testing.T) {
	cfg := fullConfig(t)
	p, err := newPlan(cfg, 1400)
	if err != nil {
		t.Fatal(err)
	}
	inJail, _, err := jail.JailLayout{Root: "/j/root"}.Jailed(cfg)
	if err != nil {
		t.Fatal(err)
	}
	q := p.relocated(inJail)
	caps := mustCaps(t, "1.16.1")
	host, _, err := p.calls(caps)
	if err != nil {
		t.Fatal(err)
	}
	jailed, _, err := q.calls(caps)
	if err != nil {
		t.Fatal(err)
	}
	if len(host) != len(jailed) {
		t.Fatalf("%d calls jailed, %d unjailed", len(jailed), len(host))
	}
	paths := strings.NewReplacer(cfg.Kernel, jail.JailKernel, cfg.Initrd, jail.JailInitrd,
		cfg.Disks[0].Path, jail.DiskPath("root"), cfg.Disks[1].Path, jail.DiskPath("data_1"), cfg.Vsock.Path, jail.JailVsock)
	for i := range host {
		hb, _ := json.Marshal(host[i].body)
		jb, _ := json.Marshal(jailed[i].body)
		if host[i].method != jailed[i].method || host[i].path != jailed[i].path || paths.Replace(string(hb)) != string(jb) {
			t.Errorf("call %d: %s %s %s, jailed %s %s %s", i, host[i].method, host[i].path, hb, jailed[i].method, jailed[i].path, jb)
		}
	}
	if p.boot.KernelImagePath != cfg.Kernel {
		t.Error("relocated changed the plan it was called on")
	}
}

// A jailed boot that fails is undone through Jailed.Kill (the daemon may
// not signal the jailed process itself), and leaves the process gone.
func TestBootJailedUndo(t *testing.T) {
	fj := newFakeJail(t, "1.14.2")
	if err := os.Remove(filepath.Join(fj.j.Root, strings.TrimPrefix(jail.JailKernel, "/"))); err != nil {
		t.Fatal(err)
	}
	_, err := (&Driver{}).BootJailed(t.Context(), fj.j, fj.cfg, testLogger(t))
	if !isFault(err, "The kernel file cannot be opened") {
		t.Fatalf("BootJailed: %v, want the kernel refused", err)
	}
	if fj.killed.Load() != 1 {
		t.Errorf("Kill called %d times, want 1", fj.killed.Load())
	}
	if _, err := vmm.Find(fj.j.PID, fj.j.StartTime); err == nil {
		t.Error("the process survived a failed boot")
	}
}

// AttachJailed re-attaches to a booted jailed VM and kills it through the
// function it is given; BootJailed refuses a description it cannot act
// on.
func TestAttachJailed(t *testing.T) {
	fj := newFakeJail(t, "1.16.1")
	d := &Driver{}
	m, err := d.BootJailed(t.Context(), fj.j, fj.cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	h := m.Handle()
	_ = m.Close()
	if _, err := d.AttachJailed(t.Context(), h, nil, testLogger(t)); err == nil {
		t.Error("AttachJailed without a kill function")
	}
	m2, err := d.AttachJailed(t.Context(), h, fj.j.Kill, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if st, err := m2.State(t.Context()); err != nil || st != vmm.Running {
		t.Fatalf("state %q, %v; want running", st, err)
	}
	if err := m2.Kill(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m2, 5*time.Second, "after Kill")
	if got := m2.Exit().Reason; got != "killed" {
		t.Errorf("exit reason %q, want killed", got)
	}
	if fj.killed.Load() != 1 {
		t.Errorf("Kill called %d times, want 1", fj.killed.Load())
	}

	for name, mutate := range map[string]func(*Jailed){
		"no kill function": func(j *Jailed) { j.Kill = nil },
		"relative socket":  func(j *Jailed) { j.Socket = "api.sock" },
		"no root":          func(j *Jailed) { j.Root = "" },
		"no pid":           func(j *Jailed) { j.PID = 0 },
	} {
		j := fj.j
		mutate(&j)
		if _, err := d.BootJailed(t.Context(), j, fj.cfg, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// The log a jailed VM's Attach reads is the one the helper links next to
// the socket, under the driver's own log name.
func TestJailHostLogName(t *testing.T) {
	if jail.HostLogName != LogName {
		t.Errorf("jail.HostLogName %q differs from LogName %q: Attach would miss a jailed VM's log", jail.HostLogName, LogName)
	}
}
