package firecracker

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// fullConfig uses every device the driver can configure.
func fullConfig(t *testing.T) vmm.Config {
	dir := shortDir(t)
	cfg := testConfig(t, dir)
	cfg.Initrd = writeDisk(t, dir, "initrd.img")
	cfg.Disks = append(cfg.Disks, vmm.Disk{ID: "data_1", Path: writeDisk(t, dir, "data.img"), ReadOnly: true})
	cfg.NICs = []vmm.NIC{{ID: "eth0", MAC: "52:54:00:12:34:56", Tap: "bgr-test0"}}
	return cfg
}

func mustCaps(t *testing.T, version string) Capabilities {
	t.Helper()
	v, err := ParseVersion(version)
	if err != nil {
		t.Fatal(err)
	}
	caps, err := CapabilitiesFor(v)
	if err != nil {
		t.Fatal(err)
	}
	return caps
}

// Every request of the boot sequence, logger included, is valid for the
// schema of the version it is built for, with and without an MTU.
func TestBootRequestsMatchEachSpec(t *testing.T) {
	for _, version := range fcfake.Versions() {
		spec, err := fcfake.LoadSpec(version)
		if err != nil {
			t.Fatal(err)
		}
		for _, mtu := range []int{0, 1400} {
			p, err := newPlan(fullConfig(t), mtu)
			if err != nil {
				t.Fatal(err)
			}
			calls, _, err := p.calls(mustCaps(t, version))
			if err != nil {
				t.Fatal(err)
			}
			calls = append(calls, call{"logger", "PUT", "/logger", Logger{LogPath: "/x/firecracker.log", Level: "Info", ShowLevel: true}})
			for _, c := range calls {
				body, err := json.Marshal(c.body)
				if err != nil {
					t.Fatal(err)
				}
				if err := spec.Validate(c.method, c.path, body); err != nil {
					t.Errorf("%s mtu=%d: %s %s %s: %v", version, mtu, c.method, c.path, body, err)
				}
			}
		}
	}
}

// The other requests the client can send (control, snapshots) are valid
// for every version's schema.
func TestControlRequestsMatchEachSpec(t *testing.T) {
	reqs := []call{
		{"", "PATCH", "/vm", vmState{State: "Paused"}},
		{"", "PATCH", "/vm", vmState{State: "Resumed"}},
		{"", "PUT", "/actions", instanceAction{ActionType: ActionSendCtrlAltDel}},
		{"", "PUT", "/actions", instanceAction{ActionType: ActionFlushMetrics}},
		{"", "PUT", "/snapshot/create", SnapshotCreate{SnapshotPath: "/s", MemFilePath: "/m", SnapshotType: "Full"}},
		{"", "PUT", "/snapshot/load", SnapshotLoad{SnapshotPath: "/s", MemBackend: &MemoryBackend{BackendType: "File", BackendPath: "/m"},
			ResumeVM: true, TrackDirtyPages: true, NetworkOverrides: []NetworkOverride{{IfaceID: "eth0", HostDevName: "tap1"}}}},
		{"", "PUT", "/drives/root", Drive{DriveID: "root", PathOnHost: "/d", IsRootDevice: true, CacheType: "Writeback", IOEngine: "Async",
			RateLimiter: &RateLimiter{Bandwidth: &TokenBucket{Size: 1 << 20, RefillTime: 100}, Ops: &TokenBucket{Size: 100, OneTimeBurst: 10, RefillTime: 1000}}}},
		{"", "PUT", "/entropy", EntropyDevice{RateLimiter: &RateLimiter{Bandwidth: &TokenBucket{Size: 1000, RefillTime: 100}}}},
		{"", "PUT", "/machine-config", MachineConfig{VCPUCount: 2, MemSizeMiB: 512, SMT: true, TrackDirtyPages: true, HugePages: "2M"}},
	}
	for _, version := range fcfake.Versions() {
		spec, err := fcfake.LoadSpec(version)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range reqs {
			body, _ := json.Marshal(c.body)
			if err := spec.Validate(c.method, c.path, body); err != nil {
				t.Errorf("%s: %s %s %s: %v", version, c.method, c.path, body, err)
			}
		}
	}
}

