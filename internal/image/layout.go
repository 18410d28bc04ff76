package image

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
	"golang.org/x/sys/unix"
)

// An image directory (paths.Layout.ImageDir) holds these files. Their
// names are fixed so that a directory can be checked and reconciled
// without its database row.
const (
	fileKernel   = "vmlinuz"     // bzImage; absent for an imported ELF kernel
	fileVmlinux  = "vmlinux"     // uncompressed ELF, for Firecracker
	fileInitrd   = "initrd.img"  // optional
	fileRootfs   = "rootfs.ext4" // the ext4 root file system VM disks clone
	fileMetadata = "metadata.json"
)

// Roles of the files in Metadata.Files and api.Image.Files.
const (
	RoleKernel  = "kernel"
	RoleVmlinux = "vmlinux"
	RoleInitrd  = "initrd"
	RoleRootfs  = "rootfs"
)

// Image sources.
const (
	SourceBuild  = "build"
	SourceImport = "import"
)

// metadataSchema is the version of Metadata's encoding.
const metadataSchema = 1

// Metadata is the JSON kept with every image, both in the images table and
// as metadata.json in the image's directory. File paths in it are relative
// to the image's directory.
type Metadata struct {
	Schema    int             `json:"schema"`
	ID        string          `json:"id"`
	Name      string          `json:"name"`
	Source    string          `json:"source"`
	CreatedAt time.Time       `json:"created_at"`
	Files     []api.ImageFile `json:"files"`
	Recipe    *api.Recipe     `json:"recipe,omitempty"`
	// KernelRelease is the kernel's release ("6.1.0-28-cloud-amd64") when
	// known: built images take it from /boot.
	KernelRelease string `json:"kernel_release,omitempty"`
}

// ImageFiles are the absolute paths of an image's files, for booting.
type ImageFiles struct {
	Dir string
	// Kernel is what QEMU boots: the bzImage, or for an image imported
	// with an ELF kernel that vmlinux (QEMU loads an ELF vmlinux through
	// its PVH entry point; CONFIG_PVH=y kernels have one).
	Kernel string
	// KernelFormat is Kernel's format.
	KernelFormat Format
	// Vmlinux is the uncompressed ELF kernel Firecracker boots.
	Vmlinux string
	// Initrd is empty for an image without one.
	Initrd string
	// Rootfs is the ext4 image per-VM disks are cloned from; never write
	// to it.
	Rootfs string
}

// newID returns a random image id: 12 lowercase hex digits, like VM ids.
func newID() string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b[:])
}

// randomSuffix is for scratch names beside real ones.
func randomSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// describeFile hashes a file of an image being assembled in dir and makes
// it durable.
func describeFile(ctx context.Context, dir, role, name string) (api.ImageFile, error) {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return api.ImageFile{}, fmt.Errorf("hash %s: %w", name, err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, ctxReaderOf(ctx, f))
	if err != nil {
		return api.ImageFile{}, fmt.Errorf("hash %s: %w", name, err)
	}
	// The image is registered next: its files must be on disk by then,
	// whatever crashes afterwards.
	if err := f.Sync(); err != nil {
		return api.ImageFile{}, fmt.Errorf("sync %s: %w", name, err)
	}
	return api.ImageFile{Role: role, Path: name, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// ctxReaderOf makes a long read notice cancellation.
func ctxReaderOf(ctx context.Context, r io.Reader) io.Reader {
	return bufio.NewReaderSize(ctxReader{ctx: ctx, r: r}, 1<<20)
}

// describeFiles hashes the files present in dir, in role order.
func describeFiles(ctx context.Context, dir string) ([]api.ImageFile, error) {
	var out []api.ImageFile
	for _, rf := range []struct{ role, name string }{
		{RoleKernel, fileKernel}, {RoleVmlinux, fileVmlinux}, {RoleInitrd, fileInitrd}, {RoleRootfs, fileRootfs},
	} {
		if _, err := os.Lstat(filepath.Join(dir, rf.name)); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		f, err := describeFile(ctx, dir, rf.role, rf.name)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

// writeFileSync writes a file and makes it durable.
func writeFileSync(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// decodeMetadata reads an images row's metadata.
func decodeMetadata(r store.Image) (Metadata, error) {
	var md Metadata
	if err := json.Unmarshal(r.Metadata, &md); err != nil {
		return Metadata{}, fmt.Errorf("image %s: decode metadata: %w", r.Name, err)
	}
	return md, nil
}

// mountsUnder lists the mount points at or below dir, from
// /proc/self/mountinfo (field 5, octal-escaped).
func mountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, nil
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeTree deletes dir and everything below it, refusing when anything
// is mounted there: a build tree with the host's /dev or /proc still
// bind-mounted must never be recursed into.
func removeTree(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	mounts, err := mountsUnder(abs)
	if err != nil {
		return fmt.Errorf("remove %s: list mounts: %w", dir, err)
	}
	if len(mounts) > 0 {
		return fmt.Errorf("remove %s: refusing, file systems are mounted below it: %s", dir, strings.Join(mounts, ", "))
	}
	if err := os.RemoveAll(abs); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// renameNoReplaceDir moves a directory into place unless the target
// exists (fs.ErrExist then).
func renameNoReplaceDir(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("rename %s to %s: %w", oldpath, newpath, fs.ErrExist)
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// No RENAME_NOREPLACE here: check, then rename. Builds of one
		// name are serialized by the service, so the window is ours.
		if _, serr := os.Lstat(newpath); serr == nil {
			return fmt.Errorf("rename %s to %s: %w", oldpath, newpath, fs.ErrExist)
		}
		err = os.Rename(oldpath, newpath)
	}
	if err != nil {
		return fmt.Errorf("rename %s to %s: %w", oldpath, newpath, err)
	}
	return nil
}
