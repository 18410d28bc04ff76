package testutil

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Test guests boot the same Debian cloud kernel that banger images ship,
// fetched from the host's apt sources. Downloads are cached across runs (and
// across test binaries running in parallel) in a directory named by
// $BANGER_TEST_CACHE, /var/cache/banger-test by default, falling back to the
// user's cache directory when that is not writable.

// EnvTestCache names the cache directory for downloaded test fixtures.
const EnvTestCache = "BANGER_TEST_CACHE"

const defaultTestCache = "/var/cache/banger-test"

// debianKernelPackage is the metapackage that depends on the current cloud
// kernel; guest-boot.md describes what it contains.
const debianKernelPackage = "linux-image-cloud-amd64"

// GuestModules are the modules, in load order, that a busybox initramfs
// needs to reach virtio disks and NICs on QEMU's microvm or Firecracker with
// the Debian cloud kernel, where the virtio transport and drivers are modules.
var GuestModules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net"}

// memo remembers fixtures already resolved in this process: asking apt
// takes seconds.
var memo sync.Map

// aptTimeout bounds each apt invocation; a download of the kernel package
// (27 MB) takes about a second on a mirror that answers.
const aptTimeout = 5 * time.Minute

// TestCacheDir returns the fixture cache directory, creating it.
func TestCacheDir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv(EnvTestCache); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatalf("create %s=%s: %v", EnvTestCache, d, err)
		}
		return d
	}
	if err := os.MkdirAll(defaultTestCache, 0o755); err == nil && unix.Access(defaultTestCache, unix.W_OK) == nil {
		return defaultTestCache
	}
	base, err := os.UserCacheDir()
	if err != nil {
		t.Skipf("no writable test cache: %s is not writable and %v (set %s)", defaultTestCache, err, EnvTestCache)
	}
	d := filepath.Join(base, "banger-test")
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatalf("create test cache %s: %v", d, err)
	}
	return d
}

// DebianKernel returns the Debian cloud kernel (a bzImage) and the modules
// directory that matches it (…/lib/modules/<release>). The package comes
// from `apt-get download` and is unpacked with `dpkg-deb -x` into the test
// cache; the test is skipped with the reason when apt cannot provide it and
// nothing is cached.
func DebianKernel(t testing.TB) (vmlinuz, modulesDir string) {
	t.Helper()
	if v, ok := memo.Load("kernel"); ok {
		k := v.([2]string)
		return k[0], k[1]
	}
	RequireCommand(t, "apt-get", "apt-cache", "dpkg-deb")
	cache := TestCacheDir(t)
	unlock := lockDir(t, cache)
	defer unlock()

	pkg, resolveErr := resolveDependency(t.Context(), debianKernelPackage, regexp.MustCompile(`^linux-image-[0-9].*-cloud-amd64$`))
	var root string
	if resolveErr == nil {
		var err error
		root, err = debianPackageLocked(t.Context(), cache, pkg)
		if err != nil {
			resolveErr = err
		}
	}
	if resolveErr != nil {
		// Offline with a warm cache is fine: any cached cloud kernel boots.
		cached := cachedPackages(cache, "linux-image-*-cloud-amd64_*")
		if len(cached) == 0 {
			t.Skipf("cannot fetch the Debian kernel through apt (%v); run apt-get update or make the Debian mirror reachable", resolveErr)
		}
		root = cached[len(cached)-1]
		t.Logf("using cached kernel %s: %v", filepath.Base(root), resolveErr)
	}
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		t.Fatalf("package in %s holds %d kernels, want 1", root, len(kernels))
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	for _, d := range []string{"lib/modules", "usr/lib/modules"} {
		md := filepath.Join(root, d, release)
		if st, err := os.Stat(md); err == nil && st.IsDir() {
			memo.Store("kernel", [2]string{kernels[0], md})
			return kernels[0], md
		}
	}
	t.Fatalf("package in %s has no modules directory for %s", root, release)
	return "", ""
}

// Busybox returns a static busybox binary from Debian's busybox-static,
// fetched and cached like DebianKernel.
func Busybox(t testing.TB) string {
	t.Helper()
	root := DebianPackage(t, "busybox-static")
	bb := filepath.Join(root, "bin", "busybox")
	if _, err := os.Stat(bb); err != nil {
		t.Fatalf("busybox-static unpacked without bin/busybox: %v", err)
	}
	return bb
}

