package helper

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerhq/banger/internal/helperapi"
)

// Defaults of the jail configuration.
const (
	defaultJailUIDCount = 1024
	defaultJailCgroup   = "banger-jail"
	nobodyID            = 65534
)

// jailConfig is the checked jail configuration: binaries with symlinks
// resolved (the jailer canonicalizes --exec-file, and the jail's path
// carries the resolved file name).
type jailConfig struct {
	firecracker, jailer string
	dir                 string // the chroot base
	uidBase, uidCount   uint32
	cgroup              string // relative to the cgroup v2 mount
	executable          string // the helper binary, run as the console logger
}

// jailDir is JailDir or its default.
func (c Config) jailDir() string {
	if c.JailDir != "" {
		return c.JailDir
	}
	return c.StateDir + "-jail"
}

// validateJail checks the jail settings without touching the host.
func (c Config) validateJail() error {
	var errs []error
	if c.Firecracker == "" || c.Jailer == "" {
		errs = append(errs, errors.New("jailed launches need both --firecracker and --jailer"))
	}
	for _, p := range []struct{ name, path string }{{"firecracker", c.Firecracker}, {"jailer", c.Jailer}, {"jail dir", c.jailDir()}} {
		if p.path != "" && (!filepath.IsAbs(p.path) || filepath.Clean(p.path) != p.path || p.path == "/") {
			errs = append(errs, fmt.Errorf("%s %q: want an absolute, clean path other than /", p.name, p.path))
		}
	}
	if dir := c.jailDir(); dir == c.StateDir || strings.HasPrefix(dir, c.StateDir+"/") {
		errs = append(errs, fmt.Errorf("jail dir %s: must not be under the state dir, which the owner can write", dir))
	}
	if c.JailUIDBase == 0 {
		errs = append(errs, errors.New("jailed launches need --jail-uid-base: the first of the uids jailed firecrackers run as"))
	} else if err := checkUIDRange(c.JailUIDBase, c.jailUIDCount(), c.OwnerUID); err != nil {
		errs = append(errs, err)
	}
	if cg := c.jailCgroup(); !validCgroupPath(cg) {
		errs = append(errs, fmt.Errorf("jail cgroup %q: want a relative path of [A-Za-z0-9._-] names", cg))
	}
	return errors.Join(errs...)
}

func (c Config) jailUIDCount() uint32 {
	if c.JailUIDCount == 0 {
		return defaultJailUIDCount
	}
	return c.JailUIDCount
}

func (c Config) jailCgroup() string {
	if c.JailCgroup == "" {
		return defaultJailCgroup
	}
	return c.JailCgroup
}

// checkUIDRange refuses a range that wraps, reaches (uid_t)-1, or holds
// root, the owner or nobody: a jailed Firecracker must be nobody else.
func checkUIDRange(base, count, owner uint32) error {
	last := uint64(base) + uint64(count) - 1
	switch {
	case count == 0:
		return errors.New("jail uid range is empty")
	case last >= 1<<32-1:
		return fmt.Errorf("jail uids %d-%d: must end below 4294967295", base, last)
	case uint64(owner) >= uint64(base) && uint64(owner) <= last:
		return fmt.Errorf("jail uids %d-%d: hold the owner's uid %d", base, last, owner)
	case nobodyID >= uint64(base) && nobodyID <= last:
		return fmt.Errorf("jail uids %d-%d: hold %d (nobody)", base, last, nobodyID)
	}
	return nil
}

func validCgroupPath(p string) bool {
	if p == "" || filepath.IsAbs(p) || filepath.Clean(p) != p {
		return false
	}
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." || !plainName(c) {
			return false
		}
	}
	return true
}

func plainName(s string) bool {
	if s == "" || len(s) > 255 {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '.' && r != '_' && r != '-' {
			return false
		}
	}
	return true
}

