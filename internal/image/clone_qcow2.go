package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// qcow2Cloner makes a qcow2 overlay whose backing file is src: QEMU reads
// unwritten clusters from src and writes only to the overlay.
type qcow2Cloner struct {
	qemuImg string
}

func (qcow2Cloner) Strategy() CloneStrategy { return CloneQCOW2 }
func (qcow2Cloner) Format() DiskFormat      { return DiskQCOW2 }

func (c qcow2Cloner) Clone(ctx context.Context, src, dst string) error {
	if err := c.clone(ctx, src, dst); err != nil {
		return fmt.Errorf("create qcow2 overlay %q over %q: %w", dst, src, err)
	}
	return nil
}

func (c qcow2Cloner) clone(ctx context.Context, src, dst string) error {
	if err := checkCloneSource(src); err != nil {
		return err
	}
	// The overlay records the backing path as given; an absolute one keeps
	// it valid wherever QEMU is started from.
	backing, err := filepath.Abs(src)
	if err != nil {
		return err
	}
	// QEMU reads "proto:rest" in a filename as a protocol (nbd:, ssh:...),
	// so a colon would make the overlay point somewhere else entirely.
	for _, p := range []string{backing, dst} {
		if strings.Contains(p, ":") {
			return fmt.Errorf("path %q contains ':', which qemu reads as a protocol prefix", p)
		}
	}
	return createFileClone(dst, func(tmp *os.File) error {
		// -F raw: never let qemu probe the backing file's format, or a
		// guest that writes a qcow2 header into its rootfs could make
		// later overlays read host files.
		cmd := exec.CommandContext(ctx, c.qemuImg, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, tmp.Name())
		if out, err := cmd.CombinedOutput(); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("qemu-img create: %w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	})
}

func (qcow2Cloner) Remove(_ context.Context, dst string) error { return removeFileClone(dst) }
