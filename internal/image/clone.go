package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// CloneStrategy names how a VM's disk is made from an image's rootfs.
type CloneStrategy string

// The strategies, best first. ChooseCloner tries them in this order.
const (
	// CloneDMSnapshot is a device-mapper snapshot over a loop device of
	// the rootfs, made by the root helper: O(1), writes go to a COW store.
	CloneDMSnapshot CloneStrategy = "dm-snapshot"
	// CloneReflink shares the rootfs's extents (FICLONE): O(1) on XFS,
	// btrfs and other reflink filesystems, and independent of the rootfs
	// afterwards.
	CloneReflink CloneStrategy = "reflink"
	// CloneQCOW2 is a qcow2 overlay backed by the rootfs: O(1), QEMU only
	// (Firecracker reads raw disks alone).
	CloneQCOW2 CloneStrategy = "qcow2"
	// CloneSparseCopy copies the rootfs's data and keeps its holes: O(data),
	// works everywhere.
	CloneSparseCopy CloneStrategy = "sparse-copy"
)

// DiskFormat is the format of a VM disk as its VMM must open it.
type DiskFormat string

const (
	DiskRaw   DiskFormat = "raw"
	DiskQCOW2 DiskFormat = "qcow2"
)

// Cloner makes and removes per-VM disks with one strategy.
type Cloner interface {
	Strategy() CloneStrategy
	// Format is the format of the disks Clone makes.
	Format() DiskFormat
	// Clone makes dst, a disk whose content is src's and whose writes never
	// reach src. dst must not exist; on failure nothing is left at dst nor
	// beside it. qcow2 and dm-snapshot clones keep reading src, which must
	// outlive them.
	Clone(ctx context.Context, src, dst string) error
	// Remove deletes a disk Clone made, and any leftovers of an interrupted
	// Clone to dst. Removing a disk that is already gone succeeds, so that
	// reconciliation after a crash can call it blindly.
	Remove(ctx context.Context, dst string) error
}

// SnapshotBackend makes device-mapper snapshots. The root helper implements
// it; bangerd never touches loop devices or device-mapper itself.
type SnapshotBackend interface {
	// CreateSnapshot makes a writable copy-on-write block device for VM
	// vmID over origin (an image rootfs) and returns the device's path.
	CreateSnapshot(ctx context.Context, vmID, origin string) (device string, err error)
	// RemoveSnapshot tears down vmID's snapshot and its COW store.
	// Removing a snapshot that does not exist succeeds.
	RemoveSnapshot(ctx context.Context, vmID string) error
}

// CloneOptions say what this host and VM allow beyond plain files.
type CloneOptions struct {
	// Snapshots, when set (the root helper is reachable), makes
	// dm-snapshot the first choice.
	Snapshots SnapshotBackend
	// VMID names the VM the disk is for; dm-snapshot needs it.
	VMID string
	// AllowQCOW2 is set when the VM runs under QEMU, the one VMM that opens
	// qcow2 overlays.
	AllowQCOW2 bool
	// QemuImg is the qemu-img binary; empty means "qemu-img" on PATH.
	QemuImg string
	// Size, when larger than the source, is the virtual size a qcow2
	// overlay is created with, so that it needs no Grow afterwards (an
	// overlay may be larger than its backing file: QEMU reads zeros past
	// the backing file's end). Other strategies ignore it; grow them.
	Size int64
	// Logger receives the choice and the reasons for passing over a
	// strategy; nil discards them.
	Logger *slog.Logger
}

func (o CloneOptions) qemuImg() string {
	if o.QemuImg != "" {
		return o.QemuImg
	}
	return "qemu-img"
}

// ErrShrink is returned by Grow for a size below the disk's current one.
var ErrShrink = errors.New("shrinking a disk is refused")

