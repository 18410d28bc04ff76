package image

import (
	"context"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// reflinkCloner clones with FICLONE: the clone shares src's extents and the
// filesystem copies a block only when either side writes it.
type reflinkCloner struct{}

func (reflinkCloner) Strategy() CloneStrategy { return CloneReflink }
func (reflinkCloner) Format() DiskFormat      { return DiskRaw }

func (reflinkCloner) Clone(ctx context.Context, src, dst string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("reflink %q to %q: %w", src, dst, err)
	}
	if err := checkCloneSource(src); err != nil {
		return fmt.Errorf("reflink %q to %q: %w", src, dst, err)
	}
	s, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("reflink %q to %q: %w", src, dst, err)
	}
	defer s.Close()
	err = createFileClone(dst, func(tmp *os.File) error {
		if err := unix.IoctlFileClone(int(tmp.Fd()), int(s.Fd())); err != nil {
			return fmt.Errorf("FICLONE: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("reflink %q to %q: %w", src, dst, err)
	}
	return nil
}

func (reflinkCloner) Remove(_ context.Context, dst string) error { return removeFileClone(dst) }

// reflinkProbeLen is how much of src the probe clones: a multiple of every
// filesystem block size in use, so that FICLONERANGE's alignment rule holds.
const reflinkProbeLen = 64 << 10

// probeReflink checks that a file in dstDir can share src's extents, by
// cloning src's first 64 KiB into a scratch file there. This is the real
// operation on the real pair of filesystems (same filesystem, reflink
// enabled, permissions), not a guess from the filesystem type.
func probeReflink(src, dstDir string) error {
	s, err := os.Open(src)
	if err != nil {
		return err
	}
	defer s.Close()
	st, err := s.Stat()
	if err != nil {
		return err
	}
	probe, err := os.CreateTemp(dstDir, ".reflink-probe-*")
	if err != nil {
		return fmt.Errorf("create reflink probe: %w", err)
	}
	defer func() { _ = os.Remove(probe.Name()) }()
	defer probe.Close()
	length := uint64(reflinkProbeLen)
	if st.Size() < reflinkProbeLen {
		length = 0 // to the end of src, which may end mid-block
	}
	err = unix.IoctlFileCloneRange(int(probe.Fd()), &unix.FileCloneRange{
		Src_fd:     int64(s.Fd()),
		Src_length: length,
	})
	if err != nil {
		return fmt.Errorf("FICLONERANGE %q to %q: %w", src, dstDir, err)
	}
	return nil
}
