package helper

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// jailBins are built once per test binary: a static fake Firecracker
// (the real one is static too, and a chroot holds no shared libraries)
// and copies of this test binary as the jailer and as the helper's own
// binary, in a root-owned directory others may enter, as the helper
// requires of its binaries and the owner of the logger's.
var jailBins struct {
	once                         sync.Once
	err                          error
	dir                          string
	firecracker, jailer, testBin string
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
			jailBins.testBin = filepath.Join(jb.Dir, "helper.test")
			return os.Link(jb.Jailer, jailBins.testBin)
		}()
	})
	if jailBins.err != nil {
		t.Fatalf("build the jail test binaries: %v", jailBins.err)
	}
}

func copyFileMode(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, mode)
}

// jailRig is a helper with jailed launches on, its network confined to a
// namespace, its jail dir, cgroup and uid range its own.
type jailRig struct {
	*harness
	jailDir  string
	cgroup   string // relative to the cgroup v2 mount
	mount    string
	uidBase  uint32
	uidCount uint32
}

func startJailRig(t *testing.T, configure func(*Config)) *jailRig {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "go", "ip", "nft")
	mount, err := cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup v2 hierarchy: %v", err)
	}
	buildJailBins(t)
	base, err := os.MkdirTemp("", "bj")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<20))
	var tag [4]byte
	_, _ = rand.Read(tag[:])
	r := &jailRig{
		jailDir:  filepath.Join(base, "jail"),
		cgroup:   "banger-jail-test-" + hex.EncodeToString(tag[:]),
		mount:    mount,
		uidBase:  3000000000 + uint32(n.Int64())*16,
		uidCount: 16,
	}
	r.harness = startHelperWith(t, func(c *Config) {
		c.Firecracker = jailBins.firecracker
		c.Jailer = jailBins.jailer
		c.Executable = jailBins.testBin
		c.JailDir = r.jailDir
		c.JailUIDBase = r.uidBase
		c.JailUIDCount = r.uidCount
		c.JailCgroup = r.cgroup
		if configure != nil {
			configure(c)
		}
	})
	// The owner reaches its VM files, as in a real state dir.
	for _, d := range []string{filepath.Dir(r.stateDir), r.stateDir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		// Every undo of a failed launch worked.
		for _, rec := range r.logs.records("undo failed jailed launch") {
			t.Errorf("undo failed: %v", rec["err"])
		}
		// Whatever a failed test left: the jails' processes and cgroups.
		_ = killCgroupTree(filepath.Join(mount, r.cgroup))
	})
	return r
}

// killCgroupTree removes a test's cgroup parent and whatever is below it.
func killCgroupTree(dir string) error {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = killCgroup(ctx, filepath.Join(dir, e.Name()))
			cancel()
		}
	}
	return syscall.Rmdir(dir)
}

// vm creates the owner's VM directory with a kernel, an initrd and a root
// disk, and returns its id.
func (r *jailRig) vm(t *testing.T) string {
	t.Helper()
	id := helperapi.NewVMID()
	dir := filepath.Join(r.stateDir, "vms", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, testOwner, testOwner); err != nil {
		t.Fatal(err)
	}
	r.vmFile(id, "vmlinux", 0)
	if err := os.WriteFile(filepath.Join(dir, "vmlinux"), elfHeader(), 0o600); err != nil {
		t.Fatal(err)
	}
	r.vmFile(id, "initrd.img", 4096)
	r.vmFile(id, "root.img", 64<<20)
	return id
}

// elfHeader is the 64-byte header of an x86_64 ELF executable: all the
// driver's kernel check and the fake's boot source read.
func elfHeader() []byte {
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = 2, 1, 1
	binary.LittleEndian.PutUint16(h[16:], 2)
	binary.LittleEndian.PutUint16(h[18:], 62)
	return h
}

func launchOp(id string) helperapi.LaunchJailed {
	return helperapi.LaunchJailed{
		VMID: id, CPUs: 2, MemoryMiB: 256,
		Kernel: "vmlinux", Initrd: "initrd.img",
		Disks: []helperapi.JailDisk{{ID: "root", File: "root.img"}},
		Tap:   true,
	}
}

