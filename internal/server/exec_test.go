package server

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/guest/guesttest"
	"github.com/bangerhq/banger/internal/testutil"
)

type execHarness struct {
	c    *client.Client
	sock string
	d    *guesttest.SSHD
	done chan struct{}
}

// startExecServer serves the API with a guest service whose every VM is a
// real sshd started for the test.
func startExecServer(t testing.TB, opts guesttest.Options) *execHarness {
	t.Helper()
	d := guesttest.StartSSHD(t, opts)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	h := &execHarness{d: d, done: make(chan struct{}), sock: filepath.Join(t.TempDir(), "api.sock")}
	srv := &Server{
		Guest: &guest.Service{Pool: d.Pool(t), Log: log},
		Info:  func() api.VersionInfo { return api.VersionInfo{Version: "test"} },
		Owner: uint32(os.Getuid()),
		Done:  h.done,
		Log:   log,
	}
	serve(t, srv, h.sock)
	t.Cleanup(func() { // runs before the server closes
		select {
		case <-h.done:
		default:
			close(h.done)
		}
	})
	h.c = client.New(h.sock)
	return h
}

func (h *execHarness) run(t testing.TB, stdin io.Reader, argv ...string) (string, string, api.ExecExit, error) {
	t.Helper()
	ec, err := h.c.Exec(context.Background(), "vm", api.ExecRequest{Argv: argv})
	if err != nil {
		return "", "", api.ExecExit{}, err
	}
	defer func() { _ = ec.Close() }()
	var out, errb bytes.Buffer
	x, err := ec.Run(stdin, &out, &errb)
	return out.String(), errb.String(), x, err
}

// Through the daemon's exec protocol a command's exit code, separate
// output streams and standard input all arrive intact.
func TestExecThroughDaemon(t *testing.T) {
	h := startExecServer(t, guesttest.Options{})
	cases := []struct {
		name     string
		stdin    string
		argv     []string
		out, err string
		code     int
	}{
		{"exit 0", "", []string{"true"}, "", "", 0},
		{"exit 1", "", []string{"false"}, "", "", 1},
		{"exit 42 with both streams", "", []string{"sh", "-c", "echo to-out; echo to-err >&2; exit 42"}, "to-out\n", "to-err\n", 42},
		{"stdin piped through", "line one\nline two\n", []string{"sh", "-c", "tr a-z A-Z; echo done >&2"}, "LINE ONE\nLINE TWO\n", "done\n", 0},
		{"arguments kept exact", "", []string{"printf", "%s|", "a b", "", "$HOME", "it's"}, "a b||$HOME|it's|", "", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, x, err := h.run(t, strings.NewReader(tc.stdin), tc.argv...)
			if err != nil {
				t.Fatal(err)
			}
			if x.Code != tc.code || out != tc.out || errs != tc.err {
				t.Fatalf("exit %d stdout %q stderr %q; want %d %q %q", x.Code, out, errs, tc.code, tc.out, tc.err)
			}
		})
	}
	// Large output in both streams at once does not deadlock or mix.
	out, errs, x, err := h.run(t, nil, "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o & head -c 2000000 /dev/zero | tr '\\0' e >&2; wait")
	if err != nil || x.Code != 0 || len(out) != 3000000 || len(errs) != 2000000 || strings.Trim(out, "o") != "" || strings.Trim(errs, "e") != "" {
		t.Fatalf("large output: exit %+v err %v, %d and %d bytes", x, err, len(out), len(errs))
	}
}

// A host key that is not the pinned one is refused before the protocol
// switch, as an API error that says so and how to fix it.
func TestExecThroughDaemonRefusesChangedKey(t *testing.T) {
	other, err := guest.GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	h := startExecServer(t, guesttest.Options{Pinned: &other})
	_, _, _, err = h.run(t, nil, "true")
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeFailedPrecondition || !strings.Contains(ae.Message, "host key changed") || ae.Hint == "" {
		t.Fatalf("err = %#v", err)
	}
}