// The MTU, a v1.16+ field, is left out of the request to v1.14.2 (which
// would reject the whole interface) and sent to newer versions.
func TestMTUOnlyWhereSupported(t *testing.T) {
	p, err := newPlan(fullConfig(t), 1400)
	if err != nil {
		t.Fatal(err)
	}
	old, err := fcfake.LoadSpec("1.14.2")
	if err != nil {
		t.Fatal(err)
	}
	withMTU := `{"iface_id":"eth0","host_dev_name":"bgr-test0","mtu":1400}`
	if err := old.Validate("PUT", "/network-interfaces/eth0", []byte(withMTU)); err == nil {
		t.Fatal("the v1.14.2 spec accepts mtu: this test no longer tests anything")
	}
	for _, tc := range []struct {
		version     string
		wantMTU     bool
		wantDropped []string
	}{
		{"1.14.2", false, []string{"network interface mtu"}},
		{"1.16.1", true, nil},
		{"1.17.0-dev", true, nil},
	} {
		calls, dropped, err := p.calls(mustCaps(t, tc.version))
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(calls, func(c call) bool { return strings.HasPrefix(c.path, "/network-interfaces/") })
		body, _ := json.Marshal(calls[i].body)
		if got := strings.Contains(string(body), `"mtu"`); got != tc.wantMTU {
			t.Errorf("%s: body %s, mtu sent %v, want %v", tc.version, body, got, tc.wantMTU)
		}
		if diff := cmp.Diff(tc.wantDropped, dropped); diff != "" {
			t.Errorf("%s: dropped (-want +got):\n%s", tc.version, diff)
		}
	}
	// The client refuses the field itself too, without sending it.
	c := NewClient("/nonexistent/sock", nil)
	c.caps = mustCaps(t, "1.14.2")
	err = c.PutNetworkInterface(t.Context(), NetworkInterface{IfaceID: "eth0", HostDevName: "tap0", MTU: 1400})
	if !strings.Contains(err.Error(), ErrNotSupported.Error()) {
		t.Errorf("client sent mtu to 1.14.2: %v", err)
	}
}