// vmConfig is the VM as the owner's daemon describes it to the driver:
// host paths in the VM's directory, a NIC on the VM's tap, a vsock.
func (r *jailRig) vmConfig(id string) vmm.Config {
	dir := filepath.Join(r.stateDir, "vms", id)
	return vmm.Config{
		ID: id, CPUs: 2, MemoryMiB: 256,
		Kernel:  filepath.Join(dir, "vmlinux"),
		Initrd:  filepath.Join(dir, "initrd.img"),
		Cmdline: "console=ttyS0",
		Disks:   []vmm.Disk{{ID: "root", Path: filepath.Join(dir, "root.img"), Format: "raw"}},
		NICs:    []vmm.NIC{{ID: "eth0", MAC: "52:54:00:12:34:56", Tap: helperapi.TapName(id)}},
		Vsock:   &vmm.Vsock{CID: 3},
	}
}

func (r *jailRig) createTap(t *testing.T, id string) {
	t.Helper()
	ctx := t.Context()
	if _, err := r.client.EnsureBridge(ctx, helperapi.EnsureBridge{Name: "banger0", CIDR: "172.30.0.1/24"}); err != nil {
		t.Fatal(err)
	}
	if err := r.client.CreateTap(ctx, helperapi.CreateTap{Name: helperapi.TapName(id), Bridge: "banger0", OwnerUID: testOwner}); err != nil {
		t.Fatal(err)
	}
}

func (r *jailRig) tapOwner(t *testing.T, id string) string {
	t.Helper()
	return strings.TrimSpace(nsRun(t, r.ns, "cat", "/sys/class/net/"+helperapi.TapName(id)+"/owner"))
}

// assertBaseline checks that nothing of any jail is left: no jail, no
// cgroup, no process running as a jail uid.
func (r *jailRig) assertBaseline(t *testing.T) {
	t.Helper()
	if entries, err := os.ReadDir(r.jailDir); err == nil && len(entries) > 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("jail dir %s holds %v", r.jailDir, names)
	}
	if _, err := os.Stat(filepath.Join(r.mount, r.cgroup)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("cgroup %s is still there (%v)", r.cgroup, err)
	}
	// A killed Firecracker is reparented to init when the jailer exits,
	// and stays a zombie until init reaps it: that holds nothing.
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		var st syscall.Stat_t
		if _, err := strconv.Atoi(p.Name()); err == nil && syscall.Stat("/proc/"+p.Name(), &st) == nil &&
			st.Uid >= r.uidBase && st.Uid < r.uidBase+r.uidCount && !zombie("/proc/"+p.Name()) {
			t.Errorf("pid %s still runs as jail uid %d", p.Name(), st.Uid)
		}
	}
}

