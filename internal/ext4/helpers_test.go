package ext4

import (
	"os"
	"path/filepath"
	"testing"
)

// requireTools skips unless the e2fsprogs tools are found the way the
// package finds them (PATH, then /usr/sbin and /sbin).
func requireTools(t testing.TB) {
	t.Helper()
	for _, n := range []string{"mkfs.ext4", "debugfs", "e2fsck", "resize2fs"} {
		if _, err := tool(n); err != nil {
			t.Skipf("requires %s (e2fsprogs, installed by .ci/run)", n)
		}
	}
}

// treeFile is one entry of a test source tree for Make.
type treeFile struct {
	mode     os.FileMode // os.ModeDir / os.ModeSymlink select the kind
	data     string      // content, or symlink target
	uid, gid int
}

// makeTree writes entries (relative path → file) under a new temporary
// directory, creating parents 0755 as needed.
func makeTree(t testing.TB, entries map[string]treeFile) string {
	t.Helper()
	root := t.TempDir()
	for p, f := range entries {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		switch {
		case f.mode&os.ModeDir != 0:
			if err := os.MkdirAll(full, f.mode.Perm()); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(full, f.mode&(os.ModePerm|specialBits)); err != nil {
				t.Fatal(err)
			}
		case f.mode&os.ModeSymlink != 0:
			if err := os.Symlink(f.data, full); err != nil {
				t.Fatal(err)
			}
		default:
			if err := os.WriteFile(full, []byte(f.data), f.mode.Perm()); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(full, f.mode); err != nil {
				t.Fatal(err)
			}
		}
		if f.uid != 0 || f.gid != 0 {
			if err := os.Lchown(full, f.uid, f.gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

// newImage makes an image of size bytes from entries.
func newImage(t testing.TB, size int64, entries map[string]treeFile) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.ext4")
	if err := Make(t.Context(), makeTree(t, entries), img, size, MakeOptions{}); err != nil {
		t.Fatal(err)
	}
	return img
}