// ChooseCloner returns the best strategy that works for cloning src into
// dstDir here: dm-snapshot when a snapshot backend is given, then reflink
// when the destination filesystem really clones src's extents (probed, not
// guessed from the filesystem type), then a qcow2 overlay when the VMM is
// QEMU and qemu-img is installed, then a sparse copy, which always works.
func ChooseCloner(ctx context.Context, src, dstDir string, opts CloneOptions) (Cloner, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := checkCloneSource(src); err != nil {
		return nil, fmt.Errorf("choose clone strategy: %w", err)
	}
	if st, err := os.Stat(dstDir); err != nil {
		return nil, fmt.Errorf("choose clone strategy: %w", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("choose clone strategy: %q is not a directory", dstDir)
	}

	pick := func(c Cloner) (Cloner, error) {
		log.Debug("chose disk clone strategy", "strategy", c.Strategy(), "src", src, "dir", dstDir)
		return c, nil
	}
	if opts.Snapshots != nil {
		c, err := NewCloner(CloneDMSnapshot, opts)
		if err != nil {
			return nil, fmt.Errorf("choose clone strategy: %w", err)
		}
		return pick(c)
	}
	if err := probeReflink(src, dstDir); err != nil {
		log.Debug("disk clone strategy unavailable", "strategy", CloneReflink, "reason", err)
	} else {
		return pick(reflinkCloner{})
	}
	if !opts.AllowQCOW2 {
		log.Debug("disk clone strategy unavailable", "strategy", CloneQCOW2, "reason", "the VMM does not open qcow2")
	} else if _, err := exec.LookPath(opts.qemuImg()); err != nil {
		log.Debug("disk clone strategy unavailable", "strategy", CloneQCOW2, "reason", err)
	} else {
		return pick(qcow2Cloner{qemuImg: opts.qemuImg(), size: opts.Size})
	}
	return pick(sparseCopyCloner{})
}

// NewCloner returns the cloner of a given strategy without probing, for
// removing a disk whose strategy was recorded when it was made.
func NewCloner(strategy CloneStrategy, opts CloneOptions) (Cloner, error) {
	switch strategy {
	case CloneDMSnapshot:
		if opts.Snapshots == nil {
			return nil, errors.New("dm-snapshot clone needs a snapshot backend (hint: is banger-helper running?)")
		}
		if opts.VMID == "" {
			return nil, errors.New("dm-snapshot clone needs a VM id")
		}
		return dmSnapshotCloner{backend: opts.Snapshots, vmID: opts.VMID}, nil
	case CloneReflink:
		return reflinkCloner{}, nil
	case CloneQCOW2:
		return qcow2Cloner{qemuImg: opts.qemuImg(), size: opts.Size}, nil
	case CloneSparseCopy:
		return sparseCopyCloner{}, nil
	}
	return nil, fmt.Errorf("unknown clone strategy %q", strategy)
}

// checkCloneSource accepts a regular file, the only kind of image rootfs.
func checkCloneSource(src string) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("clone source %q is not a regular file", src)
	}
	return nil
}

// cloneTmpInfix marks the temporary files a Clone to dst makes beside it:
// "." + base(dst) + cloneTmpInfix + random. Remove finds leftovers by it.
const cloneTmpInfix = ".clone-"

// createFileClone makes dst through a temporary file in dst's directory that
// fill writes. dst appears only once fill succeeded and the file is synced,
// and never replaces an existing file; on failure the temporary file is gone.
func createFileClone(dst string, fill func(tmp *os.File) error) (err error) {
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%q: %w", dst, fs.ErrExist)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	dir, base := filepath.Split(dst)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+cloneTmpInfix+"*")
	if err != nil {
		return fmt.Errorf("create temporary clone: %w", err)
	}
	defer func() {
		tmp.Close()
		if err != nil {
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := fill(tmp); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %q: %w", tmp.Name(), err)
	}
	if err := renameNoReplace(tmp.Name(), dst); err != nil {
		return err
	}
	return syncDir(dir)
}

// renameNoReplace moves oldpath to newpath unless newpath exists.
func renameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: link(2) refuses an
		// existing target just the same.
		if err = os.Link(oldpath, newpath); err == nil {
			return os.Remove(oldpath)
		}
	}
	if err != nil {
		return fmt.Errorf("rename %q to %q: %w", oldpath, newpath, err)
	}
	return nil
}

