package helper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// A jail, as LaunchJailed builds it (docs/jailer.md for what the jailer
// adds):
//
//	<jail dir>/                          root, 0711 (checkTrusted)
//	  <firecracker name>/<vm id>/        root, 0711: the instance dir
//	    jail.json                        the record: uid, cgroup, tap, disks, pid
//	    api.sock                         hard link to the API socket, owner's, 0600
//	    firecracker.log                  hard link to root/firecracker.log
//	    root/                            the chroot: the jail's uid, 0700, plus an
//	                                     ACL that lets the owner in (grantOwnerIn)
//	      firecracker                    the jailer's copy of the binary
//	      firecracker.pid                Firecracker's host pid (the jailer writes it)
//	      vmlinux, initrd                copies of the VM's kernel and initrd, root:<jail gid> 0440
//	      drive_<id>                     hard links to the VM's disks
//	      firecracker.log                owner:<jail gid> 0620: Firecracker appends, the owner reads
//	      dev/{kvm,net/tun,urandom}      made by the jailer, the jail's uid
//	      run/firecracker.socket         the API socket
//
// Kernel and initrd are copied: they may be hard links to an image's
// files, and a copy owned by root cannot be changed from the jail. Disks
// are hard-linked, never copied, so that the guest's writes land in the
// VM's own file; a disk must therefore lie on the jail dir's file system,
// and have no other name (its group and mode change while jailed: the
// jail's gid gets read-write access, the owner keeps its own). A bind
// mount instead would leave a mount on the host for every crash to leak.
const (
	jailRecordName = "jail.json"
	jailRootName   = "root"
	// jailReadyTimeout bounds the wait for the jailer to finish and for
	// Firecracker's API socket to appear: both take milliseconds.
	jailReadyTimeout = 10 * time.Second
	// Cgroup limits beyond what the guest is given: Firecracker's own
	// memory (a few MiB), its console logger and the page cache of disk
	// I/O, which is charged to the cgroup but reclaimable; half a CPU
	// for its device emulation and API threads; a bound on tasks.
	jailMemOverhead = 128 << 20
	jailCPUPeriod   = 100000
	jailVMMQuota    = jailCPUPeriod / 2
	jailPidsMax     = 256
	// maxBootFileSize bounds a kernel or initrd, which the helper copies
	// into the jail at root's expense of disk space.
	maxBootFileSize = 1 << 30
)

// jailRecord is what the helper writes down about a jail before it
// changes anything (intent), so that KillJailed can undo a launch cut
// short, even by a crash of the helper.
type jailRecord struct {
	VMID   string       `json:"vm_id"`
	UID    uint32       `json:"uid"` // also the gid
	Cgroup string       `json:"cgroup"`
	Tap    string       `json:"tap,omitempty"` // the tap given to the jail's uid
	Disks  []recordDisk `json:"disks"`
	// PID and StartTime are Firecracker's, once known.
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
}

// recordDisk is a disk linked into the jail, as it was before.
type recordDisk struct {
	ID   string `json:"id"`
	File string `json:"file"`
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
	GID  uint32 `json:"gid"`
	Mode uint32 `json:"mode"` // permission bits
}

// jailLimits are the cgroup limits of a VM with cpus vCPUs and memMiB of
// memory.
func jailLimits(cpus, memMiB int) jail.CgroupLimits {
	return jail.CgroupLimits{
		MemoryMax: int64(memMiB)<<20 + jailMemOverhead,
		CPUQuota:  cpus*jailCPUPeriod + jailVMMQuota,
		CPUPeriod: jailCPUPeriod,
		PidsMax:   jailPidsMax,
	}
}

// vmFileKind says how a file reaches the jail.
type vmFileKind int

const (
	copied vmFileKind = iota + 1 // kernel, initrd
	linked                       // disks
)

type vmFile struct {
	f    *os.File
	st   unix.Stat_t
	kind vmFileKind
	disk helperapi.JailDisk
}

