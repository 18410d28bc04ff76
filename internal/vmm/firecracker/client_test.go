package firecracker

import (
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// Firecracker's error bodies become *APIError with method, path, status
// and the fault message verbatim, and the phase errors match their
// sentinels.
func TestAPIErrors(t *testing.T) {
	sock, _ := serveFake(t, "1.14.2", fcfake.Options{})
	c := NewClient(sock, nil)
	ctx := t.Context()
	if _, err := c.Negotiate(ctx); err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	kernel := writeVmlinux(t, dir)

	for _, tc := range []struct {
		name     string
		do       func() error
		want     APIError
		sentinel error
	}{
		{"post-boot action before boot", func() error { return c.Pause(ctx) },
			APIError{"PATCH", "/vm", 400, "The requested operation is not supported before starting the microVM."}, ErrNotBeforeStart},
		{"start without kernel", func() error { return c.Action(ctx, ActionInstanceStart) },
			APIError{"PUT", "/actions", 400, "Start microvm error: Cannot start microvm without kernel configuration."}, nil},
		{"missing kernel file", func() error { return c.PutBootSource(ctx, BootSource{KernelImagePath: "/nonexistent/vmlinux"}) },
			APIError{"PUT", "/boot-source", 400, "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"}, nil},
		{"unknown field", func() error {
			return c.send(ctx, "PUT", "/machine-config", map[string]any{"vcpu_count": 1, "mem_size_mib": 128, "mtu": 1}, nil)
		}, APIError{"PUT", "/machine-config", 400, "An error occurred when deserializing the json body of a request: unknown field `mtu`, expected one of `cpu_template`, `smt`, `mem_size_mib`, `track_dirty_pages`, `vcpu_count`, `huge_pages`."}, nil},
		{"id with a dash in the path", func() error {
			return c.send(ctx, "PUT", "/drives/root-1", Drive{DriveID: "root-1"}, nil)
		}, APIError{"PUT", "/drives/root-1", 400, "API Resource IDs can only contain alphanumeric characters and underscores."}, nil},
		{"path and body ids differ", func() error {
			return c.send(ctx, "PUT", "/drives/root", Drive{DriveID: "other", PathOnHost: kernel}, nil)
		}, APIError{"PUT", "/drives/root", 400, "The id from the path does not match the id from the body!"}, nil},
		{"unknown path", func() error { return c.send(ctx, "GET", "/nope/x", nil, nil) },
			APIError{"GET", "/nope/x", 400, "Invalid request method and/or path: GET nope."}, nil},
		{"empty put", func() error { return c.send(ctx, "PUT", "/vsock", nil, nil) },
			APIError{"PUT", "/vsock", 400, "Empty PUT request."}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.do()
			var got *APIError
			if !errors.As(err, &got) {
				t.Fatalf("error %v (%T) is not an *APIError", err, err)
			}
			if diff := cmp.Diff(tc.want, *got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if tc.sentinel != nil && !errors.Is(err, tc.sentinel) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.sentinel)
			}
		})
	}

	// After boot, pre-boot resources are refused with ErrNotAfterStart.
	if err := c.PutBootSource(ctx, BootSource{KernelImagePath: kernel}); err != nil {
		t.Fatal(err)
	}
	if err := c.Action(ctx, ActionInstanceStart); err != nil {
		t.Fatal(err)
	}
	err := c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 1, MemSizeMiB: 128})
	if !errors.Is(err, ErrNotAfterStart) || errors.Is(err, ErrNotBeforeStart) {
		t.Errorf("machine config after boot: %v, want ErrNotAfterStart", err)
	}
	if err := c.Action(ctx, ActionInstanceStart); !errors.Is(err, ErrNotAfterStart) {
		t.Errorf("second InstanceStart: %v, want ErrNotAfterStart", err)
	}
}

// The client validates ids itself and sends nothing for a bad one.
func TestValidID(t *testing.T) {
	for id, ok := range map[string]bool{
		"root": true, "data_1": true, "ETH0": true,
		"": false, "root-1": false, "a/b": false, "../x": false, "eth0\n": false, "x y": false, "é": false,
	} {
		if err := ValidID(id); (err == nil) != ok {
			t.Errorf("ValidID(%q) = %v, want ok=%v", id, err, ok)
		}
	}
	c := NewClient("/nonexistent/fc.sock", nil)
	err := c.PutDrive(t.Context(), Drive{DriveID: "../../vm"})
	if err == nil || strings.Contains(err.Error(), "nonexistent") {
		t.Errorf("PutDrive with a bad id: %v, want a refusal before any connection", err)
	}
}