// removeFileClone deletes dst and the temporary files of interrupted
// clones to dst.
func removeFileClone(dst string) error {
	var errs []error
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	dir, base := filepath.Split(dst)
	if dir == "" {
		dir = "."
	}
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "."+base+cloneTmpInfix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove clone %q: %w", dst, err)
	}
	return nil
}

// Grow enlarges the disk at path to newSize bytes, a multiple of 512:
// truncate for raw files, qemu-img resize for qcow2. It refuses to shrink
// (ErrShrink) and leaves growing the filesystem inside to the caller.
func Grow(ctx context.Context, path string, format DiskFormat, newSize int64) error {
	if newSize <= 0 || newSize%sectorSize != 0 {
		return fmt.Errorf("grow %q: size %d is not a positive multiple of %d bytes", path, newSize, sectorSize)
	}
	switch format {
	case DiskRaw:
		st, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("grow %q: %w", path, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("grow %q: not a regular file (a dm-snapshot device is sized by banger-helper)", path)
		}
		if newSize < st.Size() {
			return fmt.Errorf("grow %q to %d bytes: %w (it has %d)", path, newSize, ErrShrink, st.Size())
		}
		if newSize == st.Size() {
			return nil
		}
		if err := os.Truncate(path, newSize); err != nil {
			return fmt.Errorf("grow %q: %w", path, err)
		}
		return nil
	case DiskQCOW2:
		size, err := qcow2VirtualSize(ctx, "qemu-img", path)
		if err != nil {
			return fmt.Errorf("grow %q: %w", path, err)
		}
		if newSize < size {
			return fmt.Errorf("grow %q to %d bytes: %w (it has %d)", path, newSize, ErrShrink, size)
		}
		if newSize == size {
			return nil
		}
		if out, err := exec.CommandContext(ctx, "qemu-img", "resize", "-q", "-f", "qcow2", path, fmt.Sprint(newSize)).CombinedOutput(); err != nil {
			return fmt.Errorf("grow %q: qemu-img resize: %w: %s", path, err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	return fmt.Errorf("grow %q: unknown disk format %q", path, format)
}

// qcow2Info is the part of `qemu-img info --output=json` banger reads.
type qcow2Info struct {
	Format              string `json:"format"`
	VirtualSize         int64  `json:"virtual-size"`
	BackingFilename     string `json:"backing-filename"`
	BackingFilenameFull string `json:"full-backing-filename"`
	BackingFormat       string `json:"backing-filename-format"`
}

// readQCOW2Info runs qemu-img info on a qcow2 file. It does not open the
// backing chain, so it works while the backing file is missing too.
func readQCOW2Info(ctx context.Context, qemuImg, path string) (qcow2Info, error) {
	cmd := exec.CommandContext(ctx, qemuImg, "info", "--output=json", "-f", "qcow2", path)
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return qcow2Info{}, fmt.Errorf("qemu-img info: %w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return qcow2Info{}, fmt.Errorf("qemu-img info: %w", err)
	}
	var info qcow2Info
	if err := json.Unmarshal(out, &info); err != nil {
		return qcow2Info{}, fmt.Errorf("decode qemu-img info: %w", err)
	}
	return info, nil
}

func qcow2VirtualSize(ctx context.Context, qemuImg, path string) (int64, error) {
	info, err := readQCOW2Info(ctx, qemuImg, path)
	if err != nil {
		return 0, err
	}
	if info.Format != "qcow2" || info.VirtualSize <= 0 {
		return 0, fmt.Errorf("qemu-img info: format %q, virtual size %d: not a qcow2 disk", info.Format, info.VirtualSize)
	}
	return info.VirtualSize, nil
}
