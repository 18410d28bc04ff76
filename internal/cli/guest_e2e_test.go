package cli_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
)

// vmEnv is a private banger (its own daemon, state and home) with one
// running VM, driven through the built binaries as a user would.
type vmEnv struct {
	t      testing.TB
	banger string
	env    []string
	home   string
	vm     string
}

// result is one run of a binary.
type result struct {
	out, err string
	code     int
}

// run runs banger with stdin and returns what it printed and its status.
func (e *vmEnv) run(stdin io.Reader, args ...string) result {
	e.t.Helper()
	return e.cmd(stdin, e.banger, args...)
}

func (e *vmEnv) cmd(stdin io.Reader, exe string, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := exec.CommandContext(ctx, exe, args...)
	c.Env = e.env
	c.Stdin = stdin
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	err := c.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("%s %v: %v", exe, args, err)
	}
	return result{out.String(), errb.String(), code}
}

// must runs banger and fails the test unless it exits 0.
func (e *vmEnv) must(stdin io.Reader, args ...string) string {
	e.t.Helper()
	r := e.run(stdin, args...)
	if r.code != 0 {
		e.t.Fatalf("banger %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.out, r.err)
	}
	return r.out
}

// sh runs a shell command in the VM through banger vm exec.
func (e *vmEnv) sh(script string) string {
	e.t.Helper()
	return e.must(nil, "vm", "exec", e.vm, "--", "sh", "-c", script)
}

// newVMEnv builds the binaries, imports the cached default image, writes a
// config with file_sync entries and creates a VM. Setup files in the home
// are written by prepare before the VM is created (file sync runs then).
func newVMEnv(t testing.TB, prepare func(home string)) *vmEnv {
	t.Helper()
	testutil.SkipShort(t, "boots a real VM")
	testutil.RequireCommand(t, "qemu-system-x86_64", "qemu-img", "ssh", "scp")
	img := imagetest.DefaultImage(t)
	dir := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "banger", "bangerd")
	home, err := os.MkdirTemp("", "bgr-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	e := &vmEnv{t: t, banger: filepath.Join(dir, "banger"), env: testutil.UserEnv(home), home: home, vm: "dev"}
	t.Cleanup(func() {
		e.run(nil, "vm", "delete", "--force", e.vm)
		shutdown(home)
		_ = os.RemoveAll(home)
	})
	cfg := filepath.Join(home, "config", "banger", "config.toml")
	if err := os.MkdirAll(filepath.Dir(cfg), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(`[vm]
cpus = 2
memory = "1GiB"

[[file_sync]]
host = "~/.gitconfig"
guest = "/root/.gitconfig"

[[file_sync]]
host = "~/proj"
guest = "/root/proj"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	if prepare != nil {
		prepare(home)
	}
	e.must(nil, "image", "import", "default",
		"--rootfs", filepath.Join(img, imagetest.Rootfs),
		"--kernel", filepath.Join(img, imagetest.Kernel),
		"--initrd", filepath.Join(img, imagetest.Initrd))
	t0 := time.Now()
	r := e.run(nil, "vm", "create", "--name", e.vm)
	if r.code != 0 {
		t.Fatalf("vm create: exit %d\n%s\n%s\ndaemon log:\n%s", r.code, r.out, r.err, tail(filepath.Join(home, "state", "banger", "bangerd.log"), 4000))
	}
	t.Logf("VM created and synced in %s:\n%s%s", time.Since(t0).Round(time.Millisecond), r.out, r.err)
	return e
}

// shutdown stops the private daemon and waits (bounded) for it to go.
func shutdown(home string) {
	c := client.New(filepath.Join(home, "run", "banger", "bangerd.sock"))
	v, err := c.Version(context.Background())
	if err != nil {
		return
	}
	_, _ = c.Shutdown(context.Background(), api.ShutdownRequest{Reason: "test cleanup"})
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if syscall.Kill(v.PID, 0) != nil {
			return
		}
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func writeFile(t testing.TB, p, data string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func randomFile(t testing.TB, p string, size int64) string {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestGuestEndToEnd drives exec, cp, sync, ssh-config and the host key
// pin on one real VM (QEMU/TCG, booted from the default image), through
// the banger binary as a user would.
func TestGuestEndToEnd(t *testing.T) {
	e := newVMEnv(t, func(home string) {
		writeFile(t, filepath.Join(home, ".gitconfig"), "[user]\n\tname = banger test\n", 0o644)
		writeFile(t, filepath.Join(home, "proj", ".gitignore"), "*.log\nbuild/\n", 0o644)
		writeFile(t, filepath.Join(home, "proj", "main.go"), "package main\n", 0o644)
		writeFile(t, filepath.Join(home, "proj", "run.sh"), "#!/bin/sh\necho run\n", 0o755)
		writeFile(t, filepath.Join(home, "proj", "lib", "a.go"), "package lib\n", 0o640)
		writeFile(t, filepath.Join(home, "proj", "debug.log"), "ignored\n", 0o644)
		writeFile(t, filepath.Join(home, "proj", "build", "out"), "ignored\n", 0o644)
	})

	t.Run("exec exit codes and streams", func(t *testing.T) {
		e.t = t
		for _, tc := range []struct {
			argv     []string
			out, err string
			code     int
		}{
			{[]string{"true"}, "", "", 0},
			{[]string{"false"}, "", "", 1},
			{[]string{"sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 42"}, "to-stdout\n", "to-stderr\n", 42},
			{[]string{"printf", "[%s]", "two words", "", "$HOME", "a;b", "it's"}, "[two words][][$HOME][a;b][it's]", "", 0},
		} {
			r := e.run(nil, append([]string{"vm", "exec", e.vm, "--"}, tc.argv...)...)
			if r.code != tc.code || r.out != tc.out || r.err != tc.err {
				t.Errorf("exec %q: exit %d stdout %q stderr %q; want %d %q %q", tc.argv, r.code, r.out, r.err, tc.code, tc.out, tc.err)
			}
		}
	})

	t.Run("exec stdin", func(t *testing.T) {
		e.t = t
		in := make([]byte, 5<<20)
		rand.Read(in)
		sum := sha256.Sum256(in)
		out := e.must(bytes.NewReader(in), "vm", "exec", e.vm, "--", "sha256sum")
		if got := strings.Fields(out)[0]; got != hex.EncodeToString(sum[:]) {
			t.Fatalf("stdin arrived as %s, want %s", got, hex.EncodeToString(sum[:]))
		}
		if out := e.must(strings.NewReader(""), "vm", "exec", e.vm, "--", "wc", "-c"); strings.TrimSpace(out) != "0" {
			t.Fatalf("empty stdin: %q", out)
		}
	})

	t.Run("exec forwards signals", func(t *testing.T) {
		e.t = t
		c := exec.Command(e.banger, "vm", "exec", e.vm, "--", "sh", "-c", `trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done`)
		c.Env = e.env
		out, err := c.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(out)
		if line, _ := br.ReadString('\n'); line != "ready\n" {
			_ = c.Process.Kill()
			t.Fatalf("first line %q", line)
		}
		_ = c.Process.Signal(os.Interrupt)
		rest, _ := io.ReadAll(br)
		err = c.Wait()
		if code := c.ProcessState.ExitCode(); code != 3 || string(rest) != "got-int\n" {
			t.Fatalf("after ^C: exit %d (%v), output %q; want the command's trap to run and exit 3", code, err, rest)
		}
	})

	t.Run("exec -t gives a terminal that follows resizes", func(t *testing.T) {
		e.t = t
		master, slave := openPTY(t, 30, 90)
		c := exec.Command(e.banger, "vm", "exec", "-t", e.vm, "--", "sh", "-c", `stty -echo; tty; stty size; read x; stty size`)
		c.Env = append(e.env, "TERM=xterm")
		c.Stdin, c.Stdout, c.Stderr = slave, slave, slave
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		slave.Close()
		br := bufio.NewReader(master)
		readLine := func() string {
			l, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("read the terminal: %v", err)
			}
			return strings.TrimSpace(l)
		}
		if l := readLine(); !strings.HasPrefix(l, "/dev/pts/") {
			t.Fatalf("tty in the guest: %q", l)
		}
		if l := readLine(); l != "30 90" {
			t.Fatalf("size in the guest %q, want 30 90", l)
		}
		// Resize the local terminal: the kernel sends banger SIGWINCH.
		if err := unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 120}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		_, _ = master.Write([]byte("\r"))
		if l := readLine(); l != "40 120" {
			t.Fatalf("size after the resize %q, want 40 120", l)
		}
		if err := c.Wait(); err != nil {
			t.Fatalf("exec -t: %v", err)
		}
	})

	t.Run("cp 100MiB both ways", func(t *testing.T) {
		e.t = t
		local := t.TempDir()
		want := randomFile(t, filepath.Join(local, "big.bin"), 100<<20)
		e.must(nil, "vm", "cp", filepath.Join(local, "big.bin"), e.vm+":/root/")
		if got := strings.Fields(e.sh("sha256sum /root/big.bin"))[0]; got != want {
			t.Fatalf("sha256 in the guest %s, want %s", got, want)
		}
		e.must(nil, "vm", "cp", e.vm+":/root/big.bin", filepath.Join(local, "back.bin"))
		if got := testutil.SHA256File(t, filepath.Join(local, "back.bin")); got != want {
			t.Fatalf("sha256 back on the host %s, want %s", got, want)
		}
		e.sh("rm /root/big.bin")
	})

	t.Run("cp tree keeps modes and mtimes", func(t *testing.T) {
		e.t = t
		local := t.TempDir()
		src := filepath.Join(local, "tree")
		old := time.Date(2022, 1, 2, 3, 4, 5, 0, time.UTC)
		for i, f := range []struct {
			p    string
			mode os.FileMode
		}{{"bin/tool", 0o755}, {"secret/key", 0o600}, {"ro.txt", 0o444}, {"a/b/c/deep", 0o640}} {
			p := filepath.Join(src, f.p)
			writeFile(t, p, strings.Repeat(f.p, i+1), f.mode)
			if err := os.Chtimes(p, old, old.Add(time.Duration(i)*time.Hour)); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chmod(filepath.Join(src, "secret"), 0o700); err != nil {
			t.Fatal(err)
		}
		want := localListing(t, src)
		e.must(nil, "vm", "cp", "-r", src, e.vm+":/root/")
		// The guest's own view: mode, mtime and size of every file.
		got := e.sh(`cd /root/tree && find . -mindepth 1 \( -type d -printf '%P %m %T@ d\n' \) -o \( -type f -printf '%P %m %T@ f %s\n' \) | sed 's/\.[0-9]* / /' | sort`)
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("tree in the guest (-host +guest):\n%s", diff)
		}
		back := filepath.Join(local, "back")
		e.must(nil, "vm", "cp", "-r", e.vm+":/root/tree", back)
		if diff := cmp.Diff(want, localListing(t, back)); diff != "" {
			t.Fatalf("tree back on the host (-want +got):\n%s", diff)
		}
		r := e.run(nil, "vm", "cp", src, e.vm+":/root/")
		if r.code == 0 || !strings.Contains(r.err, "-r") {
			t.Errorf("a directory without -r: exit %d, %q", r.code, r.err)
		}
	})

	t.Run("sync moves only changed files", func(t *testing.T) {
		e.t = t
		// Synced when the VM was created.
		if got := e.sh("cat /root/.gitconfig"); got != "[user]\n\tname = banger test\n" {
			t.Fatalf("gitconfig in the guest: %q", got)
		}
		if got := e.sh("cd /root/proj && find . -type f | sort"); got != "./.gitignore\n./lib/a.go\n./main.go\n./run.sh\n" {
			t.Fatalf("proj in the guest (.gitignore not honoured?):\n%s", got)
		}
		if got := e.sh("stat -c %a /root/proj/run.sh /root/proj/lib/a.go"); got != "755\n640\n" {
			t.Fatalf("modes in the guest: %q", got)
		}
		rep := e.syncReport()
		if rep.Uploaded != 0 || rep.Deleted != 0 || rep.Unchanged != 5 {
			t.Fatalf("sync with nothing changed: %+v", rep)
		}
		writeFile(t, filepath.Join(e.home, "proj", "main.go"), "package main\n\nfunc main() {}\n", 0o644)
		writeFile(t, filepath.Join(e.home, "proj", "lib", "b.go"), "package lib\n", 0o644)
		writeFile(t, filepath.Join(e.home, "proj", "more.log"), "ignored\n", 0o644)
		_ = os.Remove(filepath.Join(e.home, "proj", "run.sh"))
		rep = e.syncReport()
		if rep.Uploaded != 2 || rep.Deleted != 1 || rep.Unchanged != 3 {
			t.Fatalf("sync after 1 edit, 1 new, 1 ignored, 1 deleted: %+v", rep)
		}
		if got := e.sh("cd /root/proj && find . -type f | sort && cat main.go"); got != "./.gitignore\n./lib/a.go\n./lib/b.go\n./main.go\npackage main\n\nfunc main() {}\n" {
			t.Fatalf("proj in the guest after the sync:\n%s", got)
		}
	})

	t.Run("sync --watch sends changes as they happen", func(t *testing.T) {
		e.t = t
		c := exec.Command(e.banger, "vm", "sync", e.vm, "--watch")
		c.Env = e.env
		var out, errb lockedBuffer
		c.Stdout, c.Stderr = &out, &errb
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = c.Process.Signal(os.Interrupt)
			_ = c.Wait()
		}()
		testutil.WaitFor(t, time.Minute, "the watch to start", func() bool { return strings.Contains(errb.String(), "watching") })
		writeFile(t, filepath.Join(e.home, "proj", "lib", "watched.go"), "package lib // watched\n", 0o644)
		writeFile(t, filepath.Join(e.home, "proj", "watch.log"), "ignored\n", 0o644)
		deadline := time.Now().Add(2 * time.Minute)
		for e.sh("cat /root/proj/lib/watched.go 2>/dev/null || true") != "package lib // watched\n" {
			if time.Now().After(deadline) {
				t.Fatalf("the change did not reach the guest; watch said:\n%s\n%s", out.String(), errb.String())
			}
			time.Sleep(time.Second)
		}
		testutil.WaitFor(t, 30*time.Second, "the watch to report the sync", func() bool { return strings.Contains(out.String(), "synced: 1 sent") })
		if got := e.sh("test -e /root/proj/watch.log && echo present || echo absent"); got != "absent\n" {
			t.Errorf("an ignored file was synced by the watch: %s", got)
		}
	})

	t.Run("sync refuses paths outside the home", func(t *testing.T) {
		e.t = t
		if err := os.Symlink("/etc/shadow", filepath.Join(e.home, "proj", "shadow")); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = os.Remove(filepath.Join(e.home, "proj", "shadow")) }()
		r := e.run(nil, "vm", "sync", e.vm)
		if r.code == 0 || !strings.Contains(r.err, "/etc/shadow") || !strings.Contains(r.err, "outside the owner's home") {
			t.Fatalf("sync with a symlink to /etc/shadow: exit %d, %q", r.code, r.err)
		}
		if got := e.sh("ls /root/proj"); strings.Contains(got, "shadow") {
			t.Fatalf("the symlink's target reached the guest: %q", got)
		}
	})

	t.Run("ssh-config works for ssh and scp", func(t *testing.T) {
		e.t = t
		cfg := filepath.Join(t.TempDir(), "ssh_config")
		writeFile(t, cfg, e.must(nil, "vm", "ssh-config"), 0o600)
		r := e.cmd(nil, "ssh", "-F", cfg, "-o", "BatchMode=yes", e.vm+".banger", "echo", "via-ssh-config")
		if r.code != 0 || r.out != "via-ssh-config\n" {
			t.Fatalf("ssh -F: exit %d %q %q", r.code, r.out, r.err)
		}
		f := filepath.Join(t.TempDir(), "f")
		writeFile(t, f, "scp", 0o644)
		if r := e.cmd(nil, "scp", "-q", "-F", cfg, f, e.vm+".banger:/tmp/f"); r.code != 0 {
			t.Fatalf("scp -F: exit %d %q", r.code, r.err)
		}
		named := filepath.Join(t.TempDir(), "named")
		writeFile(t, named, e.must(nil, "vm", "ssh-config", e.vm), 0o600)
		if r := e.cmd(nil, "ssh", "-F", named, "-o", "BatchMode=yes", e.vm, "cat", "/tmp/f"); r.code != 0 || r.out != "scp" {
			t.Fatalf("ssh by bare name: exit %d %q %q", r.code, r.out, r.err)
		}
	})

	// Last: it makes the VM unusable.
	t.Run("changed host key fails ssh, exec and cp", func(t *testing.T) {
		e.t = t
		// New host keys in the guest, sshd restarted, and every open
		// connection (the daemon's pooled one included) dropped, so the
		// next one meets the new key.
		e.sh(`rm -f /etc/ssh/ssh_host_*key*
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
ssh-keygen -q -t ecdsa -b 256 -N '' -f /etc/ssh/ssh_host_ecdsa_key
nohup sh -c 'sleep 1; systemctl restart ssh; pkill -KILL -f "^sshd: root"' >/dev/null 2>&1 &`)
		time.Sleep(5 * time.Second)
		f := filepath.Join(t.TempDir(), "f")
		writeFile(t, f, "x", 0o644)
		for _, tc := range []struct {
			name string
			args []string
			want string
		}{
			{"exec", []string{"vm", "exec", e.vm, "--", "true"}, "host key changed"},
			{"cp", []string{"vm", "cp", f, e.vm + ":/tmp/"}, "host key changed"},
			{"ssh", []string{"vm", "ssh", e.vm, "--", "true"}, "Host key verification failed"},
		} {
			r := e.run(nil, tc.args...)
			if r.code == 0 || !strings.Contains(r.err, tc.want) {
				t.Errorf("%s after the host key changed: exit %d, stderr %q; want a failure saying %q", tc.name, r.code, r.err, tc.want)
			}
		}
	})
}

// lockedBuffer is a bytes.Buffer a running command writes while the test
// reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// openPTY opens a pseudo-terminal pair of the given size (no cgo: the
// /dev/ptmx ioctls).
func openPTY(t *testing.T, rows, cols uint16) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}

// localListing renders a tree as the guest's find line does: path, octal
// mode, mtime in seconds, size, type.
func localListing(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	if err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		fi, _ := os.Lstat(p)
		rel, _ := filepath.Rel(root, p)
		line := fmt.Sprintf("%s %o %d", rel, fi.Mode().Perm(), fi.ModTime().Unix())
		if fi.IsDir() {
			line += " d"
		} else {
			line += fmt.Sprintf(" f %d", fi.Size())
		}
		lines = append(lines, line)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

func (e *vmEnv) syncReport() api.SyncReport {
	e.t.Helper()
	var rep api.SyncReport
	if err := json.Unmarshal([]byte(e.must(nil, "vm", "sync", e.vm, "--json")), &rep); err != nil {
		e.t.Fatal(err)
	}
	return rep
}
