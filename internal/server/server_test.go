package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vm"
)

// The test binary doubles as a client run under another uid (see
// TestOtherUIDRefused): with BANGER_TEST_CLIENT_SOCKET set it calls the
// daemon once, prints the outcome and exits.
func TestMain(m *testing.M) {
	if sock := os.Getenv("BANGER_TEST_CLIENT_SOCKET"); sock != "" {
		_, err := client.New(sock).ListVMs(context.Background())
		var ae *api.Error
		if errors.As(err, &ae) {
			fmt.Printf("code=%s message=%s\n", ae.Code, ae.Message)
		} else {
			fmt.Printf("err=%v\n", err)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type harness struct {
	sock  string
	st    *store.Store
	bus   *events.Bus
	c     *client.Client
	logs  *syncBuffer
	owner uint32
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer serves the API on a real unix socket over a real SQLite file.
func startServer(t testing.TB) *harness {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, "banger.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	h := &harness{sock: filepath.Join(dir, "api.sock"), st: st, bus: &events.Bus{}, logs: logs, owner: uint32(os.Getuid())}
	done := make(chan struct{})
	srv := &Server{
		VMs:    &vm.Service{Store: st, Log: log},
		Images: &image.Service{Store: st, Log: log},
		Events: h.bus,
		Info:   func() api.VersionInfo { return api.VersionInfo{Version: "test", PID: os.Getpid()} },
		Owner:  h.owner,
		Done:   done,
		Log:    log,
	}
	serve(t, srv, h.sock)
	t.Cleanup(func() { close(done) }) // runs before the server closes
	h.c = client.New(h.sock)
	return h
}

// serve serves srv's API on a unix socket until the test ends.
func serve(t testing.TB, srv *Server, sock string) {
	t.Helper()
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), ConnContext: ConnContext}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
}

func (h *harness) raw(t testing.TB, method, path, contentType string, body io.Reader) (int, api.ErrorResponse) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.sock)
	}}}
	req, _ := http.NewRequest(method, "http://x"+path, body)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var er api.ErrorResponse
	b, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(b, &er)
	return resp.StatusCode, er
}

// Lists come from the database and are empty arrays, not null, when empty.
func TestListEndpoints(t *testing.T) {
	h := startServer(t)
	ctx := t.Context()
	vms, err := h.c.ListVMs(ctx)
	if err != nil || vms == nil || len(vms) != 0 {
		t.Fatalf("ListVMs = %#v, %v", vms, err)
	}
	if err := h.st.InsertImage(ctx, store.Image{ID: "i1", Name: "default", Source: "build", Metadata: []byte(`{"files":[]}`)}); err != nil {
		t.Fatal(err)
	}
	if err := h.st.InsertVM(ctx, store.VM{ID: "0123456789ab", Name: "dev", ImageID: "i1", VMM: "qemu", CPUs: 2, MemoryBytes: 1 << 30, DiskBytes: 8 << 30, NetMode: "user", State: "stopped"}); err != nil {
		t.Fatal(err)
	}
	vms, err = h.c.ListVMs(ctx)
	if err != nil || len(vms) != 1 || vms[0].Name != "dev" || vms[0].Image != "default" || vms[0].State != api.VMStopped {
		t.Fatalf("ListVMs = %+v, %v", vms, err)
	}
	ims, err := h.c.ListImages(ctx)
	if err != nil || len(ims) != 1 || ims[0].Name != "default" {
		t.Fatalf("ListImages = %+v, %v", ims, err)
	}
}

