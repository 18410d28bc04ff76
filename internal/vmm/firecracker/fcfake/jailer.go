package fcfake

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// JailerName is the file name the fake jailer answers to. The real jailer
// clears its environment before anything else, and so does whoever starts
// it (banger-helper), so the mode cannot be chosen by an environment
// variable: a test binary whose TestMain calls JailerMain becomes the fake
// jailer when it is run under this name (a copy or a hard link).
const JailerName = "jailer"

// jailerExitError is the jailer's exit status on any error.
const jailerExitError = 1

// JailerMain runs the fake jailer and exits when the process was started
// as JailerName; otherwise it returns false at once.
func JailerMain() bool {
	if filepath.Base(os.Args[0]) != JailerName {
		return false
	}
	os.Exit(RunJailer(os.Args[1:], os.Stdout, os.Stderr))
	return true
}

// jailerArgs is a parsed jailer command line (docs/jailer.md, "Jailer
// Usage").
type jailerArgs struct {
	id, execFile, chrootBase, netns, parentCgroup string
	uid, gid                                      uint32
	cgroupVersion                                 string
	cgroups, limits                               []string
	daemonize, newPIDNS                           bool
	extra                                         []string // after "--", for Firecracker
}

// RunJailer is the fake jailer: it checks its command line as the jailer
// does (docs/jailer.md and env.rs), builds the jail, and starts the exec
// file in it with the uid and gid dropped, returning the exit status.
//
// What it does for real, as root: create <chroot_base>/<exec_file_name>/
// <id>/root, copy the exec file there, set the resource limits (no-file
// 2048 unless given), move into --parent-cgroup when no --cgroup is given
// (cgroup v2) or create <parent>/<id> with the --cgroup values, create
// /, /dev, /dev/net and /run in the jail with mode 0700 owned by uid:gid,
// mknod /dev/net/tun, /dev/kvm, /dev/urandom (and /dev/userfaultfd when the
// host has it) owned by uid:gid, join --netns, then run the exec file
// chrooted, with no supplementary groups and an empty environment, as
// "<exec_file_name> --id <id> --start-time-us N --start-time-cpu-us N
// --parent-cpu-time-us N <extra args>". With --new-pid-ns the child is
// pid 1 of a new pid namespace and the parent writes its pid to
// <exec_file_name>.pid in the jail and exits 0; without it the jailer
// writes its own pid there and execs in place.
//
// What it leaves out: pivot_root (the child gets a mount namespace of its
// own and a chroot, which confines the same paths), closing inherited
// descriptors (Go opens everything close-on-exec), cgroup v1 and
// --daemonize, which banger does not use: both are refused as not
// modelled rather than imitated loosely.
func RunJailer(args []string, stdout, stderr io.Writer) int {
	start := time.Now()
	a, err := parseJailerArgs(args)
	if errors.Is(err, errJailerVersion) {
		_, _ = fmt.Fprintln(stdout, "Jailer v1.14.2 (fcfake)")
		return 0
	}
	if err == nil {
		err = a.run(start)
	}
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "Jailer error: %v\n", err)
		return jailerExitError
	}
	return 0
}

var errJailerVersion = errors.New("--version")

