package guest

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata")

// fixtureIdentity is a deterministic identity: fixture host keys from
// ssh-keygen, a fixed owner key and machine id.
func fixtureIdentity(t testing.TB, mode NetMode) Identity {
	t.Helper()
	id := Identity{
		Hostname:       "dev",
		AuthorizedKeys: [][]byte{bytes.TrimSpace(readFixture(t, "owner_key.pub"))},
		HostKeys:       fixtureKeys(t),
		MachineID:      "5f2b3c4d6e7f40818293a4b5c6d7e8f9",
		Net:            NetConfig{Mode: mode, MAC: "52:54:00:AB:cd:01"},
	}
	if mode == NetStatic {
		id.Net.Address = "172.30.0.5/24"
		id.Net.Gateway = "172.30.0.1"
		id.Net.DNS = []string{"172.30.0.1", "9.9.9.9"}
	}
	return id
}

// renderFiles prints files the way a reviewer wants to read them: path,
// kind, mode, owner, then the content.
func renderFiles(files []ext4.File) string {
	var b strings.Builder
	for _, f := range files {
		switch {
		case f.Remove:
			fmt.Fprintf(&b, "== %s remove\n", f.Path)
		case f.Dir:
			fmt.Fprintf(&b, "== %s dir %04o %d:%d\n", f.Path, f.Mode.Perm(), f.UID, f.GID)
		case f.Symlink != "":
			fmt.Fprintf(&b, "== %s symlink -> %s %d:%d\n", f.Path, f.Symlink, f.UID, f.GID)
		default:
			fmt.Fprintf(&b, "== %s file %04o %d:%d\n%s", f.Path, f.Mode.Perm(), f.UID, f.GID, f.Data)
		}
	}
	return b.String()
}

// Files renders each network mode to exactly the reviewed files under
// testdata (go test -update rewrites them).
func TestIdentityFilesGolden(t *testing.T) {
	for _, mode := range []NetMode{NetStatic, NetUser} {
		t.Run(string(mode), func(t *testing.T) {
			files, err := fixtureIdentity(t, mode).Files()
			if err != nil {
				t.Fatal(err)
			}
			got := renderFiles(files)
			golden := filepath.Join("testdata", "identity-"+string(mode)+".golden")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (hint: go test -run %s -update)", err, t.Name())
			}
			if d := cmp.Diff(string(want), got); d != "" {
				t.Errorf("Files() (-%s +got):\n%s", golden, d)
			}
		})
	}
}

// Every invalid field is refused with a message naming it, and Files
// returns nothing for an invalid identity.
func TestIdentityValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(id *Identity)
		want   string
	}{
		{"uppercase hostname", func(id *Identity) { id.Hostname = "Dev" }, "hostname"},
		{"hostname with a dot", func(id *Identity) { id.Hostname = "dev.example" }, "hostname"},
		{"hostname with underscore", func(id *Identity) { id.Hostname = "my_vm" }, "hostname"},
		{"leading hyphen", func(id *Identity) { id.Hostname = "-dev" }, "hostname"},
		{"trailing hyphen", func(id *Identity) { id.Hostname = "dev-" }, "hostname"},
		{"64-byte hostname", func(id *Identity) { id.Hostname = strings.Repeat("a", 64) }, "hostname"},
		{"empty hostname", func(id *Identity) { id.Hostname = "" }, "hostname"},
		{"newline in hostname", func(id *Identity) { id.Hostname = "dev\n127.0.0.1 evil" }, "hostname"},
		{"bad domain label", func(id *Identity) { id.Domain = "ban_ger" }, "domain"},
		{"empty domain label", func(id *Identity) { id.Domain = "a..b" }, "domain"},
		{"user mode with an address", func(id *Identity) { id.Net.Mode = NetUser }, "user networking"},
		{"unknown mode", func(id *Identity) { id.Net.Mode = "bridge" }, "network mode"},
		{"address without prefix", func(id *Identity) { id.Net.Address = "172.30.0.5" }, "address"},
		{"gateway outside the subnet", func(id *Identity) { id.Net.Gateway = "10.0.0.1" }, "gateway"},
		{"gateway is the VM", func(id *Identity) { id.Net.Gateway = "172.30.0.5" }, "gateway"},
		{"bad dns", func(id *Identity) { id.Net.DNS = []string{"dns.example"} }, "dns"},
		{"newline in dns", func(id *Identity) { id.Net.DNS = []string{"1.1.1.1\n[Route]"} }, "dns"},
		{"bad mac", func(id *Identity) { id.Net.MAC = "52:54:00:ab:cd" }, "mac"},
		{"multicast mac", func(id *Identity) { id.Net.MAC = "01:00:5e:00:00:01" }, "multicast"},
		{"no authorized keys", func(id *Identity) { id.AuthorizedKeys = nil }, "nobody could log in"},
		{"two keys in one entry", func(id *Identity) {
			id.AuthorizedKeys = [][]byte{append(append(bytes.Clone(id.AuthorizedKeys[0]), '\n'), id.AuthorizedKeys[0]...)}
		}, "more than one line"},
		{"garbage key", func(id *Identity) { id.AuthorizedKeys = [][]byte{[]byte("ssh-ed25519 notbase64")} }, "authorized key 1"},
		{"missing host key", func(id *Identity) { id.HostKeys.ECDSA = HostKey{} }, "host key missing"},
		{"mismatched host key halves", func(id *Identity) { id.HostKeys.ED25519.Public = genKeys(t).ED25519.Public }, "do not match"},
		{"short machine id", func(id *Identity) { id.MachineID = "abc" }, "machine id"},
		{"uppercase machine id", func(id *Identity) { id.MachineID = strings.ToUpper(id.MachineID) }, "machine id"},
		{"zero machine id", func(id *Identity) { id.MachineID = strings.Repeat("0", 32) }, "machine id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := fixtureIdentity(t, NetStatic)
			tt.mutate(&id)
			files, err := id.Files()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Files() = %v, want an error containing %q", err, tt.want)
			}
			if files != nil {
				t.Fatal("Files returned files with an error")
			}
		})
	}
}

