package qemu

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

func baseConfig() vmm.Config {
	return vmm.Config{
		ID:        "dev",
		CPUs:      2,
		MemoryMiB: 1024,
		Kernel:    "/var/lib/banger/images/bookworm/vmlinuz",
		Initrd:    "/var/lib/banger/images/bookworm/initrd.img",
		Cmdline:   "root=/dev/vda rw panic=-1",
		Disks:     []vmm.Disk{{ID: "root", Path: "/var/lib/banger/vms/dev/root.ext4", Format: "raw"}},
		RunDir:    "/run/banger/vm/dev",
		Accel:     vmm.TCG,
	}
}

// The command line for each kind of VM banger starts is pinned in a golden
// file (go test -run TestBuildArgvGolden -update rewrites them).
func TestBuildArgvGolden(t *testing.T) {
	host := HostInfo{TSCkHz: 2445406}
	tests := []struct {
		name string
		cfg  func(*vmm.Config)
		host HostInfo
	}{
		{"tcg_user_net", func(c *vmm.Config) {
			c.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:12:34:56", Forwards: []vmm.Forward{
				{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 2222, GuestPort: 22},
				{Proto: "udp", HostIP: "127.0.0.1", HostPort: 5353, GuestPort: 53},
			}}}
		}, host},
		{"kvm_tap_vsock_qcow2", func(c *vmm.Config) {
			c.ID = "0f3a9c" // a hex id is a valid -name
			c.Accel = vmm.KVM
			c.Disks = []vmm.Disk{
				{ID: "root", Path: "/var/lib/banger/vms/dev/root.qcow2", Format: "qcow2"},
				{ID: "seed", Path: "/var/lib/banger/vms/dev/seed.img", Format: "raw", ReadOnly: true},
			}
			c.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:ab:cd:ef", Tap: "bgr-1a2b3c"}}
			c.Vsock = &vmm.Vsock{CID: 42}
			c.Executable = "/opt/qemu/bin/qemu-system-x86_64"
		}, host},
		{"tcg_no_initrd_unknown_tsc_vsock_dropped", func(c *vmm.Config) {
			c.Initrd = ""
			c.Cmdline = "console=hvc0 tsc_early_khz=1000000"
			c.Vsock = &vmm.Vsock{CID: 3}
		}, HostInfo{}},
		{"commas_in_paths", func(c *vmm.Config) {
			c.RunDir = "/run/a,b"
			c.Disks[0].Path = "/srv/x,format=qcow2,file=/etc/shadow"
			c.Cmdline = ""
		}, host},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := baseConfig()
			tt.cfg(&cfg)
			argv, err := BuildArgv(cfg, tt.host)
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Join(argv, "\n") + "\n"
			path := filepath.Join("testdata", tt.name+".argv")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("argv (-golden +got):\n%s", diff)
			}
		})
	}
}

// BuildArgv is pure: the same input always gives the same command line, and
// it does not touch the Config it was given.
func TestBuildArgvPure(t *testing.T) {
	cfg := baseConfig()
	cfg.NICs = []vmm.NIC{{ID: "eth0", Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 2222, GuestPort: 22}}}}
	before := baseConfig()
	before.NICs = cfg.NICs
	a, err := BuildArgv(cfg, HostInfo{TSCkHz: 1})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := BuildArgv(cfg, HostInfo{TSCkHz: 1})
	if diff := cmp.Diff(a, b); diff != "" {
		t.Errorf("two builds differ:\n%s", diff)
	}
	if diff := cmp.Diff(before, cfg); diff != "" {
		t.Errorf("config modified:\n%s", diff)
	}
}