func fileStat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// The whole jailed path: the helper launches Firecracker (here the spec's
// fake) under the (fake) jailer as a uid of its own, chrooted, in a new pid
// namespace and a cgroup, with the VM's files, tap and API socket handed
// over as planned; the owner's daemon, a process running as the owner,
// boots it through the socket with the firecracker driver, reaches its
// vsock, re-attaches after a "restart", may not kill it itself, shuts it
// down; ListOwned shows the jail while it exists; KillJailed takes
// everything back.
func TestLaunchJailedEndToEnd(t *testing.T) {
	r := startJailRig(t, nil)
	ctx := t.Context()
	id := r.vm(t)
	r.createTap(t, id)
	disk := filepath.Join(r.stateDir, "vms", id, "root.img")
	before := fileStat(t, disk)

	res, err := r.client.LaunchJailed(ctx, launchOp(id))
	if err != nil {
		t.Fatal(err)
	}
	r.wantOpLogged(helperapi.OpLaunchJailed, "ok")
	inst := filepath.Join(r.jailDir, "firecracker", id)
	root := filepath.Join(inst, "root")
	want := helperapi.LaunchJailedResult{
		PID: res.PID, StartTime: res.StartTime,
		Socket:     filepath.Join(inst, jail.HostSocketName),
		Log:        filepath.Join(inst, jail.HostLogName),
		ConsoleLog: filepath.Join(r.stateDir, "vms", id, "console.log"),
		Root:       root,
		UID:        r.uidBase, GID: r.uidBase,
		Cgroup: r.cgroup + "/" + id,
		Limits: res.Limits,
	}
	if diff := cmp.Diff(want, res); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}

	// Firecracker: the jail's uid and gid with no other group, its own pid
	// namespace, the VM's cgroup.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", res.PID))
	if err != nil {
		t.Fatal(err)
	}
	uid := strconv.Itoa(int(res.UID))
	for key, want := range map[string]string{
		"Uid":    strings.Repeat(uid+"\t", 3) + uid,
		"Gid":    strings.Repeat(uid+"\t", 3) + uid,
		"Groups": "",
		"NSpid":  strconv.Itoa(res.PID) + "\t1", // pid 1 of a namespace of its own
		"Umask":  "0007",
	} {
		if got := statusField(string(status), key); got != want {
			t.Errorf("/proc/%d/status %s: %q, want %q", res.PID, key, got, want)
		}
	}
	if !inCgroup(res.PID, res.Cgroup) {
		t.Errorf("firecracker pid %d is not in cgroup %s", res.PID, res.Cgroup)
	}
	if start, err := vmm.ProcStartTime(res.PID); err != nil || start != res.StartTime {
		t.Errorf("start time %d, %v; want %d", start, err, res.StartTime)
	}
	// The helper wrote every limit whose controller this host's cgroup v2
	// offers.
	offered, _ := os.ReadFile(filepath.Join(r.mount, "cgroup.controllers"))
	var wantLimits []string
	for _, f := range jailLimits(2, 256).Files() {
		if containsString(strings.Fields(string(offered)), f.Controller()) {
			wantLimits = append(wantLimits, f.Name+"="+f.Value)
			if b, err := os.ReadFile(filepath.Join(r.mount, res.Cgroup, f.Name)); err != nil || !strings.HasPrefix(string(b), strings.Fields(f.Value)[0]) {
				t.Errorf("%s: %q, %v; want %s", f.Name, b, err, f.Value)
			}
		}
	}
	if diff := cmp.Diff(wantLimits, res.Limits, cmpEmpty); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
	// What the jailer made (docs/jailer.md): the device nodes, owned by
	// the jail's uid.
	for dev, nums := range map[string][2]uint32{"dev/kvm": {10, 232}, "dev/net/tun": {10, 200}} {
		st := fileStat(t, filepath.Join(root, dev))
		if st.Mode&syscall.S_IFMT != syscall.S_IFCHR || unixMajor(st.Rdev) != nums[0] || unixMinor(st.Rdev) != nums[1] || st.Uid != res.UID {
			t.Errorf("%s: mode %o dev %d:%d uid %d", dev, st.Mode, unixMajor(st.Rdev), unixMinor(st.Rdev), st.Uid)
		}
	}
	// The owner's socket; the disk lent to the jail's gid, the same
	// inode; the kernel a root-owned copy; the tap the jail's.
	if st := fileStat(t, res.Socket); st.Mode&syscall.S_IFMT != syscall.S_IFSOCK || st.Uid != testOwner || st.Mode&0o777 != 0o600 {
		t.Errorf("api socket: mode %o uid %d", st.Mode, st.Uid)
	}
	if st := fileStat(t, filepath.Join(root, "drive_root")); st.Ino != before.Ino || st.Gid != res.GID || st.Uid != testOwner || st.Mode&0o777 != 0o660 {
		t.Errorf("jailed disk: ino %d (want %d) uid %d gid %d mode %o", st.Ino, before.Ino, st.Uid, st.Gid, st.Mode&0o777)
	}
	if st := fileStat(t, filepath.Join(root, "vmlinux")); st.Uid != 0 || st.Gid != res.GID || st.Mode&0o777 != 0o440 {
		t.Errorf("jailed kernel: uid %d gid %d mode %o", st.Uid, st.Gid, st.Mode&0o777)
	}
	if got := r.tapOwner(t, id); got != uid {
		t.Errorf("tap owner %s, want the jail's uid %s", got, uid)
	}
	owned, err := r.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantJail := helperapi.OwnedJail{VMID: id, Dir: inst, Cgroup: res.Cgroup, UID: res.UID, PID: res.PID, StartTime: res.StartTime, Running: true}
	if diff := cmp.Diff([]helperapi.OwnedJail{wantJail}, owned.Jails); diff != "" {
		t.Errorf("ListOwned jails (-want +got):\n%s", diff)
	}

	// The owner's daemon boots it.
	rep := r.runOwner(t, ownerJob{Action: "boot", VMID: id, Launch: res, Config: r.vmConfig(id)})
	if rep.Err != "" {
		t.Fatalf("boot as the owner: %s", rep.Err)
	}
	if rep.State != string(vmm.Running) || rep.Vsock != "" {
		t.Errorf("after boot: state %q, vsock dial %q", rep.State, rep.Vsock)
	}
	testutil.WaitFor(t, 5*time.Second, "the guest's console in the owner's console log", func() bool {
		b, _ := os.ReadFile(res.ConsoleLog)
		return strings.Contains(string(b), "Linux version")
	})
	if st := fileStat(t, res.ConsoleLog); st.Uid != testOwner {
		t.Errorf("console log owned by uid %d, want the owner", st.Uid)
	}

	// A restarted daemon re-attaches; it may not signal the jail's uid,
	// and says how to kill it instead; the guest powers off.
	rep = r.runOwner(t, ownerJob{Action: "attach-shutdown", VMID: id, Launch: res})
	if rep.Err != "" {
		t.Fatalf("attach as the owner: %s", rep.Err)
	}
	if rep.State != string(vmm.Running) || !strings.Contains(rep.Kill, "operation not permitted") || !strings.Contains(rep.Kill, "KillJailed") {
		t.Errorf("after attach: state %q, plain kill %q", rep.State, rep.Kill)
	}
	if !rep.Exit.GuestPoweroff {
		t.Errorf("exit %+v, want a guest power-off", rep.Exit)
	}
	owned, err = r.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantJail.Running = false
	if diff := cmp.Diff([]helperapi.OwnedJail{wantJail}, owned.Jails); diff != "" {
		t.Errorf("ListOwned jails after power-off (-want +got):\n%s", diff)
	}

	if err := r.client.KillJailed(ctx, helperapi.KillJailed{VMID: id}); err != nil {
		t.Fatal(err)
	}
	r.assertBaseline(t)
	if st := fileStat(t, disk); st.Gid != before.Gid || st.Mode != before.Mode {
		t.Errorf("disk after KillJailed: gid %d mode %o, want %d %o", st.Gid, st.Mode, before.Gid, before.Mode)
	}
	if got := r.tapOwner(t, id); got != strconv.Itoa(testOwner) {
		t.Errorf("tap owner %s after KillJailed, want the owner", got)
	}
	owned, err = r.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(owned.Jails) != 0 {
		t.Errorf("ListOwned jails after KillJailed: %+v", owned.Jails)
	}
	if err := r.client.KillJailed(ctx, helperapi.KillJailed{VMID: id}); err != nil {
		t.Errorf("KillJailed of a VM without a jail: %v", err)
	}

	// Again, and this time the owner's daemon kills the running VM
	// through the helper, as the driver's Machine.Kill does for a jailed
	// VM.
	res, err = r.client.LaunchJailed(ctx, launchOp(id))
	if err != nil {
		t.Fatal(err)
	}
	if rep := r.runOwner(t, ownerJob{Action: "boot", VMID: id, Launch: res, Config: r.vmConfig(id)}); rep.Err != "" {
		t.Fatalf("boot as the owner: %s", rep.Err)
	}
	rep = r.runOwner(t, ownerJob{Action: "attach-kill", VMID: id, Launch: res})
	if rep.Err != "" || rep.Exit.Reason != "killed" {
		t.Errorf("kill as the owner: %q, exit %+v", rep.Err, rep.Exit)
	}
	r.assertBaseline(t)
	if st := fileStat(t, disk); st.Gid != before.Gid || st.Mode != before.Mode {
		t.Errorf("disk after the owner's kill: gid %d mode %o, want %d %o", st.Gid, st.Mode, before.Gid, before.Mode)
	}
}