func (s *Server) launchJailed(ctx context.Context, op helperapi.LaunchJailed) (res helperapi.LaunchJailedResult, err error) {
	if s.jail == nil {
		return res, errJailOff
	}
	jc := s.jail
	log := s.logFor(ctx).With("vm", op.VMID)
	// Checked at start-up, and again: a package upgrade or an admin's
	// chmod may have changed them since.
	for _, exe := range []string{jc.firecracker, jc.jailer} {
		if err := checkTrusted(exe, false); err != nil {
			return res, helperapi.Errorf(helperapi.CodeForbidden, "refuse to run %s: %v", exe, err)
		}
	}
	dirSt, err := s.ensureJailDir()
	if err != nil {
		return res, err
	}
	if dirs, err := s.findJails(op.VMID); err != nil {
		return res, err
	} else if len(dirs) > 0 {
		return res, helperapi.Errorf(helperapi.CodeExists, "vm %s already has a jail at %s (hint: KillJailed removes it)", op.VMID, dirs[0])
	}
	mount, err := cgroup2Mount()
	if err != nil {
		return res, err
	}
	cgroupRel := jc.cgroup + "/" + op.VMID

	// The VM's directory and files, opened beneath the state dir without
	// following symlinks, each checked to be the owner's.
	vmSt, err := s.vmDirStat(op.VMID)
	if err != nil {
		return res, err
	}
	files := map[string]*vmFile{} // by host path, as jail.JailLayout.Jailed names them
	defer func() {
		for _, f := range files {
			f.f.Close()
		}
	}()
	vmPath := func(name string) string { return filepath.Join(s.cfg.StateDir, "vms", op.VMID, name) }
	open := func(name string, kind vmFileKind, d helperapi.JailDisk) error {
		f, _, err := s.openVMFile(op.VMID, name, false)
		if err != nil {
			return err
		}
		vf := &vmFile{f: f, kind: kind, disk: d}
		files[vmPath(name)] = vf
		if err := unix.Fstat(int(f.Fd()), &vf.st); err != nil {
			return fmt.Errorf("stat %s: %w", f.Name(), err)
		}
		if kind == copied && vf.st.Size > maxBootFileSize {
			return helperapi.Errorf(helperapi.CodeInvalid, "%s is %d bytes: a kernel or initrd is copied into the jail, and may take at most %d", f.Name(), vf.st.Size, int64(maxBootFileSize))
		}
		if kind == linked {
			switch {
			case vf.st.Nlink != 1:
				return helperapi.Errorf(helperapi.CodeForbidden, "disk %s has %d names: a jailed disk must be the VM's own file, since its group and mode change while jailed", f.Name(), vf.st.Nlink)
			case vf.st.Dev != dirSt.Dev:
				return helperapi.Errorf(helperapi.CodeUnsupported, "disk %s is on another file system than the jail dir %s: it is hard-linked into the jail (hint: --jail-dir on the state dir's file system)", f.Name(), jc.dir)
			}
		}
		return nil
	}
	cfg := vmm.Config{ID: op.VMID, Kernel: vmPath(op.Kernel)}
	if err := open(op.Kernel, copied, helperapi.JailDisk{}); err != nil {
		return res, err
	}
	if op.Initrd != "" {
		cfg.Initrd = vmPath(op.Initrd)
		if err := open(op.Initrd, copied, helperapi.JailDisk{}); err != nil {
			return res, err
		}
	}
	for _, d := range op.Disks {
		cfg.Disks = append(cfg.Disks, vmm.Disk{ID: d.ID, Path: vmPath(d.File), ReadOnly: d.ReadOnly})
		if err := open(d.File, linked, d); err != nil {
			return res, err
		}
	}

	uid, err := s.allocJailUID()
	if err != nil {
		return res, err
	}
	argv, layout, err := s.jailSpec(op.VMID, uid).JailerArgv()
	if err != nil {
		return res, err
	}
	_, links, err := layout.Jailed(cfg)
	if err != nil {
		return res, err
	}

	// From here on every step is undone by killJail, which follows the
	// record written first.
	if err := os.MkdirAll(filepath.Dir(layout.InstanceDir), 0o711); err != nil {
		return res, fmt.Errorf("create jail dir: %w", err)
	}
	if err := os.Mkdir(layout.InstanceDir, 0o711); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return res, helperapi.Errorf(helperapi.CodeExists, "jail %s exists (hint: KillJailed removes it)", layout.InstanceDir)
		}
		return res, fmt.Errorf("create jail: %w", err)
	}
	defer func() {
		if err != nil {
			if uerr := s.killJail(context.WithoutCancel(ctx), op.VMID); uerr != nil {
				log.Error("undo failed jailed launch", "err", uerr)
			}
		}
	}()
	inst, err := os.OpenFile(layout.InstanceDir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return res, fmt.Errorf("open jail: %w", err)
	}
	defer inst.Close()
	rec := jailRecord{VMID: op.VMID, UID: uid, Cgroup: cgroupRel}
	if op.Tap {
		rec.Tap = helperapi.TapName(op.VMID)
	}
	for _, d := range op.Disks {
		st := files[vmPath(d.File)].st
		rec.Disks = append(rec.Disks, recordDisk{ID: d.ID, File: d.File, Dev: st.Dev, Ino: st.Ino, GID: st.Gid, Mode: st.Mode & 0o7777})
	}
	if err := writeRecord(inst, rec); err != nil {
		return res, err
	}

	// The chroot, filled before the jailer runs (it leaves an existing
	// root alone, then chowns it to the jail's uid).
	if err := unix.Mkdirat(int(inst.Fd()), jailRootName, 0o700); err != nil {
		return res, fmt.Errorf("create jail root: %w", err)
	}
	root, err := openIn(inst, jailRootName, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return res, err
	}
	defer root.Close()
	for _, l := range links {
		if err := placeInJail(root, l, files[l.Source], uid); err != nil {
			return res, err
		}
	}
	if err := createJailLog(inst, root, s.cfg.OwnerUID, uid); err != nil {
		return res, err
	}
	if op.Tap {
		if err := s.setTapOwner(rec.Tap, uid); err != nil {
			return res, err
		}
	}
	applied, missing, err := makeJailCgroup(mount, jc.cgroup, op.VMID, jailLimits(op.CPUs, op.MemoryMiB))
	if err != nil {
		return res, err
	}
	if len(missing) > 0 {
		log.Warn("cgroup v2 lacks controllers; their limits are left out", "controllers", missing, "cgroup", cgroupRel)
	}
	cgroupDir := filepath.Join(mount, cgroupRel)

	consoleLog := vmPath(consoleLogName)
	pr, pw, err := os.Pipe()
	if err != nil {
		return res, fmt.Errorf("console pipe: %w", err)
	}
	defer pw.Close()
	err = s.startConsoleLogger(pr, consoleLog, s.cfg.OwnerUID, vmSt.Gid, cgroupDir)
	pr.Close()
	if err != nil {
		return res, err
	}
	if err := runJailer(ctx, argv, pw); err != nil {
		return res, fmt.Errorf("%w%s", err, s.consoleTail(op.VMID))
	}
	pw.Close() // Firecracker holds the write end now.

	pid, err := readJailPID(root, filepath.Base(layout.PIDFile))
	if err != nil {
		return res, err
	}
	start, err := vmm.ProcStartTime(pid)
	if err != nil {
		return res, fmt.Errorf("firecracker pid %d exited at once%s", pid, s.consoleTail(op.VMID))
	}
	var procSt unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(pid), &procSt); err != nil || procSt.Uid != uid {
		return res, fmt.Errorf("pid %d from the jailer's pid file does not run as the jail's uid %d", pid, uid)
	}
	if !inCgroup(pid, cgroupRel) {
		return res, fmt.Errorf("firecracker pid %d is not in cgroup %s (hint: the jailer is older than the one documented, which moves into --parent-cgroup)", pid, cgroupRel)
	}
	rec.PID, rec.StartTime = pid, start
	if err := writeRecord(inst, rec); err != nil {
		return res, err
	}
	if err := handOverSocket(ctx, inst, root, pid, start, uid, s.cfg.OwnerUID, vmSt.Gid); err != nil {
		return res, fmt.Errorf("%w%s", err, s.consoleTail(op.VMID))
	}
	if err := grantOwnerIn(root, s.cfg.OwnerUID); err != nil {
		return res, err
	}
	log.Info("jailed firecracker running", "pid", pid, "uid", uid, "cgroup", cgroupRel, "limits", applied)
	return helperapi.LaunchJailedResult{
		PID:        pid,
		StartTime:  start,
		Socket:     filepath.Join(layout.InstanceDir, jail.HostSocketName),
		Log:        filepath.Join(layout.InstanceDir, jail.HostLogName),
		ConsoleLog: consoleLog,
		Root:       layout.Root,
		UID:        uid,
		GID:        uid,
		Cgroup:     cgroupRel,
		Limits:     append([]string{}, applied...),
	}, nil
}

