package helper

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/testutil"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// testOwner is the owner uid the tests configure: not root, and nobody's.
const testOwner = 4242

// harness is a helper serving on a real socket, its network operations
// confined to a fresh network namespace, its state dir a temp dir.
type harness struct {
	t        *testing.T
	ns       string // network namespace name (ip netns)
	nsPath   string
	stateDir string
	socket   string
	client   *helperapi.Client
	logs     *syncBuffer
}

// syncBuffer collects the helper's JSON log lines.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// records returns the log lines with msg, decoded.
func (b *syncBuffer) records(msg string) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b.buf.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r map[string]any
		if json.Unmarshal(sc.Bytes(), &r) == nil && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// newNetNS creates a named network namespace and deletes it when the test
// ends. Nothing the tests do touches the host's own namespace.
func newNetNS(t *testing.T) string {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "bgrt-" + hex.EncodeToString(b[:])
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// nsRun runs a command inside the namespace.
func nsRun(t *testing.T, ns string, args ...string) string {
	t.Helper()
	return run(t, "ip", append([]string{"netns", "exec", ns}, args...)...)
}

// inNS runs f on a thread inside the namespace. Sockets f creates stay in
// that namespace after f returns.
func inNS(t *testing.T, ns string, f func() error) {
	t.Helper()
	if err := runInNetNS("/run/netns/"+ns, f); err != nil {
		t.Fatal(err)
	}
}

func startHelper(t *testing.T) *harness {
	t.Helper()
	return startHelperWith(t, nil)
}

// startHelperWith is startHelper with the configuration changed by
// configure before the server starts.
func startHelperWith(t *testing.T, configure func(*Config)) *harness {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "ip", "nft")
	h := &harness{t: t, ns: newNetNS(t), stateDir: t.TempDir(), logs: &syncBuffer{}}
	h.nsPath = "/run/netns/" + h.ns
	if err := os.MkdirAll(filepath.Join(h.stateDir, "vms"), 0o755); err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "bgr-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(sockDir) })
	// Let other uids reach the socket; its own mode decides who connects.
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	h.socket = filepath.Join(sockDir, "helper.sock")
	cfg := Config{
		OwnerUID: testOwner,
		StateDir: h.stateDir,
		Socket:   h.socket,
		Bridge:   "banger0",
		NetNS:    h.nsPath,
		Logger:   slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if configure != nil {
		configure(&cfg)
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(h.socket, testOwner)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	h.client = &helperapi.Client{Socket: h.socket}
	return h
}

// vmFile creates <state dir>/vms/<id>/<name> of size bytes, owned by the
// owner, and returns its path.
func (h *harness) vmFile(id, name string, size int64) string {
	h.t.Helper()
	dir := filepath.Join(h.stateDir, "vms", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		h.t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Chown(p, testOwner, testOwner); err != nil {
		h.t.Fatal(err)
	}
	return p
}

// loopsUnder lists "device backing-file" lines of the loop devices whose
// backing file lies under dir; loop devices are host-wide, and others on
// this machine may be using some.
func loopsUnder(t *testing.T, dir string) []string {
	t.Helper()
	out := run(t, "losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE")
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(f[1], dir+"/") {
			got = append(got, line)
		}
	}
	return got
}

// wantOpLogged checks the helper logged op with this process as the peer.
func (h *harness) wantOpLogged(op, outcome string) {
	h.t.Helper()
	msg := "operation done"
	if outcome != "ok" {
		msg = "operation failed"
	}
	for _, r := range h.logs.records(msg) {
		if r["op"] == op && r["outcome"] == outcome &&
			r["peer_uid"] == float64(os.Getuid()) && r["peer_pid"] == float64(os.Getpid()) {
			return
		}
	}
	h.t.Errorf("no %q log line for op %s with peer uid %d pid %d", msg, op, os.Getuid(), os.Getpid())
}

// golden compares got with testdata/<name>, or rewrites it under -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (hint: go test -run %s -update): %v", t.Name(), err)
	}
	if string(want) != got {
		t.Errorf("%s differs (-want +got):\n%s", path, lineDiff(string(want), got))
	}
}

func lineDiff(want, got string) string {
	var b strings.Builder
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := range max(len(w), len(g)) {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "-%s\n+%s\n", wl, gl)
		}
	}
	return b.String()
}

func isCode(err error, code helperapi.Code) bool {
	var he *helperapi.Error
	return errors.As(err, &he) && he.Code == code
}