// Negotiate refuses a Firecracker older than 1.14, by its own answer.
func TestNegotiateRefusesOldVersion(t *testing.T) {
	sock := filepath.Join(shortDir(t), "old.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"firecracker_version":"1.13.1"}`))
	})}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
	_, err = NewClient(sock, nil).Negotiate(t.Context())
	if !errors.Is(err, ErrUnsupportedVersion) || !strings.Contains(err.Error(), "1.13.1") {
		t.Fatalf("negotiate with 1.13.1: %v", err)
	}
}

// decodeResponse maps statuses and bodies: 204 and 200 without a wanted
// value succeed, a wanted value needs a JSON body, and every non-2xx is an
// *APIError carrying the fault message or the raw body.
func TestDecodeResponse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		status  int
		body    string
		want    bool // decode into InstanceInfo
		wantErr string
		fault   string
	}{
		{"put 204", 204, "", false, "", ""},
		{"hinting 200 with body", 200, `{"x":1}`, false, "", ""},
		{"get 200", 200, `{"app_name":"Firecracker","id":"a","state":"Running","vmm_version":"1.14.2"}`, true, "", ""},
		{"get 204", 204, "", true, "without the expected JSON body", ""},
		{"get bad json", 200, `{"state":`, true, "decode firecracker", ""},
		{"fault", 400, `{"fault_message":"Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"}`, false, "", "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"},
		{"mmds too large", 413, `{"fault_message":"MMDS limit exceeded error"}`, false, "", "MMDS limit exceeded error"},
		{"not json", 500, "internal error\n", false, "", "internal error"},
		{"empty", 400, "", false, "", "(empty body)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var info InstanceInfo
			var want any
			if tc.want {
				want = &info
			}
			err := decodeResponse("GET", "/", tc.status, []byte(tc.body), want)
			var apiErr *APIError
			switch {
			case tc.fault != "":
				if !errors.As(err, &apiErr) || apiErr.FaultMessage != tc.fault || apiErr.Status != tc.status {
					t.Fatalf("err %v, want APIError %d %q", err, tc.status, tc.fault)
				}
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || errors.As(err, &apiErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
			case err != nil:
				t.Fatal(err)
			}
		})
	}
}

// FuzzDecodeResponse feeds arbitrary statuses and bodies (the socket is
// another process's output) to the response decoder: it never panics, a
// non-2xx is always an *APIError with a non-empty, bounded message, and a
// 2xx never is.
func FuzzDecodeResponse(f *testing.F) {
	f.Add(200, []byte(`{"firecracker_version":"1.14.2"}`))
	f.Add(200, []byte(`{"app_name":"Firecracker","id":"anonymous-instance","state":"Not started","vmm_version":"1.14.2"}`))
	f.Add(400, []byte(`{"fault_message":"The requested operation is not supported after starting the microVM."}`))
	f.Add(400, []byte(`{"fault_message":1}`))
	f.Add(204, []byte{})
	f.Add(413, []byte("\xff\xfe"))
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		var v versionInfo
		var info InstanceInfo
		errV := decodeResponse("GET", "/version", status, body, &v)
		errI := decodeResponse("GET", "/", status, body, &info)
		for _, err := range []error{errV, errI} {
			var apiErr *APIError
			isAPI := errors.As(err, &apiErr)
			if ok := status >= 200 && status <= 299; ok == isAPI {
				t.Fatalf("status %d: APIError=%v (%v)", status, isAPI, err)
			}
			if isAPI && (apiErr.FaultMessage == "" || len(apiErr.FaultMessage) > maxResponse) {
				t.Fatalf("fault message %q", apiErr.FaultMessage)
			}
		}
		if errV == nil && status >= 200 && status <= 299 {
			if _, err := ParseVersion(v.FirecrackerVersion); err == nil {
				_ = runState(info.State)
			}
		}
	})
}
