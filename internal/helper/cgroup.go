package helper

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted: the first
// cgroup2 entry of /proc/self/mountinfo, as the jailer picks the first of
// /proc/mounts. On a hybrid host that is /sys/fs/cgroup/unified.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find the cgroup v2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields := strings.Fields(pre)
		if ok && len(fields) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			return unescapeMountinfo(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("find the cgroup v2 mount: %w", err)
	}
	return "", helperapi.Errorf(helperapi.CodeUnsupported, "no cgroup v2 hierarchy is mounted (the jailer needs one)")
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// makeJailCgroup creates <mount>/<parent>/<name>, the cgroup the jailer
// moves Firecracker into, with the limits whose controller the hierarchy
// offers: each is enabled in cgroup.subtree_control from the top down to
// the parent, as the jailer does for its own --cgroup values. It returns
// the limits written, as "file=value". The cgroup must not exist yet.
func makeJailCgroup(mount, parent, name string, limits jail.CgroupLimits) (applied, missing []string, err error) {
	parentDir := filepath.Join(mount, parent)
	if err := os.MkdirAll(parentDir, 0o755); err != nil {
		return nil, nil, fmt.Errorf("create cgroup %s: %w", parentDir, err)
	}
	b, err := os.ReadFile(filepath.Join(mount, "cgroup.controllers"))
	if err != nil {
		return nil, nil, fmt.Errorf("read the cgroup controllers: %w", err)
	}
	offered := strings.Fields(string(b))
	var files []jail.CgroupFile
	for _, f := range limits.Files() {
		c := f.Controller()
		if !containsString(offered, c) {
			missing = append(missing, c)
			continue
		}
		if err := enableController(mount, parent, c); err != nil {
			return nil, nil, err
		}
		files = append(files, f)
	}
	dir := filepath.Join(parentDir, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, nil, helperapi.Errorf(helperapi.CodeExists, "cgroup %s exists (hint: KillJailed removes it)", dir)
		}
		return nil, nil, fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.Name), []byte(f.Value), 0o644); err != nil {
			return nil, nil, fmt.Errorf("write %s=%s in cgroup %s: %w", f.Name, f.Value, dir, err)
		}
		applied = append(applied, f.Name+"="+f.Value)
	}
	return applied, missing, nil
}

// enableController writes "+controller" into cgroup.subtree_control of the
// mount's root and of every cgroup down to parent (included), where it is
// not enabled yet.
func enableController(mount, parent, controller string) error {
	dir := mount
	for _, c := range append([]string{""}, strings.Split(parent, "/")...) {
		dir = filepath.Join(dir, c)
		ctl := filepath.Join(dir, "cgroup.subtree_control")
		b, err := os.ReadFile(ctl)
		if err != nil {
			return fmt.Errorf("enable cgroup controller %s in %s: %w", controller, dir, err)
		}
		if containsString(strings.Fields(string(b)), controller) {
			continue
		}
		if err := os.WriteFile(ctl, []byte("+"+controller), 0o644); err != nil {
			return fmt.Errorf("enable cgroup controller %s in %s: %w", controller, dir, err)
		}
	}
	return nil
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// moveToCgroup moves pid into the cgroup dir.
func moveToCgroup(dir string, pid int) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return fmt.Errorf("move pid %d into cgroup %s: %w", pid, dir, err)
	}
	return nil
}

// inCgroup reports whether pid's cgroup v2 path is rel (relative to the
// mount, as the kernel shows it in /proc/<pid>/cgroup).
func inCgroup(pid int, rel string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p == "/"+rel
		}
	}
	return false
}

// populated reads the cgroup's "populated" flag from cgroup.events: true
// while a process lives in it or below.
func populated(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events has no populated line", dir)
}

// killCgroup kills every process in the cgroup dir, waits until it is
// empty and removes it. A missing cgroup is not an error. cgroup.kill
// (Linux 5.14) kills the whole cgroup at once, including processes forked
// meanwhile; without it, cgroup.procs is read and killed until empty.
func killCgroup(ctx context.Context, dir string) error {
	return killCgroupVia(ctx, dir, "cgroup.kill")
}

// killCgroupVia is killCgroup with the kill file named (a test names a
// missing one to take the older kernels' path).
func killCgroupVia(ctx context.Context, dir, killFile string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	useKill := true
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		busy, err := populated(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("kill cgroup %s: %w", dir, err)
		}
		if !busy {
			break
		}
		if useKill {
			// No O_CREAT: on a kernel without cgroup.kill, creating it
			// fails with EACCES rather than ENOENT.
			err := writeExisting(filepath.Join(dir, killFile), "1")
			if errors.Is(err, fs.ErrNotExist) {
				useKill = false
			} else if err != nil {
				return fmt.Errorf("kill cgroup %s: %w", dir, err)
			}
		}
		if !useKill {
			if err := signalProcs(dir); err != nil {
				return err
			}
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("kill cgroup %s: processes remain: %w", dir, ctx.Err())
		case <-t.C:
		}
	}
	// The cgroup may take a moment to drop its last (already dead) task.
	for range 100 {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: still busy", dir)
}

// writeExisting writes value into an existing file.
func writeExisting(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func signalProcs(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return fmt.Errorf("list processes of cgroup %s: %w", dir, err)
	}
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// removeIfEmpty removes the directory dir when it is empty: a cgroup
// without children, or a jail dir level. Anything else is left alone.
func removeIfEmpty(dir string) error {
	err := syscall.Rmdir(dir)
	if err == nil || errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.EBUSY) {
		return nil
	}
	return fmt.Errorf("remove %s: %w", dir, err)
}
