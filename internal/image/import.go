package image

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/ext4"
)

// Bounds on imported files: generous for anything bootable, small enough
// to catch a wrong path (a disk image given as the kernel).
const (
	maxKernelSize = 256 << 20
	maxInitrdSize = 2 << 30
	minRootfsSize = 1 << 20
)

// initrdMagics are the starts of the initrd formats Linux unpacks: an
// uncompressed newc cpio (also how Debian's early-microcode initrds begin)
// and the compressors of usr/Kconfig's INITRAMFS_COMPRESSION choices.
var initrdMagics = [][]byte{
	[]byte("070701"), []byte("070702"), // cpio newc, crc
	{0x1f, 0x8b},                     // gzip
	{0x28, 0xb5, 0x2f, 0xfd},         // zstd
	{0xfd, '7', 'z', 'X', 'Z', 0x00}, // xz
	{0x02, 0x21, 0x4c, 0x18},         // lz4 legacy
	[]byte("BZh"),                    // bzip2
	{0x5d, 0x00, 0x00},               // lzma
	{0x89, 'L', 'Z', 'O', 0x00, '\r', '\n', 0x1a, '\n'}, // lzop
}

// Import registers an image made elsewhere: an ext4 rootfs, a kernel
// (bzImage, or an x86-64 ELF vmlinux) and an optional initrd, all given
// as absolute host paths the daemon can read. The files are checked, then
// copied (reflink where the file system allows it, else a sparse copy)
// into staging; a bzImage also yields an extracted vmlinux for
// Firecracker, while an ELF kernel serves both VMMs (QEMU boots an ELF
// vmlinux through its PVH entry point). The image then appears and is
// registered as Build's do. The sources are never modified.
func (s *Service) Import(ctx context.Context, req api.ImageImportRequest, progress ProgressFunc) (im api.Image, err error) {
	if err := ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	name := req.Name
	o := s.newOp(EventImport, name, progress)
	defer func() {
		if err != nil {
			o.fail(err)
		}
	}()
	o.step(StepResolve, 0, 1, "")
	src, err := checkImportFiles(req)
	if err != nil {
		return api.Image{}, err
	}
	release, err := s.claim(name, "imported")
	if err != nil {
		return api.Image{}, err
	}
	defer release()
	if err := s.checkNew(ctx, name); err != nil {
		return api.Image{}, err
	}
	o.step(StepResolve, 1, 1, "")
	log := s.log().With("image", name)
	start := time.Now()
	im, err = s.importFiles(ctx, name, src, o)
	if err != nil {
		log.Warn("image import failed", "err", err)
		what := fmt.Sprintf("import image %q", name)
		var ae *api.Error
		switch {
		case ctx.Err() != nil:
			return api.Image{}, canceled(what, ctx.Err())
		case errors.As(err, &ae):
			return api.Image{}, ae
		case errors.Is(err, ext4.ErrNotClean):
			return api.Image{}, api.Errorf(api.CodeInvalidArgument, "%s: the rootfs has file system errors: %v", what, err).
				WithHint("repair it with e2fsck -fy " + src.rootfs)
		}
		return api.Image{}, api.Errorf(api.CodeInternal, "%s: %v", what, err)
	}
	log.Info("imported image", "took", time.Since(start).Round(time.Millisecond), "rootfs", src.rootfs, "kernel", src.kernel)
	return im, nil
}

// importSource is a checked import request.
type importSource struct {
	rootfs, kernel, initrd string
	kernelFormat           Format
}

