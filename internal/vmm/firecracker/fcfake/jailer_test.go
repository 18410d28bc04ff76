package fcfake

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The fake jailer reads a jailer command line into what it will do, and
// refuses what docs/jailer.md and env.rs refuse; each case names the
// mistake or attack. What it does not model it refuses too, rather than
// pretend.
func TestJailerArgs(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "firecracker-v1.14.2")
	sh := filepath.Join(dir, "sh")
	for _, p := range []string{exe, sh} {
		if err := os.WriteFile(p, []byte("binary"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(dir, "firecracker-link")
	if err := os.Symlink(exe, link); err != nil {
		t.Fatal(err)
	}
	good := []string{"--id", "vm-1", "--exec-file", link, "--uid", "1000", "--gid", "1001", "--chroot-base-dir", dir,
		"--cgroup-version", "2", "--parent-cgroup", "banger/vm-1", "--new-pid-ns", "--", "--api-sock", "/run/firecracker.socket"}
	a, err := parseJailerArgs(good)
	if err != nil {
		t.Fatal(err)
	}
	want := jailerArgs{id: "vm-1", execFile: exe, chrootBase: dir, parentCgroup: "banger/vm-1", uid: 1000, gid: 1001,
		cgroupVersion: "2", newPIDNS: true, extra: []string{"--api-sock", "/run/firecracker.socket"}}
	if diff := cmp.Diff(want, *a, cmp.AllowUnexported(jailerArgs{})); diff != "" {
		t.Errorf("parsed (-want +got):\n%s", diff)
	}
	defaults, err := parseJailerArgs([]string{"--id", "x", "--exec-file", exe, "--uid", "1", "--gid", "1", "--chroot-base-dir", dir})
	if err != nil {
		t.Fatal(err)
	}
	if defaults.cgroupVersion != "1" || defaults.parentCgroup != filepath.Base(exe) {
		t.Errorf("defaults: cgroup version %q, parent cgroup %q", defaults.cgroupVersion, defaults.parentCgroup)
	}

	replace := func(flag, value string) []string {
		out := append([]string{}, good...)
		for i := range out {
			if out[i] == flag {
				out[i+1] = value
				return out
			}
		}
		t.Fatalf("no %s in the good command line", flag)
		return nil
	}
	without := func(flag string) []string {
		var out []string
		for i := 0; i < len(good); i++ {
			if good[i] == flag {
				i++
				continue
			}
			out = append(out, good[i])
		}
		return out
	}
	before := func(extra ...string) []string {
		i := len(good) - 3 // before "--"
		return append(append(append([]string{}, good[:i]...), extra...), good[i:]...)
	}
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no id", without("--id"), "'--id' required"},
		{"../ in the id escapes the chroot base", replace("--id", "../etc"), "invalid instance id"},
		{"an id longer than 64", replace("--id", strings.Repeat("a", 65)), "invalid instance id"},
		{"an exec file the jailer will not run", replace("--exec-file", sh), `must contain "firecracker"`},
		{"a missing exec file", replace("--exec-file", filepath.Join(dir, "firecracker-missing")), "canonicalize"},
		{"a chroot base that is a file", replace("--chroot-base-dir", exe), "not a directory"},
		{"a uid that is not a number", replace("--uid", "root"), "invalid uid"},
		{"a negative uid", replace("--uid", "-1"), "invalid uid"},
		{"a gid beyond 32 bits", replace("--gid", "4294967296"), "invalid gid"},
		{"../ in the parent cgroup", replace("--parent-cgroup", "../system.slice"), "parent cgroup path is invalid"},
		{"an absolute parent cgroup", replace("--parent-cgroup", "/system.slice"), "parent cgroup path is invalid"},
		{"an unknown cgroup version", replace("--cgroup-version", "3"), "cgroup version not supported"},
		{"a cgroup value missing", before("--cgroup", "memory.max="), "invalid format for cgroups"},
		{"a second = in a cgroup value", before("--cgroup", "memory.max=1=2"), "invalid format for cgroups"},
		{"../ in a cgroup file writes outside the cgroup", before("--cgroup", "../cgroup.procs=1"), "invalid cgroup file"},
		{"an unknown resource", before("--resource-limit", "cpu=1"), "invalid resource argument"},
		{"a resource limit that is not a number", before("--resource-limit", "no-file=many"), "invalid limit value"},
		{"an unknown flag", before("--seccomp-level", "0"), "wasn't expected"},
		{"a flag given twice", before("--id", "vm-2"), "more than once"},
		{"a flag without its value", []string{"--id", "vm-1", "--exec-file"}, "requires a value"},
		{"--daemonize is not modelled", before("--daemonize"), "not modelled"},
		{"cgroup v1 values are not modelled", []string{"--id", "vm-1", "--exec-file", exe, "--uid", "1", "--gid", "1", "--chroot-base-dir", dir,
			"--cgroup", "memory.limit_in_bytes=1"}, "not modelled"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseJailerArgs(tt.args)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("parseJailerArgs(%q): %v, want %q", tt.args, err, tt.wantErr)
			}
		})
	}

	var out, errOut bytes.Buffer
	if code := RunJailer([]string{"--id"}, &out, &errOut); code != jailerExitError || !strings.Contains(errOut.String(), "Jailer error:") {
		t.Errorf("RunJailer with a bad command line: exit %d, stderr %q", code, errOut.String())
	}
}