// cmpEmpty treats nil and empty slices alike.
var cmpEmpty = cmp.Comparer(func(a, b []string) bool { return len(a) == 0 && len(b) == 0 || cmp.Equal(a, b) })

// statusField is a field of /proc/<pid>/status, trimmed.
func statusField(status, key string) string {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "(missing)"
}

func unixMajor(dev uint64) uint32 { return uint32((dev >> 8) & 0xfff) }
func unixMinor(dev uint64) uint32 { return uint32((dev & 0xff) | ((dev >> 12) & 0xfff00)) }

// Without the tap, the jailed Firecracker cannot open it (the kernel
// checks the tap's owner against the jail's uid), the boot fails, and the
// driver's undo kills the VM through the helper, leaving nothing.
func TestLaunchJailedTapIsTheJails(t *testing.T) {
	r := startJailRig(t, nil)
	id := r.vm(t)
	r.createTap(t, id)
	op := launchOp(id)
	op.Tap = false
	res, err := r.client.LaunchJailed(t.Context(), op)
	if err != nil {
		t.Fatal(err)
	}
	rep := r.runOwner(t, ownerJob{Action: "boot", VMID: id, Launch: res, Config: r.vmConfig(id)})
	if !strings.Contains(rep.Err, "Operation not permitted") {
		t.Errorf("boot with a tap the jail may not open: %q", rep.Err)
	}
	r.assertBaseline(t)
}