// checkImportFiles validates the request's paths and the files behind
// them before any work.
func checkImportFiles(req api.ImageImportRequest) (importSource, error) {
	bad := func(format string, args ...any) *api.Error {
		return api.Errorf(api.CodeInvalidArgument, format, args...)
	}
	src := importSource{rootfs: req.Rootfs, kernel: req.Kernel, initrd: req.Initrd}
	for _, f := range []struct {
		role, path string
		required   bool
	}{{"rootfs", req.Rootfs, true}, {"kernel", req.Kernel, true}, {"initrd", req.Initrd, false}} {
		if f.path == "" {
			if f.required {
				return importSource{}, bad("import needs a %s", f.role).WithHint("give --" + f.role + " PATH")
			}
			continue
		}
		if !filepath.IsAbs(f.path) || filepath.Clean(f.path) != f.path {
			return importSource{}, bad("%s path %q is not a clean absolute path", f.role, f.path)
		}
		st, err := os.Stat(f.path)
		if err != nil {
			return importSource{}, bad("%s %s: %v", f.role, f.path, unwrapPathError(err))
		}
		if !st.Mode().IsRegular() {
			return importSource{}, bad("%s %s is not a regular file", f.role, f.path)
		}
		if st.Size() == 0 {
			return importSource{}, bad("%s %s is empty", f.role, f.path)
		}
	}

	info, err := ext4.CheckSuperblock(src.rootfs)
	if err != nil {
		return importSource{}, bad("rootfs %s is not a usable ext4 image: %v", src.rootfs, err)
	}
	st, _ := os.Stat(src.rootfs)
	switch {
	case st.Size() < minRootfsSize || st.Size() > maxImageSize:
		return importSource{}, bad("rootfs %s is %s, outside %s to %s", src.rootfs, api.FormatSize(st.Size()), api.FormatSize(minRootfsSize), api.FormatSize(maxImageSize))
	case st.Size()%512 != 0:
		return importSource{}, bad("rootfs %s is %d bytes, not a whole number of 512-byte sectors", src.rootfs, st.Size()).
			WithHint(fmt.Sprintf("truncate -s %d %s", (st.Size()+511)/512*512, src.rootfs))
	case info.NeedsRecovery || info.ErrorsDetected:
		return importSource{}, bad("rootfs %s was not cleanly unmounted or has recorded errors", src.rootfs).
			WithHint("e2fsck -fy " + src.rootfs)
	}

	if src.kernelFormat, err = KernelFormat(src.kernel); err != nil {
		return importSource{}, bad("%v", err).WithHint("give a bzImage (/boot/vmlinuz-*) or an x86-64 ELF vmlinux")
	}
	if st, _ := os.Stat(src.kernel); st.Size() > maxKernelSize {
		return importSource{}, bad("kernel %s is %s, more than %s: not a kernel", src.kernel, api.FormatSize(st.Size()), api.FormatSize(maxKernelSize))
	}
	if src.kernelFormat == FormatELF {
		// QEMU, the VMM that runs everywhere, loads an ELF kernel only
		// through its PVH entry point.
		if ok, err := hasPVHEntry(src.kernel); err != nil {
			return importSource{}, bad("kernel %s: %v", src.kernel, err)
		} else if !ok {
			return importSource{}, bad("ELF kernel %s has no PVH entry point, so QEMU cannot boot it", src.kernel).
				WithHint("give the kernel's bzImage instead (banger extracts the vmlinux Firecracker needs), or build it with CONFIG_PVH=y")
		}
	}

	if src.initrd != "" {
		st, _ := os.Stat(src.initrd)
		if st.Size() > maxInitrdSize {
			return importSource{}, bad("initrd %s is %s, more than %s", src.initrd, api.FormatSize(st.Size()), api.FormatSize(maxInitrdSize))
		}
		if err := checkInitrd(src.initrd); err != nil {
			return importSource{}, bad("%v", err).WithHint("give a cpio archive, compressed or not (/boot/initrd.img-*)")
		}
	}
	return src, nil
}

// xenElfnotePhys32Entry is the ELF note (owner "Xen") holding a kernel's
// 32-bit PVH entry point (xen/include/public/elfnote.h).
const xenElfnotePhys32Entry = 18

// hasPVHEntry reports whether the ELF kernel at path carries a PVH entry
// point.
func hasPVHEntry(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	return pvhEntry(f)
}

// pvhEntry does hasPVHEntry's work on any reader; the input is untrusted
// (an imported kernel) and the fuzz target drives it.
func pvhEntry(r io.ReaderAt) (bool, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return false, fmt.Errorf("parse ELF: %w", err)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE || p.Filesz > 1<<20 {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return false, fmt.Errorf("read ELF notes: %w", err)
		}
		// Elf64_Nhdr: namesz, descsz, type (4 bytes each, in the file's
		// byte order), then name and desc, each padded to 4 bytes.
		for len(b) >= 12 {
			namesz, descsz, typ := f.ByteOrder.Uint32(b), f.ByteOrder.Uint32(b[4:]), f.ByteOrder.Uint32(b[8:])
			b = b[12:]
			nameLen, descLen := (uint64(namesz)+3)&^3, (uint64(descsz)+3)&^3
			if nameLen+descLen > uint64(len(b)) {
				break
			}
			name := strings.TrimRight(string(b[:namesz]), "\x00")
			if name == "Xen" && typ == xenElfnotePhys32Entry {
				return true, nil
			}
			b = b[nameLen+descLen:]
		}
	}
	return false, nil
}

