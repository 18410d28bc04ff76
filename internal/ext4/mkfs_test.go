package ext4

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
	"github.com/google/go-cmp/cmp"
)

// Make copies owners, modes and symlinks from the tree as they are, and
// makes the image's root directory root-owned whoever owns the source.
func TestMakeKeepsOwnersAndModes(t *testing.T) {
	testutil.RequireRoot(t)
	requireTools(t)
	ctx := t.Context()
	tree := makeTree(t, map[string]treeFile{
		"etc/shadow":          {mode: 0o640, data: "root:*:1::::::\n", gid: 42},
		"home/dev":            {mode: os.ModeDir | 0o750, uid: 1000, gid: 1000},
		"home/dev/notes":      {mode: 0o600, data: "hi\n", uid: 1000, gid: 1000},
		"usr/bin/passwd":      {mode: os.ModeSetuid | 0o755, data: "elf\n"},
		"usr/bin/vi":          {mode: os.ModeSymlink, data: "/etc/alternatives/vi"},
		"home/dev/link":       {mode: os.ModeSymlink, data: "notes", uid: 1000, gid: 1000},
		"var/tmp":             {mode: os.ModeDir | os.ModeSticky | 0o777},
		"etc/ssh/sshd_config": {mode: 0o644, data: "Port 22\n"},
	})
	if err := os.Chown(tree, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "disk.ext4")
	if err := Make(ctx, tree, img, 64<<20, MakeOptions{}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path string
		want FileInfo
	}{
		{"/", FileInfo{Mode: os.ModeDir | 0o755}},
		{"/etc/shadow", FileInfo{Mode: 0o640, GID: 42, Size: 15}},
		{"/home/dev", FileInfo{Mode: os.ModeDir | 0o750, UID: 1000, GID: 1000}},
		{"/home/dev/notes", FileInfo{Mode: 0o600, UID: 1000, GID: 1000, Size: 3}},
		{"/usr/bin/passwd", FileInfo{Mode: os.ModeSetuid | 0o755, Size: 4}},
		{"/usr/bin/vi", FileInfo{Mode: os.ModeSymlink | 0o777, Size: 20, Target: "/etc/alternatives/vi"}},
		{"/home/dev/link", FileInfo{Mode: os.ModeSymlink | 0o777, UID: 1000, GID: 1000, Size: 5, Target: "notes"}},
		{"/var/tmp", FileInfo{Mode: os.ModeDir | os.ModeSticky | 0o777}},
	}
	for _, tt := range tests {
		got, err := Stat(ctx, img, tt.path)
		if err != nil {
			t.Errorf("Stat(%s): %v", tt.path, err)
			continue
		}
		if got.Mode.IsDir() {
			tt.want.Size = got.Size
		}
		if d := cmp.Diff(tt.want, got); d != "" {
			t.Errorf("Stat(%s) (-want +got):\n%s", tt.path, d)
		}
	}
	if err := Fsck(ctx, img); err != nil {
		t.Error(err)
	}
}

