package helper

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// clientEnv makes the test binary act as a helper client (see TestMain):
// the peer tests run it under another uid.
const clientEnv = "BANGER_HELPER_TEST_CLIENT_SOCKET"

// The test binary is also, selected by its environment or name: a helper
// client under another uid (clientEnv), a jailed VM's console logger (as
// the helper binary is), the fake jailer (run under the name "jailer",
// since the jailer's environment is cleared) and the owner's daemon
// driving a jailed VM (envOwnerDriver).
func TestMain(m *testing.M) {
	if sock := os.Getenv(clientEnv); sock != "" {
		os.Exit(clientChild(sock))
	}
	consoleLoggerMain()
	fcfake.JailerMain()
	ownerDriverMain()
	code := m.Run()
	if jailBins.dir != "" {
		_ = os.RemoveAll(jailBins.dir)
	}
	os.Exit(code)
}

// childResult is what the client child reports on stdout.
type childResult struct {
	UID  int    `json:"uid"`
	Err  string `json:"err"`
	Code string `json:"code"`
}

func clientChild(sock string) int {
	c := &helperapi.Client{Socket: sock}
	_, err := c.ListOwned(context.Background())
	res := childResult{UID: os.Getuid()}
	if err != nil {
		res.Err = err.Error()
		var he *helperapi.Error
		if errors.As(err, &he) {
			res.Code = string(he.Code)
		}
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// runClientAs runs the test binary as uid (and gid) calling ListOwned, and
// returns its report and pid.
func runClientAs(t *testing.T, exe, socket string, uid uint32) (childResult, int) {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = []string{clientEnv + "=" + socket}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client as uid %d: %v\n%s", uid, err, out)
	}
	var res childResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("client as uid %d: %v: %s", uid, err, out)
	}
	if res.UID != int(uid) {
		t.Fatalf("client ran as uid %d, want %d", res.UID, uid)
	}
	return res, cmd.Process.Pid
}

// copyExecutable puts a copy of the test binary where any uid can run it.
func copyExecutable(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "bgr-exe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	exe := filepath.Join(dir, "helper.test")
	dst, err := os.OpenFile(exe, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return exe
}

// Only root and the owner get through. Another uid is stopped by the
// socket's mode, and when the mode has been widened (the owner could do
// that), by the SO_PEERCRED check, which refuses and logs it with its uid
// and pid.
func TestPeerCredentials(t *testing.T) {
	h := startHelper(t)
	exe := copyExecutable(t)

	if res, _ := runClientAs(t, exe, h.socket, testOwner); res.Err != "" {
		t.Errorf("owner uid %d refused: %s", testOwner, res.Err)
	}

	res, _ := runClientAs(t, exe, h.socket, 65534)
	if !strings.Contains(res.Err, "permission denied") {
		t.Errorf("uid 65534 through the 0600 socket: %q, want permission denied", res.Err)
	}

	if err := os.Chmod(h.socket, 0o666); err != nil {
		t.Fatal(err)
	}
	res, pid := runClientAs(t, exe, h.socket, 65534)
	if res.Code != string(helperapi.CodeForbidden) {
		t.Errorf("uid 65534 through a 0666 socket: %+v, want code forbidden", res)
	}
	refused := false
	for _, r := range h.logs.records("refused peer") {
		if r["peer_uid"] == float64(65534) && r["peer_pid"] == float64(pid) {
			refused = true
		}
	}
	if !refused {
		t.Errorf("no 'refused peer' log line for uid 65534 pid %d", pid)
	}
	for _, r := range h.logs.records("operation done") {
		if r["peer_uid"] == float64(65534) {
			t.Errorf("an operation ran for uid 65534: %v", r)
		}
	}
}

// Requests that are malformed on the wire are answered with a code and
// logged, and run nothing.
func TestServerRefusesMalformed(t *testing.T) {
	h := startHelper(t)
	tests := []struct {
		name string
		req  string
		code helperapi.Code
	}{
		{"unknown op", `{"op":"run","args":{"argv":["sh"]}}`, helperapi.CodeUnknownOp},
		{"unknown field", `{"op":"delete_tap","args":{"name":"bgr-0123456789","force":true}}`, helperapi.CodeInvalid},
		{"newline in a name", `{"op":"delete_tap","args":{"name":"bgr-0123456789\nx"}}`, helperapi.CodeInvalid},
		{"oversize request", `{"op":"list_owned","args":{"pad":"` + strings.Repeat("A", helperapi.MaxRequestSize) + `"}}`, helperapi.CodeInvalid},
		{"not JSON", "\x00\x01binary", helperapi.CodeInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("unix", h.socket)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = c.Close() }()
			if _, err := io.WriteString(c, tt.req); err != nil {
				t.Fatal(err)
			}
			_ = c.(*net.UnixConn).CloseWrite()
			b, err := io.ReadAll(c)
			// The helper stopped reading an oversize request: after its
			// answer the connection is reset.
			if err != nil && (!errors.Is(err, syscall.ECONNRESET) || len(b) == 0) {
				t.Fatal(err)
			}
			var resp helperapi.Response
			if err := json.Unmarshal(b, &resp); err != nil {
				t.Fatalf("response %q: %v", b, err)
			}
			if resp.OK || resp.Error == nil || resp.Error.Code != tt.code {
				t.Fatalf("response %+v, want code %s", resp, tt.code)
			}
		})
	}
	if n := len(h.logs.records("refused request")); n != len(tests) {
		t.Errorf("%d 'refused request' log lines, want %d", n, len(tests))
	}
	if n := len(h.logs.records("operation done")) + len(h.logs.records("operation failed")); n != 0 {
		t.Errorf("%d operations ran", n)
	}
}
