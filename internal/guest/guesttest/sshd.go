// Package guesttest runs a real OpenSSH sshd for tests of what banger does
// over SSH: on a random loopback port, with host keys the test chose and
// pinned in a known_hosts of its own, accepting one client key. It stands
// in for a guest's sshd wherever booting a VM would only add minutes.
package guesttest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerhq/banger/internal/guest"
)

// SSHDPath is where Debian's openssh-server installs sshd.
const SSHDPath = "/usr/sbin/sshd"

// SFTPServerPath is Debian's sftp-server.
const SFTPServerPath = "/usr/lib/openssh/sftp-server"

// Alias is the known_hosts name the test sshd's keys are pinned under, as
// a VM's are under "<name>.banger".
const Alias = "test.banger"

// Options configure StartSSHD.
type Options struct {
	// HostKeys are the keys sshd serves; fresh ones when zero.
	HostKeys *guest.HostKeys
	// Pinned are the keys pinned in KnownHosts; HostKeys when nil. Pin
	// other keys to play a guest whose host key changed.
	Pinned *guest.HostKeys
	// NoPin leaves KnownHosts without any entry for Alias.
	NoPin bool
}

// SSHD is a running sshd.
type SSHD struct {
	Addr       string
	Port       int
	User       string
	Dir        string
	KnownHosts string
	// KeyPath is the client's private key file (its .pub beside it).
	KeyPath  string
	Signer   ssh.Signer
	HostKeys guest.HostKeys

	cmd  *exec.Cmd
	logs *logBuffer
}

// Require skips the test when sshd or sftp-server is not installed.
func Require(t testing.TB) {
	t.Helper()
	for _, p := range []string{SSHDPath, SFTPServerPath} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("requires OpenSSH's %s (apt install openssh-server; .ci/run installs it)", p)
		}
	}
}

// StartSSHD starts sshd for the test and stops it at cleanup.
func StartSSHD(t testing.TB, opts Options) *SSHD {
	t.Helper()
	Require(t)
	dir, err := os.MkdirTemp("", "banger-sshd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	d := &SSHD{Dir: dir, User: u.Username, KnownHosts: filepath.Join(dir, "known_hosts"), KeyPath: filepath.Join(dir, "id_ed25519")}

	if opts.HostKeys != nil {
		d.HostKeys = *opts.HostKeys
	} else if d.HostKeys, err = guest.GenerateHostKeys(); err != nil {
		t.Fatal(err)
	}
	pinned := d.HostKeys
	if opts.Pinned != nil {
		pinned = *opts.Pinned
	}
	if !opts.NoPin {
		if err := guest.Add(d.KnownHosts, []string{Alias}, pinned.PublicKeys()); err != nil {
			t.Fatal(err)
		}
	} else if err := os.WriteFile(d.KnownHosts, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	signer, line, err := guest.LoadOrCreateClientKey(d.KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	d.Signer = signer
	auth := filepath.Join(dir, "authorized_keys")
	write(t, auth, append(line, '\n'), 0o600)
	edKey := filepath.Join(dir, "ssh_host_ed25519_key")
	ecKey := filepath.Join(dir, "ssh_host_ecdsa_key")
	write(t, edKey, d.HostKeys.ED25519.PrivatePEM, 0o600)
	write(t, ecKey, d.HostKeys.ECDSA.PrivatePEM, 0o600)

	if os.Geteuid() == 0 {
		// sshd running as root insists on its privilege separation
		// directory, which systemd would make.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		cfg := filepath.Join(dir, "sshd_config")
		write(t, cfg, []byte(strings.Join([]string{
			fmt.Sprintf("ListenAddress 127.0.0.1:%d", port),
			"HostKey " + edKey,
			"HostKey " + ecKey,
			"AuthorizedKeysFile " + auth,
			"PidFile none",
			"StrictModes no",
			"UsePAM no",
			"PasswordAuthentication no",
			"KbdInteractiveAuthentication no",
			"PermitRootLogin prohibit-password",
			"Subsystem sftp " + SFTPServerPath,
			"MaxStartups 100",
			// As Debian's sshd_config: exec marks its commands with an
			// LC_ variable to find them for signals.
			"AcceptEnv LANG LC_*",
			"LogLevel INFO",
			"",
		}, "\n")), 0o600)
		d.Port = port
		d.Addr = fmt.Sprintf("127.0.0.1:%d", port)
		err := d.start(cfg)
		if err == nil {
			break
		}
		if attempt == 4 || !strings.Contains(err.Error(), "Address already in use") {
			t.Fatalf("start sshd: %v", err)
		}
	}
	t.Cleanup(d.stop)
	return d
}

func write(t testing.TB, p string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, b, mode); err != nil {
		t.Fatal(err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port
}

// start runs sshd in the foreground and waits for it to listen.
func (d *SSHD) start(cfg string) error {
	cmd := exec.Command(SSHDPath, "-D", "-e", "-f", cfg)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	d.logs = &logBuffer{}
	listening := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			d.logs.add(sc.Text())
			if strings.Contains(sc.Text(), "Server listening on") {
				once.Do(func() { close(listening) })
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	select {
	case <-listening:
		d.cmd = cmd
		return nil
	case <-exited:
		_ = cmd.Wait()
		return fmt.Errorf("sshd exited: %s", d.logs.String())
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("sshd did not listen within 20s: %s", d.logs.String())
	}
}

func (d *SSHD) stop() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
}

// Logs is what sshd wrote so far, for failure messages.
func (d *SSHD) Logs() string { return d.logs.String() }

// Target is how banger would reach this sshd.
func (d *SSHD) Target() guest.Target {
	return guest.Target{Addr: d.Addr, Alias: Alias, User: d.User, Signer: d.Signer, KnownHosts: d.KnownHosts}
}

// Pool returns a connection pool whose every VM name resolves to this
// sshd, closed at cleanup.
func (d *SSHD) Pool(t testing.TB) *guest.Pool {
	p := &guest.Pool{
		Resolve: func(context.Context, string) (guest.Target, error) { return d.Target(), nil },
		Log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	t.Cleanup(p.Close)
	return p
}

// SSHArgs are the system ssh's options for this sshd, strict as banger's.
func (d *SSHD) SSHArgs() []string {
	return []string{
		"-i", d.KeyPath,
		"-p", fmt.Sprint(d.Port),
		"-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + d.KnownHosts,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "HostKeyAlias=" + Alias,
		"-o", "UpdateHostKeys=no",
		"-o", "LogLevel=ERROR",
		"-o", "BatchMode=yes",
	}
}

type logBuffer struct {
	mu    sync.Mutex // guards lines
	lines []string
}

func (l *logBuffer) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) < 2000 {
		l.lines = append(l.lines, s)
	}
}

func (l *logBuffer) String() string {
	if l == nil {
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}
