package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/bangerhq/banger/internal/testutil"
)

// testSourceSize and testSourceData shape the source image of the clone
// tests: a leading hole, three data extents, holes between them and a long
// trailing hole, like a freshly made ext4 image.
const testSourceSize = 64 << 20

var testSourceData = []sourceExtent{{1 << 20, 1 << 20}, {8 << 20, 300 << 10}, {40 << 20, 4 << 20}}

// hostDirNoReflink returns a temporary directory on the host filesystem, and
// skips when that filesystem can reflink (the tests using it need one that
// cannot).
func hostDirNoReflink(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	probe := filepath.Join(dir, "probe")
	if err := os.WriteFile(probe, []byte("probe"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.Remove(probe) }()
	if probeReflink(probe, dir) == nil {
		t.Skip("the host temp dir supports reflink; this test needs a filesystem that does not")
	}
	return dir
}

// mkdirs makes and returns subdirectories of parent.
func mkSubdirs(t *testing.T, parent string, names ...string) []string {
	t.Helper()
	var dirs []string
	for _, n := range names {
		d := filepath.Join(parent, n)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, d)
	}
	return dirs
}

// fakeSnapshots is a SnapshotBackend test double: the real one is the root
// helper's device-mapper code, which cannot run here.
type fakeSnapshots struct {
	device    string // returned by CreateSnapshot
	createErr error
	removeErr error
	created   []string // "vmID origin" per CreateSnapshot call
	removed   []string // vmID per RemoveSnapshot call
}

func (f *fakeSnapshots) CreateSnapshot(_ context.Context, vmID, origin string) (string, error) {
	f.created = append(f.created, vmID+" "+origin)
	if f.createErr != nil {
		return "", f.createErr
	}
	return f.device, nil
}

func (f *fakeSnapshots) RemoveSnapshot(_ context.Context, vmID string) error {
	f.removed = append(f.removed, vmID)
	return f.removeErr
}

// ChooseCloner takes the first strategy that works for the actual source
// and destination, in the order dm-snapshot, reflink, qcow2, sparse copy,
// and its probing leaves nothing behind.
func TestChooseCloner(t *testing.T) {
	// setup returns the source image and the destination directory.
	type setup func(t *testing.T) (src, dstDir string)
	onDir := func(dir func(*testing.T) string) setup {
		return func(t *testing.T) (string, string) {
			d := mkSubdirs(t, dir(t), "images", "vms")
			src := filepath.Join(d[0], "rootfs.ext4")
			makeSparseSource(t, src, 1<<20, []sourceExtent{{0, 128 << 10}})
			return src, d[1]
		}
	}
	xfs := func(t *testing.T) string { return xfsReflinkFS(t, 512<<20) }
	twoXFS := func(t *testing.T) (string, string) {
		src := filepath.Join(xfs(t), "rootfs.ext4")
		makeSparseSource(t, src, 1<<20, []sourceExtent{{0, 128 << 10}})
		return src, xfs(t)
	}
	qemuImg := func(t *testing.T) {
		testutil.RequireCommand(t, "qemu-img")
	}
	tests := []struct {
		name  string
		setup setup
		opts  CloneOptions
		needs func(*testing.T)
		want  CloneStrategy
	}{
		{"snapshot backend first", onDir(func(t *testing.T) string { return t.TempDir() }), CloneOptions{Snapshots: &fakeSnapshots{}, VMID: "vm1", AllowQCOW2: true}, nil, CloneDMSnapshot},
		{"reflink on XFS before qcow2", onDir(xfs), CloneOptions{AllowQCOW2: true}, nil, CloneReflink},
		{"reflink on XFS without QEMU", onDir(xfs), CloneOptions{}, nil, CloneReflink},
		{"no reflink across two XFS filesystems", twoXFS, CloneOptions{AllowQCOW2: true}, qemuImg, CloneQCOW2},
		{"no reflink on ext4, QEMU", onDir(func(t *testing.T) string { return ext4FS(t, 64<<20) }), CloneOptions{AllowQCOW2: true}, qemuImg, CloneQCOW2},
		{"no reflink on ext4, Firecracker", onDir(func(t *testing.T) string { return ext4FS(t, 64<<20) }), CloneOptions{}, nil, CloneSparseCopy},
		{"host fs, QEMU", onDir(hostDirNoReflink), CloneOptions{AllowQCOW2: true}, qemuImg, CloneQCOW2},
		{"host fs, QEMU without qemu-img", onDir(hostDirNoReflink), CloneOptions{AllowQCOW2: true, QemuImg: "/nonexistent/qemu-img"}, nil, CloneSparseCopy},
		{"host fs, Firecracker", onDir(hostDirNoReflink), CloneOptions{}, nil, CloneSparseCopy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needs != nil {
				tt.needs(t)
			}
			src, dstDir := tt.setup(t)
			c, err := ChooseCloner(t.Context(), src, dstDir, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if c.Strategy() != tt.want {
				t.Fatalf("ChooseCloner chose %q, want %q", c.Strategy(), tt.want)
			}
			if left := listDir(t, dstDir); len(left) != 0 && (len(left) != 1 || left[0] != "lost+found") {
				t.Fatalf("probing left %v in the destination directory", left)
			}
		})
	}
}

