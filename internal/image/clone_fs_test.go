package image

import (
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/testutil"
)

// run runs a command that a test needs to succeed.
func runTool(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// loopFS makes a fresh filesystem of fstype (mkfs.<fstype> with mkfsArgs)
// in a sparse file of size bytes, mounts it through a loop device in a
// temporary directory, and returns the mount point. Cleanup unmounts it,
// detaches the loop device and removes the file, in that order.
func loopFS(t testing.TB, fstype string, size int64, mkfsArgs ...string) string {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "losetup", "mount", "umount", "mkfs."+fstype)
	dir := t.TempDir()
	backing := filepath.Join(dir, fstype+".img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, size); err != nil {
		t.Fatal(err)
	}
	runTool(t, "mkfs."+fstype, append(mkfsArgs, backing)...)
	// Direct I/O keeps the host's page cache out of the loop device, so the
	// filesystem behaves (and syncs) like one on a real disk.
	dev := strings.TrimSpace(runTool(t, "losetup", "--find", "--show", "--direct-io=on", backing))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	runTool(t, "mount", "-t", fstype, dev, mnt)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

// syncFS flushes the filesystem holding path (syncfs(2)), so that the next
// measurement does not pay for earlier writes.
func syncFS(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatalf("syncfs %s: %v", path, err)
	}
}

// xfsReflinkFS is an XFS filesystem with reflink enabled, the filesystem
// reflink clones are tested on.
func xfsReflinkFS(t testing.TB, size int64) string {
	return loopFS(t, "xfs", size, "-q", "-f", "-m", "reflink=1")
}

// ext4FS is an ext4 filesystem, which has no reflink.
func ext4FS(t testing.TB, size int64) string {
	return loopFS(t, "ext4", size, "-q", "-F")
}

// extent is a range of a source image that holds data.
type sourceExtent struct{ off, len int64 }

// makeSource writes a sparse file of size bytes at path whose data extents
// hold pseudo-random (incompressible) bytes and whose other ranges are holes.
func makeSparseSource(t testing.TB, path string, size int64, data []sourceExtent) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.NewChaCha8([32]byte{byte(size), byte(len(data))})
	for _, e := range data {
		if _, err := io.Copy(io.NewOffsetWriter(f, e.off), io.LimitReader(rng, e.len)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// allocated is the space a file really uses, in bytes (st_blocks).
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