// Twenty launches and kills leave no jail, cgroup, process, disk mode or
// tap owner behind.
func TestLaunchKillCycles(t *testing.T) {
	r := startJailRig(t, nil)
	id := r.vm(t)
	r.createTap(t, id)
	disk := filepath.Join(r.stateDir, "vms", id, "root.img")
	before := fileStat(t, disk)
	for i := range 20 {
		res, err := r.client.LaunchJailed(t.Context(), launchOp(id))
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if res.UID != r.uidBase {
			t.Errorf("cycle %d: uid %d, want the range's first %d again", i, res.UID, r.uidBase)
		}
		if err := r.client.KillJailed(t.Context(), helperapi.KillJailed{VMID: id}); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		r.assertBaseline(t)
		if st := fileStat(t, disk); st.Gid != before.Gid || st.Mode != before.Mode {
			t.Fatalf("cycle %d: disk gid %d mode %o, want %d %o", i, st.Gid, st.Mode, before.Gid, before.Mode)
		}
		if got := r.tapOwner(t, id); got != strconv.Itoa(testOwner) {
			t.Fatalf("cycle %d: tap owner %s", i, got)
		}
	}
}

// Two jails run side by side with distinct uids from the range; a range
// that is used up refuses the next launch and leaves nothing behind.
func TestLaunchJailedUIDs(t *testing.T) {
	r := startJailRig(t, func(c *Config) { c.JailUIDCount = 2 })
	var ids []string
	for range 3 {
		ids = append(ids, r.vm(t))
	}
	op := func(id string) helperapi.LaunchJailed { o := launchOp(id); o.Tap = false; return o }
	a, err := r.client.LaunchJailed(t.Context(), op(ids[0]))
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.client.LaunchJailed(t.Context(), op(ids[1]))
	if err != nil {
		t.Fatal(err)
	}
	if a.UID != r.uidBase || b.UID != r.uidBase+1 {
		t.Errorf("uids %d and %d, want %d and %d", a.UID, b.UID, r.uidBase, r.uidBase+1)
	}
	_, err = r.client.LaunchJailed(t.Context(), op(ids[2]))
	if !errors.Is(err, helperapi.ErrUnsupported) || !strings.Contains(err.Error(), "in use") {
		t.Errorf("third launch with two uids: %v", err)
	}
	if dirs, _ := os.ReadDir(filepath.Join(r.jailDir, "firecracker")); len(dirs) != 2 {
		t.Errorf("%d jails after the refused launch, want 2", len(dirs))
	}
	for _, id := range ids[:2] {
		if err := r.client.KillJailed(t.Context(), helperapi.KillJailed{VMID: id}); err != nil {
			t.Fatal(err)
		}
	}
	r.assertBaseline(t)
}