// A signal sent by the client reaches the command.
func TestExecSignal(t *testing.T) {
	h := startExecServer(t, guesttest.Options{})
	ec, err := h.c.Exec(context.Background(), "vm", api.ExecRequest{Argv: []string{"sh", "-c", `trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.05; done`}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ec.Close() }()
	pr, pw := io.Pipe()
	res := make(chan api.ExecExit, 1)
	go func() {
		x, err := ec.Run(nil, pw, io.Discard)
		if err != nil {
			t.Error(err)
		}
		_ = pw.Close()
		res <- x
	}()
	br := bufio.NewReader(pr)
	if line, _ := br.ReadString('\n'); line != "ready\n" {
		t.Fatalf("first line %q", line)
	}
	if err := ec.Signal("INT"); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(br)
	if x := <-res; x.Code != 3 || string(rest) != "got-int\n" {
		t.Fatalf("after INT: exit %+v, output %q", x, rest)
	}
}

// With a terminal the command sees a tty of the requested size, and a
// resize frame changes it.
func TestExecTTYAndResize(t *testing.T) {
	h := startExecServer(t, guesttest.Options{})
	ec, err := h.c.Exec(context.Background(), "vm", api.ExecRequest{
		Argv: []string{"sh", "-c", "stty -echo; test -t 0 && echo tty; stty size; read x; stty size"},
		TTY:  true, Term: "dumb", Rows: 50, Cols: 132,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ec.Close() }()
	// A terminal's input does not end: keep stdin open.
	inR, inW := io.Pipe()
	defer func() { _ = inW.Close() }()
	pr, pw := io.Pipe()
	res := make(chan error, 1)
	go func() {
		_, err := ec.Run(inR, pw, io.Discard)
		_ = pw.Close()
		res <- err
	}()
	br := bufio.NewReader(pr)
	var lines []string
	for len(lines) < 2 {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v (got %q)", err, lines)
		}
		lines = append(lines, strings.TrimSpace(l))
	}
	if lines[0] != "tty" || lines[1] != "50 132" {
		t.Fatalf("terminal: %q", lines)
	}
	if err := ec.Resize(40, 100); err != nil {
		t.Fatal(err)
	}
	// Give sshd the resize before the command looks again.
	time.Sleep(200 * time.Millisecond)
	_, _ = inW.Write([]byte("\n"))
	rest, _ := io.ReadAll(br)
	if got := strings.TrimSpace(string(rest)); got != "40 100" {
		t.Fatalf("after resize: %q", got)
	}
	if err := <-res; err != nil {
		t.Fatal(err)
	}
}

// A request without the protocol switch headers is refused as a bad
// request; one for a daemon stopping mid-command ends with an error frame.
func TestExecProtocolErrors(t *testing.T) {
	h := startExecServer(t, guesttest.Options{})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.sock)
	}}}
	resp, err := hc.Post("http://x/v1/vms/vm/exec", "application/json", strings.NewReader(`{"argv":["true"]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("no upgrade headers: %s", resp.Status)
	}

	ec, err := h.c.Exec(context.Background(), "vm", api.ExecRequest{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ec.Close() }()
	go func() {
		time.Sleep(300 * time.Millisecond)
		close(h.done)
	}()
	_, err = ec.Run(nil, io.Discard, io.Discard)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeUnavailable {
		t.Fatalf("daemon stopping: %v", err)
	}
}

// BenchmarkExecThroughDaemon is one `true` through the daemon's exec
// protocol and pooled connection (in-process client); its peer,
// BenchmarkExecSSHControlMaster, runs the system ssh over a ControlMaster
// to the same sshd. The CLI end-to-end benchmark compares the binaries.
func BenchmarkExecThroughDaemon(b *testing.B) {
	h := startExecServer(b, guesttest.Options{})
	for b.Loop() {
		if _, _, x, err := h.run(b, nil, "true"); err != nil || x.Code != 0 {
			b.Fatal(x, err)
		}
	}
}

func BenchmarkExecSSHControlMaster(b *testing.B) {
	d := guesttest.StartSSHD(b, guesttest.Options{})
	args := append(d.SSHArgs(), "-o", "ControlMaster=auto", "-o", "ControlPath="+filepath.Join(d.Dir, "cm-%C"), "-o", "ControlPersist=60")
	dest := d.User + "@127.0.0.1"
	b.Cleanup(func() { _ = exec.Command("ssh", append(args, "-O", "exit", dest)...).Run() })
	if out, err := exec.Command("ssh", append(args, dest, "true")...).CombinedOutput(); err != nil {
		b.Fatalf("ssh: %v %s", err, out)
	}
	for b.Loop() {
		if err := exec.Command("ssh", append(args, dest, "true")...).Run(); err != nil {
			b.Fatal(err)
		}
	}
}

// A client that goes away mid-command hangs it up: the command gets
// SIGHUP, as it would from a closed terminal, instead of running on
// orphaned.
func TestExecClientGoneHangsUp(t *testing.T) {
	h := startExecServer(t, guesttest.Options{})
	marker := filepath.Join(t.TempDir(), "hup")
	ec, err := h.c.Exec(context.Background(), "vm", api.ExecRequest{Argv: []string{"sh", "-c", `trap 'echo hup > "$0"; exit 1' HUP; echo ready; while :; do sleep 0.05; done`, marker}})
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { _, _ = ec.Run(nil, pw, io.Discard) }() // ends in an error once ec is closed below
	if line, _ := bufio.NewReader(pr).ReadString('\n'); line != "ready\n" {
		t.Fatalf("first line %q", line)
	}
	_ = ec.Close()
	testutil.WaitFor(t, 10*time.Second, "the command to get SIGHUP", func() bool {
		_, err := os.Stat(marker)
		return err == nil
	})
}
