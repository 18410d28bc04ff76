package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// sparseCopyCloner copies src's data extents and leaves its holes as holes,
// so a mostly empty rootfs costs only what it holds.
type sparseCopyCloner struct{}

func (sparseCopyCloner) Strategy() CloneStrategy { return CloneSparseCopy }
func (sparseCopyCloner) Format() DiskFormat      { return DiskRaw }

func (sparseCopyCloner) Clone(ctx context.Context, src, dst string) error {
	if err := checkCloneSource(src); err != nil {
		return fmt.Errorf("copy %q to %q: %w", src, dst, err)
	}
	s, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy %q to %q: %w", src, dst, err)
	}
	defer s.Close()
	st, err := s.Stat()
	if err != nil {
		return fmt.Errorf("copy %q to %q: %w", src, dst, err)
	}
	err = createFileClone(dst, func(tmp *os.File) error {
		return copySparse(ctx, s, tmp, st.Size())
	})
	if err != nil {
		return fmt.Errorf("copy %q to %q: %w", src, dst, err)
	}
	return nil
}

func (sparseCopyCloner) Remove(_ context.Context, dst string) error { return removeFileClone(dst) }

// copyChunk bounds one copy_file_range call, so that cancellation is
// noticed within a fraction of a second.
const copyChunk = 64 << 20

// copySparse copies the first size bytes of src into the empty file dst:
// the data ranges SEEK_DATA/SEEK_HOLE report are copied, holes are skipped,
// and dst is extended to size so trailing holes stay holes too.
func copySparse(ctx context.Context, src, dst *os.File, size int64) error {
	sfd := int(src.Fd())
	useCFR := true
	for off := int64(0); off < size; {
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole from off to the end
		}
		hole := size
		switch {
		case errors.Is(err, unix.EINVAL):
			// No SEEK_DATA here: copy the rest as data.
			data = off
		case err != nil:
			return fmt.Errorf("seek data in source: %w", err)
		default:
			if hole, err = unix.Seek(sfd, data, unix.SEEK_HOLE); err != nil {
				return fmt.Errorf("seek hole in source: %w", err)
			}
		}
		hole = min(hole, size)
		if err := copyRange(ctx, src, dst, data, hole-data, &useCFR); err != nil {
			return err
		}
		off = hole
	}
	if err := dst.Truncate(size); err != nil {
		return fmt.Errorf("set clone size: %w", err)
	}
	return nil
}

// copyRange copies n bytes at off from src to the same offset in dst, with
// copy_file_range while the kernel allows it (in-kernel copy, or a shared
// extent where the filesystem can) and read/write otherwise.
func copyRange(ctx context.Context, src, dst *os.File, off, n int64, useCFR *bool) error {
	var buf []byte
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		chunk := min(n, copyChunk)
		if *useCFR {
			roff, woff := off, off
			c, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(chunk), 0)
			switch {
			case err == nil && c > 0:
				off += int64(c)
				n -= int64(c)
				continue
			case err == nil:
				return fmt.Errorf("source ended at %d, before its size: changed during the copy?", off)
			case errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS),
				errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPERM):
				// Not between these files (other filesystem types,
				// no support): copy through user space from here on.
				*useCFR = false
			default:
				return fmt.Errorf("copy_file_range at %d: %w", off, err)
			}
		}
		if buf == nil {
			buf = make([]byte, 1<<20)
		}
		w, err := io.CopyBuffer(io.NewOffsetWriter(dst, off), io.NewSectionReader(src, off, chunk), buf)
		if err != nil {
			return fmt.Errorf("copy at %d: %w", off, err)
		}
		if w < chunk {
			return fmt.Errorf("source ended at %d, before its size: changed during the copy?", off+w)
		}
		off += w
		n -= w
	}
	return nil
}