// Bad bodies get 400 with a stable code, and the daemon keeps serving.
func TestStrictDecoding(t *testing.T) {
	h := startServer(t)
	big := `{"reason":"` + strings.Repeat("x", api.MaxRequestBody) + `"}`
	tests := []struct {
		name, ct, body string
		status         int
		code           api.Code
	}{
		{"malformed", "application/json", `{"reason":`, 400, api.CodeInvalidJSON},
		{"not json", "application/json", `hello`, 400, api.CodeInvalidJSON},
		{"unknown field", "application/json", `{"reason":"x","force":true}`, 400, api.CodeUnknownField},
		{"wrong type", "application/json", `{"when_idle":"yes"}`, 400, api.CodeInvalidJSON},
		{"two values", "application/json", `{} {}`, 400, api.CodeInvalidJSON},
		{"empty", "application/json", ``, 400, api.CodeInvalidJSON},
		{"oversize", "application/json", big, 400, api.CodePayloadTooLarge},
		{"wrong media type", "text/plain", `{}`, 415, api.CodeUnsupportedMedia},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, er := h.raw(t, "POST", "/v1/shutdown", tt.ct, strings.NewReader(tt.body))
			if status != tt.status || er.Error == nil || er.Error.Code != tt.code || er.Error.Message == "" {
				t.Fatalf("status %d, error %+v; want %d %s", status, er.Error, tt.status, tt.code)
			}
			if _, err := h.c.Health(t.Context()); err != nil {
				t.Fatalf("daemon stopped serving after a bad request: %v", err)
			}
		})
	}
}

// Unknown paths and wrong methods get JSON errors too.
func TestRouting(t *testing.T) {
	h := startServer(t)
	if status, er := h.raw(t, "GET", "/v1/nope", "", nil); status != 404 || er.Error.Code != api.CodeNotFound {
		t.Errorf("unknown path: %d %+v", status, er.Error)
	}
	if status, er := h.raw(t, "DELETE", "/v1/vms", "", nil); status != 405 || er.Error.Code != api.CodeMethodNotAllowed {
		t.Errorf("wrong method: %d %+v", status, er.Error)
	}
}

// A client running as another uid is refused on its connection's
// SO_PEERCRED, even though the socket's file mode would let it connect, and
// the refusal is logged with its uid and pid.
func TestOtherUIDRefused(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "setpriv")
	h := startServer(t)
	h.owner = 1000
	// Open the path to everyone so only the credential check stands.
	for _, p := range []string{filepath.Dir(filepath.Dir(h.sock)), filepath.Dir(h.sock)} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(h.sock, 0o777); err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	if err := os.Chmod(exe, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe)
	cmd.Env = []string{"BANGER_TEST_CLIENT_SOCKET=" + h.sock}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as uid 65534: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "code=forbidden") || !strings.Contains(string(out), "uid 65534") {
		t.Fatalf("uid 65534 was not refused: %s", out)
	}
	if !strings.Contains(h.logs.String(), "uid=65534") {
		t.Fatalf("refusal not logged with the peer uid:\n%s", h.logs.String())
	}
	// Root (the test itself) still gets in.
	if _, err := h.c.ListVMs(t.Context()); err != nil {
		t.Fatalf("root refused: %v", err)
	}
}

// Events published on the bus reach a streaming client in order.
func TestEventStream(t *testing.T) {
	h := startServer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	s, err := h.c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	// The subscription exists once the response headers arrived.
	h.bus.Publish(api.Event{Type: "vm.state", Kind: "vm", Name: "a"})
	h.bus.Publish(api.Event{Type: "vm.state", Kind: "vm", Name: "b"})
	e1, err := s.Next()
	if err != nil {
		t.Fatal(err)
	}
	e2, err := s.Next()
	if err != nil {
		t.Fatal(err)
	}
	if e1.Name != "a" || e2.Name != "b" || e2.Seq != e1.Seq+1 {
		t.Fatalf("events %+v %+v", e1, e2)
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{"reason":"x","when_idle":true}`, `{`, `[]`, `{"reason":1}`, `{"a":1}`, `{} {}`, ``, `null`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req api.ShutdownRequest
		err := decodeBody(bytes.NewReader(b), &req)
		if err == nil {
			// Whatever decoded must re-encode to something that decodes
			// to the same value.
			again, _ := json.Marshal(req)
			var back api.ShutdownRequest
			if err := decodeBody(bytes.NewReader(again), &back); err != nil || back != req {
				t.Fatalf("round trip of %q: %+v, %v", b, back, err)
			}
			return
		}
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code == "" || ae.Code.HTTPStatus() >= 500 {
			t.Fatalf("decode error %v is not a client error with a code", err)
		}
	})
}