// DebianPackage downloads one Debian package with `apt-get download`,
// unpacks it into the test cache and returns the unpacked tree. Without apt
// or a reachable mirror it uses a cached copy, else skips the test.
func DebianPackage(t testing.TB, name string) string {
	t.Helper()
	if v, ok := memo.Load("deb:" + name); ok {
		return v.(string)
	}
	RequireCommand(t, "apt-get", "dpkg-deb")
	cache := TestCacheDir(t)
	unlock := lockDir(t, cache)
	defer unlock()
	root, err := debianPackageLocked(t.Context(), cache, name)
	if err == nil {
		memo.Store("deb:"+name, root)
		return root
	}
	cached := cachedPackages(cache, name+"_*")
	if len(cached) == 0 {
		t.Skipf("cannot fetch Debian package %s through apt (%v); run apt-get update or make the Debian mirror reachable", name, err)
	}
	t.Logf("using cached %s: %v", filepath.Base(cached[len(cached)-1]), err)
	return cached[len(cached)-1]
}

// debianPackageLocked returns cache/debs/<deb file stem>, downloading and
// unpacking the package when that version is not there yet. The caller
// holds the cache lock.
func debianPackageLocked(ctx context.Context, cache, name string) (string, error) {
	debs := filepath.Join(cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", debs, err)
	}
	tmp, err := os.MkdirTemp(debs, ".fetch-")
	if err != nil {
		return "", fmt.Errorf("create download dir: %w", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	// --print-uris names the exact file (name_version_arch.deb) without
	// downloading, so a cached version is found without the network.
	out, err := runTool(ctx, tmp, "apt-get", "download", "--print-uris", name)
	if err != nil {
		return "", err
	}
	fields := strings.Fields(out)
	if len(fields) < 2 || !strings.HasSuffix(fields[1], ".deb") {
		return "", fmt.Errorf("apt-get download --print-uris %s: unexpected output %q", name, out)
	}
	debFile := fields[1]
	dest := filepath.Join(debs, strings.TrimSuffix(debFile, ".deb"))
	if _, err := os.Stat(dest); err == nil {
		return dest, nil
	}
	if _, err := runTool(ctx, tmp, "apt-get", "download", name); err != nil {
		return "", err
	}
	unpacked := filepath.Join(tmp, "root")
	if _, err := runTool(ctx, tmp, "dpkg-deb", "-x", filepath.Join(tmp, debFile), unpacked); err != nil {
		return "", err
	}
	// The rename publishes the tree whole, so a concurrent or interrupted
	// run never sees half an unpacking.
	if err := os.Rename(unpacked, dest); err != nil {
		return "", fmt.Errorf("publish %s: %w", dest, err)
	}
	return dest, nil
}

// resolveDependency returns the one dependency of a metapackage whose name
// matches want (linux-image-cloud-amd64 → linux-image-6.1.0-N-cloud-amd64).
func resolveDependency(ctx context.Context, meta string, want *regexp.Regexp) (string, error) {
	out, err := runTool(ctx, "", "apt-cache", "depends", "--no-recommends", "--no-suggests", meta)
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		dep, ok := strings.CutPrefix(line, "Depends: ")
		if ok && want.MatchString(dep) {
			return dep, nil
		}
	}
	return "", fmt.Errorf("apt-cache depends %s: no dependency matching %s", meta, want)
}

func cachedPackages(cache, pattern string) []string {
	m, _ := filepath.Glob(filepath.Join(cache, "debs", pattern))
	sort.Strings(m)
	return m
}

func runTool(ctx context.Context, dir, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, aptTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(lastLine(stderr.String())))
	}
	return stdout.String(), nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// lockDir takes an exclusive flock on dir/.lock; go test runs package test
// binaries in parallel and several of them fetch the same fixtures.
func lockDir(t testing.TB, dir string) (unlock func()) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("open cache lock: %v", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("lock %s: %v", dir, err)
	}
	return func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}
}

// Initramfs describes a busybox initramfs for test guests. Its /init mounts
// /proc, /sys and /dev, installs the busybox applets, loads Modules in order
// from ModulesDir and then runs Script with /bin/sh, as PID 1.
type Initramfs struct {
	Busybox    string   // static busybox binary (see Busybox)
	ModulesDir string   // …/lib/modules/<release> (see DebianKernel)
	Modules    []string // module names; '-' and '_' are interchangeable
	Script     string   // shell run after the modules are loaded
	// Files are extra regular files; parent directories are created.
	Files []InitramfsFile
}

// InitramfsFile is one regular file in an Initramfs.
type InitramfsFile struct {
	Path string // absolute guest path
	Mode fs.FileMode
	Data []byte
}