// The boot sequence has the shape Firecracker expects: machine, boot
// source, root drive first, interfaces, vsock, entropy, and InstanceStart
// last; reboot=k is added so a guest power-off ends the process.
func TestBootSequence(t *testing.T) {
	cfg := fullConfig(t)
	p, err := newPlan(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	calls, _, err := p.calls(mustCaps(t, "1.14.2"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range calls {
		got = append(got, c.method+" "+c.path)
	}
	want := []string{
		"PUT /machine-config", "PUT /boot-source", "PUT /drives/root", "PUT /drives/data_1",
		"PUT /network-interfaces/eth0", "PUT /vsock", "PUT /entropy", "PUT /actions",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("sequence (-want +got):\n%s", diff)
	}
	wantBoot := BootSource{KernelImagePath: cfg.Kernel, InitrdPath: cfg.Initrd, BootArgs: "console=ttyS0 panic=1 reboot=k"}
	if diff := cmp.Diff(wantBoot, calls[1].body); diff != "" {
		t.Errorf("boot source (-want +got):\n%s", diff)
	}
	wantDrives := []any{
		Drive{DriveID: "root", PathOnHost: cfg.Disks[0].Path, IsRootDevice: true},
		Drive{DriveID: "data_1", PathOnHost: cfg.Disks[1].Path, IsReadOnly: true},
	}
	if diff := cmp.Diff(wantDrives, []any{calls[2].body, calls[3].body}); diff != "" {
		t.Errorf("drives (-want +got):\n%s", diff)
	}
}

// bootArgs keeps an explicit reboot= and Firecracker's default command
// line when none is given.
func TestBootArgs(t *testing.T) {
	for in, want := range map[string]string{
		"":                          "",
		"console=ttyS0":             "console=ttyS0 reboot=k",
		"console=ttyS0 reboot=t":    "console=ttyS0 reboot=t",
		"  root=/dev/vda  reboot=k": "root=/dev/vda  reboot=k",
	} {
		if got := bootArgs(in); got != want {
			t.Errorf("bootArgs(%q) = %q, want %q", in, got, want)
		}
	}
}

// A bzImage is refused for the versions that boot only ELF, accepted by
// 1.17, and anything else is refused before the spawn.
func TestKernelFormat(t *testing.T) {
	dir := shortDir(t)
	bz := make([]byte, 0x400)
	copy(bz[0x202:], "HdrS")
	bzPath := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(bzPath, bz, 0o644); err != nil {
		t.Fatal(err)
	}
	arm := make([]byte, 64)
	copy(arm, "\x7fELF")
	arm[4], arm[5], arm[18] = 2, 1, 183 // EM_AARCH64
	armPath := filepath.Join(dir, "vmlinux-arm64")
	if err := os.WriteFile(armPath, arm, 0o644); err != nil {
		t.Fatal(err)
	}
	text := filepath.Join(dir, "README")
	if err := os.WriteFile(text, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		path    string
		goarch  string
		want    kernelFormat
		wantErr string
	}{
		{writeVmlinux(t, dir), "amd64", kernelELF, ""},
		{bzPath, "amd64", kernelBzImage, ""},
		{armPath, "amd64", 0, "not a 64-bit x86_64"},
		{text, "amd64", 0, "neither an ELF vmlinux nor a bzImage"},
		{filepath.Join(dir, "missing"), "amd64", 0, "no such file"},
		{bzPath, "arm64", 0, "not an arm64 Image"},
		{bzPath, "riscv64", 0, "only on x86_64 and aarch64"},
	} {
		got, err := detectKernel(tc.path, tc.goarch)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("detectKernel(%s, %s) = %v, %v; want error with %q", filepath.Base(tc.path), tc.goarch, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("detectKernel(%s, %s) = %v, %v; want %v", filepath.Base(tc.path), tc.goarch, got, err, tc.want)
		}
	}

	cfg := fullConfig(t)
	cfg.Kernel = bzPath
	p, err := newPlan(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		version string
		ok      bool
	}{{"1.14.2", false}, {"1.16.1", false}, {"1.17.0-dev", true}} {
		_, _, err := p.calls(mustCaps(t, tc.version))
		if (err == nil) != tc.ok {
			t.Errorf("bzImage on %s: err %v, want ok=%v", tc.version, err, tc.ok)
		}
	}
}

// newPlan refuses what Firecracker cannot do, with an error that names the
// problem and, where there is one, the way out.
func TestPlanRejects(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mutate  func(*vmm.Config)
		mtu     int
		wantErr string
	}{
		{"qcow2 disk", func(c *vmm.Config) { c.Disks[0].Format = "qcow2" }, 0, "firecracker reads only raw images (hint: qemu-img convert -O raw"},
		{"unknown disk format", func(c *vmm.Config) { c.Disks[0].Format = "vmdk" }, 0, `unknown format "vmdk"`},
		{"user-mode nic", func(c *vmm.Config) { c.NICs[0].Tap = "" }, 0, "firecracker has no user-mode networking"},
		{"port forwards", func(c *vmm.Config) {
			c.NICs[0].Forwards = []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 2222, GuestPort: 22}}
		}, 0, "port forwards need user-mode networking"},
		{"disk id with dash", func(c *vmm.Config) { c.Disks[0].ID = "root-disk" }, 0, "only letters, digits and '_'"},
		{"nic id with slash", func(c *vmm.Config) { c.NICs[0].ID = "eth0/../x" }, 0, "only letters, digits and '_'"},
		{"duplicate disk", func(c *vmm.Config) { c.Disks[1].ID = "root" }, 0, "given twice"},
		{"missing disk", func(c *vmm.Config) { c.Disks[1].Path = "/nonexistent/disk.img" }, 0, "no such file"},
		{"long tap", func(c *vmm.Config) { c.NICs[0].Tap = "bgr-0123456789ab" }, 0, "1 to 15 characters"},
		{"tap with space", func(c *vmm.Config) { c.NICs[0].Tap = "bgr x" }, 0, "interface names cannot hold"},
		{"bad mac", func(c *vmm.Config) { c.NICs[0].MAC = "52-54-00-12-34-56" }, 0, "guest mac"},
		{"no cpus", func(c *vmm.Config) { c.CPUs = 0 }, 0, "1 to 32 vCPUs"},
		{"too many cpus", func(c *vmm.Config) { c.CPUs = 33 }, 0, "1 to 32 vCPUs"},
		{"no memory", func(c *vmm.Config) { c.MemoryMiB = 0 }, 0, "at least 1 MiB"},
		{"tcg", func(c *vmm.Config) { c.Accel = vmm.TCG }, 0, "only with kvm"},
		{"reserved cid", func(c *vmm.Config) { c.Vsock.CID = 2 }, 0, "must be 3 or more"},
		{"relative run dir", func(c *vmm.Config) { c.RunDir = "run" }, 0, "must be an absolute path"},
		{"long run dir", func(c *vmm.Config) { c.RunDir = "/" + strings.Repeat("r", 110) }, 0, "run dir"},
		{"long vsock path", func(c *vmm.Config) { c.Vsock.Path = c.RunDir + "/" + strings.Repeat("v", 110) }, 0, "longer than a unix socket path"},
		{"no kernel", func(c *vmm.Config) { c.Kernel = "" }, 0, "no kernel given"},
		{"missing initrd", func(c *vmm.Config) { c.Initrd = "/nonexistent/initrd" }, 0, "open initrd"},
		{"mtu out of range", func(c *vmm.Config) {}, 10, "mtu 10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := fullConfig(t)
			tc.mutate(&cfg)
			_, err := newPlan(cfg, tc.mtu)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("newPlan: %v\nwant an error containing %q", err, tc.wantErr)
			}
		})
	}
}

// All problems of a config are reported at once, so a user fixes them in
// one go.
func TestPlanReportsAllProblems(t *testing.T) {
	cfg := fullConfig(t)
	cfg.CPUs = 0
	cfg.Disks[0].Format = "qcow2"
	cfg.NICs[0].Tap = ""
	_, err := newPlan(cfg, 0)
	for _, want := range []string{"vCPUs", "qcow2", "user-mode networking"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
}