// jailSpec is the jailer's command line for vmID's Firecracker running as
// uid: the helper's binaries and jail dir, the VM id as the jail's id, a
// new pid namespace, and the cgroup the helper creates beforehand as
// --parent-cgroup (without --cgroup values, the jailer moves into it).
// The helper's network namespace, if any, is the jail's.
func (s *Server) jailSpec(vmID string, uid uint32) jail.JailSpec {
	return jail.JailSpec{
		Jailer:       s.jail.jailer,
		ExecFile:     s.jail.firecracker,
		ID:           vmID,
		UID:          int(uid),
		GID:          int(uid),
		ChrootBase:   s.jail.dir,
		NetNS:        s.cfg.NetNS,
		ParentCgroup: s.jail.cgroup + "/" + vmID,
		NewPIDNS:     true,
	}
}

// ensureJailDir creates the jail dir when missing and checks that nobody
// but root can change it or anything above it.
func (s *Server) ensureJailDir() (unix.Stat_t, error) {
	var st unix.Stat_t
	dir := s.jail.dir
	if err := checkTrusted(filepath.Dir(dir), true); err != nil {
		return st, helperapi.Errorf(helperapi.CodeForbidden, "jail dir: %v", err)
	}
	if err := os.Mkdir(dir, 0o711); err != nil && !errors.Is(err, fs.ErrExist) {
		return st, fmt.Errorf("create jail dir: %w", err)
	}
	if err := checkTrusted(dir, true); err != nil {
		return st, helperapi.Errorf(helperapi.CodeForbidden, "jail dir: %v", err)
	}
	if err := unix.Stat(dir, &st); err != nil {
		return st, fmt.Errorf("stat jail dir: %w", err)
	}
	return st, nil
}