// A tree too big for the size asked fails with mke2fs's reason and leaves
// neither the image nor a temporary file behind.
func TestMakeFailureLeavesNothing(t *testing.T) {
	requireTools(t)
	tree := t.TempDir()
	big := make([]byte, 20<<20)
	for i := range big {
		big[i] = byte(i*7 + i>>9) // not all zeroes: mke2fs skips zero blocks
	}
	if err := os.WriteFile(filepath.Join(tree, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	outDir := t.TempDir()
	img := filepath.Join(outDir, "disk.ext4")
	err := Make(t.Context(), tree, img, 8<<20, MakeOptions{})
	if err == nil || !strings.Contains(err.Error(), "Could not allocate block") {
		t.Fatalf("Make = %v, want mke2fs's allocation failure", err)
	}
	left, _ := os.ReadDir(outDir)
	if len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// Make never replaces an existing file and refuses bad options before
// running anything.
func TestMakeRefuses(t *testing.T) {
	requireTools(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.ext4")
	if err := os.WriteFile(existing, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		src  string
		out  string
		size int64
		opts MakeOptions
		want string
	}{
		{"existing output", dir, existing, 64 << 20, MakeOptions{}, "file already exists"},
		{"label too long", dir, filepath.Join(dir, "a"), 64 << 20, MakeOptions{Label: "a-label-over-16-bytes"}, "label"},
		{"label with a space", dir, filepath.Join(dir, "a"), 64 << 20, MakeOptions{Label: "my root"}, "label"},
		{"uppercase uuid", dir, filepath.Join(dir, "a"), 64 << 20, MakeOptions{UUID: "6F1C2A7E-1111-4222-8333-123456789ABC"}, "uuid"},
		{"uuid without dashes", dir, filepath.Join(dir, "a"), 64 << 20, MakeOptions{UUID: "6f1c2a7e111142228333123456789abc"}, "uuid"},
		{"size not a block multiple", dir, filepath.Join(dir, "a"), 64<<20 + 1, MakeOptions{}, "multiple"},
		{"zero size", dir, filepath.Join(dir, "a"), 0, MakeOptions{}, "multiple"},
		{"source is a file", existing, filepath.Join(dir, "a"), 64 << 20, MakeOptions{}, "not a directory"},
		{"source missing", filepath.Join(dir, "nope"), filepath.Join(dir, "a"), 64 << 20, MakeOptions{}, "no such file"},
		{"output inside the source", dir, filepath.Join(dir, "a"), 64 << 20, MakeOptions{}, "inside the source tree"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Make(t.Context(), tt.src, tt.out, tt.size, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Make = %v, want an error containing %q", err, tt.want)
			}
		})
	}
	if b, _ := os.ReadFile(existing); string(b) != "precious" {
		t.Fatalf("existing file changed to %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("refused Make left %s/a behind", dir)
	}
}

// An image of SizeFor's size holds the tree with at least a quarter of the
// content free and a quarter of the inodes spare, both for a tree of many
// tiny files (inode-bound) and for one of big files (block-bound).
func TestSizeForFits(t *testing.T) {
	requireTools(t)
	t.Run("many tiny files", func(t *testing.T) {
		// 20k entries: past the 16k inodes of the minimum size, so the
		// inode bound decides. Creating them takes ~30 s on a slow disk.
		testutil.SkipShort(t, "creates 20,000 files")
		tree := t.TempDir()
		for d := range 40 {
			sub := filepath.Join(tree, fmt.Sprintf("d%02d", d))
			if err := os.Mkdir(sub, 0o755); err != nil {
				t.Fatal(err)
			}
			for f := range 500 {
				if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%03d", f)), []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		checkSizeFor(t, tree, 20041)
	})
	t.Run("big files", func(t *testing.T) {
		tree := t.TempDir()
		chunk := make([]byte, 1<<20)
		for i := range chunk {
			chunk[i] = byte(i*31 + i>>11)
		}
		for n := range 3 {
			f, err := os.Create(filepath.Join(tree, fmt.Sprintf("blob%d", n)))
			if err != nil {
				t.Fatal(err)
			}
			for range 100 {
				if _, err := f.Write(chunk); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
		}
		checkSizeFor(t, tree, 4)
	})
}

func checkSizeFor(t *testing.T, tree string, entries int64) {
	t.Helper()
	size, err := SizeFor(t.Context(), tree)
	if err != nil {
		t.Fatal(err)
	}
	var content int64
	if err := filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
		if fi, err := d.Info(); err == nil && fi.Mode().IsRegular() {
			content += roundUp(fi.Size(), 4096)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "disk.ext4")
	if err := Make(t.Context(), tree, img, size, MakeOptions{}); err != nil {
		t.Fatalf("Make at SizeFor's %d bytes: %v", size, err)
	}
	info, err := CheckSuperblock(img)
	if err != nil {
		t.Fatal(err)
	}
	free := int64(info.FreeBlocks) * int64(info.BlockSize)
	if free < content/4 {
		t.Errorf("size %d MiB: %d MiB free, want at least a quarter of the %d MiB content", size>>20, free>>20, content>>20)
	}
	if int64(info.FreeInodes) < entries/4 {
		t.Errorf("size %d MiB: %d inodes free, want at least a quarter of %d entries", size>>20, info.FreeInodes, entries)
	}
	t.Logf("%d entries, %d MiB content → %d MiB image, %d MiB and %d inodes free", entries, content>>20, size>>20, free>>20, info.FreeInodes)
}

// sizeForContent's floor, inode bound and growth with content.
func TestSizeForContent(t *testing.T) {
	tests := []struct {
		name          string
		data, inodes  int64
		atLeast, most int64
	}{
		{"empty tree gets the minimum", 0, 1, 256 << 20, 256 << 20},
		{"100 MiB of data", 100 << 20, 1000, 256 << 20, 256 << 20},
		{"1 GiB of data", 1 << 30, 30000, (1<<30)*5/4 + 64<<20, 1700 << 20},
		{"200k inodes of nothing", 0, 200000, 200012 * 5 / 4 * 16384, 200012*5/4*16384 + 1<<20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := sizeForContent(tt.data, tt.inodes)
			if got < tt.atLeast || got > tt.most || got%(1<<20) != 0 {
				t.Fatalf("sizeForContent(%d, %d) = %d MiB, want whole MiB in [%d, %d] MiB", tt.data, tt.inodes, got>>20, tt.atLeast>>20, tt.most>>20)
			}
		})
	}
}