func parseJailerArgs(args []string) (*jailerArgs, error) {
	a := &jailerArgs{chrootBase: "/srv/jailer", cgroupVersion: "1"}
	single := map[string]*string{
		"--id": &a.id, "--exec-file": &a.execFile, "--chroot-base-dir": &a.chrootBase,
		"--netns": &a.netns, "--parent-cgroup": &a.parentCgroup, "--cgroup-version": &a.cgroupVersion,
	}
	multi := map[string]*[]string{"--cgroup": &a.cgroups, "--resource-limit": &a.limits}
	var uid, gid string
	single["--uid"], single["--gid"] = &uid, &gid
	seen := map[string]bool{}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		switch {
		case arg == "--":
			a.extra = args[i+1:]
			i = len(args)
		case arg == "--version":
			return nil, errJailerVersion
		case arg == "--daemonize":
			a.daemonize = true
		case arg == "--new-pid-ns":
			a.newPIDNS = true
		case single[arg] != nil || multi[arg] != nil:
			if i+1 >= len(args) {
				return nil, fmt.Errorf("arguments parsing error: the argument '%s' requires a value, but none was supplied", arg)
			}
			i++
			if p := single[arg]; p != nil {
				if seen[arg] {
					return nil, fmt.Errorf("arguments parsing error: the argument '%s' was provided more than once", arg)
				}
				seen[arg] = true
				*p = args[i]
			} else {
				*multi[arg] = append(*multi[arg], args[i])
			}
		default:
			return nil, fmt.Errorf("arguments parsing error: found argument '%s' which wasn't expected, or isn't valid in this context", arg)
		}
	}
	for _, req := range []string{"--id", "--exec-file", "--uid", "--gid"} {
		if !seen[req] {
			return nil, fmt.Errorf("arguments parsing error: argument '%s' required, but not found", req)
		}
	}
	if !validInstanceID(a.id) {
		return nil, fmt.Errorf("invalid instance id: %q", a.id)
	}
	u, err := strconv.ParseUint(uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("invalid uid: %s", uid)
	}
	g, err := strconv.ParseUint(gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("invalid gid: %s", gid)
	}
	a.uid, a.gid = uint32(u), uint32(g)
	// The jailer canonicalizes both paths: the jail is where the real
	// path leads.
	if a.execFile, err = canonical(a.execFile); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(a.execFile); err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a file", a.execFile)
	}
	if !strings.Contains(filepath.Base(a.execFile), "firecracker") {
		return nil, fmt.Errorf("invalid filename. The filename of `--exec-file` option must contain \"firecracker\": %s", filepath.Base(a.execFile))
	}
	if a.chrootBase, err = canonical(a.chrootBase); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(a.chrootBase); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", a.chrootBase)
	}
	if a.parentCgroup == "" {
		a.parentCgroup = filepath.Base(a.execFile)
	}
	if !relativeClean(a.parentCgroup) {
		return nil, errors.New("parent cgroup path is invalid: path must be a relative path without '.' or '..' components")
	}
	if a.cgroupVersion != "1" && a.cgroupVersion != "2" {
		return nil, fmt.Errorf("cgroup version not supported: %s", a.cgroupVersion)
	}
	for _, cg := range a.cgroups {
		file, value, ok := strings.Cut(cg, "=")
		if !ok || value == "" || strings.Contains(value, "=") {
			return nil, fmt.Errorf("invalid format for cgroups: %s", cg)
		}
		if !relativeClean(file) || strings.Count(file, ".") != 1 {
			return nil, fmt.Errorf("invalid cgroup file: %s", cg)
		}
	}
	for _, l := range a.limits {
		name, value, ok := strings.Cut(l, "=")
		if !ok {
			return nil, fmt.Errorf("invalid format for resource limits: %s", l)
		}
		if _, err := strconv.ParseUint(value, 10, 64); err != nil {
			return nil, fmt.Errorf("invalid limit value %s: %w", value, err)
		}
		if name != "fsize" && name != "no-file" {
			return nil, fmt.Errorf("invalid resource argument: %s", name)
		}
	}
	// Not modelled: refused rather than imitated loosely.
	if a.cgroupVersion == "1" && len(a.cgroups) > 0 {
		return nil, errors.New("fcfake jailer: cgroup v1 is not modelled")
	}
	if a.daemonize {
		return nil, errors.New("fcfake jailer: --daemonize is not modelled")
	}
	return a, nil
}

func canonical(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", fmt.Errorf("failed to canonicalize path %s: %w", p, err)
	}
	return abs, nil
}

// relativeClean rejects absolute paths and "." or ".." components, as the
// jailer's checks of --parent-cgroup and cgroup file names do.
func relativeClean(p string) bool {
	if p == "" || filepath.IsAbs(p) {
		return false
	}
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." {
			return false
		}
	}
	return true
}

