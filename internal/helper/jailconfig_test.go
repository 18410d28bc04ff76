package helper

import (
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// The jail flags fill the jail settings, and a jail setting without what
// jailed launches need is refused rather than ignored; each refusal names
// the mistake or attack it stands for.
func TestParseJailFlags(t *testing.T) {
	base := []string{"--owner-uid", "1000", "--state-dir", "/var/lib/banger"}
	binaries := []string{"--firecracker", "/usr/libexec/banger/firecracker", "--jailer", "/usr/libexec/banger/jailer"}
	bins := func(extra ...string) []string { return append(append([]string{}, binaries...), extra...) }
	jailArgs := bins("--jail-uid-base", "900000")
	with := func(extra ...string) []string { return append(append([]string{}, jailArgs...), extra...) }
	tests := []struct {
		name    string
		args    []string
		want    Config
		wantErr string
	}{
		{"jailed launches on", jailArgs, Config{
			OwnerUID: 1000, StateDir: "/var/lib/banger", Socket: "/run/banger/helper.sock", Bridge: "banger0",
			Firecracker: "/usr/libexec/banger/firecracker", Jailer: "/usr/libexec/banger/jailer", JailUIDBase: 900000,
		}, ""},
		{"every jail flag", with("--jail-dir", "/srv/banger-jail", "--jail-uid-count", "64", "--jail-cgroup", "machine.slice/banger"), Config{
			OwnerUID: 1000, StateDir: "/var/lib/banger", Socket: "/run/banger/helper.sock", Bridge: "banger0",
			Firecracker: "/usr/libexec/banger/firecracker", Jailer: "/usr/libexec/banger/jailer", JailUIDBase: 900000,
			JailDir: "/srv/banger-jail", JailUIDCount: 64, JailCgroup: "machine.slice/banger",
		}, ""},
		{"a jailer without firecracker", []string{"--jailer", "/usr/bin/jailer", "--jail-uid-base", "900000"}, Config{}, "both --firecracker and --jailer"},
		{"a uid range without binaries is not silently ignored", []string{"--jail-uid-base", "900000"}, Config{}, "both --firecracker and --jailer"},
		{"no uid range: firecracker would run as whoever", bins(), Config{}, "--jail-uid-base"},
		{"relative firecracker resolved against the helper's cwd", []string{"--firecracker", "bin/firecracker", "--jailer", "/j", "--jail-uid-base", "900000"}, Config{}, "absolute, clean"},
		{"../ in the jailer path", []string{"--firecracker", "/f/firecracker", "--jailer", "/usr/../tmp/jailer", "--jail-uid-base", "900000"}, Config{}, "absolute, clean"},
		{"the jail dir inside the owner-writable state dir", with("--jail-dir", "/var/lib/banger/jail"), Config{}, "must not be under the state dir"},
		{"the jail dir is the state dir", with("--jail-dir", "/var/lib/banger"), Config{}, "must not be under the state dir"},
		{"the jail dir /", with("--jail-dir", "/"), Config{}, "other than /"},
		{"a range holding the owner", bins("--jail-uid-base", "999", "--jail-uid-count", "2"), Config{}, "owner's uid 1000"},
		{"a range holding nobody", bins("--jail-uid-base", "65000", "--jail-uid-count", "1000"), Config{}, "nobody"},
		{"a range reaching (uid_t)-1, which chown reads as 'unchanged'", bins("--jail-uid-base", "4294967290", "--jail-uid-count", "6"), Config{}, "below 4294967295"},
		{"a uid base beyond 32 bits wraps to root", bins("--jail-uid-base", "4294967296"), Config{}, "32 bits"},
		{"../ in the cgroup escapes the hierarchy", with("--jail-cgroup", "../system.slice"), Config{}, "jail cgroup"},
		{"absolute cgroup", with("--jail-cgroup", "/banger"), Config{}, "jail cgroup"},
		{"newline in the cgroup", with("--jail-cgroup", "banger\nx"), Config{}, "jail cgroup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := parseFlags(append(append([]string{}, base...), tt.args...), io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, cfg, cmpopts.IgnoreFields(Config{}, "Logger")); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
		})
	}
}

// The default jail dir is the state dir's sibling, not a directory the
// owner could replace.
func TestJailDirDefault(t *testing.T) {
	if got := (Config{StateDir: "/var/lib/banger"}).jailDir(); got != "/var/lib/banger-jail" {
		t.Errorf("default jail dir %q", got)
	}
}