// BuildInitramfs writes spec as a gzip-compressed newc cpio archive under
// t.TempDir() and returns its path.
func BuildInitramfs(t testing.TB, spec Initramfs) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "initramfs.cpio.gz")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := WriteInitramfs(f, spec); err != nil {
		t.Fatalf("build initramfs: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// WriteInitramfs writes spec to w as a gzip-compressed newc cpio archive.
func WriteInitramfs(w io.Writer, spec Initramfs) error {
	bb, err := os.ReadFile(spec.Busybox)
	if err != nil {
		return fmt.Errorf("read busybox: %w", err)
	}
	mods, err := findModules(spec.ModulesDir, spec.Modules)
	if err != nil {
		return err
	}
	zw := gzip.NewWriter(w)
	cw := NewCPIOWriter(zw)
	made := map[string]bool{}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "etc", "root", "lib", "lib/modules"} {
		made[d] = true
		cw.Dir(d, 0o755)
	}
	cw.File("bin/busybox", 0o755, bb)
	cw.Symlink("bin/sh", "busybox")

	var init strings.Builder
	init.WriteString("#!/bin/sh\n")
	init.WriteString("/bin/busybox --install -s\n")
	init.WriteString("export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root\n")
	init.WriteString("mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n")
	for i, m := range mods {
		name := fmt.Sprintf("lib/modules/%02d-%s", i, filepath.Base(m.path))
		data, err := os.ReadFile(m.path)
		if err != nil {
			return fmt.Errorf("read module %s: %w", m.name, err)
		}
		cw.File(name, 0o644, data)
		fmt.Fprintf(&init, "insmod /%s || echo 'init: insmod %s failed'\n", name, m.name)
	}
	init.WriteString(spec.Script)
	init.WriteString("\n")
	cw.File("init", 0o755, []byte(init.String()))

	for _, f := range spec.Files {
		rel := strings.TrimPrefix(filepath.Clean("/"+f.Path), "/")
		if rel == "" || rel == "init" || made[rel] {
			return fmt.Errorf("initramfs file %q: reserved path", f.Path)
		}
		var dirs []string
		for d := filepath.Dir(rel); d != "." && !made[d]; d = filepath.Dir(d) {
			dirs = append([]string{d}, dirs...)
		}
		for _, d := range dirs {
			made[d] = true
			cw.Dir(d, 0o755)
		}
		made[rel] = true
		cw.File(rel, f.Mode, f.Data)
	}
	if err := cw.Close(); err != nil {
		return fmt.Errorf("write cpio: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compress cpio: %w", err)
	}
	return nil
}

type module struct{ name, path string }

// findModules locates each named module (.ko, uncompressed, as the Debian
// cloud kernel ships them) under modulesDir.
func findModules(modulesDir string, names []string) ([]module, error) {
	if len(names) == 0 {
		return nil, nil
	}
	norm := func(s string) string { return strings.ReplaceAll(s, "-", "_") }
	index := map[string]string{}
	err := filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			index[norm(strings.TrimSuffix(d.Name(), ".ko"))] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules in %s: %w", modulesDir, err)
	}
	var out []module
	for _, n := range names {
		p, ok := index[norm(n)]
		if !ok {
			return nil, fmt.Errorf("module %s not found under %s", n, modulesDir)
		}
		out = append(out, module{name: n, path: p})
	}
	return out, nil
}

// CPIOWriter writes a cpio archive in the "newc" format the kernel unpacks
// into its initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
// Errors are sticky and reported by Close.
type CPIOWriter struct {
	w   io.Writer
	ino uint32
	n   int64
	err error
}

// NewCPIOWriter returns a writer appending entries to w.
func NewCPIOWriter(w io.Writer) *CPIOWriter { return &CPIOWriter{w: w, ino: 1} }

// Dir adds a directory.
func (c *CPIOWriter) Dir(name string, perm fs.FileMode) {
	c.entry(name, unix.S_IFDIR|uint32(perm.Perm()), 2, nil)
}

// File adds a regular file.
func (c *CPIOWriter) File(name string, perm fs.FileMode, data []byte) {
	c.entry(name, unix.S_IFREG|uint32(perm.Perm()), 1, data)
}

// Symlink adds a symbolic link name → target.
func (c *CPIOWriter) Symlink(name, target string) {
	c.entry(name, unix.S_IFLNK|0o777, 1, []byte(target))
}

// Close writes the trailer. It does not close the underlying writer.
func (c *CPIOWriter) Close() error {
	c.entry("TRAILER!!!", 0, 1, nil)
	return c.err
}

func (c *CPIOWriter) entry(name string, mode uint32, nlink uint32, data []byte) {
	if c.err != nil {
		return
	}
	if name == "" || strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0) {
		c.err = fmt.Errorf("cpio entry %q: want a relative path", name)
		return
	}
	ino := c.ino
	c.ino++
	if name == "TRAILER!!!" {
		ino = 0
	}
	// 13 eight-digit hex fields after the magic; the name includes its NUL.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
	c.write(data)
	c.pad()
}

func (c *CPIOWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	if err != nil {
		c.err = err
	}
}

// pad aligns the stream to 4 bytes, as newc requires after the name and
// after the data.
func (c *CPIOWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}