// vmDirStat stats <state dir>/vms/<id>, reached without following
// symlinks, and checks that the owner owns it: the console logger,
// running as the owner, writes there, with the directory's group.
func (s *Server) vmDirStat(vmID string) (unix.Stat_t, error) {
	var st unix.Stat_t
	state, err := os.OpenFile(s.cfg.StateDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return st, helperapi.Errorf(helperapi.CodeNotFound, "open state dir %s: %v", s.cfg.StateDir, err)
	}
	defer state.Close()
	d, err := openIn(state, filepath.Join("vms", vmID), unix.O_PATH|unix.O_DIRECTORY, 0)
	if errors.Is(err, unix.ENOENT) {
		return st, helperapi.Errorf(helperapi.CodeNotFound, "vm directory %s/vms/%s does not exist", s.cfg.StateDir, vmID)
	}
	if err != nil {
		return st, err
	}
	defer d.Close()
	if err := unix.Fstat(int(d.Fd()), &st); err != nil {
		return st, fmt.Errorf("stat %s: %w", d.Name(), err)
	}
	if st.Uid != s.cfg.OwnerUID {
		return st, helperapi.Errorf(helperapi.CodeForbidden, "vm directory %s is owned by uid %d, not the owner %d", d.Name(), st.Uid, s.cfg.OwnerUID)
	}
	return st, nil
}

// startConsoleLogger starts the helper's binary as the owner (uid, gid, no
// supplementary groups) copying r into path, and moves it into the VM's
// cgroup.
func (s *Server) startConsoleLogger(r *os.File, path string, uid, gid uint32, cgroupDir string) error {
	cmd := exec.Command(s.jail.executable)
	cmd.Env = []string{envConsoleLog + "=" + path, envConsoleLogMax + "=" + strconv.Itoa(vmm.DefaultConsoleLogMax)}
	cmd.Dir = "/"
	cmd.Stdin = r
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}},
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start console logger: %w", err)
	}
	go func() { _ = cmd.Wait() }() // reap it, if the helper is still its parent then
	if err := moveToCgroup(cgroupDir, cmd.Process.Pid); err != nil {
		_ = cmd.Process.Kill()
		return err
	}
	return nil
}

// runJailer runs the jailer in a session of its own with stdout and
// stderr to out, an empty environment, and umask 007: sockets and files
// Firecracker creates later get group permissions, which the owner's
// default ACL entry needs (unix sockets take the umask even under a
// default ACL). With --new-pid-ns the jailer exits once Firecracker runs.
func runJailer(ctx context.Context, argv []string, out *os.File) error {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{}
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	umaskMu.Lock()
	old := unix.Umask(0o007)
	err = cmd.Start()
	unix.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return fmt.Errorf("start jailer: %w", err)
	}
	// err is written by the waiter and read only after done is closed.
	done := make(chan struct{})
	go func() { err = cmd.Wait(); close(done) }()
	t := time.NewTimer(jailReadyTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		_ = cmd.Process.Kill()
		<-done // reap it; its error only says it was killed
		return fmt.Errorf("jailer did not finish within %s", jailReadyTimeout)
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-done // reap it; its error only says it was killed
		return fmt.Errorf("run jailer: %w", ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("jailer failed: %w", err)
	}
	return nil
}