// Each refused launch names its reason with a helper error code, and
// leaves no jail, cgroup or process behind, nor a disk changed.
func TestLaunchJailedRefuses(t *testing.T) {
	r := startJailRig(t, nil)
	tests := []struct {
		attack string
		setup  func(t *testing.T, id string) helperapi.LaunchJailed
		code   helperapi.Code
		msg    string
	}{
		{"a disk that is a symlink to another user's file", func(t *testing.T, id string) helperapi.LaunchJailed {
			p := filepath.Join(r.stateDir, "vms", id, "root.img")
			_ = os.Remove(p)
			if err := os.Symlink("/etc/shadow", p); err != nil {
				t.Fatal(err)
			}
			return launchOp(id)
		}, helperapi.CodeForbidden, "symlink"},
		{"a disk with a second name, an image's file whose group would change", func(t *testing.T, id string) helperapi.LaunchJailed {
			if err := os.Link(filepath.Join(r.stateDir, "vms", id, "root.img"), filepath.Join(r.stateDir, "vms", id, "image.img")); err != nil {
				t.Fatal(err)
			}
			return launchOp(id)
		}, helperapi.CodeForbidden, "2 names"},
		{"a disk the owner does not own", func(t *testing.T, id string) helperapi.LaunchJailed {
			if err := os.Chown(filepath.Join(r.stateDir, "vms", id, "root.img"), 0, 0); err != nil {
				t.Fatal(err)
			}
			return launchOp(id)
		}, helperapi.CodeForbidden, "not the owner"},
		{"a kernel that is not there", func(t *testing.T, id string) helperapi.LaunchJailed {
			o := launchOp(id)
			o.Kernel = "missing"
			return o
		}, helperapi.CodeNotFound, "no such file"},
		{"a vm directory that is not the owner's", func(t *testing.T, id string) helperapi.LaunchJailed {
			if err := os.Chown(filepath.Join(r.stateDir, "vms", id), 0, 0); err != nil {
				t.Fatal(err)
			}
			return launchOp(id)
		}, helperapi.CodeForbidden, "not the owner"},
		{"a tap that does not exist (undone after the disk was lent)", func(t *testing.T, id string) helperapi.LaunchJailed {
			return launchOp(id)
		}, helperapi.CodeNotFound, "CreateTap first"},
	}
	for _, tt := range tests {
		t.Run(tt.attack, func(t *testing.T) {
			id := r.vm(t)
			op := tt.setup(t, id)
			disk := filepath.Join(r.stateDir, "vms", id, "root.img")
			var before syscall.Stat_t
			_ = syscall.Lstat(disk, &before)
			_, err := r.client.LaunchJailed(t.Context(), op)
			if !isCode(err, tt.code) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("LaunchJailed: %v; want code %s and %q", err, tt.code, tt.msg)
			}
			r.assertBaseline(t)
			var after syscall.Stat_t
			_ = syscall.Lstat(disk, &after)
			if after.Gid != before.Gid || after.Mode != before.Mode {
				t.Errorf("disk gid %d mode %o, was %d %o", after.Gid, after.Mode, before.Gid, before.Mode)
			}
		})
	}

	// A second launch for a VM with a jail.
	id := r.vm(t)
	op := launchOp(id)
	op.Tap = false
	if _, err := r.client.LaunchJailed(t.Context(), op); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.LaunchJailed(t.Context(), op); !isCode(err, helperapi.CodeExists) {
		t.Errorf("second launch: %v, want exists", err)
	}
	if err := r.client.KillJailed(t.Context(), helperapi.KillJailed{VMID: id}); err != nil {
		t.Fatal(err)
	}
	r.assertBaseline(t)
}

