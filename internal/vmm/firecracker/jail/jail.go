// Package jail plans a jailed Firecracker launch (docs/jailer.md): the
// jailer command line, where the jail lands on the host, and which files
// go into it. Everything here is pure: it checks its input and computes
// paths, and touches nothing. banger-helper creates the jail, runs the
// argv and removes the jail and its cgroup afterwards (the jailer cleans up
// nothing); the firecracker driver uses JailLayout.Jailed to send
// jail-relative paths through the API socket.
//
// It imports no HTTP code: the root helper links it.
package jail

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/bangerhq/banger/internal/vmm"
)

// DefaultChrootBase is the jailer's default --chroot-base-dir.
const DefaultChrootBase = "/srv/jailer"

// Paths inside the jail (what Firecracker sees after chroot). The API
// socket is the jailer's default location; /run is created by the jailer.
const (
	JailAPISocket = "/run/firecracker.socket"
	JailKernel    = "/vmlinux"
	JailInitrd    = "/initrd"
	JailLog       = "/firecracker.log"
	JailVsock     = "/v.sock"
	jailDiskPref  = "/drive_" // + disk id
)

// Names banger-helper gives, in JailLayout.InstanceDir (outside the chroot,
// writable by root only), to hard links the owner's daemon uses: the API
// socket (Root+JailAPISocket, whose /run the owner cannot enter) and
// Firecracker's log (Root+JailLog). The log keeps the driver's file name,
// so that Attach finds it next to the socket as for an unjailed VM.
const (
	HostSocketName = "api.sock"
	HostLogName    = "firecracker.log"
)

// MaxSocketPath is the longest unix socket path: sun_path holds 108 bytes
// with the trailing NUL.
const MaxSocketPath = 107

// JailSpec is one jailed launch. Host paths must be absolute, clean and
// canonical: the jailer canonicalizes --exec-file and --chroot-base-dir, so
// a symlink would put the jail somewhere else than the layout says
// (resolve them with filepath.EvalSymlinks first).
type JailSpec struct {
	Jailer   string // the jailer binary
	ExecFile string // the firecracker binary; its file name is a path component of the jail
	// ID is the jailer's --id: letters, digits and '-', 1 to 64 characters.
	ID string
	// UID and GID are what Firecracker runs as; never 0.
	UID, GID int
	// ChrootBase is --chroot-base-dir; "" means DefaultChrootBase.
	ChrootBase string
	// NetNS is a network namespace to join (/var/run/netns/NAME), or "".
	NetNS string
	// ParentCgroup is --parent-cgroup, relative to the cgroup v2 mount;
	// "" means the exec file name, as the jailer does.
	ParentCgroup string
	Cgroup       CgroupLimits
	// NoFile and FileSize are --resource-limit no-file and fsize; 0 keeps
	// the jailer's defaults (no-file 2048, fsize unlimited).
	NoFile   int
	FileSize int64
	// Daemonize detaches the jailer (setsid, stdio to /dev/null): the
	// serial console is then lost, so banger leaves it off and captures
	// stdout instead.
	Daemonize bool
	// NewPIDNS runs Firecracker as pid 1 of a new pid namespace; its host
	// pid differs from the jailer's and is read from JailLayout.PIDFile.
	NewPIDNS bool
}

// The jailer refuses an exec file whose name lacks this (env.rs,
// validate_exec_file).
const execNameMust = "firecracker"

// CgroupLimits are cgroup v2 limits: the jailer writes them (--cgroup
// FILE=VALUE), or banger-helper writes them itself into a cgroup it
// creates before the launch (Files). Zero values are not written.
type CgroupLimits struct {
	MemoryMax int64  // memory.max, bytes
	CPUQuota  int    // cpu.max quota in µs per CPUPeriod µs
	CPUPeriod int    // cpu.max period, µs; 0 means 100000 when CPUQuota is set
	PidsMax   int    // pids.max
	CPUs      string // cpuset.cpus, "0-3,6"
}

// JailLayout is where a JailSpec's jail lands on the host.
type JailLayout struct {
	// InstanceDir is <base>/<exec file name>/<id>: remove it after the VM
	// is gone. Root is InstanceDir/root, the chroot.
	InstanceDir string
	Root        string
	// Exec is the copy of the binary the jailer makes. PIDFile
	// (<Root>/<exec file name>.pid) holds Firecracker's host pid. With
	// NewPIDNS the jailer's parent writes it after the clone; without it the
	// jailer execs Firecracker in place, so the pid is the jailer's (and
	// older jailers write no file at all).
	Exec    string
	PIDFile string
	// APISocket is the host path of the API socket (Root + JailAPISocket).
	APISocket string
	// CgroupDir is Firecracker's cgroup, relative to the cgroup v2 mount:
	// <parent>/<id> when the jailer creates one (some --cgroup is given);
	// ParentCgroup itself when no limit is given, since the jailer then
	// moves into that cgroup if it exists (banger-helper creates it first
	// and writes the limits itself); "" otherwise.
	CgroupDir string
}

