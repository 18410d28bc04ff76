package fcfake

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Every embedded spec loads, every $ref resolves, and the operations the
// driver uses are present in all of them.
func TestLoadSpecs(t *testing.T) {
	for _, v := range Versions() {
		s, err := LoadSpec(v)
		if err != nil {
			t.Fatal(err)
		}
		for _, mp := range [][2]string{
			{"GET", "/"}, {"GET", "/version"}, {"PUT", "/logger"}, {"PUT", "/machine-config"},
			{"PUT", "/boot-source"}, {"PUT", "/drives/root"}, {"PUT", "/network-interfaces/eth0"},
			{"PUT", "/vsock"}, {"PUT", "/entropy"}, {"PUT", "/actions"}, {"PATCH", "/vm"},
			{"PUT", "/snapshot/create"}, {"PUT", "/snapshot/load"},
		} {
			if _, _, ok := s.Lookup(mp[0], mp[1]); !ok {
				t.Errorf("%s: %s %s missing", v, mp[0], mp[1])
			}
		}
	}
	if _, err := LoadSpec("1.13.0"); err == nil {
		t.Error("LoadSpec(1.13.0) succeeded")
	}
}

// Validation follows the schema strictly, as serde with
// deny_unknown_fields does, and words errors like serde_json.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		version, method, path, body string
		wantErr                     string // "" means valid
	}{
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":512}`, ""},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":2}`, "missing field `mem_size_mib`"},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":33,"mem_size_mib":512}`, "invalid value: integer `33`"},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":"2","mem_size_mib":512}`, `invalid type: string "2", expected an integer`},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":1.5,"mem_size_mib":512}`, "invalid type: floating point `1.5`"},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":512,"huge_pages":"Transparent"}`, "unknown variant `Transparent`, expected `None` or `2M`"},
		{"1.17.0-dev", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":512,"huge_pages":"Transparent"}`, ""},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":512,"smt":null}`, ""},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":null,"mem_size_mib":512}`, "invalid type: null"},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":1,"vcpu_count":2,"mem_size_mib":512}`, "duplicate field `vcpu_count`"},
		{"1.14.2", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":512}x`, "trailing characters"},
		{"1.14.2", "PUT", "/machine-config", `[1]`, "invalid type: sequence, expected struct MachineConfiguration"},
		{"1.14.2", "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","mtu":1500}`, "unknown field `mtu`"},
		{"1.16.1", "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","mtu":1500}`, ""},
		{"1.16.1", "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","mtu":67}`, "invalid value: integer `67`"},
		{"1.14.2", "PUT", "/drives/root", `{"drive_id":"root","is_root_device":true,"rate_limiter":{"bandwidth":{"size":1}}}`, "missing field `refill_time`"},
		{"1.14.2", "PUT", "/drives/root", `{"drive_id":"root","is_root_device":true,"cache_type":"Always"}`, "unknown variant `Always`, expected `Unsafe` or `Writeback`"},
		{"1.14.2", "PUT", "/vsock", `{"guest_cid":2,"uds_path":"/v.sock"}`, "invalid value: integer `2`, expected an integer >= 3"},
		{"1.14.2", "PATCH", "/vm", `{"state":"Stopped"}`, "unknown variant `Stopped`, expected `Paused` or `Resumed`"},
		{"1.14.2", "PUT", "/actions", `{"action_type":"Reboot"}`, "expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"},
		{"1.14.2", "PUT", "/logger", `{"level":"debug"}`, ""},
		{"1.14.2", "PUT", "/logger", `{"level":"loud"}`, "unknown variant `loud`"},
		{"1.14.2", "PUT", "/metrics", `{"metrics_path":"/m","emit_id":true}`, ""}, // MetricsConfig lacks deny_unknown_fields in v1.14.2
		{"1.16.1", "PUT", "/metrics", `{"metrics_path":"/m","emit_id":true}`, "unknown field `emit_id`, expected `metrics_path`"},
		{"1.17.0-dev", "PUT", "/metrics", `{"metrics_path":"/m","emit_id":true,"properties":{"a":"b"}}`, ""},
		{"1.17.0-dev", "PUT", "/metrics", `{"metrics_path":"/m","properties":{"a":1}}`, "invalid type: integer `1`, expected a string"},
		{"1.14.2", "PUT", "/snapshot/load", `{"snapshot_path":"/s","vsock_override":{"uds_path":"/v"}}`, "unknown field `vsock_override`"},
		{"1.16.1", "PUT", "/snapshot/load", `{"snapshot_path":"/s","vsock_override":{"uds_path":"/v"}}`, ""},
		{"1.16.1", "PUT", "/snapshot/load", `{"snapshot_path":"/s","vsock_override":{}}`, "missing field `uds_path`"},
		{"1.14.2", "PUT", "/mmds", `{"any":{"thing":[1,2]}}`, ""},
		{"1.14.2", "PUT", "/mmds/config", `{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}`, "expected a string matching"},
		{"1.14.2", "PUT", "/mmds/config", `{"network_interfaces":["eth0"],"ipv4_address":"169.254.169.254"}`, ""},
		{"1.14.2", "PUT", "/entropy", ``, "EOF while parsing a value"},
		{"1.14.2", "GET", "/", ``, ""},
		{"1.14.2", "DELETE", "/drives/root", ``, "not in the firecracker 1.14.2 spec"},
	} {
		s, err := LoadSpec(tc.version)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Validate(tc.method, tc.path, []byte(tc.body))
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s %s %s %s: %v", tc.version, tc.method, tc.path, tc.body, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s %s %s %s: %v\nwant an error containing %q", tc.version, tc.method, tc.path, tc.body, err, tc.wantErr)
		}
	}
}

type fake struct {
	t     *testing.T
	srv   *Server
	spec  *Spec
	exits chan int
	out   *syncBuffer
}

func newFake(t *testing.T, version string, noKVM bool) *fake {
	spec, err := LoadSpec(version)
	if err != nil {
		t.Fatal(err)
	}
	f := &fake{t: t, spec: spec, exits: make(chan int, 1), out: &syncBuffer{}}
	f.srv = NewServer(spec, Options{NoKVM: noKVM, Stdout: f.out, Exit: func(c int) { f.exits <- c }, ResetDelay: time.Millisecond})
	t.Cleanup(f.srv.Close)
	return f
}

// do sends one request and returns the status, the fault message (if any)
// and the raw body.
func (f *fake) do(method, path, body string) (int, string, []byte) {
	f.t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	rec := httptest.NewRecorder()
	f.srv.ServeHTTP(rec, req)
	var fb struct {
		FaultMessage string `json:"fault_message"`
	}
	_ = json.Unmarshal(rec.Body.Bytes(), &fb)
	if rec.Code == 200 {
		// A 200 body must match the spec's response schema.
		op, _, _ := f.spec.Lookup(method, path)
		if rs := op.Responses["200"]; rs != nil {
			if _, err := rs.Decode(rec.Body.Bytes()); err != nil {
				f.t.Errorf("%s %s: response %s does not match the spec: %v", method, path, rec.Body.Bytes(), err)
			}
		}
	}
	return rec.Code, fb.FaultMessage, rec.Body.Bytes()
}

// syncBuffer is the fake's stdout: written by the server's goroutines,
// read by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func writeKernel(t *testing.T, dir string) string {
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5] = 2, 1
	binary.LittleEndian.PutUint16(h[18:], 62)
	p := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(p, h, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

type step struct {
	method, path, body string
	status             int
	fault              string // substring of the fault message; "" for none
}

func runSteps(t *testing.T, f *fake, steps []step) {
	t.Helper()
	for i, s := range steps {
		status, fault, raw := f.do(s.method, s.path, s.body)
		if status != s.status || (s.fault != "" && !strings.Contains(fault, s.fault)) || (s.fault == "" && fault != "") {
			t.Errorf("step %d %s %s %s: %d %s\nwant %d %q", i, s.method, s.path, s.body, status, raw, s.status, s.fault)
		}
	}
}

// The fake enforces Firecracker's phases, id rules and routing errors with
// Firecracker's texts, and a boot moves it from "Not started" to Running.
func TestServerLifecycle(t *testing.T) {
	dir, err := os.MkdirTemp("", "fcf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	kernel := writeKernel(t, dir)
	disk := filepath.Join(dir, "root.img")
	if err := os.WriteFile(disk, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "fc.log")
	if err := os.WriteFile(logPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	vsock := filepath.Join(dir, "v.sock")
	f := newFake(t, "1.14.2", false)
	runSteps(t, f, []step{
		{"GET", "/", "", 200, ""},
		{"PATCH", "/vm", `{"state":"Paused"}`, 400, "not supported before starting the microVM."},
		{"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 400, "not supported before starting the microVM."},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "Start microvm error: Cannot start microvm without kernel configuration."},
		{"PUT", "/logger", `{"log_path":"/nonexistent/fc.log"}`, 400, "No such file or directory (os error 2)"},
		{"PUT", "/logger", `{"log_path":"` + logPath + `","level":"Info","show_level":true}`, 204, ""},
		{"PUT", "/machine-config", `{"vcpu_count":3,"mem_size_mib":256,"smt":true}`, 400, "Machine config error"},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256}`, 204, ""},
		{"PATCH", "/machine-config", `{"mem_size_mib":512}`, 204, ""},
		{"GET", "/machine-config", "", 200, ""},
		{"PUT", "/boot-source", `{"kernel_image_path":"/nonexistent"}`, 400, "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"},
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `","boot_args":"console=ttyS0"}`, 204, ""},
		{"PUT", "/drives/", `{"drive_id":"root"}`, 400, "The ID cannot be empty."},
		{"PUT", "/drives/ro-ot", `{"drive_id":"ro-ot"}`, 400, "API Resource IDs can only contain alphanumeric characters and underscores."},
		{"PUT", "/drives/root", `{"drive_id":"other","path_on_host":"` + disk + `","is_root_device":true,"is_read_only":false}`, 400, "The id from the path does not match the id from the body!"},
		{"PUT", "/drives/root", `{"drive_id":"root","path_on_host":"/nonexistent","is_root_device":true,"is_read_only":false}`, 400, "No such file or directory"},
		{"PUT", "/drives/root", `{"drive_id":"root","path_on_host":"` + disk + `","is_root_device":true,"is_read_only":false}`, 204, ""},
		{"PUT", "/drives/second", `{"drive_id":"second","path_on_host":"` + disk + `","is_root_device":true,"is_read_only":true}`, 400, "A root block device already exists!"},
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap-name-too-long0"}`, 400, "Network config error"},
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"` + vsock + `"}`, 204, ""},
		{"PUT", "/entropy", `{}`, 204, ""},
		{"PUT", "/nope", `{}`, 400, "Invalid request method and/or path: PUT nope."},
		{"GET", "/version", `{}`, 400, "GET request cannot have a body."},
		{"PUT", "/entropy", "", 400, "Empty PUT request."},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
		{"GET", "/vm/config", "", 200, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "The requested operation is not supported after starting the microVM."},
		{"PUT", "/drives/root", `{"drive_id":"root","path_on_host":"` + disk + `","is_root_device":true,"is_read_only":false}`, 400, "not supported after starting"},
		{"PUT", "/snapshot/create", `{"snapshot_path":"` + dir + `/s","mem_file_path":"` + dir + `/m"}`, 400, "paused"},
		{"PATCH", "/vm", `{"state":"Paused"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_path":"` + dir + `/s","mem_file_path":"` + dir + `/m"}`, 204, ""},
		{"PATCH", "/vm", `{"state":"Resumed"}`, 204, ""},
	})
	if got := f.srv.State(); got != "Running" {
		t.Errorf("state %q after resume", got)
	}
	if fi, err := os.Lstat(vsock); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("vsock not bound at PUT time: %v", err)
	}
	if !strings.Contains(f.out.String(), "Command line: console=ttyS0 pci=off root=/dev/vda rw") {
		t.Errorf("console output %q", f.out.String())
	}
	logb, _ := os.ReadFile(logPath)
	if !strings.Contains(string(logb), "[anonymous-instance:main:ERROR] Received Error. Status code: 400 Bad Request.") {
		t.Errorf("log lacks Firecracker's error line:\n%s", logb)
	}

	// Ctrl-Alt-Del: the guest resets, the process exits 0.
	runSteps(t, f, []step{{"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 204, ""}})
	select {
	case code := <-f.exits:
		if code != 0 {
			t.Errorf("exit code %d after ctrl-alt-del", code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no exit after ctrl-alt-del")
	}
}

// A success status comes from the version's spec: the balloon hinting
// actions answer 200 in v1.14.2 and 204 from v1.16.1 on.
func TestSuccessStatusFollowsSpec(t *testing.T) {
	dir := t.TempDir()
	kernel := writeKernel(t, dir)
	for version, want := range map[string]int{"1.14.2": 200, "1.16.1": 204} {
		f := newFake(t, version, false)
		runSteps(t, f, []step{
			{"PUT", "/balloon", `{"amount_mib":0,"deflate_on_oom":true,"free_page_hinting":true}`, 204, ""},
			{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `"}`, 204, ""},
			{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
			{"PATCH", "/balloon/hinting/start", `{}`, want, ""},
			{"PATCH", "/balloon/hinting/stop", "", want, ""},
		})
	}
}

// A snapshot load is refused once boot-specific resources are configured,
// and a load that fails ends the process, as Firecracker considers its
// state dirty.
func TestSnapshotLoadRules(t *testing.T) {
	dir := t.TempDir()
	kernel := writeKernel(t, dir)
	f := newFake(t, "1.16.1", false)
	runSteps(t, f, []step{
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `"}`, 204, ""},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}`, 400,
			"Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."},
	})
	f = newFake(t, "1.16.1", false)
	runSteps(t, f, []step{
		{"PUT", "/snapshot/load", `{"snapshot_path":"/nonexistent","mem_backend":{"backend_type":"File","backend_path":"/m"}}`, 400, "Failed to restore from snapshot"},
	})
	select {
	case code := <-f.exits:
		if code != 1 {
			t.Errorf("exit code %d after a failed load", code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the process survived a failed snapshot load")
	}
}

// InstanceStart on a host without KVM fails and leaves the process in the
// pre-boot phase, as Firecracker does.
func TestNoKVM(t *testing.T) {
	dir := t.TempDir()
	kernel := writeKernel(t, dir)
	f := newFake(t, "1.14.2", true)
	runSteps(t, f, []step{
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "Kvm error"},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128}`, 204, ""},
		{"GET", "/", "", 200, ""},
	})
	if f.srv.State() != "Not started" {
		t.Errorf("state %q", f.srv.State())
	}
}

// The fake process parses Firecracker's command line: unknown arguments
// exit 153, a path already taken by a socket exits 1 with Firecracker's
// message, --version prints the version.
func TestRun(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Run("1.14.2", []string{"--bogus"}, false, &out, &errb); code != 153 {
		t.Errorf("unknown argument: exit %d, want 153 (%s)", code, errb.String())
	}
	out.Reset()
	if code := Run("1.14.2", []string{"--version"}, false, &out, &errb); code != 0 || !strings.Contains(out.String(), "Firecracker v1.14.2") {
		t.Errorf("--version: exit %d, output %q", code, out.String())
	}
	dir, err := os.MkdirTemp("", "fcf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	out.Reset()
	if code := Run("1.14.2", []string{"--api-sock", sock}, false, &out, &errb); code != 1 ||
		!strings.Contains(out.String(), "Failed to open the API socket at: "+sock+". Check that it is not already used.") ||
		!strings.Contains(out.String(), "Firecracker exiting with error. exit_code=1") {
		t.Errorf("socket in use: exit %d, output %q", code, out.String())
	}
}

// The resources the driver does not use are still modelled where the
// summary documents them: metrics initialise once, MMDS data merges like a
// JSON merge patch, the MMDS interfaces must exist, and PATCH /drives works
// only after boot.
func TestOtherResources(t *testing.T) {
	dir := t.TempDir()
	kernel := writeKernel(t, dir)
	metrics := filepath.Join(dir, "metrics.json")
	if err := os.WriteFile(metrics, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "d.img")
	if err := os.WriteFile(disk, make([]byte, 512), 0o600); err != nil {
		t.Fatal(err)
	}
	f := newFake(t, "1.16.1", false)
	runSteps(t, f, []step{
		{"PUT", "/metrics", `{"metrics_path":"/nonexistent/m"}`, 400, "No such file or directory"},
		{"PUT", "/metrics", `{"metrics_path":"` + metrics + `"}`, 204, ""},
		{"PUT", "/metrics", `{"metrics_path":"` + metrics + `"}`, 400, "Metrics error"},
		{"PATCH", "/mmds", `{"a":1}`, 400, "MMDS error"},
		{"PUT", "/mmds", `{"latest":{"meta-data":{"ami-id":"x","host":"h"}}}`, 204, ""},
		{"PATCH", "/mmds", `{"latest":{"meta-data":{"host":null,"zone":"z"}}}`, 204, ""},
		{"PUT", "/mmds/config", `{"network_interfaces":["eth9"]}`, 400, "MMDS config error"},
		{"PATCH", "/drives/root", `{"drive_id":"root","path_on_host":"` + disk + `"}`, 400, "not supported before starting the microVM."},
		{"PUT", "/drives/root", `{"drive_id":"root","path_on_host":"` + disk + `","is_root_device":true,"is_read_only":true}`, 204, ""},
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
		{"PATCH", "/drives/root", `{"drive_id":"root","path_on_host":"` + disk + `"}`, 204, ""},
		{"PATCH", "/drives/nope", `{"drive_id":"nope","path_on_host":"` + disk + `"}`, 400, "Drive config error"},
		{"PUT", "/actions", `{"action_type":"FlushMetrics"}`, 204, ""},
	})
	_, _, raw := f.do("GET", "/mmds", "")
	var got map[string]any
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"latest": map[string]any{"meta-data": map[string]any{"ami-id": "x", "zone": "z"}}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("mmds after patch (-want +got):\n%s", diff)
	}
}

// Deprecated fields still work and the answer carries a Deprecation
// header.
func TestDeprecationHeader(t *testing.T) {
	dir, err := os.MkdirTemp("", "fcf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	f := newFake(t, "1.14.2", false)
	req := httptest.NewRequest("PUT", "/vsock", strings.NewReader(`{"vsock_id":"v","guest_cid":3,"uds_path":"`+filepath.Join(dir, "v.sock")+`"}`))
	rec := httptest.NewRecorder()
	f.srv.ServeHTTP(rec, req)
	if rec.Code != 204 || rec.Header().Get("Deprecation") == "" {
		t.Errorf("status %d, Deprecation %q", rec.Code, rec.Header().Get("Deprecation"))
	}
}
