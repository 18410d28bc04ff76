package guest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
	"golang.org/x/crypto/ssh"
)

// The first call creates an unencrypted ed25519 key in OpenSSH format, 0600
// in a new 0700 directory, with its .pub; later calls return the same key,
// and a deleted .pub comes back.
func TestLoadOrCreateClientKeyCreatesThenReuses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config", "ssh", "id_ed25519")
	signer, line, err := LoadOrCreateClientKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := signer.PublicKey().Type(); got != ssh.KeyAlgoED25519 {
		t.Errorf("key type %s, want ed25519", got)
	}
	for p, want := range map[string]os.FileMode{path: 0o600, filepath.Dir(path): os.ModeDir | 0o700, path + ".pub": 0o644} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s mode %v, want %v", p, fi.Mode(), want)
		}
	}
	priv, _ := os.ReadFile(path)
	if block, _ := pem.Decode(priv); block == nil || block.Type != "OPENSSH PRIVATE KEY" {
		t.Errorf("private key is not an OpenSSH PEM block: %.40q", priv)
	}
	pub, _ := os.ReadFile(path + ".pub")
	if string(pub) != string(line)+"\n" {
		t.Errorf(".pub = %q, want the authorized line %q", pub, line)
	}
	if !strings.HasSuffix(string(line), " banger") || strings.Contains(string(line), "\n") {
		t.Errorf("line %q: want one line ending in the banger comment", line)
	}
	parsed, _, _, _, err := ssh.ParseAuthorizedKey(line)
	if err != nil || !bytes.Equal(parsed.Marshal(), signer.PublicKey().Marshal()) {
		t.Fatalf("line does not parse to the signer's key: %v", err)
	}

	if err := os.Remove(path + ".pub"); err != nil {
		t.Fatal(err)
	}
	again, line2, err := LoadOrCreateClientKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.PublicKey().Marshal(), signer.PublicKey().Marshal()) || !bytes.Equal(line, line2) {
		t.Fatal("second call returned a different key")
	}
	if pub2, _ := os.ReadFile(path + ".pub"); !bytes.Equal(pub, pub2) {
		t.Errorf("recreated .pub = %q, want %q", pub2, pub)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// A key file that exists but cannot be used is an error with a hint, and
// is left exactly as it was: banger never replaces a user's key.
func TestLoadOrCreateClientKeyNeverReplaces(t *testing.T) {
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	encrypted, err := ssh.MarshalPrivateKeyWithPassphrase(edPriv, "", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		content []byte
		want    string
	}{
		{"garbage", []byte("not a key\n"), "move it aside"},
		{"empty file", nil, "move it aside"},
		{"passphrase-protected", pem.EncodeToMemory(encrypted), "passphrase-protected"},
		{"public key where the private one belongs", []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPb0j7voaBBxjxCo9+Ghq2GWoBaeTX54w48611uQN5+0 x\n"), "move it aside"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "id_ed25519")
			if err := os.WriteFile(path, tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			_, _, err := LoadOrCreateClientKey(path)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("LoadOrCreateClientKey = %v, want an error containing %q", err, tt.want)
			}
			if got, _ := os.ReadFile(path); !bytes.Equal(got, tt.content) {
				t.Fatal("key file was changed")
			}
			if _, err := os.Stat(path + ".pub"); err == nil {
				t.Fatal("a .pub was written for an unusable key")
			}
		})
	}
	t.Run("unreadable: a directory at the key path", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "id_ed25519")
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreateClientKey(path); err == nil {
			t.Fatal("LoadOrCreateClientKey over a directory succeeded")
		}
	})
}

// Concurrent first calls (two CLI invocations starting the daemon at once)
// end with one key that all of them return.
func TestLoadOrCreateClientKeyConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ssh", "id_ed25519")
	const n = 8
	keys := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, _, err := LoadOrCreateClientKey(path)
			errs[i] = err
			if err == nil {
				keys[i] = s.PublicKey().Marshal()
			}
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if !bytes.Equal(keys[i], keys[0]) {
			t.Fatalf("caller %d got a different key", i)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 2 {
		t.Errorf("directory holds %d entries, want the key and its .pub", len(entries))
	}
}

// OpenSSH's own tools read the key banger writes: ssh-keygen derives the
// same public key from it.
func TestClientKeyReadableBySSHKeygen(t *testing.T) {
	testutil.RequireCommand(t, "ssh-keygen")
	path := filepath.Join(t.TempDir(), "id_ed25519")
	_, line, err := LoadOrCreateClientKey(path)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ssh-keygen", "-y", "-f", path).CombinedOutput()
	if err != nil {
		t.Fatalf("ssh-keygen -y: %v: %s", err, out)
	}
	want := strings.TrimSuffix(string(line), " banger")
	if got := strings.Fields(string(out)); len(got) < 2 || got[0]+" "+got[1] != want {
		t.Fatalf("ssh-keygen derived %q, want %q", out, want)
	}
}

// GenerateHostKeys makes distinct ed25519 and ECDSA P-256 pairs whose PEM
// halves parse back to their public halves, also for ssh-keygen.
func TestGenerateHostKeys(t *testing.T) {
	a, err := GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	b, err := GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	if a.ED25519.Public.Type() != ssh.KeyAlgoED25519 || a.ECDSA.Public.Type() != ssh.KeyAlgoECDSA256 {
		t.Fatalf("types %s, %s", a.ED25519.Public.Type(), a.ECDSA.Public.Type())
	}
	if bytes.Equal(a.ED25519.Public.Marshal(), b.ED25519.Public.Marshal()) || bytes.Equal(a.ECDSA.Public.Marshal(), b.ECDSA.Public.Marshal()) {
		t.Fatal("two calls gave the same key")
	}
	if err := a.validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("ssh-keygen"); err == nil {
		for _, k := range []HostKey{a.ED25519, a.ECDSA} {
			p := filepath.Join(t.TempDir(), "key")
			if err := os.WriteFile(p, k.PrivatePEM, 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("ssh-keygen", "-y", "-f", p).Output()
			if err != nil {
				t.Fatalf("ssh-keygen -y: %v", err)
			}
			pk, _, _, _, err := ssh.ParseAuthorizedKey(out)
			if err != nil || !bytes.Equal(pk.Marshal(), k.Public.Marshal()) {
				t.Fatalf("ssh-keygen read %s back as %q (%v)", k.Public.Type(), out, err)
			}
		}
	}
}

// ParseHostKeys reads ssh-keygen's files and refuses a key of the wrong
// type in a slot.
func TestParseHostKeys(t *testing.T) {
	ed, ec := readFixture(t, "ssh_host_ed25519_key"), readFixture(t, "ssh_host_ecdsa_key")
	if _, err := ParseHostKeys(ed, ec); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseHostKeys(ec, ed); err == nil || !strings.Contains(err.Error(), "got a") {
		t.Fatalf("swapped keys: %v, want a type error", err)
	}
	if _, err := ParseHostKeys([]byte("junk"), ec); err == nil {
		t.Fatal("junk accepted")
	}
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