// HardLink is a file the helper links (or copies, across file systems)
// into the jail before running the jailer. Target is a host path under
// JailLayout.Root.
type HardLink struct {
	Source string
	Target string
}

// Validate checks every field; the error names each bad one.
func (s JailSpec) Validate() error {
	var errs []error
	for _, p := range []struct{ name, path string }{
		{"jailer", s.Jailer}, {"exec file", s.ExecFile}, {"chroot base", s.chrootBase()},
	} {
		if err := checkHostPath(p.path); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p.name, err))
		}
	}
	if s.ExecFile != "" {
		name := filepath.Base(s.ExecFile)
		if err := checkPathComponent(name); err != nil {
			errs = append(errs, fmt.Errorf("exec file name: %w", err))
		} else if !strings.Contains(name, execNameMust) {
			errs = append(errs, fmt.Errorf("exec file name %q: the jailer runs only a binary whose name contains %q", name, execNameMust))
		}
	}
	if s.chrootBase() == "/" {
		errs = append(errs, errors.New("chroot base: must not be /"))
	}
	if err := ValidateID(s.ID); err != nil {
		errs = append(errs, err)
	}
	// uid/gid 0 would run Firecracker as root inside the jail: the jail
	// would then hold nothing in.
	if s.UID <= 0 || s.UID > 1<<32-2 {
		errs = append(errs, fmt.Errorf("uid %d: must be an unprivileged uid (1 to 4294967294)", s.UID))
	}
	if s.GID <= 0 || s.GID > 1<<32-2 {
		errs = append(errs, fmt.Errorf("gid %d: must be an unprivileged gid (1 to 4294967294)", s.GID))
	}
	if s.NetNS != "" {
		if err := checkHostPath(s.NetNS); err != nil {
			errs = append(errs, fmt.Errorf("netns: %w", err))
		}
	}
	if s.ParentCgroup != "" {
		if err := checkRelPath(s.ParentCgroup); err != nil {
			errs = append(errs, fmt.Errorf("parent cgroup: %w", err))
		}
	}
	if err := s.Cgroup.Validate(); err != nil {
		errs = append(errs, err)
	}
	if s.NoFile < 0 || s.FileSize < 0 {
		errs = append(errs, errors.New("resource limits: must not be negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("jail spec: %w", err)
	}
	if l := len(s.layout().APISocket); l > MaxSocketPath {
		return fmt.Errorf("jail spec: api socket %s is %d bytes, longer than a unix socket path may be (%d; hint: a shorter chroot base or id)",
			s.layout().APISocket, l, MaxSocketPath)
	}
	return nil
}

// JailerArgv returns the jailer command line, argv[0] included, and where
// the jail will be.
func (s JailSpec) JailerArgv() ([]string, JailLayout, error) {
	if err := s.Validate(); err != nil {
		return nil, JailLayout{}, err
	}
	argv := []string{
		s.Jailer,
		"--id", s.ID,
		"--exec-file", s.ExecFile,
		"--uid", strconv.Itoa(s.UID),
		"--gid", strconv.Itoa(s.GID),
		"--chroot-base-dir", s.chrootBase(),
		// The jailer defaults to cgroup v1; banger's hosts are v2.
		"--cgroup-version", "2",
	}
	for _, c := range s.Cgroup.args() {
		argv = append(argv, "--cgroup", c)
	}
	if s.ParentCgroup != "" {
		argv = append(argv, "--parent-cgroup", s.ParentCgroup)
	}
	if s.NetNS != "" {
		argv = append(argv, "--netns", s.NetNS)
	}
	if s.NoFile > 0 {
		argv = append(argv, "--resource-limit", "no-file="+strconv.Itoa(s.NoFile))
	}
	if s.FileSize > 0 {
		argv = append(argv, "--resource-limit", "fsize="+strconv.FormatInt(s.FileSize, 10))
	}
	if s.Daemonize {
		argv = append(argv, "--daemonize")
	}
	if s.NewPIDNS {
		argv = append(argv, "--new-pid-ns")
	}
	// After "--": Firecracker's own arguments, paths relative to the jail.
	// The jailer adds --id and the start times itself.
	argv = append(argv, "--", "--api-sock", JailAPISocket)
	return argv, s.layout(), nil
}

func (s JailSpec) chrootBase() string {
	if s.ChrootBase == "" {
		return DefaultChrootBase
	}
	return s.ChrootBase
}

func (s JailSpec) layout() JailLayout {
	name := filepath.Base(s.ExecFile)
	inst := filepath.Join(s.chrootBase(), name, s.ID)
	root := filepath.Join(inst, "root")
	l := JailLayout{
		InstanceDir: inst,
		Root:        root,
		Exec:        filepath.Join(root, name),
		PIDFile:     filepath.Join(root, name+".pid"),
		APISocket:   filepath.Join(root, JailAPISocket),
	}
	// v2 creates a cgroup only when some --cgroup is given; it is named
	// <parent>/<id>, the parent defaulting to the exec file name. Without
	// one, the jailer moves into an existing --parent-cgroup.
	switch {
	case len(s.Cgroup.args()) > 0:
		parent := s.ParentCgroup
		if parent == "" {
			parent = name
		}
		l.CgroupDir = filepath.Join(parent, s.ID)
	case s.ParentCgroup != "":
		l.CgroupDir = s.ParentCgroup
	}
	return l
}

// DiskPath is where Jailed puts the disk with this id, as the jailed
// Firecracker sees it.
func DiskPath(id string) string { return jailDiskPref + id }

// Jailed rewrites a vmm.Config for a jailed Firecracker: kernel, initrd,
// disks and vsock move to fixed names inside the jail, and links says which
// host files to hard-link there first. The returned config's file paths are
// the ones to send through the API socket at APISocket; RunDir and
// ConsoleLog stay host paths for the daemon. Only the files it names are
// linked: anything else Firecracker must open goes into Root the same way.
func (l JailLayout) Jailed(cfg vmm.Config) (vmm.Config, []HardLink, error) {
	if l.Root == "" {
		return vmm.Config{}, nil, errors.New("jailed config: empty layout")
	}
	var links []HardLink
	link := func(src, inJail string) (string, error) {
		if err := checkHostPath(src); err != nil {
			return "", err
		}
		links = append(links, HardLink{Source: src, Target: filepath.Join(l.Root, inJail)})
		return inJail, nil
	}
	out := cfg
	var err error
	if out.Kernel, err = link(cfg.Kernel, JailKernel); err != nil {
		return vmm.Config{}, nil, fmt.Errorf("jailed config: kernel: %w", err)
	}
	if cfg.Initrd != "" {
		if out.Initrd, err = link(cfg.Initrd, JailInitrd); err != nil {
			return vmm.Config{}, nil, fmt.Errorf("jailed config: initrd: %w", err)
		}
	}
	out.Disks = make([]vmm.Disk, len(cfg.Disks))
	for i, d := range cfg.Disks {
		// The id becomes a file name in the jail; Firecracker's own rule
		// for drive ids (letters, digits, '_') is checked by the driver.
		if err := checkPathComponent(d.ID); err != nil {
			return vmm.Config{}, nil, fmt.Errorf("jailed config: disk %d id: %w", i, err)
		}
		out.Disks[i] = d
		if out.Disks[i].Path, err = link(d.Path, DiskPath(d.ID)); err != nil {
			return vmm.Config{}, nil, fmt.Errorf("jailed config: disk %q: %w", d.ID, err)
		}
	}
	if cfg.Vsock != nil {
		v := *cfg.Vsock
		v.Path = JailVsock // bound by Firecracker inside the jail; the host sees Root+JailVsock
		out.Vsock = &v
	}
	return out, links, nil
}

// Validate checks the limits; the error names each bad one.
func (c CgroupLimits) Validate() error {
	var errs []error
	if c.MemoryMax < 0 || c.CPUQuota < 0 || c.CPUPeriod < 0 || c.PidsMax < 0 {
		errs = append(errs, errors.New("cgroup limits: must not be negative"))
	}
	if c.CPUPeriod != 0 && (c.CPUPeriod < 1000 || c.CPUPeriod > 1000000) {
		errs = append(errs, fmt.Errorf("cgroup cpu period %d: must be 1000 to 1000000 µs", c.CPUPeriod))
	}
	if c.CPUPeriod != 0 && c.CPUQuota == 0 {
		errs = append(errs, errors.New("cgroup cpu period given without a quota"))
	}
	if c.CPUQuota != 0 && c.CPUQuota < 1000 {
		errs = append(errs, fmt.Errorf("cgroup cpu quota %d: must be at least 1000 µs", c.CPUQuota))
	}
	if c.CPUs != "" && !validCPUList(c.CPUs) {
		errs = append(errs, fmt.Errorf("cgroup cpus %q: want a list like 0-3,6", c.CPUs))
	}
	return errors.Join(errs...)
}

// CgroupFile is one cgroup interface file and the value written to it.
type CgroupFile struct {
	Name  string // "memory.max"
	Value string // "1073741824"
}

// Controller is the controller the file belongs to: "memory" for
// "memory.max". It must be enabled in the parent's cgroup.subtree_control
// for the file to exist.
func (f CgroupFile) Controller() string {
	c, _, _ := strings.Cut(f.Name, ".")
	return c
}

// Files returns the limits as cgroup files and values, in a fixed order.
// They are valid only for limits that pass Validate.
func (c CgroupLimits) Files() []CgroupFile {
	var fs []CgroupFile
	if c.MemoryMax > 0 {
		fs = append(fs, CgroupFile{"memory.max", strconv.FormatInt(c.MemoryMax, 10)})
	}
	if c.CPUQuota > 0 {
		period := c.CPUPeriod
		if period == 0 {
			period = 100000
		}
		fs = append(fs, CgroupFile{"cpu.max", fmt.Sprintf("%d %d", c.CPUQuota, period)})
	}
	if c.PidsMax > 0 {
		fs = append(fs, CgroupFile{"pids.max", strconv.Itoa(c.PidsMax)})
	}
	if c.CPUs != "" {
		fs = append(fs, CgroupFile{"cpuset.cpus", c.CPUs})
	}
	return fs
}

// args renders the limits as the jailer's FILE=VALUE arguments.
func (c CgroupLimits) args() []string {
	var a []string
	for _, f := range c.Files() {
		a = append(a, f.Name+"="+f.Value)
	}
	return a
}

// validCPUList accepts cpuset lists: "3", "0-3", "0-3,6,8-9".
func validCPUList(s string) bool {
	if len(s) > 256 {
		return false
	}
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err1 := strconv.ParseUint(lo, 10, 16)
		if err1 != nil || lo == "" || (len(lo) > 1 && lo[0] == '0') {
			return false
		}
		if isRange {
			b, err2 := strconv.ParseUint(hi, 10, 16)
			if err2 != nil || hi == "" || (len(hi) > 1 && hi[0] == '0') || b < a {
				return false
			}
		}
	}
	return true
}

