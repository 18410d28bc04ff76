package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// dmSnapshotCloner asks the root helper for a device-mapper snapshot of src
// and records it as a symlink at dst pointing to the device, so that every
// strategy's disk is found at the same path.
type dmSnapshotCloner struct {
	backend SnapshotBackend
	vmID    string
}

func (dmSnapshotCloner) Strategy() CloneStrategy { return CloneDMSnapshot }
func (dmSnapshotCloner) Format() DiskFormat      { return DiskRaw }

func (c dmSnapshotCloner) Clone(ctx context.Context, src, dst string) (err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("snapshot %q for vm %s at %q: %w", src, c.vmID, dst, err)
		}
	}()
	if err := checkCloneSource(src); err != nil {
		return err
	}
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%q: %w", dst, fs.ErrExist)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	dev, err := c.backend.CreateSnapshot(ctx, c.vmID, src)
	if err != nil {
		return fmt.Errorf("create snapshot: %w", err)
	}
	// From here a failure must not leave the snapshot behind, even when
	// it is ctx that failed.
	undo := func(cause error) error {
		if rerr := c.backend.RemoveSnapshot(context.WithoutCancel(ctx), c.vmID); rerr != nil {
			return errors.Join(cause, fmt.Errorf("undo: remove snapshot: %w", rerr))
		}
		return cause
	}
	if filepath.Clean(dev) != dev || !strings.HasPrefix(dev, "/dev/") {
		return undo(fmt.Errorf("backend returned device path %q, not a clean path under /dev", dev))
	}
	if err := os.Symlink(dev, dst); err != nil {
		return undo(err)
	}
	if err := syncDir(filepath.Dir(dst)); err != nil {
		_ = os.Remove(dst)
		return undo(err)
	}
	return nil
}

// Remove tears the snapshot down first and the symlink last, so that a
// failed removal can be retried and still finds what it is about.
func (c dmSnapshotCloner) Remove(ctx context.Context, dst string) error {
	st, err := os.Lstat(dst)
	switch {
	case err == nil && st.Mode()&fs.ModeSymlink == 0:
		return fmt.Errorf("remove snapshot clone %q: not a symlink, so not a dm-snapshot clone", dst)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("remove snapshot clone %q: %w", dst, err)
	}
	if err := c.backend.RemoveSnapshot(ctx, c.vmID); err != nil {
		return fmt.Errorf("remove snapshot of vm %s: %w", c.vmID, err)
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove snapshot clone %q: %w", dst, err)
	}
	return nil
}