// A jailer that fails is reported with what it wrote (the console log),
// and the launch is undone.
func TestLaunchJailedJailerFails(t *testing.T) {
	dir, err := os.MkdirTemp("", "bgr-badjailer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "jailer")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho 'Jailer error: boom' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := startJailRig(t, func(c *Config) { c.Jailer = bad })
	id := r.vm(t)
	op := launchOp(id)
	op.Tap = false
	_, err = r.client.LaunchJailed(t.Context(), op)
	if err == nil || !strings.Contains(err.Error(), "jailer failed") || !strings.Contains(err.Error(), "Jailer error: boom") {
		t.Fatalf("LaunchJailed with a failing jailer: %v", err)
	}
	r.assertBaseline(t)
}

// A helper started without jail settings refuses both jail operations.
func TestJailOpsOff(t *testing.T) {
	h := startHelper(t)
	if _, err := h.client.LaunchJailed(t.Context(), launchOp(testID)); !errors.Is(err, helperapi.ErrUnsupported) {
		t.Errorf("LaunchJailed: %v", err)
	}
	if err := h.client.KillJailed(t.Context(), helperapi.KillJailed{VMID: testID}); !errors.Is(err, helperapi.ErrUnsupported) {
		t.Errorf("KillJailed: %v", err)
	}
}

// The owner's daemon, in a process of its own running as the owner: what
// it is asked to do and what it saw.
const envOwnerDriver = "BANGER_TEST_OWNER_DRIVER"

type ownerJob struct {
	Action string                       `json:"action"` // boot, attach-shutdown, attach-kill
	Helper string                       `json:"helper"` // the helper's socket
	VMID   string                       `json:"vm_id"`
	Launch helperapi.LaunchJailedResult `json:"launch"`
	Config vmm.Config                   `json:"config"`
}

type ownerReport struct {
	Err   string   `json:"err"`
	State string   `json:"state"`
	Vsock string   `json:"vsock"` // the error dialing the vsock socket, "" when it worked
	Kill  string   `json:"kill"`  // the error of a kill by signal
	Exit  vmm.Exit `json:"exit"`
}

func (r *jailRig) runOwner(t *testing.T, job ownerJob) ownerReport {
	t.Helper()
	job.Helper = r.socket
	in, err := json.Marshal(job)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), jailBins.testBin)
	cmd.Env = []string{envOwnerDriver + "=1"}
	cmd.Dir = "/"
	cmd.Stdin = bytes.NewReader(in)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: testOwner, Gid: testOwner, Groups: []uint32{}}}
	if err := cmd.Run(); err != nil {
		t.Fatalf("owner process: %v\n%s", err, stderr.String())
	}
	var rep ownerReport
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("owner report %q: %v\n%s", out.String(), err, stderr.String())
	}
	t.Logf("owner %s: %+v", job.Action, rep)
	return rep
}

func ownerDriverMain() {
	if os.Getenv(envOwnerDriver) == "" {
		return
	}
	var job ownerJob
	rep := ownerReport{}
	if err := json.NewDecoder(os.Stdin).Decode(&job); err != nil {
		rep.Err = err.Error()
	} else {
		rep = runOwnerJob(job)
	}
	_ = json.NewEncoder(os.Stdout).Encode(rep)
	os.Exit(0)
}