// ChooseCloner refuses sources and destinations no strategy can use.
func TestChooseClonerRejects(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "rootfs.ext4")
	makeSparseSource(t, src, 1<<20, nil)
	tests := []struct {
		name    string
		src     string
		dstDir  string
		opts    CloneOptions
		wantErr string
	}{
		{"missing source", filepath.Join(dir, "nope"), dir, CloneOptions{}, "no such file"},
		{"source is a directory", dir, dir, CloneOptions{}, "not a regular file"},
		{"missing destination directory", src, filepath.Join(dir, "nope"), CloneOptions{}, "no such file"},
		{"destination is a file", src, src, CloneOptions{}, "not a directory"},
		{"snapshot backend without a VM id", src, dir, CloneOptions{Snapshots: &fakeSnapshots{}}, "needs a VM id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ChooseCloner(t.Context(), tt.src, tt.dstDir, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ChooseCloner = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

// NewCloner rebuilds the cloner of a recorded strategy, with the disk
// format each strategy produces, and refuses what it cannot build.
func TestNewCloner(t *testing.T) {
	snap := CloneOptions{Snapshots: &fakeSnapshots{}, VMID: "vm1"}
	tests := []struct {
		strategy   CloneStrategy
		opts       CloneOptions
		wantFormat DiskFormat
		wantErr    string
	}{
		{CloneDMSnapshot, snap, DiskRaw, ""},
		{CloneReflink, CloneOptions{}, DiskRaw, ""},
		{CloneQCOW2, CloneOptions{}, DiskQCOW2, ""},
		{CloneSparseCopy, CloneOptions{}, DiskRaw, ""},
		{CloneDMSnapshot, CloneOptions{}, "", "needs a snapshot backend (hint: is banger-helper running?)"},
		{CloneDMSnapshot, CloneOptions{Snapshots: &fakeSnapshots{}}, "", "needs a VM id"},
		{"rsync", CloneOptions{}, "", `unknown clone strategy "rsync"`},
	}
	for _, tt := range tests {
		c, err := NewCloner(tt.strategy, tt.opts)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("NewCloner(%q) = %v, want error containing %q", tt.strategy, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("NewCloner(%q): %v", tt.strategy, err)
			continue
		}
		if c.Strategy() != tt.strategy || c.Format() != tt.wantFormat {
			t.Errorf("NewCloner(%q) = %q/%q, want %q/%q", tt.strategy, c.Strategy(), c.Format(), tt.strategy, tt.wantFormat)
		}
	}
}

// readDisk returns a clone's guest-visible content: the file itself for
// raw disks, a raw conversion for qcow2.
func readDisk(t *testing.T, c Cloner, path string) []byte {
	t.Helper()
	if c.Format() == DiskRaw {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	raw := filepath.Join(t.TempDir(), "converted.raw")
	runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeDisk writes data at off as the guest would.
func writeDisk(t *testing.T, c Cloner, path string, off int64, data []byte) {
	t.Helper()
	if c.Format() == DiskRaw {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		return
	}
	src := filepath.Join(t.TempDir(), "chunk")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.RequireCommand(t, "qemu-io")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -q -s %s %d %d", src, off, len(data)), path)
}

// checkSharesExtents pins that a reflink clone really shares its data
// extents with the source instead of having copied them.
func checkSharesExtents(t *testing.T, src, dst string) {
	testutil.RequireCommand(t, "filefrag")
	out := runTool(t, "filefrag", "-v", dst)
	var data, shared int
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, "..") || !strings.Contains(line, ":") {
			continue
		}
		data++
		if strings.Contains(line, "shared") {
			shared++
		}
	}
	if data == 0 || shared != data {
		t.Fatalf("%d of %d extents of the reflink clone are shared:\n%s", shared, data, out)
	}
}

// checkHolesKept pins that a sparse copy allocates no more than the source.
func checkHolesKept(t *testing.T, src, dst string) {
	got, want := allocatedBytes(t, dst), allocatedBytes(t, src)
	if got > want+64<<10 || got < 5<<20 {
		t.Fatalf("clone allocates %d bytes, source %d: holes not preserved", got, want)
	}
}

// checkBacking pins that a qcow2 clone is a small overlay over the source,
// by absolute path, as a raw backing file.
func checkBacking(t *testing.T, src, dst string) {
	info, err := readQCOW2Info(t.Context(), "qemu-img", dst)
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(src)
	want := qcow2Info{Format: "qcow2", VirtualSize: testSourceSize, BackingFilename: abs, BackingFilenameFull: abs, BackingFormat: "raw"}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Fatalf("qemu-img info (-want +got):\n%s", diff)
	}
	if a := allocatedBytes(t, dst); a > 1<<20 {
		t.Fatalf("overlay allocates %d bytes, want a small header-only file", a)
	}
}

// Every strategy makes a disk that reads exactly like the source, takes
// writes that never reach the source, refuses to replace an existing disk,
// and is removed without trace.
func TestCloneStrategies(t *testing.T) {
	type dirs func(t *testing.T) (srcDir, dstDir string)
	same := func(mount func(*testing.T) string) dirs {
		return func(t *testing.T) (string, string) {
			d := mkSubdirs(t, mount(t), "images", "vms/vm1")
			return d[0], d[1]
		}
	}
	xfs := func(t *testing.T) string { return xfsReflinkFS(t, 512<<20) }
	ext4 := func(t *testing.T) string { return ext4FS(t, 256<<20) }
	tests := []struct {
		name   string
		cloner Cloner
		dirs   dirs
		needs  []string
		check  func(t *testing.T, src, dst string)
	}{
		{"reflink on XFS", reflinkCloner{}, same(xfs), nil, checkSharesExtents},
		{"sparse copy on ext4", sparseCopyCloner{}, same(ext4), nil, checkHolesKept},
		{"sparse copy from XFS to ext4", sparseCopyCloner{}, func(t *testing.T) (string, string) { return xfs(t), ext4(t) }, nil, checkHolesKept},
		{"sparse copy on the host filesystem", sparseCopyCloner{}, same(func(t *testing.T) string { return t.TempDir() }), nil, checkHolesKept},
		{"qcow2 on ext4", qcow2Cloner{qemuImg: "qemu-img"}, same(ext4), []string{"qemu-img", "qemu-io"}, checkBacking},
		{"qcow2 on the host filesystem", qcow2Cloner{qemuImg: "qemu-img"}, same(func(t *testing.T) string { return t.TempDir() }), []string{"qemu-img", "qemu-io"}, checkBacking},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testutil.RequireCommand(t, tt.needs...)
			srcDir, dstDir := tt.dirs(t)
			src := filepath.Join(srcDir, "rootfs.ext4")
			makeSparseSource(t, src, testSourceSize, testSourceData)
			srcSum := testutil.SHA256File(t, src)
			want, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			before := listDir(t, dstDir)

			dst := filepath.Join(dstDir, "disk")
			if err := tt.cloner.Clone(t.Context(), src, dst); err != nil {
				t.Fatalf("Clone: %v", err)
			}
			if diff := cmp.Diff(append(before, "disk"), listDir(t, dstDir), cmpopts.SortSlices(func(a, b string) bool { return a < b })); diff != "" {
				t.Fatalf("destination directory after Clone (-want +got):\n%s", diff)
			}
			if !bytes.Equal(readDisk(t, tt.cloner, dst), want) {
				t.Fatal("the clone does not read like the source")
			}
			tt.check(t, src, dst)

			// Guest writes: over data, into a hole, at the very end.
			writes := []struct {
				off  int64
				data []byte
			}{
				{1 << 20, bytes.Repeat([]byte{0xab}, 64<<10)},
				{20 << 20, bytes.Repeat([]byte{0xcd}, 4096)},
				{testSourceSize - 512, bytes.Repeat([]byte{0xef}, 512)},
			}
			for _, w := range writes {
				writeDisk(t, tt.cloner, dst, w.off, w.data)
				copy(want[w.off:], w.data)
			}
			if got := testutil.SHA256File(t, src); got != srcSum {
				t.Fatalf("writing to the clone changed the source: sha256 %s, was %s", got, srcSum)
			}
			if !bytes.Equal(readDisk(t, tt.cloner, dst), want) {
				t.Fatal("the clone does not read back what was written to it")
			}

			cloneSum := testutil.SHA256File(t, dst)
			if err := tt.cloner.Clone(t.Context(), src, dst); !errors.Is(err, fs.ErrExist) {
				t.Fatalf("Clone over an existing disk = %v, want fs.ErrExist", err)
			}
			if got := testutil.SHA256File(t, dst); got != cloneSum {
				t.Fatal("a refused Clone changed the existing disk")
			}

			if err := tt.cloner.Remove(t.Context(), dst); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			if diff := cmp.Diff(before, listDir(t, dstDir)); diff != "" {
				t.Fatalf("destination directory after Remove (-want +got):\n%s", diff)
			}
			if err := tt.cloner.Remove(t.Context(), dst); err != nil {
				t.Fatalf("second Remove: %v", err)
			}
			if got := testutil.SHA256File(t, src); got != srcSum {
				t.Fatal("Remove changed the source")
			}
		})
	}
}