// readJailPID reads the pid the jailer wrote to <root>/<name>.
func readJailPID(root *os.File, name string) (int, error) {
	f, err := openIn(root, name, unix.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return 0, fmt.Errorf("read firecracker's pid: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 32))
	if err != nil {
		return 0, fmt.Errorf("read firecracker's pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("read firecracker's pid: %s holds %q", f.Name(), b)
	}
	return pid, nil
}

// consoleTail quotes the end of a VM's console log for an error: the
// jailer and an early Firecracker write their errors there. It is read as
// any VM file, without following symlinks; the logger may trail a little.
func (s *Server) consoleTail(vmID string) string {
	var b []byte
	for deadline := time.Now().Add(500 * time.Millisecond); ; time.Sleep(20 * time.Millisecond) {
		if f, _, err := s.openVMFile(vmID, consoleLogName, false); err == nil {
			if fi, err := f.Stat(); err == nil && fi.Size() > 1024 {
				_, _ = f.Seek(-1024, io.SeekEnd)
			}
			b, _ = io.ReadAll(io.LimitReader(f, 1024))
			f.Close()
		}
		if len(b) > 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(b) == 0 {
		return ""
	}
	return ": console: " + strings.TrimSpace(string(b))
}

// setTapOwner makes uid the owner of the VM's persistent tap, by attaching
// to it as root the way the VMM will (addTap's flags). A tap in use by a
// running VMM cannot be attached to, and is refused.
func (s *Server) setTapOwner(name string, uid uint32) error {
	return s.inNetNS(func() error {
		link, err := netlink.LinkByName(name)
		if linkNotFound(err) {
			return helperapi.Errorf(helperapi.CodeNotFound, "tap %q does not exist (hint: CreateTap first)", name)
		}
		if err != nil {
			return fmt.Errorf("find tap %q: %w", name, err)
		}
		if link.Type() != "tuntap" {
			return helperapi.Errorf(helperapi.CodeForbidden, "link %q is a %s, not a tap", name, link.Type())
		}
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("set owner of tap %q: %w", name, err)
		}
		defer func() { _ = unix.Close(fd) }()
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return fmt.Errorf("set owner of tap %q: %w", name, err)
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return helperapi.Errorf(helperapi.CodeForbidden, "set owner of tap %q: a process has it open", name)
			}
			return fmt.Errorf("set owner of tap %q: %w", name, err)
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, int(uid)); err != nil {
			return fmt.Errorf("set owner of tap %q: %w", name, err)
		}
		return nil
	})
}

// allocJailUID picks the lowest uid of the range that no jail records or
// owns a root of, and that no process runs as.
func (s *Server) allocJailUID() (uint32, error) {
	used := make(map[uint32]bool)
	jails, err := s.allJails()
	if err != nil {
		return 0, err
	}
	for _, j := range jails {
		if rec, err := readRecordAt(j.dir); err == nil {
			used[rec.UID] = true
		}
		var st unix.Stat_t
		if unix.Lstat(filepath.Join(j.dir, jailRootName), &st) == nil {
			used[st.Uid] = true
		}
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list processes: %w", err)
	}
	jc := s.jail
	inRange := func(u uint32) bool { return u >= jc.uidBase && uint64(u) < uint64(jc.uidBase)+uint64(jc.uidCount) }
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		// A zombie holds nothing: a killed Firecracker is one until init
		// reaps it, since the jailer that forked it has exited.
		var st unix.Stat_t
		if unix.Lstat("/proc/"+p.Name(), &st) == nil && inRange(st.Uid) && !zombie("/proc/"+p.Name()) {
			used[st.Uid] = true
		}
	}
	for u := uint64(jc.uidBase); u < uint64(jc.uidBase)+uint64(jc.uidCount); u++ {
		if !used[uint32(u)] {
			return uint32(u), nil
		}
	}
	return 0, helperapi.Errorf(helperapi.CodeUnsupported, "all %d jail uids from %d are in use (hint: --jail-uid-count)", jc.uidCount, jc.uidBase)
}

// zombie reports whether the process at /proc/<pid> has exited and waits
// to be reaped.
func zombie(procDir string) bool {
	b, err := os.ReadFile(procDir + "/stat")
	if err != nil {
		return true // gone meanwhile
	}
	i := strings.LastIndexByte(string(b), ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}
