package guest

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/crypto/ssh"
)

// canonicalHost accepts the address forms banger pins and spells them as
// known_hosts does.
func TestCanonicalHostAccepts(t *testing.T) {
	tests := map[string]string{
		"127.0.0.1":           "127.0.0.1",
		"[127.0.0.1]:2222":    "[127.0.0.1]:2222",
		"[127.0.0.1]:22":      "127.0.0.1",
		"dev.banger":          "dev.banger",
		"[dev.banger]:2200":   "[dev.banger]:2200",
		"172.30.0.5":          "172.30.0.5",
		"fd00::1":             "fd00::1",
		"[fd00:0::1]:2222":    "[fd00::1]:2222",
		"a-1.b-2.banger":      "a-1.b-2.banger",
		"[::ffff:10.0.0.1]:2": "[::ffff:10.0.0.1]:2",
	}
	for in, want := range tests {
		got, err := canonicalHost(in)
		if err != nil || got != want {
			t.Errorf("canonicalHost(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// canonicalHost refuses every address that would make a line match more,
// or other, hosts than the one named.
func TestCanonicalHostRejects(t *testing.T) {
	tests := []struct{ name, host string }{
		{"wildcard matches every VM", "*.banger"},
		{"single-char wildcard", "de?.banger"},
		{"negation", "!dev.banger"},
		{"comma adds a second host", "dev.banger,evil.example"},
		{"space ends the host field", "dev.banger ssh-ed25519"},
		{"newline injects a line", "dev.banger\n* ssh-ed25519 AAAA"},
		{"hashed host", "|1|c2FsdA==|aGFzaA=="},
		{"marker", "@cert-authority"},
		{"uppercase", "Dev.banger"},
		{"leading hyphen", "-dev.banger"},
		{"empty", ""},
		{"port zero", "[127.0.0.1]:0"},
		{"port too big", "[127.0.0.1]:65536"},
		{"port with a sign", "[127.0.0.1]:+22"},
		{"brackets without port", "[127.0.0.1]"},
		{"zoned IPv6", "fe80::1%eth0"},
		{"underscore", "my_vm.banger"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := canonicalHost(tt.host); err == nil {
				t.Fatalf("canonicalHost(%q) = %q, want an error", tt.host, got)
			}
		})
	}
}

func fixtureKeys(t testing.TB) HostKeys {
	t.Helper()
	h, err := ParseHostKeys(readFixture(t, "ssh_host_ed25519_key"), readFixture(t, "ssh_host_ecdsa_key"))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func genKeys(t testing.TB) HostKeys {
	t.Helper()
	h, err := GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// Add writes one line per key naming all the hosts, replaces what was
// pinned for any of them (also inside a line shared with other hosts), and
// Remove takes hosts out of every line, keeping comments and foreign lines.
func TestAddRemove(t *testing.T) {
	path := filepath.Join(t.TempDir(), "known_hosts")
	a, b := fixtureKeys(t), genKeys(t)
	foreign := "# pinned by hand\n|1|c2FsdA==|aGFzaA== ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPb0j7voaBBxjxCo9+Ghq2GWoBaeTX54w48611uQN5+0\n"
	if err := os.WriteFile(path, []byte(foreign), 0o644); err != nil {
		t.Fatal(err)
	}
	line := func(hosts string, k ssh.PublicKey) string {
		return hosts + " " + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k)))
	}
	read := func() []string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	}
	foreignLines := strings.Split(strings.TrimSuffix(foreign, "\n"), "\n")

	if err := Add(path, []string{"[127.0.0.1]:2222", "a.banger"}, a.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	if err := Add(path, []string{"172.30.0.6", "b.banger", "[127.0.0.1]:22"}, b.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	want := append(append([]string{}, foreignLines...),
		line("[127.0.0.1]:2222,a.banger", a.ED25519.Public),
		line("[127.0.0.1]:2222,a.banger", a.ECDSA.Public),
		line("172.30.0.6,b.banger,127.0.0.1", b.ED25519.Public),
		line("172.30.0.6,b.banger,127.0.0.1", b.ECDSA.Public),
	)
	if d := cmp.Diff(want, read()); d != "" {
		t.Fatalf("after two Adds (-want +got):\n%s", d)
	}

	// A new VM reuses a.banger's forwarded port: its key replaces a's for
	// that host only; a.banger keeps a's keys.
	c := genKeys(t)
	if err := Add(path, []string{"[127.0.0.1]:2222"}, []ssh.PublicKey{c.ED25519.Public}); err != nil {
		t.Fatal(err)
	}
	want = append(append([]string{}, foreignLines...),
		line("a.banger", a.ED25519.Public),
		line("a.banger", a.ECDSA.Public),
		line("172.30.0.6,b.banger,127.0.0.1", b.ED25519.Public),
		line("172.30.0.6,b.banger,127.0.0.1", b.ECDSA.Public),
		line("[127.0.0.1]:2222", c.ED25519.Public),
	)
	if d := cmp.Diff(want, read()); d != "" {
		t.Fatalf("after replacing a host (-want +got):\n%s", d)
	}

	if err := Remove(path, []string{"a.banger", "b.banger", "172.30.0.6", "never.banger"}); err != nil {
		t.Fatal(err)
	}
	want = append(append([]string{}, foreignLines...),
		line("127.0.0.1", b.ED25519.Public),
		line("127.0.0.1", b.ECDSA.Public),
		line("[127.0.0.1]:2222", c.ED25519.Public),
	)
	if d := cmp.Diff(want, read()); d != "" {
		t.Fatalf("after Remove (-want +got):\n%s", d)
	}
}

// Add and Remove refuse bad input without touching the file.
func TestAddRejects(t *testing.T) {
	path := filepath.Join(t.TempDir(), "known_hosts")
	k := fixtureKeys(t)
	if err := Add(path, []string{"a.banger"}, k.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	tests := []struct {
		name  string
		hosts []string
		keys  []ssh.PublicKey
	}{
		{"no hosts", nil, k.PublicKeys()},
		{"no keys", []string{"b.banger"}, nil},
		{"nil key", []string{"b.banger"}, []ssh.PublicKey{nil}},
		{"one bad host among good", []string{"b.banger", "*"}, k.PublicKeys()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := Add(path, tt.hosts, tt.keys); err == nil {
				t.Fatal("Add succeeded")
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Fatal("file changed")
			}
		})
	}
	if err := Remove(path, []string{"a.banger\n"}); err == nil {
		t.Fatal("Remove accepted a host with a newline")
	}
}

// Concurrent Adds (VMs created in parallel) and Removes all land: none
// overwrites another's rewrite.
func TestAddConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "known_hosts")
	keys := fixtureKeys(t).PublicKeys()
	const n = 32
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		wg.Go(func() {
			errs <- Add(path, []string{fmt.Sprintf("vm%d.banger", i), fmt.Sprintf("[127.0.0.1]:%d", 2200+i)}, keys)
		})
	}
	wg.Wait()
	for i := 0; i < n; i += 2 {
		wg.Go(func() { errs <- Remove(path, []string{fmt.Sprintf("vm%d.banger", i)}) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	for i := range n {
		name := fmt.Sprintf("vm%d.banger", i)
		port := fmt.Sprintf("[127.0.0.1]:%d ", 2200+i)
		if got := strings.Count(text, port); got != 2 {
			t.Errorf("%s: %d lines for its port, want 2 (one per key)", name, got)
		}
		want := 0
		if i%2 == 1 {
			want = 2
		}
		if got := strings.Count(text, name+","); got != want {
			t.Errorf("%s: in %d lines, want %d", name, got, want)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".known_hosts.tmp-*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// sshServer serves SSH handshakes with the given host keys on a loopback
// port, accepting only the client key clientPub. It returns the address.
func sshServer(t *testing.T, host HostKeys, clientPub ssh.PublicKey) string {
	t.Helper()
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
			if bytes.Equal(k.Marshal(), clientPub.Marshal()) {
				return nil, nil
			}
			return nil, errors.New("unknown client key")
		},
	}
	for _, k := range []HostKey{host.ED25519, host.ECDSA} {
		s, err := ssh.ParsePrivateKey(k.PrivatePEM)
		if err != nil {
			t.Fatal(err)
		}
		cfg.AddHostKey(s)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveConn(c, cfg)
		}
	}()
	return ln.Addr().String()
}

func serveConn(c net.Conn, cfg *ssh.ServerConfig) {
	defer func() { _ = c.Close() }()
	_, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		return
	}
	go ssh.DiscardRequests(reqs)
	for ch := range chans {
		_ = ch.Reject(ssh.Prohibited, "handshake only")
	}
}

// A real SSH handshake succeeds against a pinned key, for either key type
// the client negotiates, and fails for an unpinned host or a changed key:
// there is no trust on first use.
func TestHostKeyCallbackHandshake(t *testing.T) {
	signer, _, err := LoadOrCreateClientKey(filepath.Join(t.TempDir(), "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	guestKeys := genKeys(t)
	addr := sshServer(t, guestKeys, signer.PublicKey())
	_, port, _ := net.SplitHostPort(addr)
	hostEntry := "[127.0.0.1]:" + port

	dial := func(khPath string, algos []string) error {
		cb, err := HostKeyCallback(khPath)
		if err != nil {
			return err
		}
		c, err := ssh.Dial("tcp", addr, &ssh.ClientConfig{
			User:              "root",
			Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
			HostKeyCallback:   cb,
			HostKeyAlgorithms: algos,
		})
		if err == nil {
			_ = c.Close()
		}
		return err
	}

	dir := t.TempDir()
	pinned := filepath.Join(dir, "pinned")
	if err := Add(pinned, []string{hostEntry, "vm.banger"}, guestKeys.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other")
	if err := Add(other, []string{"vm.banger"}, guestKeys.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	changed := filepath.Join(dir, "changed")
	if err := Add(changed, []string{hostEntry}, genKeys(t).PublicKeys()); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		path  string
		algos []string
		want  error
	}{
		{"pinned, ed25519", pinned, []string{ssh.KeyAlgoED25519}, nil},
		{"pinned, ecdsa", pinned, []string{ssh.KeyAlgoECDSA256}, nil},
		{"pinned, client's choice", pinned, nil, nil},
		{"host not pinned", other, nil, ErrHostUnknown},
		{"key changed", changed, nil, ErrHostKeyChanged},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := dial(tt.path, tt.algos)
			if !errors.Is(err, tt.want) {
				t.Fatalf("dial = %v, want %v", err, tt.want)
			}
		})
	}
	t.Run("missing known_hosts", func(t *testing.T) {
		if _, err := HostKeyCallback(filepath.Join(dir, "absent")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("HostKeyCallback = %v, want ErrNotExist", err)
		}
	})
}

// Over a connection that is not TCP (vsock, a unix socket proxy), the
// hostname alone is matched, with port 22 when it has none.
func TestHostKeyCallbackNonTCP(t *testing.T) {
	signer, _, err := LoadOrCreateClientKey(filepath.Join(t.TempDir(), "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	guestKeys := genKeys(t)
	kh := filepath.Join(t.TempDir(), "known_hosts")
	if err := Add(kh, []string{"vm.banger"}, guestKeys.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	cfgFor := func(hostname string) error {
		cb, err := HostKeyCallback(kh)
		if err != nil {
			return err
		}
		srvCfg := &ssh.ServerConfig{NoClientAuth: true}
		s, _ := ssh.ParsePrivateKey(guestKeys.ED25519.PrivatePEM)
		srvCfg.AddHostKey(s)
		// A unix socket: buffered both ways, unlike net.Pipe, on which both
		// ends block writing their version line.
		sock := filepath.Join(t.TempDir(), "ssh.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			return err
		}
		defer func() { _ = ln.Close() }()
		go func() {
			if sc, err := ln.Accept(); err == nil {
				serveConn(sc, srvCfg)
			}
		}()
		cc, err := net.Dial("unix", sock)
		if err != nil {
			return err
		}
		defer func() { _ = cc.Close() }()
		conn, _, _, err := ssh.NewClientConn(cc, hostname, &ssh.ClientConfig{User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)}, HostKeyCallback: cb})
		if err == nil {
			_ = conn.Close()
		}
		return err
	}
	if err := cfgFor("vm.banger"); err != nil {
		t.Fatalf("pinned host over a unix socket: %v", err)
	}
	if err := cfgFor("other.banger"); !errors.Is(err, ErrHostUnknown) {
		t.Fatalf("unpinned host over a unix socket = %v, want ErrHostUnknown", err)
	}
}