// A failed or cancelled Clone leaves nothing in the destination directory.
func TestCloneFailureLeavesNothing(t *testing.T) {
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		name    string
		cloner  func(t *testing.T) Cloner
		ctx     context.Context
		src     func(t *testing.T, good string) string
		wantErr string
	}{
		{"sparse copy, cancelled", func(*testing.T) Cloner { return sparseCopyCloner{} }, cancelled, nil, "context canceled"},
		{"sparse copy, missing source", func(*testing.T) Cloner { return sparseCopyCloner{} }, nil,
			func(t *testing.T, good string) string { return good + ".missing" }, "no such file"},
		{"reflink where the filesystem cannot", func(t *testing.T) Cloner { hostDirNoReflink(t); return reflinkCloner{} }, nil, nil, "FICLONE"},
		{"reflink, cancelled", func(*testing.T) Cloner { return reflinkCloner{} }, cancelled, nil, "context canceled"},
		{"qcow2, backing file name too long for QEMU", func(*testing.T) Cloner { return qcow2Cloner{} }, nil,
			func(t *testing.T, good string) string {
				d := filepath.Join(t.TempDir(), strings.Repeat("d", 250), strings.Repeat("d", 250), strings.Repeat("d", 250), strings.Repeat("d", 250))
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
				p := filepath.Join(d, "rootfs.ext4")
				makeSparseSource(t, p, 1<<20, nil)
				return p
			}, "more than the 1023 QEMU opens"},
		{"qcow2, cancelled", func(*testing.T) Cloner { return qcow2Cloner{} }, cancelled, nil, "context canceled"},
		{"qcow2, colon in the source path", func(*testing.T) Cloner { return qcow2Cloner{qemuImg: "qemu-img"} }, nil,
			func(t *testing.T, good string) string {
				p := filepath.Join(t.TempDir(), "nbd:evil")
				makeSparseSource(t, p, 1<<20, nil)
				return p
			}, "protocol prefix"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.cloner(t)
			dir := t.TempDir()
			src := filepath.Join(t.TempDir(), "rootfs.ext4")
			makeSparseSource(t, src, 8<<20, []sourceExtent{{0, 1 << 20}})
			if tt.src != nil {
				src = tt.src(t, src)
			}
			ctx := tt.ctx
			if ctx == nil {
				ctx = t.Context()
			}
			err := c.Clone(ctx, src, filepath.Join(dir, "disk"))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Clone = %v, want error containing %q", err, tt.wantErr)
			}
			if left := listDir(t, dir); len(left) != 0 {
				t.Fatalf("a failed Clone left %v", left)
			}
		})
	}
}

