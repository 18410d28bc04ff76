package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/helper"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
	"github.com/bangerhq/banger/internal/vmm/qemu"
)

// jailBins are built once per test binary, in a root-owned directory
// others may enter (the helper requires that of its binaries): the fake
// Firecracker linked statically (a chroot holds no shared libraries), a
// copy of this test binary named as the jailer (TestMain), and a real
// banger-helper binary, which the helper runs as each jail's console
// logger.
var jailBins struct {
	once                        sync.Once
	err                         error
	dir                         string
	firecracker, jailer, helper string
}

func buildJailBins(t *testing.T) {
	t.Helper()
	jailBins.once.Do(func() {
		jailBins.err = func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			jb, err := fcfake.BuildJailBinaries(ctx, "1.14.2")
			jailBins.dir, jailBins.firecracker, jailBins.jailer = jb.Dir, jb.Firecracker, jb.Jailer
			if err != nil {
				return err
			}
			jailBins.helper = filepath.Join(jb.Dir, "banger-helper")
			if out, err := exec.CommandContext(ctx, "go", "build", "-o", jailBins.helper, "github.com/bangerhq/banger/cmd/banger-helper").CombinedOutput(); err != nil {
				return fmt.Errorf("build banger-helper: %w: %s", err, out)
			}
			return nil
		}()
	})
	if jailBins.err != nil {
		t.Fatalf("build the jail test binaries: %v", jailBins.err)
	}
}

// jailEnv is a bridge-mode VM service whose helper runs jailed
// Firecrackers, with a jail uid range and a cgroup of the test's own.
type jailEnv struct {
	*bridgeEnv
	jailDir          string
	cgroupMount      string
	cgroup           string // relative to the mount
	uidBase, uidSpan uint32
}

// newJailEnv must run in a child rerunInNetNS started.
func newJailEnv(t *testing.T, ns string) *jailEnv {
	t.Helper()
	mount := cgroup2MountForTest(t)
	buildJailBins(t)
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<20))
	var tag [4]byte
	_, _ = rand.Read(tag[:])
	je := &jailEnv{
		cgroupMount: mount,
		cgroup:      "banger-jail-vmtest-" + hex.EncodeToString(tag[:]),
		uidBase:     3100000000 + uint32(n.Int64())*16,
		uidSpan:     16,
	}
	je.bridgeEnv = newBridgeEnv(t, ns, func(c *helper.Config) {
		c.Firecracker = jailBins.firecracker
		c.Jailer = jailBins.jailer
		c.Executable = jailBins.helper
		c.JailUIDBase = je.uidBase
		c.JailUIDCount = je.uidSpan
		c.JailCgroup = je.cgroup
	})
	t.Cleanup(func() { _ = syscall.Rmdir(filepath.Join(mount, je.cgroup)) })
	layout := je.svc.Layout
	je.jailDir = layout.StateDir + "-jail"
	// The owner reaches its VM directories, as in its own state dir: the
	// console logger runs as the owner (the test's daemon runs as root).
	if err := os.MkdirAll(layout.VMsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	for d := layout.VMsDir(); d != filepath.Dir(filepath.Dir(filepath.Dir(layout.StateDir))); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	je.drivers = map[vmm.Kind]vmm.Driver{vmm.Firecracker: &firecracker.Driver{Executable: jailBins.firecracker}}
	for k, d := range je.drivers {
		je.svc.Drivers[k] = d
	}
	return je
}

// cgroup2MountForTest returns where the cgroup v2 hierarchy is mounted in
// the child. ip netns exec gives the child a mount namespace with a sysfs
// of the network namespace, which hides the host's cgroup mounts: the one
// hierarchy is mounted again there, in the child's namespace only.
func cgroup2MountForTest(t *testing.T) string {
	t.Helper()
	find := func() string {
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			pre, post, ok := strings.Cut(line, " - ")
			if f := strings.Fields(pre); ok && len(f) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
				return f[4]
			}
		}
		return ""
	}
	if m := find(); m != "" {
		return m
	}
	if err := syscall.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""); err != nil {
		t.Skipf("no cgroup v2 hierarchy, which the jailer needs: mount one: %v", err)
	}
	return find()
}

