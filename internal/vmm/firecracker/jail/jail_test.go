package jail

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/vmm"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

func baseJail() JailSpec {
	return JailSpec{
		Jailer:   "/usr/local/bin/jailer",
		ExecFile: "/usr/local/bin/firecracker-v1.14.2-x86_64",
		ID:       "vm-0f3a9c",
		UID:      1001,
		GID:      1001,
	}
}

// The jailer command line and the jail layout for typical launches match
// the golden files (go test -run TestJailerGolden -update rewrites them).
func TestJailerGolden(t *testing.T) {
	full := baseJail()
	full.ChrootBase = "/var/lib/banger/jail"
	full.NetNS = "/var/run/netns/bgr-0f3a9c"
	full.ParentCgroup = "banger.slice/vms"
	full.Cgroup = CgroupLimits{MemoryMax: 1 << 30, CPUQuota: 200000, PidsMax: 256, CPUs: "0-3,6"}
	full.NoFile = 4096
	full.FileSize = 20 << 30
	full.NewPIDNS = true

	daemon := baseJail()
	daemon.Daemonize = true
	daemon.Cgroup = CgroupLimits{MemoryMax: 512 << 20}

	// What banger-helper runs: it creates the cgroup and writes the limits
	// itself, so the jailer only moves into --parent-cgroup.
	helper := JailSpec{
		Jailer:       "/usr/libexec/banger/jailer",
		ExecFile:     "/usr/libexec/banger/firecracker",
		ID:           "0f3a9c12ab",
		UID:          3000000007,
		GID:          3000000007,
		ChrootBase:   "/var/lib/banger-jail",
		ParentCgroup: "banger-jail/0f3a9c12ab",
		NewPIDNS:     true,
	}

	for _, tc := range []struct {
		name string
		spec JailSpec
	}{
		{"minimal", baseJail()},
		{"full", full},
		{"daemonize", daemon},
		{"helper", helper},
	} {
		t.Run(tc.name, func(t *testing.T) {
			argv, layout, err := tc.spec.JailerArgv()
			if err != nil {
				t.Fatal(err)
			}
			cfg := vmm.Config{
				Kernel: "/var/lib/banger/images/debian/vmlinux",
				Initrd: "/var/lib/banger/images/debian/initrd.img",
				Disks:  []vmm.Disk{{ID: "root", Path: "/var/lib/banger/vms/dev/root.img"}},
				Vsock:  &vmm.Vsock{CID: 3, Path: "/run/banger/vms/dev/v.sock"},
			}
			jailed, links, err := layout.Jailed(cfg)
			if err != nil {
				t.Fatal(err)
			}
			got, err := json.MarshalIndent(map[string]any{
				"argv":   argv,
				"layout": layout,
				"links":  links,
				"jailed": map[string]any{"kernel": jailed.Kernel, "initrd": jailed.Initrd, "disk": jailed.Disks[0].Path, "vsock": jailed.Vsock.Path},
			}, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			golden := filepath.Join("testdata", tc.name+".golden.json")
			if *update {
				if err := os.MkdirAll(filepath.Dir(golden), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("%s (-golden +got):\n%s", golden, diff)
			}
			// Jailed leaves the caller's config alone.
			if cfg.Disks[0].Path != "/var/lib/banger/vms/dev/root.img" || cfg.Vsock.Path != "/run/banger/vms/dev/v.sock" {
				t.Error("Jailed modified its input")
			}
		})
	}
}

// Each rejected input names the attack it stands for; none of them yields
// a command line.
func TestJailerRejects(t *testing.T) {
	for _, tc := range []struct {
		attack  string
		mutate  func(*JailSpec)
		wantErr string
	}{
		{"newline in id splits log lines and paths", func(s *JailSpec) { s.ID = "vm\nroot" }, "only letters, digits and '-'"},
		{"space in id", func(s *JailSpec) { s.ID = "vm 1" }, "only letters, digits and '-'"},
		{"../ in id escapes the chroot base", func(s *JailSpec) { s.ID = "../../etc" }, "only letters, digits and '-'"},
		{"slash in id nests jails", func(s *JailSpec) { s.ID = "a/b" }, "only letters, digits and '-'"},
		{"overlong id", func(s *JailSpec) { s.ID = strings.Repeat("a", 65) }, "1 to 64 characters"},
		{"empty id", func(s *JailSpec) { s.ID = "" }, "1 to 64 characters"},
		{"uid 0 runs firecracker as root", func(s *JailSpec) { s.UID = 0 }, "uid 0"},
		{"gid 0 gives the root group", func(s *JailSpec) { s.GID = 0 }, "gid 0"},
		{"negative uid wraps to a huge one", func(s *JailSpec) { s.UID = -1 }, "uid -1"},
		{"uid 2^32-1 is the invalid uid (-1)", func(s *JailSpec) { s.UID = 1<<32 - 1 }, "uid 4294967295"},
		{"relative exec file depends on the cwd", func(s *JailSpec) { s.ExecFile = "firecracker" }, "must be absolute"},
		{"../ in exec file", func(s *JailSpec) { s.ExecFile = "/usr/bin/../../tmp/firecracker" }, "must be clean"},
		{"space in chroot base", func(s *JailSpec) { s.ChrootBase = "/srv/jail er" }, "space or control character"},
		{"newline in chroot base", func(s *JailSpec) { s.ChrootBase = "/srv/jail\ner" }, "space or control character"},
		{"chroot base / jails nothing", func(s *JailSpec) { s.ChrootBase = "/" }, "must not be /"},
		{"trailing slash changes nothing but breaks equality", func(s *JailSpec) { s.ChrootBase = "/srv/jailer/" }, "must be clean"},
		{"relative jailer binary", func(s *JailSpec) { s.Jailer = "./jailer" }, "must be absolute"},
		{"exec file the jailer refuses to run (name lacks firecracker)", func(s *JailSpec) { s.ExecFile = "/usr/bin/sh" }, `whose name contains "firecracker"`},
		{"exec file name with a space", func(s *JailSpec) { s.ExecFile = "/usr/bin/fire cracker" }, "space or control character"},
		{"netns outside an absolute path", func(s *JailSpec) { s.NetNS = "netns/x" }, "must be absolute"},
		{"../ in parent cgroup escapes the hierarchy", func(s *JailSpec) { s.ParentCgroup = "../system.slice" }, `path component ".."`},
		{"absolute parent cgroup", func(s *JailSpec) { s.ParentCgroup = "/system.slice" }, "must be relative and clean"},
		{"newline in cpuset smuggles a second cgroup write", func(s *JailSpec) { s.Cgroup.CPUs = "0\ncpuset.mems=1" }, "want a list like 0-3,6"},
		{"= in cpuset breaks the FILE=VALUE split", func(s *JailSpec) { s.Cgroup.CPUs = "0=1" }, "want a list like 0-3,6"},
		{"negative memory limit", func(s *JailSpec) { s.Cgroup.MemoryMax = -1 }, "must not be negative"},
		{"cpu period without quota", func(s *JailSpec) { s.Cgroup.CPUPeriod = 100000 }, "without a quota"},
		{"negative resource limit", func(s *JailSpec) { s.NoFile = -1 }, "must not be negative"},
		{"long base overflows the socket path", func(s *JailSpec) { s.ChrootBase = "/" + strings.Repeat("b", 60) }, "longer than a unix socket path"},
	} {
		t.Run(tc.attack, func(t *testing.T) {
			s := baseJail()
			tc.mutate(&s)
			argv, _, err := s.JailerArgv()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("JailerArgv: %v\nwant an error containing %q", err, tc.wantErr)
			}
			if argv != nil {
				t.Errorf("argv %q returned with an error", argv)
			}
		})
	}
}

// Jailed refuses files it could not link safely and disk ids Firecracker
// would refuse.
func TestJailedRejects(t *testing.T) {
	_, layout, err := baseJail().JailerArgv()
	if err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]vmm.Config{
		"relative kernel":   {Kernel: "vmlinux"},
		"kernel with ..":    {Kernel: "/images/../../etc/shadow"},
		"disk id with a /":  {Kernel: "/k", Disks: []vmm.Disk{{ID: "../root", Path: "/d"}}},
		"disk with a space": {Kernel: "/k", Disks: []vmm.Disk{{ID: "root", Path: "/my disk.img"}}},
	} {
		if _, _, err := layout.Jailed(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := (JailLayout{}).Jailed(vmm.Config{Kernel: "/k"}); err == nil {
		t.Error("empty layout accepted")
	}
}

// The limits render as cgroup files in a fixed order, each naming its
// controller, and as the jailer's FILE=VALUE arguments from the same list.
func TestCgroupFiles(t *testing.T) {
	l := CgroupLimits{MemoryMax: 1 << 30, CPUQuota: 150000, PidsMax: 64, CPUs: "0-1"}
	if err := l.Validate(); err != nil {
		t.Fatal(err)
	}
	want := []CgroupFile{
		{"memory.max", "1073741824"},
		{"cpu.max", "150000 100000"},
		{"pids.max", "64"},
		{"cpuset.cpus", "0-1"},
	}
	if diff := cmp.Diff(want, l.Files()); diff != "" {
		t.Errorf("Files (-want +got):\n%s", diff)
	}
	var controllers []string
	for _, f := range l.Files() {
		controllers = append(controllers, f.Controller())
	}
	if diff := cmp.Diff([]string{"memory", "cpu", "pids", "cpuset"}, controllers); diff != "" {
		t.Errorf("controllers (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"memory.max=1073741824", "cpu.max=150000 100000", "pids.max=64", "cpuset.cpus=0-1"}, l.args()); diff != "" {
		t.Errorf("args (-want +got):\n%s", diff)
	}
	if got := (CgroupLimits{}).Files(); got != nil {
		t.Errorf("zero limits render %v", got)
	}
}