// Remove also deletes the temporary files an interrupted Clone (a killed
// daemon) left beside the disk, and nothing else.
func TestRemoveCleansInterruptedClones(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"disk", ".disk.clone-123456", ".disk.clone-999", "disk2", ".disk2.clone-1", "seed.img"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := (sparseCopyCloner{}).Remove(t.Context(), filepath.Join(dir, "disk")); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{".disk2.clone-1", "disk2", "seed.img"}, listDir(t, dir)); diff != "" {
		t.Fatalf("left in the directory (-want +got):\n%s", diff)
	}
}

// Grow enlarges raw and qcow2 disks to the requested size, keeps their
// content, refuses to shrink them, and names what it cannot grow.
func TestGrow(t *testing.T) {
	t.Run("raw", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "disk")
		makeSparseSource(t, p, 8<<20, []sourceExtent{{0, 1 << 20}})
		sum := testutil.SHA256File(t, p)
		blocks := allocatedBytes(t, p)
		if err := Grow(t.Context(), p, DiskRaw, 8<<20); err != nil {
			t.Fatalf("Grow to the same size: %v", err)
		}
		if err := Grow(t.Context(), p, DiskRaw, 32<<20); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != 32<<20 {
			t.Fatalf("size %d after Grow, want %d", st.Size(), 32<<20)
		}
		if a := allocatedBytes(t, p); a != blocks {
			t.Fatalf("Grow allocated %d bytes, was %d: the new space must be a hole", a, blocks)
		}
		if err := os.Truncate(p, 8<<20); err != nil {
			t.Fatal(err)
		}
		if got := testutil.SHA256File(t, p); got != sum {
			t.Fatal("Grow changed the existing content")
		}
		if err := Grow(t.Context(), p, DiskRaw, 4<<20); !errors.Is(err, ErrShrink) {
			t.Fatalf("Grow to a smaller size = %v, want ErrShrink", err)
		}
		if st, _ := os.Stat(p); st.Size() != 8<<20 {
			t.Fatalf("a refused shrink changed the size to %d", st.Size())
		}
	})
	t.Run("qcow2", func(t *testing.T) {
		testutil.RequireCommand(t, "qemu-img")
		dir := t.TempDir()
		src, dst := filepath.Join(dir, "rootfs"), filepath.Join(dir, "disk.qcow2")
		makeSparseSource(t, src, 8<<20, []sourceExtent{{0, 1 << 20}})
		if err := (qcow2Cloner{qemuImg: "qemu-img"}).Clone(t.Context(), src, dst); err != nil {
			t.Fatal(err)
		}
		if err := Grow(t.Context(), dst, DiskQCOW2, 64<<20); err != nil {
			t.Fatal(err)
		}
		info, err := readQCOW2Info(t.Context(), "qemu-img", dst)
		if err != nil {
			t.Fatal(err)
		}
		if info.VirtualSize != 64<<20 || info.BackingFormat != "raw" {
			t.Fatalf("after Grow: %+v, want virtual size %d over a raw backing file", info, 64<<20)
		}
		if err := Grow(t.Context(), dst, DiskQCOW2, 16<<20); !errors.Is(err, ErrShrink) {
			t.Fatalf("Grow to a smaller size = %v, want ErrShrink", err)
		}
		if err := Grow(t.Context(), src, DiskQCOW2, 64<<20); err == nil {
			t.Fatal("Grow of a raw file as qcow2 succeeded")
		}
	})
	t.Run("rejects", func(t *testing.T) {
		dir := t.TempDir()
		p := filepath.Join(dir, "disk")
		makeSparseSource(t, p, 1<<20, nil)
		dev := filepath.Join(dir, "dev")
		if err := os.Symlink("/dev/null", dev); err != nil {
			t.Fatal(err)
		}
		tests := []struct {
			name    string
			path    string
			format  DiskFormat
			size    int64
			wantErr string
		}{
			{"unaligned size", p, DiskRaw, 1<<20 + 1, "not a positive multiple of 512"},
			{"zero size", p, DiskRaw, 0, "not a positive multiple of 512"},
			{"missing disk", filepath.Join(dir, "nope"), DiskRaw, 2 << 20, "no such file"},
			{"device", dev, DiskRaw, 2 << 20, "not a regular file"},
			{"unknown format", p, "vmdk", 2 << 20, `unknown disk format "vmdk"`},
		}
		for _, tt := range tests {
			err := Grow(t.Context(), tt.path, tt.format, tt.size)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: Grow = %v, want error containing %q", tt.name, err, tt.wantErr)
			}
		}
	})
}