// ValidateID is the jailer's and Firecracker's validate_instance_id:
// letters, digits and '-', 1 to 64 characters (ASCII only here).
func ValidateID(id string) error {
	if id == "" || len(id) > 64 {
		return fmt.Errorf("id %q: must be 1 to 64 characters", id)
	}
	for _, r := range id {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-' {
			return fmt.Errorf("id %q: only letters, digits and '-' are allowed", id)
		}
	}
	return nil
}

// checkHostPath accepts absolute, clean paths of printable characters
// without white space: no "..", no "//", no trailing "/", nothing a shell
// or a log line could misread.
func checkHostPath(p string) error {
	if p == "" {
		return errors.New("empty path")
	}
	if !filepath.IsAbs(p) {
		return fmt.Errorf("path %q: must be absolute", p)
	}
	if filepath.Clean(p) != p {
		return fmt.Errorf("path %q: must be clean (no .., ., // or trailing /)", p)
	}
	if len(p) > 4095 {
		return fmt.Errorf("path %q: too long", p)
	}
	for _, r := range p {
		if r <= ' ' || r == 0x7f {
			return fmt.Errorf("path %q: has a space or control character", p)
		}
	}
	return nil
}

// checkRelPath accepts a clean relative path whose components pass
// checkPathComponent.
func checkRelPath(p string) error {
	if filepath.IsAbs(p) || filepath.Clean(p) != p {
		return fmt.Errorf("path %q: must be relative and clean", p)
	}
	for _, c := range strings.Split(p, "/") {
		if err := checkPathComponent(c); err != nil {
			return err
		}
	}
	return nil
}

// checkPathComponent accepts one file name of letters, digits, '.', '_'
// and '-', not "." or "..".
func checkPathComponent(c string) error {
	if c == "" || c == "." || c == ".." || len(c) > 255 {
		return fmt.Errorf("path component %q: not a plain name", c)
	}
	for _, r := range c {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '.' && r != '_' && r != '-' {
			return fmt.Errorf("path component %q: only letters, digits, '.', '_' and '-' are allowed", c)
		}
	}
	return nil
}
