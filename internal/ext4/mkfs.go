package ext4

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// Layout Make always asks mke2fs for, whatever the image size and the host's
// mke2fs.conf usage types ("small" and "floppy" would pick 1 KiB blocks and
// a denser inode table below 512 MiB). SizeFor's arithmetic depends on them.
const (
	mkfsBlockSize  = 4096
	mkfsInodeRatio = 16384 // bytes of file system per inode
	mkfsInodeSize  = 256
)

// MakeOptions are the optional parts of a new file system.
type MakeOptions struct {
	// Label is the volume label (at most 16 bytes; letters, digits, '-',
	// '_' and '.'), so a guest can mount it by LABEL=.
	Label string
	// UUID, canonical lowercase form, fixes the file system UUID; empty
	// lets mke2fs pick a random one.
	UUID string
}

var (
	labelRe = regexp.MustCompile(`^[A-Za-z0-9._-]{1,16}$`)
	uuidRe  = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
)

func (o MakeOptions) validate() error {
	if o.Label != "" && !labelRe.MatchString(o.Label) {
		return fmt.Errorf("label %q: want 1 to 16 of A-Z a-z 0-9 . _ -", o.Label)
	}
	if o.UUID != "" && !uuidRe.MatchString(o.UUID) {
		return fmt.Errorf("uuid %q: want lowercase 8-4-4-4-12 hex", o.UUID)
	}
	return nil
}

// Make creates out as a size-byte ext4 image holding a copy of dir (mke2fs
// -d: no mount, no root needed). Owners, modes, symlinks, device nodes and
// extended attributes of the tree are kept as they are, so a tree unpacked as
// root gives root-owned files; the image's own root directory is root-owned
// whoever runs Make. out must not exist: Make writes a temporary file beside
// it and links it into place only once mke2fs succeeded, so a failure leaves
// nothing behind.
func Make(ctx context.Context, dir, out string, size int64, opts MakeOptions) (err error) {
	if err := opts.validate(); err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	if size <= 0 || size%mkfsBlockSize != 0 {
		return fmt.Errorf("make ext4 %s: size %d is not a positive multiple of %d", out, size, mkfsBlockSize)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("make ext4 %s: source %s is not a directory", out, dir)
	}
	if _, err := os.Lstat(out); err == nil {
		return fmt.Errorf("make ext4 %s: %w", out, fs.ErrExist)
	}
	// The temporary image beside out would be copied into itself.
	if inside, err := within(dir, filepath.Dir(out)); err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	} else if inside {
		return fmt.Errorf("make ext4 %s: output is inside the source tree %s", out, dir)
	}

	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".mkfs-*")
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	tmpName := tmp.Name()
	defer func() {
		// The temporary name never survives: linked into place or failed.
		if rmErr := os.Remove(tmpName); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) && err == nil {
			err = fmt.Errorf("make ext4 %s: remove temporary: %w", out, rmErr)
		}
	}()
	// A sparse file of the final size: mke2fs sizes the file system from it.
	if err := tmp.Truncate(size); err != nil {
		tmp.Close()
		return fmt.Errorf("make ext4 %s: size temporary: %w", out, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}

	args := []string{"-q", "-F",
		"-b", fmt.Sprint(mkfsBlockSize), "-i", fmt.Sprint(mkfsInodeRatio), "-I", fmt.Sprint(mkfsInodeSize),
		"-E", "root_owner=0:0", "-d", dir}
	if opts.Label != "" {
		args = append(args, "-L", opts.Label)
	}
	if opts.UUID != "" {
		args = append(args, "-U", opts.UUID)
	}
	args = append(args, tmpName)
	res, err := run(ctx, "", "mkfs.ext4", args...)
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	// With -q a successful run prints nothing; anything printed is a problem
	// mke2fs chose to survive (a file it could not copy, a bad config), and
	// an image missing part of its tree must not pass as good.
	if res.Exit != 0 || len(bytes.TrimSpace(res.Out)) > 0 {
		return fmt.Errorf("make ext4 %s: mkfs.ext4 exit %d: %s", out, res.Exit, bytes.TrimSpace(res.Out))
	}
	if _, err := CheckSuperblock(tmpName); err != nil {
		return fmt.Errorf("make ext4 %s: check result: %w", out, err)
	}
	// Link, not rename: an image someone created at out meanwhile is kept.
	if err := os.Link(tmpName, out); err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	return nil
}

