package ext4

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
)

// ErrNotClean means e2fsck found problems in the file system.
var ErrNotClean = errors.New("ext4 file system has errors")

// e2fsck exit status bits (e2fsck(8)); 4, errors left uncorrected, is the
// one that means "not clean".
const (
	fsckCorrected  = 1
	fsckReboot     = 2
	fsckOperation  = 8
	fsckUsage      = 16
	fsckCancelled  = 32
	fsckLibraryErr = 128
)

// Fsck checks the image read-only (e2fsck -fn: full check, change nothing).
// A file system with errors gives an error wrapping ErrNotClean with
// e2fsck's report; an e2fsck that could not run gives its output too.
func Fsck(ctx context.Context, path string) error {
	res, err := run(ctx, "", "e2fsck", "-fn", path)
	if err != nil {
		return fmt.Errorf("fsck %s: %w", path, err)
	}
	switch {
	case res.Exit == 0:
		return nil
	case res.Exit&(fsckOperation|fsckUsage|fsckCancelled|fsckLibraryErr) != 0:
		return fmt.Errorf("fsck %s: e2fsck exit %d: %s", path, res.Exit, bytes.TrimSpace(res.Out))
	default:
		return fmt.Errorf("fsck %s: %w (e2fsck exit %d):\n%s", path, ErrNotClean, res.Exit, bytes.TrimSpace(res.Out))
	}
}

// repair runs e2fsck -fy, which replays a journal and fixes what it can;
// resize2fs refuses a file system not freshly checked.
func repair(ctx context.Context, path string) error {
	res, err := run(ctx, "", "e2fsck", "-fy", path)
	if err != nil {
		return err
	}
	// 1: errors corrected; 2: same, "reboot" only matters for a mounted root.
	if res.Exit&^(fsckCorrected|fsckReboot) != 0 {
		return fmt.Errorf("e2fsck -fy exit %d: %s", res.Exit, bytes.TrimSpace(res.Out))
	}
	return nil
}

// Resize grows the image file to size bytes and its file system to fill it:
// e2fsck -fy (resize2fs insists on a checked file system), extend the file,
// resize2fs. Shrinking is refused; a size the file system already has is a
// no-op. If resize2fs fails the file is cut back to its old length, which
// resize2fs has not used yet when it fails (it writes the new metadata last).
func Resize(ctx context.Context, path string, size int64) error {
	info, err := CheckSuperblock(path)
	if err != nil {
		return fmt.Errorf("resize %s: %w", path, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("resize %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("resize %s: not a regular file", path)
	}
	oldSize := fi.Size()
	if size < oldSize || size < info.Size() {
		return fmt.Errorf("resize %s: shrinking from %d to %d bytes is not supported", path, max(oldSize, info.Size()), size)
	}
	if uint64(size/int64(info.BlockSize)) == info.BlockCount {
		// Less than a block more: nothing for the file system to use.
		if err := os.Truncate(path, size); err != nil {
			return fmt.Errorf("resize %s: extend file: %w", path, err)
		}
		return nil
	}
	if err := repair(ctx, path); err != nil {
		return fmt.Errorf("resize %s: check before resize: %w", path, err)
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("resize %s: extend file: %w", path, err)
	}
	res, err := run(ctx, "", "resize2fs", path)
	if err == nil && res.Exit != 0 {
		err = fmt.Errorf("resize2fs exit %d: %s", res.Exit, bytes.TrimSpace(res.Out))
	}
	if err != nil {
		if tErr := os.Truncate(path, oldSize); tErr != nil {
			err = errors.Join(err, fmt.Errorf("restore length %d: %w", oldSize, tErr))
		}
		return fmt.Errorf("resize %s: %w", path, err)
	}
	return nil
}
