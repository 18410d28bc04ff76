package vm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/testutil"
)

// The seed disk unpacks with GNU tar exactly as the guest's apply-seed does:
// the magic entry first, the remove list, and every identity file with its
// content, mode and owner.
func TestSeedArchive(t *testing.T) {
	testutil.RequireRoot(t) // extracting owners needs root
	testutil.RequireCommand(t, "tar")
	keys, err := guest.GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	_, owner, err := guest.LoadOrCreateClientKey(filepath.Join(t.TempDir(), "id_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	id := guest.Identity{Hostname: "dev", Net: guest.NetConfig{Mode: guest.NetUser, MAC: "02:00:00:00:00:01"},
		AuthorizedKeys: [][]byte{owner},
		HostKeys:       keys, MachineID: strings.Repeat("a", 32)}
	files, err := id.Files()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	disk := filepath.Join(dir, "seed.img")
	if err := makeSeed(disk, files); err != nil {
		t.Fatal(err)
	}
	if err := makeSeed(disk, files); err == nil {
		t.Fatal("makeSeed replaced an existing file")
	}
	st, _ := os.Stat(disk)
	if st.Size()%512 != 0 {
		t.Fatalf("seed size %d is not a whole number of sectors", st.Size())
	}
	list, err := exec.Command("tar", "-tf", disk).Output()
	if err != nil {
		t.Fatal(err)
	}
	if first := strings.SplitN(string(list), "\n", 2)[0]; first != seedMagic {
		t.Fatalf("first entry %q, want %q", first, seedMagic)
	}
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("tar", "-xpf", disk, "-C", root, "--same-owner", "--exclude="+seedMagic, "--exclude="+seedRemoveList).CombinedOutput()
	if err != nil {
		t.Fatalf("tar -x: %v\n%s", err, out)
	}
	var removed int
	for _, f := range files {
		p := filepath.Join(root, f.Path)
		if f.Remove {
			removed++
			continue
		}
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatalf("%s not unpacked: %v", f.Path, err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode().Perm() != f.Mode.Perm() || int(sys.Uid) != f.UID || int(sys.Gid) != f.GID {
			t.Errorf("%s: mode %v uid %d gid %d, want %v %d %d", f.Path, st.Mode().Perm(), sys.Uid, sys.Gid, f.Mode.Perm(), f.UID, f.GID)
		}
		if !f.Dir && f.Symlink == "" {
			if b, _ := os.ReadFile(p); string(b) != string(f.Data) {
				t.Errorf("%s: content differs", f.Path)
			}
		}
	}
	if removed > 0 {
		rm, err := exec.Command("tar", "-xOf", disk, seedRemoveList).Output()
		if err != nil || strings.Count(string(rm), "\n") != removed {
			t.Fatalf("remove list %q, %v; want %d paths", rm, err, removed)
		}
	}
	if _, err := seedArchive([]ext4.File{{Path: "etc/x", Data: []byte("x")}}); err == nil {
		t.Fatal("relative path accepted")
	}
}