func runOwnerJob(job ownerJob) (rep ownerReport) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if os.Getuid() == 0 {
		return ownerReport{Err: "the owner's driver runs as root"}
	}
	helper := &helperapi.Client{Socket: job.Helper}
	kill := func() error { return helper.KillJailed(ctx, helperapi.KillJailed{VMID: job.VMID}) }
	l := job.Launch
	d := &firecracker.Driver{}
	h := vmm.Handle{Kind: vmm.Firecracker, PID: l.PID, StartTime: l.StartTime, ControlSocket: l.Socket}
	fail := func(err error) ownerReport { rep.Err = err.Error(); return rep }
	wait := func(m vmm.Machine) {
		select {
		case <-m.Done():
			rep.Exit = m.Exit()
		case <-time.After(10 * time.Second):
			rep.Err = "the process did not end"
		}
	}
	switch job.Action {
	case "boot":
		m, err := d.BootJailed(ctx, firecracker.Jailed{
			PID: l.PID, StartTime: l.StartTime, Socket: l.Socket, Root: l.Root,
			Log: l.Log, ConsoleLog: l.ConsoleLog, Kill: kill,
		}, job.Config, nil)
		if err != nil {
			return fail(err)
		}
		defer func() { _ = m.Close() }()
		st, err := m.State(ctx)
		if err != nil {
			return fail(err)
		}
		rep.State = string(st)
		rep.Vsock = dialVsock(filepath.Join(l.Root, jail.JailVsock))
	case "attach-shutdown":
		m, err := d.Attach(ctx, h, nil)
		if err != nil {
			return fail(err)
		}
		st, err := m.State(ctx)
		if err != nil {
			return fail(err)
		}
		rep.State = string(st)
		if err := m.Kill(); err != nil {
			rep.Kill = err.Error()
		}
		if err := m.Shutdown(ctx); err != nil {
			return fail(err)
		}
		wait(m)
	case "attach-kill":
		m, err := d.AttachJailed(ctx, h, kill, nil)
		if err != nil {
			return fail(err)
		}
		if err := m.Kill(); err != nil {
			return fail(err)
		}
		wait(m)
	default:
		return fail(fmt.Errorf("unknown action %q", job.Action))
	}
	return rep
}

// dialVsock connects to a vsock device's host socket as Firecracker's
// vsock.md describes (CONNECT <port>); the fake has no guest listening and
// closes the connection.
func dialVsock(path string) string {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return err.Error()
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	// Connected: that is what the owner's access is. The fake, with no
	// guest listening, closes at once; the request may or may not get
	// through before that.
	if _, err := c.Write([]byte("CONNECT 52\n")); err != nil && !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		return err.Error()
	}
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		return err.Error()
	}
	return ""
}

// The helper refuses binaries that someone besides root could change: at
// start-up, and at launch when they became so since.
func TestJailBinariesMustStayRoots(t *testing.T) {
	testutil.RequireRoot(t)
	buildJailBins(t)
	dir, err := os.MkdirTemp("", "bgr-fcbin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	fc := filepath.Join(dir, "firecracker")
	if err := copyFileMode(jailBins.firecracker, fc, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := Config{OwnerUID: testOwner, StateDir: t.TempDir(), Socket: "/run/x.sock", Bridge: "banger0",
		Firecracker: fc, Jailer: jailBins.jailer, JailUIDBase: 3900000000, JailDir: filepath.Join(dir, "jail")}
	if err := os.Chown(fc, testOwner, testOwner); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "not owned by root") {
		t.Errorf("New with the owner's firecracker: %v", err)
	}
	if err := os.Chown(fc, 0, 0); err != nil {
		t.Fatal(err)
	}

	r := startJailRig(t, func(c *Config) { c.Firecracker = fc })
	if err := os.Chmod(fc, 0o775); err != nil {
		t.Fatal(err)
	}
	id := r.vm(t)
	op := launchOp(id)
	op.Tap = false
	if _, err := r.client.LaunchJailed(t.Context(), op); !isCode(err, helperapi.CodeForbidden) || !strings.Contains(err.Error(), "writable by group or others") {
		t.Errorf("LaunchJailed with a group-writable firecracker: %v", err)
	}
	r.assertBaseline(t)
}
