package guest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/guest/guesttest"
)

// run executes argv through the pool and collects everything.
func run(t *testing.T, p *guest.Pool, stdin []byte, argv ...string) (stdout, stderr string, exit api.ExecExit, err error) {
	t.Helper()
	s, err := p.Exec(t.Context(), "vm", api.ExecRequest{Argv: argv})
	if err != nil {
		return "", "", api.ExecExit{}, err
	}
	defer func() { _ = s.Close() }()
	go func() {
		if stdin != nil {
			_, _ = s.Stdin.Write(stdin)
		}
		s.Stdin.Close()
	}()
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, _ = io.Copy(&out, s.Stdout) }()
	go func() { defer wg.Done(); _, _ = io.Copy(&errb, s.Stderr) }()
	wg.Wait()
	exit, err = s.Wait()
	return out.String(), errb.String(), exit, err
}

// A command's exit status, stdout and stderr come back separately and
// exactly, through a real sshd.
func TestExecExitCodesAndStreams(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	p := d.Pool(t)
	cases := []struct {
		name       string
		argv       []string
		out, errs  string
		code       int
		exitSignal string
	}{
		{"true", []string{"true"}, "", "", 0, ""},
		{"false", []string{"false"}, "", "", 1, ""},
		{"exit 42 with both streams", []string{"sh", "-c", "echo out; echo err >&2; echo more; exit 42"}, "out\nmore\n", "err\n", 42, ""},
		{"killed by a signal", []string{"sh", "-c", "kill -TERM $$"}, "", "", 128 + 15, "TERM"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, exit, err := run(t, p, nil, tc.argv...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(api.ExecExit{Code: tc.code, Signal: tc.exitSignal}, exit); diff != "" {
				t.Errorf("exit (-want +got):\n%s", diff)
			}
			if out != tc.out || errs != tc.errs {
				t.Errorf("stdout %q stderr %q, want %q %q", out, errs, tc.out, tc.errs)
			}
		})
	}
	if n := guest.PoolConns(p, "vm"); n != 1 {
		t.Errorf("the pool holds %d connections after sequential execs, want 1 reused", n)
	}
}

// Standard input reaches the command whole, and its end is the command's
// EOF.
func TestExecStdin(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	p := d.Pool(t)
	in := make([]byte, 3<<20+17)
	rand.Read(in)
	sum := sha256.Sum256(in)
	out, _, exit, err := run(t, p, in, "sha256sum")
	if err != nil || exit.Code != 0 {
		t.Fatalf("exit %+v, err %v", exit, err)
	}
	if got := strings.Fields(out)[0]; got != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha256 in the guest %s, want %s", got, hex.EncodeToString(sum[:]))
	}
	out, _, _, err = run(t, p, []byte{}, "wc", "-c")
	if err != nil || strings.TrimSpace(out) != "0" {
		t.Fatalf("empty stdin: %q %v", out, err)
	}
}

// Arguments reach the remote command exactly, whatever the remote shell
// would make of them: spaces, quotes, $, ;, globs, newlines, empty strings.
func TestExecArgumentsExact(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	p := d.Pool(t)
	args := shellArgs
	argv := append([]string{"printf", "[%s]\\n"}, args...)
	out, errs, exit, err := run(t, p, nil, argv...)
	if err != nil || exit.Code != 0 {
		t.Fatalf("exit %+v err %v stderr %q", exit, err, errs)
	}
	var want strings.Builder
	for _, a := range args {
		want.WriteString("[" + a + "]\n")
	}
	if diff := cmp.Diff(want.String(), out); diff != "" {
		t.Errorf("arguments as the command saw them (-want +got):\n%s", diff)
	}
}

var shellArgs = []string{
	"plain", "with space", "", "it's", `double "quoted"`, "$HOME", "${PATH}", "$(id)", "`id`",
	"a;b", "x && y", "|pipe", "star*", "?", "[ab]", "~", "~root", "#comment", "new\nline", "tab\there",
	`back\slash`, "'", "''", "=x", "a=b", "-n", "--", "é ü 中", "!bang", "{a,b}", "<in", ">out", "&",
}