// newJailConfig checks the jail settings against the host: the binaries
// are trusted executables, the uid range belongs to no user or group.
func newJailConfig(c Config) (*jailConfig, error) {
	jc := &jailConfig{
		dir:      c.jailDir(),
		uidBase:  c.JailUIDBase,
		uidCount: c.jailUIDCount(),
		cgroup:   c.jailCgroup(),
	}
	var err error
	if jc.firecracker, err = trustedExecutable(c.Firecracker); err != nil {
		return nil, fmt.Errorf("firecracker: %w", err)
	}
	if !strings.Contains(filepath.Base(jc.firecracker), "firecracker") {
		return nil, fmt.Errorf("firecracker %s: the jailer runs only a binary whose name contains \"firecracker\"", jc.firecracker)
	}
	if jc.jailer, err = trustedExecutable(c.Jailer); err != nil {
		return nil, fmt.Errorf("jailer: %w", err)
	}
	for _, f := range []struct{ path, kind string }{{"/etc/passwd", "user"}, {"/etc/group", "group"}} {
		if err := checkIDsUnused(f.path, f.kind, jc.uidBase, jc.uidCount); err != nil {
			return nil, err
		}
	}
	jc.executable = c.Executable
	if jc.executable == "" {
		if jc.executable, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("find the helper's own binary: %w", err)
		}
	}
	return jc, nil
}

// trustedExecutable resolves symlinks in path and checks the result with
// checkTrusted: a root-owned executable regular file.
func trustedExecutable(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("resolve %s: %w", path, err)
	}
	if err := checkTrusted(real, false); err != nil {
		return "", err
	}
	return real, nil
}

// checkTrusted refuses a path that anyone but root could change or
// replace: the path and every directory above it must be owned by root,
// not be symlinks, and not be writable by group or others. The one
// exception is a directory above with the sticky bit (/tmp), in which
// others may not rename or remove root's entries. The path itself must be
// a directory when dir is set, else an executable regular file.
func checkTrusted(path string, dir bool) error {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return fmt.Errorf("%q: want an absolute, clean path", path)
	}
	comps := []string{"/"}
	if path != "/" {
		for i := 1; i <= len(path); i++ {
			if i == len(path) || path[i] == '/' {
				comps = append(comps, path[:i])
			}
		}
	}
	for i, p := range comps {
		fi, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("check %s: %w", path, err)
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		last := i == len(comps)-1
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			return fmt.Errorf("%s: %s is a symlink (hint: give the resolved path)", path, p)
		case st == nil || st.Uid != 0:
			return fmt.Errorf("%s: %s is not owned by root", path, p)
		case fi.Mode().Perm()&0o022 != 0 && (!fi.IsDir() || fi.Mode()&fs.ModeSticky == 0 || last):
			return fmt.Errorf("%s: %s is writable by group or others (mode %v)", path, p, fi.Mode())
		case !last && !fi.IsDir():
			return fmt.Errorf("%s: %s is not a directory", path, p)
		case last && dir && !fi.IsDir():
			return fmt.Errorf("%s is not a directory", path)
		case last && !dir && (!fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0):
			return fmt.Errorf("%s is not an executable file", path)
		}
	}
	return nil
}

// checkIDsUnused refuses a jail id range that holds an id of the passwd or
// group file at path: a jailed Firecracker would get that account's files.
func checkIDsUnused(path, kind string, base, count uint32) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check jail uids against %s: %w", path, err)
	}
	defer f.Close()
	name, id, err := idInRange(f, kind, base, count)
	if err != nil {
		return fmt.Errorf("check jail uids against %s: %w", path, err)
	}
	if name != "" {
		return fmt.Errorf("jail uids %d-%d: hold %s %q (%d) of %s", base, uint64(base)+uint64(count)-1, kind, name, id, path)
	}
	return nil
}

// idInRange scans a passwd or group file for an entry whose uid (users)
// or gid (both) lies in [base, base+count), and returns the first one.
func idInRange(r io.Reader, kind string, base, count uint32) (string, uint64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, ":")
		cols := []int{2} // group: name:password:gid:members
		if kind == "user" {
			cols = []int{2, 3} // passwd: name:password:uid:gid:...
		}
		for _, c := range cols {
			if c >= len(f) {
				continue
			}
			id, err := strconv.ParseUint(f[c], 10, 32)
			if err == nil && id >= uint64(base) && id < uint64(base)+uint64(count) {
				return f[0], id, nil
			}
		}
	}
	return "", 0, sc.Err()
}

// errJailOff answers jail operations on a helper started without them.
var errJailOff = helperapi.Errorf(helperapi.CodeUnsupported,
	"jailed launches are off (hint: start banger-helper with --firecracker, --jailer and --jail-uid-base)")