// within reports whether dir (or what it resolves to) is root or below it.
func within(root, dir string) (bool, error) {
	r, err := filepath.EvalSymlinks(root)
	if err != nil {
		return false, err
	}
	d, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return false, err
	}
	rel, err := filepath.Rel(r, d)
	if err != nil {
		return false, nil
	}
	return rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)), nil
}

// Sizing constants for SizeFor. minImageSize leaves room for a package
// manager run in the smallest tree; headroom is the free space a fresh image
// gets on top of its content.
const (
	minImageSize = 256 << 20
	headroomNum  = 5 // content × 5/4: a quarter of the content again, free
	headroomDen  = 4
	// Block-group descriptors, bitmaps and resize reservation are ~0.1%;
	// 1% plus a fixed slack keeps small trees safe.
	metaSlack = 16 << 20
)

// SizeFor estimates an image size that holds dir with headroom: its content
// rounded to blocks, plus a quarter of that free, plus what ext4 itself
// takes (inode tables, journal, the 5% reserved for root), and enough inodes
// for every entry with a quarter spare. Sparse files count at their full
// size, which only over-estimates. The result is a whole number of MiB and
// at least 256 MiB.
func SizeFor(ctx context.Context, dir string) (int64, error) {
	var data, inodes int64
	seen := map[[2]uint64]bool{} // hard links count once: dev, ino
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			key := [2]uint64{st.Dev, st.Ino}
			if seen[key] {
				return nil
			}
			seen[key] = true
		}
		inodes++
		switch {
		case fi.Mode().IsRegular():
			data += roundUp(fi.Size(), mkfsBlockSize)
		case fi.IsDir():
			// A directory block holds dozens of entries; one block each,
			// plus one per 64 entries for big directories.
			data += mkfsBlockSize
			if entries, err := os.ReadDir(path); err == nil {
				data += int64(len(entries)/64) * mkfsBlockSize
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			// Targets up to 59 bytes live in the inode.
			if fi.Size() >= 60 {
				data += mkfsBlockSize
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("size tree %s: %w", dir, err)
	}
	return sizeForContent(data, inodes), nil
}

// sizeForContent is SizeFor's arithmetic, separate so it can be tested
// without a tree.
func sizeForContent(data, inodes int64) int64 {
	want := data * headroomNum / headroomDen
	// Usable share of the image: minus inode tables (inode size per
	// inode-ratio bytes), the 5% root reserve and 1% metadata.
	const usablePermille = 1000 - 1000*mkfsInodeSize/mkfsInodeRatio - 50 - 10
	size := int64(minImageSize)
	// The journal grows with the image, so iterate to a fixed point; it
	// steps at a handful of thresholds and converges in a few rounds.
	for range 8 {
		next := (want + journalSize(size) + metaSlack) * 1000 / usablePermille
		if next <= size {
			break
		}
		size = next
	}
	// Inodes: mke2fs makes size/ratio of them; keep a quarter spare after
	// the tree plus the reserved first 11 and lost+found.
	if byInodes := (inodes + 12) * headroomNum / headroomDen * mkfsInodeRatio; byInodes > size {
		size = byInodes
	}
	return roundUp(size, 1<<20)
}

// journalSize follows ext2fs_default_journal_size (e2fsprogs
// lib/ext2fs/mkjournal.c) for 4 KiB blocks.
func journalSize(size int64) int64 {
	blocks := size / mkfsBlockSize
	var jblocks int64
	switch {
	case blocks < 2048:
		jblocks = 0
	case blocks < 32768:
		jblocks = 1024
	case blocks < 256*1024:
		jblocks = 4096
	case blocks < 512*1024:
		jblocks = 8192
	case blocks < 4096*1024:
		jblocks = 16384
	case blocks < 8192*1024:
		jblocks = 32768
	case blocks < 16384*1024:
		jblocks = 65536
	case blocks < 32768*1024:
		jblocks = 131072
	default:
		jblocks = 262144
	}
	return jblocks * mkfsBlockSize
}

func roundUp(n, to int64) int64 {
	return (n + to - 1) / to * to
}