// ShellQuote's output, run by a real /bin/sh, gives back the arguments.
func TestShellQuoteRoundTrip(t *testing.T) {
	line := guest.ShellQuote(append([]string{"printf", "[%s]\\n"}, shellArgs...))
	out, err := exec.Command("/bin/sh", "-c", line).Output()
	if err != nil {
		t.Fatalf("sh -c %q: %v", line, err)
	}
	var want strings.Builder
	for _, a := range shellArgs {
		want.WriteString("[" + a + "]\n")
	}
	if diff := cmp.Diff(want.String(), string(out)); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// Exec refuses what no command can take before it reaches the guest.
func TestExecValidation(t *testing.T) {
	p := &guest.Pool{Resolve: func(context.Context, string) (guest.Target, error) {
		t.Fatal("resolved a VM for an invalid request")
		return guest.Target{}, nil
	}}
	cases := []struct {
		name string
		req  api.ExecRequest
	}{
		{"no command", api.ExecRequest{}},
		{"empty command", api.ExecRequest{Argv: []string{""}}},
		{"NUL in an argument", api.ExecRequest{Argv: []string{"echo", "a\x00b"}}},
		{"too many arguments", api.ExecRequest{Argv: make([]string, api.MaxExecArgs+1)}},
		{"command line too long", api.ExecRequest{Argv: []string{"echo", strings.Repeat("x", api.MaxExecCommand)}}},
		{"TERM with a space", api.ExecRequest{Argv: []string{"sh"}, TTY: true, Term: "xterm 256"}},
		{"negative size", api.ExecRequest{Argv: []string{"sh"}, TTY: true, Rows: -1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "too many arguments" {
				for i := range tc.req.Argv {
					tc.req.Argv[i] = "x"
				}
			}
			_, err := p.Exec(t.Context(), "vm", tc.req)
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Code != api.CodeInvalidArgument {
				t.Fatalf("err = %v, want invalid_argument", err)
			}
		})
	}
}

// A host key other than the pinned one fails exec loudly, and an
// unpinned host fails too: nothing is trusted on first use.
func TestExecRefusesUnpinnedHostKey(t *testing.T) {
	other, err := guest.GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		opts guesttest.Options
		want error
	}{
		{"changed", guesttest.Options{Pinned: &other}, guest.ErrHostKeyChanged},
		{"never pinned", guesttest.Options{NoPin: true}, guest.ErrHostUnknown},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := guesttest.StartSSHD(t, tc.opts)
			p := d.Pool(t)
			for range 2 { // and again: a failure is not remembered as trust
				_, err := p.Exec(t.Context(), "vm", api.ExecRequest{Argv: []string{"true"}})
				if !errors.Is(err, tc.want) {
					t.Fatalf("exec err = %v, want %v", err, tc.want)
				}
				if !strings.Contains(err.Error(), guesttest.Alias) {
					t.Errorf("error does not name the host: %v", err)
				}
			}
			if n := guest.PoolConns(p, "vm"); n != 0 {
				t.Errorf("the pool kept %d connections to an unverified host", n)
			}
		})
	}
}

// A pooled connection that died (sshd restarted, guest rebooted) is
// replaced on the next exec without the caller seeing the failure; a
// dropped VM's connections are closed.
func TestPoolReconnectsAndDrops(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	p := d.Pool(t)
	lease, err := p.Get(t.Context(), "vm")
	if err != nil {
		t.Fatal(err)
	}
	first := lease.Client
	lease.Release()
	_ = first.Close() // the connection dies under the pool
	if _, _, exit, err := run(t, p, nil, "true"); err != nil || exit.Code != 0 {
		t.Fatalf("exec after the connection died: %+v %v", exit, err)
	}
	lease, err = p.Get(t.Context(), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if lease.Client == first {
		t.Fatal("the pool handed out the dead connection")
	}
	second := lease.Client
	lease.Release()
	p.Drop("vm")
	done := make(chan struct{})
	go func() {
		_ = second.Wait() // only its return matters: the connection is gone
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Drop did not close the VM's connection")
	}
	if n := guest.PoolConns(p, "vm"); n != 0 {
		t.Fatalf("%d connections after Drop", n)
	}
}

// More commands at once than sshd allows sessions on one connection all
// run: the pool opens further connections.
func TestPoolManySessions(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	p := d.Pool(t)
	const n = 24
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _, exit, err := run(t, p, nil, "sh", "-c", "sleep 0.3; echo $0", strings.Repeat("x", i+1))
			if err == nil && (exit.Code != 0 || strings.TrimSpace(out) != strings.Repeat("x", i+1)) {
				err = errors.New("wrong result: " + out)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if c := guest.PoolConns(p, "vm"); c < 3 {
		t.Errorf("%d connections for %d concurrent sessions, want at least 3", c, n)
	}
}

// FuzzShellQuote checks that quoting keeps every argument a single word
// that a POSIX shell reads back unchanged, without running a shell: the
// quoted form is either plainly safe or one single-quoted string with
// quotes escaped outside it.
func FuzzShellQuote(f *testing.F) {
	for _, a := range shellArgs {
		f.Add(a)
	}
	f.Fuzz(func(t *testing.T, a string) {
		q := guest.ShellQuote([]string{a})
		got, ok := unquoteSingle(q)
		if !ok || got != a {
			t.Fatalf("ShellQuote(%q) = %q, reads back as %q (ok %v)", a, q, got, ok)
		}
	})
}

// unquoteSingle reads one shell word made of safe characters, single-
// quoted strings and backslash-escaped quotes, as sh would.
func unquoteSingle(w string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(w); {
		switch c := w[i]; {
		case c == '\'':
			end := strings.IndexByte(w[i+1:], '\'')
			if end < 0 {
				return "", false
			}
			b.WriteString(w[i+1 : i+1+end])
			i += end + 2
		case c == '\\' && i+1 < len(w) && w[i+1] == '\'':
			b.WriteByte('\'')
			i += 2
		case strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+,./:-", c) >= 0:
			b.WriteByte(c)
			i++
		default:
			return "", false
		}
	}
	if w == "" {
		return "", false
	}
	return b.String(), true
}