func (a *jailerArgs) run(start time.Time) error {
	name := filepath.Base(a.execFile)
	chroot := filepath.Join(a.chrootBase, name, a.id, "root")
	if err := os.MkdirAll(chroot, 0o755); err != nil {
		return fmt.Errorf("failed to create directory %s: %w", chroot, err)
	}
	if err := copyFile(a.execFile, filepath.Join(chroot, name)); err != nil {
		return err
	}
	if err := a.setLimits(); err != nil {
		return err
	}
	if err := a.setCgroups(); err != nil {
		return err
	}
	for _, dir := range []string{"", "dev", "dev/net", "run"} {
		p := filepath.Join(chroot, dir)
		if err := os.MkdirAll(p, 0o700); err != nil {
			return fmt.Errorf("failed to create directory %s: %w", p, err)
		}
		if err := os.Chmod(p, 0o700); err != nil {
			return fmt.Errorf("failed to chmod %s: %w", p, err)
		}
		if err := os.Chown(p, int(a.uid), int(a.gid)); err != nil {
			return fmt.Errorf("failed to change owner for %s: %w", p, err)
		}
	}
	devs := []struct {
		path         string
		major, minor uint32
	}{{"dev/net/tun", 10, 200}, {"dev/kvm", 10, 232}, {"dev/urandom", 1, 9}}
	if minor, ok := userfaultfdMinor(); ok {
		devs = append(devs, struct {
			path         string
			major, minor uint32
		}{"dev/userfaultfd", 10, minor})
	}
	for _, d := range devs {
		p := filepath.Join(chroot, d.path)
		if err := unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(d.major, d.minor))); err != nil {
			return fmt.Errorf("failed to create /%s via mknod inside the jail: %w", d.path, err)
		}
		if err := os.Chown(p, int(a.uid), int(a.gid)); err != nil {
			return fmt.Errorf("failed to change owner for /%s: %w", d.path, err)
		}
	}

	var cpu unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &cpu)
	argv := append([]string{"/" + name,
		"--id", a.id,
		"--start-time-us", strconv.FormatInt(start.UnixMicro(), 10),
		"--start-time-cpu-us", "0",
		"--parent-cpu-time-us", strconv.FormatInt(cpu.Nano()/1000, 10),
	}, a.extra...)
	pidFile := filepath.Join(chroot, name+".pid")

	// setns(CLONE_NEWNET) moves one thread: everything from here runs on
	// it, and the child is forked (or the exec done) from it.
	runtime.LockOSThread()
	if a.netns != "" {
		f, err := os.Open(a.netns)
		if err != nil {
			return fmt.Errorf("failed to open file %s: %w", a.netns, err)
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			return fmt.Errorf("failed to join network namespace: %w", err)
		}
	}
	if !a.newPIDNS {
		return a.execInPlace(chroot, argv, pidFile)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{}
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     chroot,
		Credential: &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: []uint32{}},
		Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS,
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("failed to exec into Firecracker: %w", err)
	}
	if err := writePIDFile(pidFile, cmd.Process.Pid); err != nil {
		return err
	}
	// Like the jailer's parent, exit without waiting: the child is
	// reparented.
	return nil
}

// execInPlace is the jailer without --new-pid-ns: Firecracker replaces it
// and keeps its pid.
func (a *jailerArgs) execInPlace(chroot string, argv []string, pidFile string) error {
	if err := writePIDFile(pidFile, os.Getpid()); err != nil {
		return err
	}
	if err := unix.Chroot(chroot); err != nil {
		return fmt.Errorf("failed to chroot into %s: %w", chroot, err)
	}
	if err := os.Chdir("/"); err != nil {
		return fmt.Errorf("failed to chdir to the new root: %w", err)
	}
	// These apply to every thread of the process.
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("failed to drop supplementary groups: %w", err)
	}
	if err := syscall.Setgid(int(a.gid)); err != nil {
		return fmt.Errorf("failed to set gid: %w", err)
	}
	if err := syscall.Setuid(int(a.uid)); err != nil {
		return fmt.Errorf("failed to set uid: %w", err)
	}
	return fmt.Errorf("failed to exec into Firecracker: %w", syscall.Exec(argv[0], argv, []string{}))
}

func writePIDFile(path string, pid int) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("failed to open file %s: %w", path, err)
	}
	_, err = f.WriteString(strconv.Itoa(pid))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("failed to write to %s: %w", path, err)
	}
	return nil
}

