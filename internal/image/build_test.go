package image_test

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
)

// The default image is really built: a clean ext4 rootfs, a bzImage with
// its initrd, an x86-64 ELF vmlinux, metadata whose hashes match the files,
// root-owned files, and banger's base customization in effect.
func TestDefaultImage(t *testing.T) {
	dir := imagetest.DefaultImage(t)
	ctx := t.Context()
	rootfs := filepath.Join(dir, imagetest.Rootfs)

	if err := ext4.Fsck(ctx, rootfs); err != nil {
		t.Fatalf("fsck: %v", err)
	}
	if f, err := image.KernelFormat(filepath.Join(dir, imagetest.Kernel)); err != nil || f != image.FormatBzImage {
		t.Errorf("kernel: format %q, %v; want bzimage", f, err)
	}
	ef, err := elf.Open(filepath.Join(dir, imagetest.Vmlinux))
	if err != nil {
		t.Fatalf("vmlinux: %v", err)
	}
	if ef.Machine != elf.EM_X86_64 || ef.Class != elf.ELFCLASS64 || ef.Type != elf.ET_EXEC {
		t.Errorf("vmlinux is %v %v %v, want an x86-64 ELF executable", ef.Class, ef.Machine, ef.Type)
	}
	_ = ef.Close()
	initrd, err := os.ReadFile(filepath.Join(dir, imagetest.Initrd))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(initrd, []byte("070701")) && !bytes.HasPrefix(initrd, []byte{0x1f, 0x8b}) && !bytes.HasPrefix(initrd, []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		t.Errorf("initrd starts % x: not a cpio archive nor gzip/zstd", initrd[:8])
	}

	// Metadata: every file listed with its real size and hash.
	var md image.Metadata
	b, err := os.ReadFile(filepath.Join(dir, imagetest.Metadata))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &md); err != nil {
		t.Fatalf("metadata.json: %v", err)
	}
	roles := map[string]bool{}
	for _, f := range md.Files {
		roles[f.Role] = true
		sum, size := sha256File(t, filepath.Join(dir, f.Path))
		if sum != f.SHA256 || size != f.Size {
			t.Errorf("%s: metadata says %d bytes sha256 %s, file has %d bytes sha256 %s", f.Path, f.Size, f.SHA256, size, sum)
		}
	}
	for _, r := range []string{image.RoleKernel, image.RoleVmlinux, image.RoleInitrd, image.RoleRootfs} {
		if !roles[r] {
			t.Errorf("metadata lacks a %s file", r)
		}
	}
	want, _ := image.DefaultRecipe(config.Default().Image)
	if md.Recipe == nil || md.Recipe.RecipeHash != want.Hash() || md.Source != image.SourceBuild || !strings.Contains(md.KernelRelease, "cloud-amd64") {
		t.Errorf("metadata recipe %+v, source %q, kernel %q; want recipe hash %s, build, a cloud kernel", md.Recipe, md.Source, md.KernelRelease, want.Hash())
	}

	// The base customization, read back from the image without mounting it.
	read := func(p string) string {
		t.Helper()
		b, err := ext4.ReadFile(ctx, rootfs, p)
		if err != nil {
			t.Errorf("read %s: %v", p, err)
		}
		return string(b)
	}
	contains := func(p, want string) {
		t.Helper()
		if got := read(p); !strings.Contains(got, want) {
			t.Errorf("%s lacks %q:\n%s", p, want, got)
		}
	}
	if fstab := read("/etc/fstab"); !regexp.MustCompile(`(?m)^/dev/vda\s+/\s+ext4\s+defaults\S*\s+0\s+1$`).MatchString(fstab) {
		t.Errorf("/etc/fstab does not mount /dev/vda as / (ext4, defaults, pass 1):\n%s", fstab)
	}
	contains("/etc/systemd/system/banger-ready.service", "echo BANGER-READY >/dev/console")
	contains("/etc/systemd/system/banger-ready.service", "After=ssh.service network-online.target")
	contains("/etc/ssh/sshd_config.d/10-banger.conf", "PermitRootLogin prohibit-password")
	contains("/etc/initramfs-tools/initramfs.conf", "\nMODULES=most\n")
	if got := read("/etc/machine-id"); got != "" {
		t.Errorf("/etc/machine-id is %q, want empty", got)
	}
	for link, target := range map[string]string{
		"/etc/systemd/system/multi-user.target.wants/banger-ready.service":     "/etc/systemd/system/banger-ready.service",
		"/etc/systemd/system/multi-user.target.wants/systemd-networkd.service": "/lib/systemd/system/systemd-networkd.service",
		"/etc/systemd/system/sysinit.target.wants/systemd-resolved.service":    "/lib/systemd/system/systemd-resolved.service",
		"/etc/systemd/system/multi-user.target.wants/ssh.service":              "/lib/systemd/system/ssh.service",
		"/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service":    "/lib/systemd/system/serial-getty@.service",
		"/etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf",
	} {
		fi, err := ext4.Stat(ctx, rootfs, link)
		if err != nil {
			t.Errorf("stat %s: %v", link, err)
			continue
		}
		if fi.Mode&fs.ModeSymlink == 0 || strings.TrimPrefix(fi.Target, "/usr") != target {
			t.Errorf("%s: mode %v target %q, want a link to %s", link, fi.Mode, fi.Target, target)
		}
	}
	for _, k := range []string{"rsa", "ecdsa", "ed25519", "dsa"} {
		for _, suffix := range []string{"", ".pub"} {
			p := "/etc/ssh/ssh_host_" + k + "_key" + suffix
			if _, err := ext4.Stat(ctx, rootfs, p); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: %v, want no host key in the image", p, err)
			}
		}
	}

	// Owners as Debian has them, not as the build host saw them.
	for p, want := range map[string]struct {
		uid, gid int
		mode     fs.FileMode
	}{
		"/usr/bin/sudo": {0, 0, fs.ModeSetuid | 0o755},
		"/etc/shadow":   {0, 42, 0o640}, // group shadow
		"/root":         {0, 0, fs.ModeDir | 0o700},
	} {
		fi, err := ext4.Stat(ctx, rootfs, p)
		if err != nil {
			t.Errorf("stat %s: %v", p, err)
			continue
		}
		if fi.UID != want.uid || fi.GID != want.gid || fi.Mode != want.mode {
			t.Errorf("%s: %d:%d %v, want %d:%d %v", p, fi.UID, fi.GID, fi.Mode, want.uid, want.gid, want.mode)
		}
	}
}

// sha256File is a file's hex SHA-256 and its size.
func sha256File(t *testing.T, path string) (string, int64) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return testutil.SHA256File(t, path), fi.Size()
}
