package ext4

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
)

// Fsck passes a fresh image and reports a damaged one with ErrNotClean and
// e2fsck's own account of the damage.
func TestFsck(t *testing.T) {
	requireTools(t)
	ctx := t.Context()
	img := newImage(t, 64<<20, map[string]treeFile{"etc/hostname": {mode: 0o644, data: "x\n"}})
	if err := Fsck(ctx, img); err != nil {
		t.Fatalf("fresh image: %v", err)
	}
	// clri zeroes the inode but leaves its directory entry: a classic
	// e2fsck finding.
	res, err := run(ctx, "", "debugfs", "-w", "-R", "clri /etc/hostname", img)
	if err != nil || res.Exit != 0 {
		t.Fatalf("damage image: %v %s", err, res.Out)
	}
	err = Fsck(ctx, img)
	if !errors.Is(err, ErrNotClean) || !strings.Contains(err.Error(), "hostname") {
		t.Fatalf("Fsck of damaged image = %v, want ErrNotClean naming hostname", err)
	}
}

// Fsck of something that is not a file system is an error, but not
// ErrNotClean: nothing was checked.
func TestFsckNotExt4(t *testing.T) {
	requireTools(t)
	p := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	err := Fsck(t.Context(), p)
	if err == nil || errors.Is(err, ErrNotClean) {
		t.Fatalf("Fsck(junk) = %v, want an operational error", err)
	}
}

// Resize grows file and file system together, keeps the content, and
// leaves e2fsck clean; asking for the current size is a no-op and asking
// for less is refused without touching the image.
func TestResize(t *testing.T) {
	requireTools(t)
	ctx := t.Context()
	img := newImage(t, 64<<20, map[string]treeFile{"etc/hostname": {mode: 0o644, data: "kept\n"}})
	if err := Resize(ctx, img, 320<<20); err != nil {
		t.Fatal(err)
	}
	info, err := CheckSuperblock(img)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size() != 320<<20 {
		t.Errorf("file system is %d bytes, want 320 MiB", info.Size())
	}
	if fi, _ := os.Stat(img); fi.Size() != 320<<20 {
		t.Errorf("file is %d bytes, want 320 MiB", fi.Size())
	}
	if err := Fsck(ctx, img); err != nil {
		t.Error(err)
	}
	if b, err := ReadFile(ctx, img, "/etc/hostname"); err != nil || string(b) != "kept\n" {
		t.Errorf("hostname after resize = %q, %v", b, err)
	}
	if err := Resize(ctx, img, 320<<20); err != nil {
		t.Errorf("resize to the same size: %v", err)
	}
	before := testutil.SHA256File(t, img)
	if err := Resize(ctx, img, 128<<20); err == nil || !strings.Contains(err.Error(), "shrinking") {
		t.Errorf("Resize down = %v, want a refusal", err)
	}
	if testutil.SHA256File(t, img) != before {
		t.Error("refused shrink changed the image")
	}
}

// Resize refuses a file that is not ext4 before running e2fsck on it.
func TestResizeNotExt4(t *testing.T) {
	p := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Resize(t.Context(), p, 2<<20); !errors.Is(err, ErrNotExt4) {
		t.Fatalf("Resize(junk) = %v, want ErrNotExt4", err)
	}
	if fi, _ := os.Stat(p); fi.Size() != 1<<20 {
		t.Fatal("refused resize changed the file's size")
	}
}