// NewMachineID gives distinct 32-hex ids marked as version 4, as
// systemd-machine-id-setup does.
func TestNewMachineID(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		id, err := NewMachineID()
		if err != nil {
			t.Fatal(err)
		}
		if !machineIDRe.MatchString(id) || id[12] != '4' || !strings.ContainsRune("89ab", rune(id[16])) {
			t.Fatalf("machine id %q: want 32 hex, version 4, RFC 4122 variant", id)
		}
		if seen[id] {
			t.Fatalf("machine id %q repeated", id)
		}
		seen[id] = true
	}
}

// The identity written into a real image with debugfs reads back byte for
// byte with its modes and root ownership, the image's stale host keys are
// gone, and e2fsck finds the file system clean.
func TestIdentityIntoImage(t *testing.T) {
	testutil.RequireCommand(t, "mkfs.ext4", "debugfs", "e2fsck")
	ctx := t.Context()

	// A tree shaped like a Debian rootfs after mmdebstrap with
	// openssh-server: host keys of every type, a placeholder machine-id.
	tree := t.TempDir()
	for p, content := range map[string]string{
		"etc/hostname":                   "debian\n",
		"etc/hosts":                      "127.0.0.1 localhost\n",
		"etc/machine-id":                 "",
		"etc/ssh/sshd_config":            "Include /etc/ssh/sshd_config.d/*.conf\n",
		"etc/ssh/ssh_host_rsa_key":       "rsa private\n",
		"etc/ssh/ssh_host_rsa_key.pub":   "ssh-rsa AAAA image\n",
		"etc/ssh/ssh_host_ecdsa_key":     "ecdsa private\n",
		"etc/ssh/ssh_host_ecdsa_key.pub": "ecdsa-sha2-nistp256 AAAA image\n",
		"etc/ssh/ssh_host_ed25519_key":   "ed25519 private\n",
		"etc/systemd/system/.keep":       "",
		"root/.profile":                  "# ~/.profile\n",
	} {
		full := filepath.Join(tree, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(tree, "root"), 0o700); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "disk.ext4")
	if err := ext4.Make(ctx, tree, img, 2<<30, ext4.MakeOptions{}); err != nil {
		t.Fatal(err)
	}

	_, owner, err := LoadOrCreateClientKey(filepath.Join(t.TempDir(), "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	machineID, err := NewMachineID()
	if err != nil {
		t.Fatal(err)
	}
	id := Identity{
		Hostname:       "dev",
		Net:            NetConfig{Mode: NetStatic, Address: "172.30.0.7/24", Gateway: "172.30.0.1", DNS: []string{"172.30.0.1"}, MAC: "52:54:00:00:00:07"},
		AuthorizedKeys: [][]byte{owner},
		HostKeys:       genKeys(t),
		MachineID:      machineID,
	}
	files, err := id.Files()
	if err != nil {
		t.Fatal(err)
	}
	if err := ext4.WriteFiles(ctx, img, files); err != nil {
		t.Fatal(err)
	}

	for _, f := range files {
		fi, err := ext4.Stat(ctx, img, f.Path)
		if f.Remove {
			if !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: still in the image (%v)", f.Path, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", f.Path, err)
			continue
		}
		want := ext4.FileInfo{Mode: f.Mode, Size: int64(len(f.Data))}
		if f.Dir {
			want.Mode |= os.ModeDir
			want.Size = fi.Size
		}
		if d := cmp.Diff(want, fi); d != "" {
			t.Errorf("%s (-want +got):\n%s", f.Path, d)
		}
		if f.Dir {
			continue
		}
		got, err := ext4.ReadFile(ctx, img, f.Path)
		if err != nil {
			t.Errorf("%s: %v", f.Path, err)
		} else if !bytes.Equal(got, f.Data) {
			t.Errorf("%s: read back %q, want %q", f.Path, got, f.Data)
		}
	}
	// Neighbours the identity does not own are untouched.
	if got, err := ext4.ReadFile(ctx, img, "/root/.profile"); err != nil || string(got) != "# ~/.profile\n" {
		t.Errorf("/root/.profile = %q, %v", got, err)
	}
	if err := ext4.Fsck(ctx, img); err != nil {
		t.Error(err)
	}
}