// Each rejected Config stands for a mistake or an attempt to add QEMU
// options through a field; the error names the field.
func TestBuildArgvRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  func(*vmm.Config)
		want string
	}{
		{"id with a comma adds -name options", func(c *vmm.Config) { c.ID = "dev,debug-threads=on" }, "vm id"},
		{"empty id", func(c *vmm.Config) { c.ID = "" }, "vm id"},
		{"id with a slash", func(c *vmm.Config) { c.ID = "../dev" }, "vm id"},
		{"no cpus", func(c *vmm.Config) { c.CPUs = 0 }, "cpus 0"},
		{"too many cpus", func(c *vmm.Config) { c.CPUs = 1000 }, "cpus 1000"},
		{"tiny memory", func(c *vmm.Config) { c.MemoryMiB = 8 }, "memory 8 MiB"},
		{"unknown accel", func(c *vmm.Config) { c.Accel = "hvf" }, `accel "hvf"`},
		{"relative kernel", func(c *vmm.Config) { c.Kernel = "vmlinuz" }, "kernel \"vmlinuz\": want an absolute path"},
		{"missing kernel", func(c *vmm.Config) { c.Kernel = "" }, "kernel: missing"},
		{"relative initrd", func(c *vmm.Config) { c.Initrd = "../initrd" }, "initrd"},
		{"no run dir", func(c *vmm.Config) { c.RunDir = "" }, "run dir: missing"},
		{"run dir too long for a socket", func(c *vmm.Config) { c.RunDir = "/" + strings.Repeat("r", 120) }, "QMP socket path would exceed"},
		{"newline in cmdline", func(c *vmm.Config) { c.Cmdline = "root=/dev/vda\ninit=/bin/sh" }, "control characters"},
		{"overlong cmdline", func(c *vmm.Config) { c.Cmdline = strings.Repeat("x", 3000) }, "kernel reads at most"},
		{"disk id with a comma", func(c *vmm.Config) { c.Disks[0].ID = "root,file=/etc/shadow" }, "disk 0 id"},
		{"disk id over 20 bytes (virtio serial)", func(c *vmm.Config) { c.Disks[0].ID = strings.Repeat("d", 21) }, "disk 0 id"},
		{"duplicate disk id", func(c *vmm.Config) { c.Disks = append(c.Disks, c.Disks[0]) }, `disk id "root": used twice`},
		{"unknown disk format", func(c *vmm.Config) { c.Disks[0].Format = "vmdk" }, `format "vmdk"`},
		{"relative disk path", func(c *vmm.Config) { c.Disks[0].Path = "root.ext4" }, "want an absolute path"},
		{"nic id with a comma", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0,hostfwd=tcp::1-:22"}} }, "nic 0 id"},
		{"duplicate nic", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0"}, {ID: "eth0"}} }, "used twice"},
		{"upper-case mac", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:AB:CD:EF"}} }, "lower-case"},
		{"multicast mac", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0", MAC: "01:00:5e:00:00:01"}} }, "multicast"},
		{"mac smuggling options", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:12:34:56,id=x"}} }, "mac"},
		{"tap with a slash", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0", Tap: "../tap0"}} }, "tap"},
		{"tap over 15 bytes", func(c *vmm.Config) { c.NICs = []vmm.NIC{{ID: "eth0", Tap: "bgr-0123456789ab"}} }, "tap"},
		{"tap with forwards", func(c *vmm.Config) {
			c.NICs = []vmm.NIC{{ID: "eth0", Tap: "bgr-1", Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 1, GuestPort: 2}}}}
		}, "need user-mode networking"},
		{"bad forward", func(c *vmm.Config) {
			c.NICs = []vmm.NIC{{ID: "eth0", Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 0, GuestPort: 22}}}}
		}, "host port 0"},
		{"same host port twice", func(c *vmm.Config) {
			f := vmm.Forward{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 2222, GuestPort: 22}
			c.NICs = []vmm.NIC{{ID: "eth0", Forwards: []vmm.Forward{f}}, {ID: "eth1", Forwards: []vmm.Forward{f}}}
		}, "already forwarded"},
		{"reserved vsock cid", func(c *vmm.Config) { c.Vsock = &vmm.Vsock{CID: 2} }, "vsock cid 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := baseConfig()
			tt.cfg(&cfg)
			_, err := BuildArgv(cfg, HostInfo{})
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

// All problems are reported at once, so a user fixes them in one go.
func TestBuildArgvReportsAll(t *testing.T) {
	cfg := baseConfig()
	cfg.CPUs, cfg.MemoryMiB, cfg.Accel = 0, 0, ""
	_, err := BuildArgv(cfg, HostInfo{})
	if err == nil {
		t.Fatal("accepted")
	}
	for _, w := range []string{"cpus 0", "memory 0 MiB", `accel ""`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
}