// The dm-snapshot strategy asks the backend for a snapshot by VM id, records
// it as a symlink at the disk path, undoes the snapshot on every later
// failure, and removes the snapshot before its symlink.
func TestDMSnapshotCloner(t *testing.T) {
	newSrc := func(t *testing.T) string {
		p := filepath.Join(t.TempDir(), "rootfs.ext4")
		makeSparseSource(t, p, 1<<20, nil)
		return p
	}
	t.Run("clone and remove", func(t *testing.T) {
		src, dir := newSrc(t), t.TempDir()
		dst := filepath.Join(dir, "disk")
		fake := &fakeSnapshots{device: "/dev/mapper/bgr-vm1"}
		c := dmSnapshotCloner{backend: fake, vmID: "vm1"}
		if err := c.Clone(t.Context(), src, dst); err != nil {
			t.Fatal(err)
		}
		if target, err := os.Readlink(dst); err != nil || target != "/dev/mapper/bgr-vm1" {
			t.Fatalf("disk path links to %q (%v), want the snapshot device", target, err)
		}
		if err := c.Clone(t.Context(), src, dst); !errors.Is(err, fs.ErrExist) {
			t.Fatalf("second Clone = %v, want fs.ErrExist", err)
		}
		if err := c.Remove(t.Context(), dst); err != nil {
			t.Fatal(err)
		}
		if err := c.Remove(t.Context(), dst); err != nil {
			t.Fatalf("second Remove: %v", err)
		}
		if diff := cmp.Diff([]string{"vm1 " + src}, fake.created); diff != "" {
			t.Errorf("CreateSnapshot calls (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff([]string{"vm1", "vm1"}, fake.removed); diff != "" {
			t.Errorf("RemoveSnapshot calls (-want +got):\n%s", diff)
		}
		if left := listDir(t, dir); len(left) != 0 {
			t.Errorf("left after Remove: %v", left)
		}
	})

	failures := []struct {
		name        string
		fake        fakeSnapshots
		dst         func(dir string) string
		wantErr     string
		wantRemoved []string
	}{
		{"backend fails", fakeSnapshots{createErr: errors.New("dm-mod not loaded")}, nil, "create snapshot: dm-mod not loaded", nil},
		{"device outside /dev", fakeSnapshots{device: "/etc/shadow"}, nil, "not a clean path under /dev", []string{"vm1"}},
		{"relative device", fakeSnapshots{device: "dev/mapper/x"}, nil, "not a clean path under /dev", []string{"vm1"}},
		{"device path escaping /dev", fakeSnapshots{device: "/dev/../etc/shadow"}, nil, "not a clean path under /dev", []string{"vm1"}},
		{"symlink cannot be made", fakeSnapshots{device: "/dev/mapper/bgr-vm1"}, func(dir string) string { return filepath.Join(dir, "missing", "disk") }, "no such file", []string{"vm1"}},
		{"undo fails too", fakeSnapshots{device: "/tmp/x", removeErr: errors.New("device busy")}, nil, "undo: remove snapshot: device busy", []string{"vm1"}},
	}
	for _, tt := range failures {
		t.Run(tt.name, func(t *testing.T) {
			src, dir := newSrc(t), t.TempDir()
			dst := filepath.Join(dir, "disk")
			if tt.dst != nil {
				dst = tt.dst(dir)
			}
			fake := tt.fake
			err := dmSnapshotCloner{backend: &fake, vmID: "vm1"}.Clone(t.Context(), src, dst)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Clone = %v, want error containing %q", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.wantRemoved, fake.removed); diff != "" {
				t.Errorf("RemoveSnapshot calls (-want +got):\n%s", diff)
			}
			if left := listDir(t, dir); len(left) != 0 {
				t.Errorf("left after a failed Clone: %v", left)
			}
		})
	}

	t.Run("remove keeps the symlink when the backend fails", func(t *testing.T) {
		dst := filepath.Join(t.TempDir(), "disk")
		if err := os.Symlink("/dev/mapper/bgr-vm1", dst); err != nil {
			t.Fatal(err)
		}
		fake := &fakeSnapshots{removeErr: errors.New("device busy")}
		if err := (dmSnapshotCloner{backend: fake, vmID: "vm1"}).Remove(t.Context(), dst); err == nil || !strings.Contains(err.Error(), "device busy") {
			t.Fatalf("Remove = %v, want the backend's error", err)
		}
		if _, err := os.Lstat(dst); err != nil {
			t.Fatalf("the symlink is gone after a failed Remove: %v", err)
		}
	})
	t.Run("remove refuses a file that is not its symlink", func(t *testing.T) {
		dst := filepath.Join(t.TempDir(), "disk")
		makeSparseSource(t, dst, 4096, nil)
		fake := &fakeSnapshots{}
		if err := (dmSnapshotCloner{backend: fake, vmID: "vm1"}).Remove(t.Context(), dst); err == nil || !strings.Contains(err.Error(), "not a symlink") {
			t.Fatalf("Remove = %v, want a not-a-symlink error", err)
		}
		if len(fake.removed) != 0 {
			t.Fatalf("RemoveSnapshot called for a file that is not a snapshot clone")
		}
	})
}