// checkTrusted accepts root-owned paths that only root can change, with a
// sticky directory (/tmp) above, and refuses every way someone else could
// swap what the jailer runs or where it builds jails.
func TestCheckTrusted(t *testing.T) {
	testutil.RequireRoot(t)
	base, err := os.MkdirTemp("", "bgr-trust-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	mk := func(rel string, mode os.FileMode, uid int, dir bool) string {
		p := filepath.Join(base, rel)
		if dir {
			if err := os.Mkdir(p, mode); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(p, []byte("#!/bin/true\n"), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := mk("good", 0o755, 0, true)
	exe := mk("good/firecracker", 0o755, 0, false)
	plain := mk("good/data", 0o644, 0, false)
	mk("groupw", 0o775, 0, true)
	inGroupW := mk("groupw/firecracker", 0o755, 0, false)
	mk("owners", 0o755, testOwner, true)
	inOwnerDir := mk("owners/firecracker", 0o755, 0, false)
	sticky := mk("sticky", 0o777|os.ModeSticky, 0, true)
	inSticky := mk("sticky/firecracker", 0o755, 0, false)
	worldW := mk("good/worldw", 0o757, 0, false)
	link := filepath.Join(base, "good", "link")
	if err := os.Symlink(exe, link); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		path    string
		dir     bool
		wantErr string
	}{
		{"a root-owned executable in root-only directories", exe, false, ""},
		{"a root-only directory", good, true, ""},
		{"under a sticky world-writable directory (/tmp)", inSticky, false, ""},
		{"a directory the group may write: a group member swaps the binary", inGroupW, false, "writable by group or others"},
		{"a directory another user owns: the owner swaps the binary", inOwnerDir, false, "not owned by root"},
		{"the sticky directory itself as the jail dir", sticky, true, "writable by group or others"},
		{"a world-writable binary", worldW, false, "writable by group or others"},
		{"a symlink: the jailer would resolve it elsewhere", link, false, "is a symlink"},
		{"a file that is not executable", plain, false, "not an executable"},
		{"a file as the jail dir", exe, true, "not a directory"},
		{"a directory as the binary", good, false, "not an executable"},
		{"a missing binary", filepath.Join(good, "missing"), false, "no such file"},
		{"a relative path", "good/firecracker", false, "absolute, clean"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkTrusted(tt.path, tt.dir)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("checkTrusted(%s): %v, want %q", tt.path, err, tt.wantErr)
			}
		})
	}
	// The jailer runs the resolved file, so the helper checks and keeps
	// that.
	got, err := trustedExecutable(link)
	if err != nil || got != exe {
		t.Errorf("trustedExecutable(link) = %q, %v; want %q", got, err, exe)
	}
}

// A jail uid range holding an existing user's uid or gid, or a group's
// gid, is found; comments, blank lines and malformed lines are skipped.
func TestIDInRange(t *testing.T) {
	passwd := "# comment\n\nroot:x:0:0:root:/root:/bin/bash\nbroken line\nalice:x:1000:1000::/home/alice:/bin/sh\nsvc:x:901:20001::/:/usr/sbin/nologin\n"
	group := "root:x:0:\nusers:x:100:\nkvm:x:20005:alice\n"
	tests := []struct {
		name        string
		file, kind  string
		base, count uint32
		wantName    string
	}{
		{"free range", passwd, "user", 200000, 1000, ""},
		{"a user's uid", passwd, "user", 1000, 1, "alice"},
		{"a user's primary gid", passwd, "user", 20000, 10, "svc"},
		{"just past the range", passwd, "user", 990, 10, ""},
		{"a group", group, "group", 20000, 10, "kvm"},
		{"group ids only count for groups", "alice:x:1000:\n", "group", 0, 999, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name, _, err := idInRange(strings.NewReader(tt.file), tt.kind, tt.base, tt.count)
			if err != nil {
				t.Fatal(err)
			}
			if name != tt.wantName {
				t.Errorf("found %q, want %q", name, tt.wantName)
			}
		})
	}
}

// A VM's cgroup limits give it its memory plus Firecracker's overhead, its
// vCPUs plus half a CPU for the VMM's own threads, and a task bound.
func TestJailLimits(t *testing.T) {
	want := []jail.CgroupFile{
		{Name: "memory.max", Value: "402653184"}, // 256 MiB + 128 MiB
		{Name: "cpu.max", Value: "250000 100000"},
		{Name: "pids.max", Value: "256"},
	}
	l := jailLimits(2, 256)
	if err := l.Validate(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, l.Files()); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
}