// copyFile copies the exec file with its mode, as fs::copy does, so that
// no two jails share the binary's pages.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(dst, fi.Mode().Perm())
	}
	if err != nil {
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// setLimits is the jailer's resource limits: no-file defaults to 2048.
// syscall.Setrlimit (not unix's) also makes Go hand RLIMIT_NOFILE down to
// children unchanged.
func (a *jailerArgs) setLimits() error {
	noFile, fsize := uint64(2048), uint64(0)
	for _, l := range a.limits {
		name, value, _ := strings.Cut(l, "=")
		n, _ := strconv.ParseUint(value, 10, 64)
		if name == "no-file" {
			noFile = n
		} else {
			fsize = n
		}
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: noFile, Max: noFile}); err != nil {
		return fmt.Errorf("failed to set no-file limit: %w", err)
	}
	if fsize > 0 {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: fsize, Max: fsize}); err != nil {
			return fmt.Errorf("failed to set fsize limit: %w", err)
		}
	}
	return nil
}

// setCgroups is the jailer's cgroup v2 handling: with --cgroup values it
// creates <mount>/<parent>/<id>, enables each value's controller in every
// cgroup above it, writes the values and moves in; without any it moves
// into <mount>/<parent> if that exists. Either way the move comes before
// the clone, so Firecracker starts in that cgroup.
func (a *jailerArgs) setCgroups() error {
	if a.cgroupVersion != "2" {
		return nil
	}
	mount, err := cgroup2Mount()
	if err != nil {
		return err
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if len(a.cgroups) == 0 {
		dir := filepath.Join(mount, a.parentCgroup)
		if _, err := os.Stat(dir); err != nil {
			return nil // not there: proceed without moving
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
			return fmt.Errorf("failed to write to cgroup %s: %w", dir, err)
		}
		return nil
	}
	dir := filepath.Join(mount, a.parentCgroup, a.id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("failed to create directory %s: %w", dir, err)
	}
	available, err := os.ReadFile(filepath.Join(mount, "cgroup.controllers"))
	if err != nil {
		return fmt.Errorf("failed to read cgroup controllers: %w", err)
	}
	for _, cg := range a.cgroups {
		file, value, _ := strings.Cut(cg, "=")
		controller, _, _ := strings.Cut(file, ".")
		if !containsField(string(available), controller) {
			return fmt.Errorf("cgroup controller %s is unavailable", controller)
		}
		// Enable the controller from the top down to the parent.
		rel, _ := filepath.Rel(mount, filepath.Dir(dir))
		parts := []string{}
		if rel != "." {
			parts = strings.Split(rel, "/")
		}
		for i := 0; i <= len(parts); i++ {
			ctl := filepath.Join(append([]string{mount}, parts[:i]...)...)
			if err := os.WriteFile(filepath.Join(ctl, "cgroup.subtree_control"), []byte("+"+controller), 0); err != nil {
				return fmt.Errorf("failed to enable %s in %s: %w", controller, ctl, err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0); err != nil {
			return fmt.Errorf("failed to write %s: %w", file, err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
		return fmt.Errorf("failed to write to cgroup %s: %w", dir, err)
	}
	return nil
}

// cgroup2Mount finds the cgroup v2 hierarchy in /proc/mounts, as the
// jailer does (the first one listed).
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return "", fmt.Errorf("failed to open /proc/mounts: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 3 && fields[2] == "cgroup2" {
			return fields[1], nil
		}
	}
	return "", errors.New("cgroup hierarchy missing: no hierarchy found for this cgroup version")
}

func containsField(list, word string) bool {
	for _, f := range strings.Fields(list) {
		if f == word {
			return true
		}
	}
	return false
}

// userfaultfdMinor finds the misc device's dynamic minor in /proc/misc.
func userfaultfdMinor() (uint32, bool) {
	b, err := os.ReadFile("/proc/misc")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[1] == "userfaultfd" {
			n, err := strconv.ParseUint(f[0], 10, 32)
			return uint32(n), err == nil
		}
	}
	return 0, false
}