func (je *jailEnv) instanceDir(id string) string {
	return filepath.Join(je.jailDir, "firecracker", id)
}

// jailLeft lists what of a VM's jail is on the host: its instance dir,
// its cgroup, a live process in that cgroup, its tap.
func (je *jailEnv) jailLeft(id string) []string {
	var left []string
	if _, err := os.Lstat(je.instanceDir(id)); !errors.Is(err, fs.ErrNotExist) {
		left = append(left, "jail "+je.instanceDir(id))
	}
	cg := je.cgroup + "/" + id
	if _, err := os.Lstat(filepath.Join(je.cgroupMount, cg)); !errors.Is(err, fs.ErrNotExist) {
		left = append(left, "cgroup "+cg)
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		b, err := os.ReadFile("/proc/" + p.Name() + "/cgroup")
		if err == nil && strings.Contains(string(b), "0::/"+cg+"\n") && !zombie(p.Name()) {
			left = append(left, "pid "+p.Name()+" in cgroup "+cg)
		}
	}
	if tapOwner(id) != "" {
		left = append(left, "tap")
	}
	return left
}

// jailUIDsLeft lists live processes running as a jail uid.
func (je *jailEnv) jailUIDsLeft() []string {
	var left []string
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		var st syscall.Stat_t
		if syscall.Stat("/proc/"+p.Name(), &st) == nil && st.Uid >= je.uidBase && st.Uid < je.uidBase+je.uidSpan && !zombie(p.Name()) {
			left = append(left, fmt.Sprintf("pid %s as jail uid %d", p.Name(), st.Uid))
		}
	}
	return left
}

// zombie reports whether /proc/<pid> has exited and waits to be reaped: a
// killed Firecracker whose jailer exited is init's to reap.
func zombie(pid string) bool {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// checkJailed checks that a running VM's Firecracker is the jailed one:
// it runs as a jail uid, its jail has the layout docs/jailer.md describes
// with the helper's links, and it answers as a started VM.
func (je *jailEnv) checkJailed(t *testing.T, v api.VM) {
	t.Helper()
	ctx := context.Background()
	if v.VMM != "firecracker/jailed" || v.State != api.VMRunning {
		t.Fatalf("vm %s: vmm %q, %s; want a running firecracker/jailed", v.Name, v.VMM, v.State)
	}
	m := je.svc.machine(v.ID)
	if m == nil {
		t.Fatal("no machine for the running vm")
	}
	h := m.Handle()
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d", h.PID), &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid < je.uidBase || st.Uid >= je.uidBase+je.uidSpan || st.Gid != st.Uid {
		t.Errorf("firecracker pid %d runs as %d:%d, want a jail uid of %d-%d", h.PID, st.Uid, st.Gid, je.uidBase, je.uidBase+je.uidSpan-1)
	}
	inst := je.instanceDir(v.ID)
	root := filepath.Join(inst, "root")
	for _, p := range []string{"firecracker", "firecracker.pid", "vmlinux", "initrd", "drive_root", "firecracker.log", "dev/kvm", "dev/net/tun", "run/firecracker.socket"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Errorf("jail layout: %v", err)
		}
	}
	if h.ControlSocket != filepath.Join(inst, "api.sock") {
		t.Errorf("control socket %s, want the helper's link in %s", h.ControlSocket, inst)
	}
	if fi, err := os.Stat(root); err != nil || fi.Sys().(*syscall.Stat_t).Uid != st.Uid {
		t.Errorf("jail root %s is not the jail uid's: %v", root, err)
	}
	// The guest's disk in the jail is the VM's own file.
	row, _ := je.svc.Store.GetVMByID(ctx, v.ID)
	rt, _ := decodeRuntime(row.Runtime)
	var a, b syscall.Stat_t
	if syscall.Stat(rt.Disk.Path, &a) != nil || syscall.Stat(filepath.Join(root, "drive_root"), &b) != nil || a.Ino != b.Ino {
		t.Errorf("the jail's drive_root is not the VM's disk %s", rt.Disk.Path)
	}
	if !rt.Jailed {
		t.Error("the runtime does not record the jail")
	}
	// The boot sequence reached InstanceStart.
	if state, err := m.State(ctx); err != nil || state != vmm.Running {
		t.Errorf("firecracker state %q, %v; want running", state, err)
	}
	if tapOwner(v.ID) != fmt.Sprint(st.Uid) {
		t.Errorf("tap owner %q, want the jail uid %d", tapOwner(v.ID), st.Uid)
	}
	rs, _ := je.svc.Store.ListResources(ctx, v.ID)
	if !hasKind(rs, resJail) || hasKind(rs, resProcess) {
		t.Errorf("resources %+v: want the jail standing for the process", rs)
	}
}