// makeJailCgroup enables each limit's controller from the top down to the
// parent, writes only the limits whose controller the hierarchy offers
// and reports the others, and refuses a cgroup that exists. (Run on a
// directory laid out like a cgroup v2 mount: this host's cgroup v2 offers
// none of these controllers.)
func TestMakeJailCgroup(t *testing.T) {
	mount := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(mount, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("cgroup.controllers", "cpuset cpu io memory hugetlb\n")
	write("cgroup.subtree_control", "memory\n")
	write("vms/cgroup.subtree_control", "")
	write("vms/banger/cgroup.subtree_control", "")
	applied, missing, err := makeJailCgroup(mount, "vms/banger", "0123456789", jailLimits(1, 64))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"memory.max=201326592", "cpu.max=150000 100000"}, applied); diff != "" {
		t.Errorf("applied (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"pids"}, missing); diff != "" {
		t.Errorf("missing (-want +got):\n%s", diff)
	}
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(mount, rel))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	// memory was enabled at the top already; cpu is enabled everywhere.
	for rel, want := range map[string]string{
		"cgroup.subtree_control":            "+cpu",
		"vms/cgroup.subtree_control":        "+cpu",
		"vms/banger/cgroup.subtree_control": "+cpu",
		"vms/banger/0123456789/memory.max":  "201326592",
		"vms/banger/0123456789/cpu.max":     "150000 100000",
	} {
		if got := read(rel); got != want {
			t.Errorf("%s: %q, want %q", rel, got, want)
		}
	}
	if _, _, err := makeJailCgroup(mount, "vms/banger", "0123456789", jailLimits(1, 64)); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("second makeJailCgroup: %v", err)
	}
}

// Mount points with escaped characters in /proc/self/mountinfo come back
// as they are.
func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		"/sys/fs/cgroup":          "/sys/fs/cgroup",
		`/mnt/with\040space`:      "/mnt/with space",
		`/mnt/tab\011and\134back`: "/mnt/tab\tand\\back",
		`/mnt/trailing\04`:        `/mnt/trailing\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// The jailer command line and jail layout the helper plans for a VM match
// the golden file (go test -run TestJailSpecGolden -update rewrites it).
func TestJailSpecGolden(t *testing.T) {
	s := &Server{
		cfg: Config{OwnerUID: 1000, StateDir: "/var/lib/banger"},
		jail: &jailConfig{
			firecracker: "/usr/libexec/banger/firecracker", jailer: "/usr/libexec/banger/jailer",
			dir: "/var/lib/banger-jail", uidBase: 900000, uidCount: 1024, cgroup: "banger-jail",
		},
	}
	argv, layout, err := s.jailSpec("0f3a9c12ab", 900003).JailerArgv()
	if err != nil {
		t.Fatal(err)
	}
	cfg := vmm.Config{
		Kernel: "/var/lib/banger/vms/0f3a9c12ab/vmlinux",
		Disks:  []vmm.Disk{{ID: "root", Path: "/var/lib/banger/vms/0f3a9c12ab/root.img"}},
	}
	_, links, err := layout.Jailed(cfg)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.MarshalIndent(map[string]any{"argv": argv, "layout": layout, "links": links}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "jail_spec.golden.json", string(b)+"\n")
}

// killCgroup kills every process of a real cgroup, those forked into it
// included, and removes it: with cgroup.kill, and on the older kernels'
// path that signals cgroup.procs until the cgroup is empty.
func TestKillCgroup(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "sh", "sleep")
	mount, err := cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup v2 hierarchy: %v", err)
	}
	for _, killFile := range []string{"cgroup.kill", "no-cgroup.kill"} {
		t.Run(killFile, func(t *testing.T) {
			dir, err := os.MkdirTemp(mount, "banger-test-kill-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = killCgroupTree(dir) })
			// A shell that keeps forking sleeps into the cgroup.
			cmd := exec.Command("sh", "-c", "while :; do sleep 60 & sleep 0.01; done")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waited := make(chan struct{})
			go func() { _ = cmd.Wait(); close(waited) }()
			if err := moveToCgroup(dir, cmd.Process.Pid); err != nil {
				t.Fatal(err)
			}
			testutil.WaitFor(t, 5*time.Second, "the shell to fork into the cgroup", func() bool {
				b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
				return len(strings.Fields(string(b))) > 2
			})
			if err := killCgroupVia(t.Context(), dir, killFile); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("cgroup %s still exists (%v)", dir, err)
			}
			select {
			case <-waited:
			case <-time.After(5 * time.Second):
				t.Error("the shell survived")
			}
			if err := killCgroup(t.Context(), dir); err != nil {
				t.Errorf("killCgroup of a removed cgroup: %v", err)
			}
		})
	}
}