// unwrapPathError drops the *PathError's repetition of the path.
func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// checkInitrd accepts a file that starts like an initramfs.
func checkInitrd(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("initrd %s: %w", path, err)
	}
	defer f.Close()
	head := make([]byte, 16)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("initrd %s: %w", path, err)
	}
	for _, m := range initrdMagics {
		if bytes.HasPrefix(head[:n], m) {
			return nil
		}
	}
	return fmt.Errorf("initrd %s is not a cpio archive nor a compressed one (starts % x)", path, head[:min(n, 8)])
}

// importFiles does Import's work once the name is claimed.
func (s *Service) importFiles(ctx context.Context, name string, src importSource, o *op) (api.Image, error) {
	st, err := s.newStaging(name)
	if err != nil {
		return api.Image{}, err
	}
	defer func() {
		if err := st.remove(); err != nil {
			s.log().Error("remove image staging directory", "image", name, "err", err)
		}
	}()

	rootfs := filepath.Join(st.out, fileRootfs)
	var srcSize int64
	if fi, err := os.Stat(src.rootfs); err == nil {
		srcSize = fi.Size()
	}
	o.step(StepCopy, 0, srcSize, "bytes")
	if err := cloneInto(ctx, src.rootfs, rootfs); err != nil {
		return api.Image{}, err
	}
	o.step(StepCopy, srcSize, srcSize, "bytes")
	// Check what was copied, not what the path held before: the source
	// could have changed in between.
	if _, err := ext4.CheckSuperblock(rootfs); err != nil {
		return api.Image{}, api.Errorf(api.CodeInvalidArgument, "rootfs %s is not a usable ext4 image: %v", src.rootfs, err)
	}
	o.step(StepFsck, 0, 1, "")
	if err := ext4.Fsck(ctx, rootfs); err != nil {
		return api.Image{}, err
	}
	o.step(StepFsck, 1, 1, "")

	o.step(StepKernel, 0, 2, "")
	switch src.kernelFormat {
	case FormatBzImage:
		kernel := filepath.Join(st.out, fileKernel)
		if err := cloneInto(ctx, src.kernel, kernel); err != nil {
			return api.Image{}, err
		}
		if err := ExtractVmlinux(ctx, kernel, filepath.Join(st.out, fileVmlinux)); err != nil {
			return api.Image{}, api.Errorf(api.CodeInvalidArgument, "%v", err).
				WithHint("give the kernel as an ELF vmlinux instead")
		}
	case FormatELF:
		vmlinux := filepath.Join(st.out, fileVmlinux)
		if err := cloneInto(ctx, src.kernel, vmlinux); err != nil {
			return api.Image{}, err
		}
		if f, err := KernelFormat(vmlinux); err != nil || f != FormatELF {
			return api.Image{}, api.Errorf(api.CodeInvalidArgument, "kernel %s changed while it was copied", src.kernel)
		}
	}
	o.step(StepKernel, 1, 2, "")
	if src.initrd != "" {
		if err := cloneInto(ctx, src.initrd, filepath.Join(st.out, fileInitrd)); err != nil {
			return api.Image{}, err
		}
	}
	o.step(StepKernel, 2, 2, "")
	return s.publish(ctx, st, Metadata{Name: name, Source: SourceImport}, o)
}

// cloneInto copies src to dst, sharing extents when the file systems
// allow it (O(1) on XFS or btrfs), else copying data and keeping holes.
func cloneInto(ctx context.Context, src, dst string) error {
	var c Cloner = sparseCopyCloner{}
	if probeReflink(src, filepath.Dir(dst)) == nil {
		c = reflinkCloner{}
	}
	if err := c.Clone(ctx, src, dst); err != nil {
		return err
	}
	return os.Chmod(dst, 0o644)
}