// A Firecracker VM in bridge mode, with a helper that shares the daemon's
// state dir, runs under the jailer as a uid of its own (here the fake
// jailer and the spec's fake Firecracker, in a network namespace of the
// test's own): the daemon boots it through the socket the helper hands
// over, re-attaches to it after a restart, kills it through the helper,
// and a graceful stop, a kill and a delete each leave no jail, cgroup,
// process, tap or row behind.
func TestJailedFirecracker(t *testing.T) {
	testutil.SkipShort(t, "starts VMMs")
	requireNetNS(t)
	testutil.RequireCommand(t, "go")
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestJailedFirecracker$")
		return
	}
	je := newJailEnv(t, ns)
	ctx := context.Background()
	before := snapshotHost(t, je.svc.Layout.StateDir)

	v := je.create(t, "jfc", func(r *api.VMCreateRequest) { r.VMM = "firecracker"; r.NoWait = true })
	je.checkJailed(t, v)
	if t.Failed() {
		return
	}

	t.Run("graceful stop and start", func(t *testing.T) {
		if _, err := je.svc.Stop(ctx, "jfc", false, 0); err != nil {
			t.Fatal(err)
		}
		if left := je.jailLeft(v.ID); len(left) > 0 {
			t.Errorf("after the stop: %v", left)
		}
		if got, _ := je.svc.Get(ctx, "jfc"); got.State != api.VMStopped || got.VMM != "firecracker" {
			t.Errorf("after the stop: %s, vmm %q", got.State, got.VMM)
		}
		got, err := je.svc.Start(ctx, "jfc", true, nil)
		if err != nil {
			t.Fatal(err)
		}
		je.checkJailed(t, got)
	})

	t.Run("daemon restart", func(t *testing.T) {
		pid := je.svc.machine(v.ID).Handle().PID
		je.restartDaemon(t)
		got, _ := je.svc.Get(ctx, "jfc")
		je.checkJailed(t, got)
		if m := je.svc.machine(v.ID); m == nil || m.Handle().PID != pid {
			t.Fatalf("not re-attached to pid %d", pid)
		}
		// The re-attached machine kills through the helper.
		if _, err := je.svc.Kill(ctx, "jfc"); err != nil {
			t.Fatal(err)
		}
		if left := je.jailLeft(v.ID); len(left) > 0 {
			t.Errorf("after the kill: %v", left)
		}
		if rs, _ := je.svc.Store.ListResources(ctx, v.ID); hasKind(rs, resJail) {
			t.Error("the jail is still recorded after the kill")
		}
	})

	t.Run("vmm gone while the daemon was down", func(t *testing.T) {
		got, err := je.svc.Start(ctx, "jfc", true, nil)
		if err != nil {
			t.Fatal(err)
		}
		pid := je.svc.machine(got.ID).Handle().PID
		je.svc.Close()
		// Its Firecracker dies meanwhile; its jail stays until the next
		// daemon releases it.
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, 10*time.Second, "the killed firecracker to exit", func() bool { return zombie(fmt.Sprint(pid)) })
		if _, err := os.Stat(je.instanceDir(got.ID)); err != nil {
			t.Fatalf("the jail went with its process: %v", err)
		}
		je.svc = je.newService(t)
		if err := je.svc.EnableBridge(ctx); err != nil {
			t.Fatal(err)
		}
		if err := je.svc.Reconcile(ctx); err != nil {
			t.Fatal(err)
		}
		if got, _ := je.svc.Get(ctx, "jfc"); got.State != api.VMError {
			t.Errorf("after the restart: %s (%s), want error", got.State, got.StateReason)
		}
		if left := je.jailLeft(v.ID); len(left) > 0 {
			t.Errorf("after the restart: %v", left)
		}
	})

	t.Run("orphan jail", func(t *testing.T) {
		// A jail of no VM (its directory made as a VM's would be) goes on
		// the next daemon start; the running VM's stays.
		if _, err := je.svc.Start(ctx, "jfc", true, nil); err != nil {
			t.Fatal(err)
		}
		orphan := helperapi.NewVMID()
		dir := je.svc.Layout.VMDir(orphan)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"vmlinux", "root.img"} {
			src, _ := je.svc.Images.BootFiles(ctx, image.DefaultImageName)
			p := filepath.Join(dir, f)
			if err := placeBootFile(ctx, src.Vmlinux, p, false); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(p, testOwner, testOwner); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chown(dir, testOwner, testOwner); err != nil {
			t.Fatal(err)
		}
		if _, err := je.helper.LaunchJailed(ctx, helperapi.LaunchJailed{VMID: orphan, CPUs: 1, MemoryMiB: 128, Kernel: "vmlinux",
			Disks: []helperapi.JailDisk{{ID: "root", File: "root.img"}}}); err != nil {
			t.Fatal(err)
		}
		je.restartDaemon(t)
		if left := je.jailLeft(orphan); len(left) > 0 {
			t.Errorf("the orphan jail survived reconciliation: %v", left)
		}
		if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the orphan's directory survived: %v", err)
		}
		got, _ := je.svc.Get(ctx, "jfc")
		je.checkJailed(t, got)
	})

	if err := je.svc.Delete(ctx, "jfc", true); err != nil {
		t.Fatal(err)
	}
	left := append(je.jailLeft(v.ID), je.leftovers(t, v.ID, 0)...)
	if left = append(left, je.jailUIDsLeft()...); len(left) > 0 {
		t.Errorf("after the delete: %v", left)
	}
	if d := cmp.Diff(before, snapshotHost(t, je.svc.Layout.StateDir)); d != "" {
		t.Errorf("host state (-before +after):\n%s", d)
	}
}

