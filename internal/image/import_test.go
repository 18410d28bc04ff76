package image

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
)

// A vmlinux extracted from the Debian cloud kernel has the PVH entry
// QEMU needs; an ELF without the note is told apart.
func TestPVHEntry(t *testing.T) {
	kernel, _ := testutil.DebianKernel(t)
	vmlinux := filepath.Join(t.TempDir(), "vmlinux")
	if err := ExtractVmlinux(t.Context(), kernel, vmlinux); err != nil {
		t.Fatal(err)
	}
	if ok, err := hasPVHEntry(vmlinux); err != nil || !ok {
		t.Errorf("Debian cloud vmlinux: PVH entry %v, %v; want true", ok, err)
	}
	self, err := os.Executable() // an x86-64 ELF without Xen notes
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := hasPVHEntry(self); err != nil || ok {
		t.Errorf("test binary: PVH entry %v, %v; want false", ok, err)
	}
}

// pvhEntry survives any input: imported kernels are untrusted.
func FuzzPVHEntry(f *testing.F) {
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	if self, err := os.Executable(); err == nil {
		if b, err := os.ReadFile(self); err == nil {
			f.Add(b[:min(len(b), 1<<16)])
		}
	}
	f.Add(bytes.Repeat([]byte{0}, 64))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = pvhEntry(bytes.NewReader(b))
	})
}
