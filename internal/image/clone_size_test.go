package image

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
)

// A qcow2 overlay asked for a size beyond its source is created at that
// virtual size, consistent for qemu-img, so the VM's disk needs no Grow.
func TestQCOW2CloneWithSize(t *testing.T) {
	testutil.RequireCommand(t, "qemu-img")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	if err := os.WriteFile(src, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := NewCloner(CloneQCOW2, CloneOptions{Size: 8 << 30})
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "vm.qcow2")
	if err := c.Clone(t.Context(), src, dst); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", dst).Output()
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 8<<30 {
		t.Fatalf("virtual size %d, want 8GiB", info.VirtualSize)
	}
	if out, err := exec.Command("qemu-img", "check", dst).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
}