// envJailCrash carries, to the process TestJailedCrash kills, the layout
// and helper socket it creates a jailed VM with.
const envJailCrash = "BANGER_TEST_JAIL_CRASH"

// A daemon killed (SIGKILL) during a jailed create — after the jail's
// intent and before LaunchJailed, after LaunchJailed and before the
// process is recorded, or after — is reconciled on restart: the VM is
// rolled back and its jail, cgroup, jailed process, tap and rows are gone.
func TestJailedCrash(t *testing.T) {
	testutil.SkipShort(t, "starts VMMs")
	requireNetNS(t)
	testutil.RequireCommand(t, "go")
	if raw := os.Getenv(envJailCrash); raw != "" {
		crashingJailedCreate(t, raw)
		return
	}
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestJailedCrash$")
		return
	}
	je := newJailEnv(t, ns)
	ctx := context.Background()
	stateDir := je.svc.Layout.StateDir
	for _, point := range []string{"start:spawn", "start:jailed", "start:spawned"} {
		t.Run(point, func(t *testing.T) {
			before := snapshotHost(t, stateDir)
			name := crashCreate(t, "TestJailedCrash", envJailCrash, point, je.bridgeEnv)
			row, err := je.svc.Store.GetVM(ctx, name)
			if err != nil {
				t.Fatalf("no row recorded before %s: %v", point, err)
			}
			if rs, _ := je.svc.Store.ListResources(ctx, row.ID); !hasKind(rs, resJail) {
				t.Errorf("no jail intent recorded before %s: %+v", point, rs)
			}
			_, err = os.Lstat(je.instanceDir(row.ID))
			jailed := err == nil
			if want := point != "start:spawn"; jailed != want {
				t.Errorf("at %s: a jail exists: %v, want %v", point, jailed, want)
			}
			je.restartDaemon(t)
			left := append(je.jailLeft(row.ID), je.leftovers(t, row.ID, 0)...)
			if left = append(left, je.jailUIDsLeft()...); len(left) > 0 {
				t.Errorf("the VM interrupted at %s left: %v", point, left)
			}
			if d := cmp.Diff(before, snapshotHost(t, stateDir)); d != "" {
				t.Errorf("host state (-before +after):\n%s", d)
			}
		})
	}
}

// crashingJailedCreate is the process TestJailedCrash kills: a daemon over
// the test's layout and helper creating one jailed VM, waiting for SSH (so
// that until the crash the VM is one to roll back).
func crashingJailedCreate(t *testing.T, raw string) {
	svc, cs := crashBridgeService(t, raw, 10056)
	svc.Drivers[vmm.Firecracker] = &firecracker.Driver{}
	_, err := svc.Create(context.Background(), api.VMCreateRequest{Name: cs.Name, VMM: "firecracker", CPUs: 1, MemoryBytes: 512 * api.MiB}, nil)
	t.Fatalf("create returned (%v) instead of dying at %s", err, crashAt)
}

// A boot is jailed only for Firecracker in bridge mode, through a helper
// that shares the daemon's state dir, with a driver that boots in a jail
// and raw disk files in the VM's directory; otherwise it says why not.
func TestJailable(t *testing.T) {
	layout := paths.Layout{StateDir: "/state"}
	dir := layout.VMDir("0123456789")
	raw := Disk{Path: filepath.Join(dir, "root.img"), Format: image.DiskRaw, Strategy: image.CloneReflink}
	row := store.VM{ID: "0123456789", NetMode: NetBridge}
	fcRT := Runtime{VMM: vmm.Firecracker, Disk: raw}
	for _, tc := range []struct {
		name   string
		row    store.VM
		rt     Runtime
		shared bool
		bridge bool
		driver vmm.Driver
		why    string // "" when jailed
	}{
		{name: "jailed", row: row, rt: fcRT, shared: true, bridge: true, driver: &firecracker.Driver{}},
		{name: "qemu", row: row, rt: Runtime{VMM: vmm.QEMU, Disk: raw}, shared: true, bridge: true, driver: &firecracker.Driver{}, why: "only firecracker"},
		{name: "no helper", row: row, rt: fcRT, shared: true, driver: &firecracker.Driver{}, why: "no bridge networking"},
		{name: "user mode", row: store.VM{ID: row.ID, NetMode: NetUser}, rt: fcRT, shared: true, bridge: true, driver: &firecracker.Driver{}, why: "no bridge networking"},
		{name: "helper's own state dir", row: row, rt: fcRT, bridge: true, driver: &firecracker.Driver{}, why: "state dir of its own"},
		{name: "no jailed driver", row: row, rt: fcRT, shared: true, bridge: true, driver: qemu.New(), why: "cannot boot a jailed"},
		{name: "dm-snapshot", row: row, rt: Runtime{VMM: vmm.Firecracker, Disk: Disk{Path: filepath.Join(dir, "root.img"), Format: image.DiskRaw, Strategy: image.CloneDMSnapshot}},
			shared: true, bridge: true, driver: &firecracker.Driver{}, why: "dm-snapshot"},
		{name: "disk elsewhere", row: row, rt: Runtime{VMM: vmm.Firecracker, Disk: Disk{Path: "/dev/dm-3", Format: image.DiskRaw}},
			shared: true, bridge: true, driver: &firecracker.Driver{}, why: "not a file of the VM's directory"},
		{name: "seed elsewhere", row: row, rt: Runtime{VMM: vmm.Firecracker, Disk: raw, Seed: "/elsewhere/seed.img"},
			shared: true, bridge: true, driver: &firecracker.Driver{}, why: "not a file of the VM's directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Service{Layout: layout, Drivers: map[vmm.Kind]vmm.Driver{vmm.Firecracker: tc.driver}}
			if tc.bridge {
				s.net = &bridgeNet{cfg: BridgeConfig{SharedStateDir: tc.shared, OwnerUID: uint32(os.Geteuid())}}
			}
			jd, err := s.jailable(tc.row, tc.rt)
			switch {
			case tc.why == "" && (err != nil || jd == nil):
				t.Errorf("not jailed: %v", err)
			case tc.why != "" && (err == nil || !strings.Contains(err.Error(), tc.why)):
				t.Errorf("jailable: %v, want an error saying %q", err, tc.why)
			}
		})
	}
}
