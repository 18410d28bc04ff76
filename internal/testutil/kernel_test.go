package testutil

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

type cpioEntry struct {
	Name string
	Mode uint32
	Data string
}

// readNewc parses a newc archive the way the kernel's initramfs unpacker
// does (init/initramfs.c): magic, 13 hex fields, the NUL-terminated name
// and the data, each padded to 4 bytes, up to TRAILER!!!.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	pad := func() { off = (off + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			t.Fatalf("truncated header at %d", off)
		}
		if off%4 != 0 {
			t.Fatalf("header at %d is not 4-byte aligned", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		off += 110
		name := string(b[off : off+namesize-1])
		if b[off+namesize-1] != 0 {
			t.Fatalf("name %q not NUL-terminated", name)
		}
		off += namesize
		pad()
		data := string(b[off : off+size])
		off += size
		pad()
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, cpioEntry{name, uint32(mode), data})
	}
}

// The writer produces the newc layout the kernel unpacks: directories,
// files and symlinks with their modes, 4-byte alignment and a trailer.
func TestCPIOWriter(t *testing.T) {
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	w.Dir("etc", 0o755)
	w.File("etc/hostname", 0o644, []byte("guest\n"))
	w.File("etc/empty", 0o600, nil)
	w.Symlink("bin/sh", "busybox")
	w.File("x", 0o755, []byte("abcde"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	want := []cpioEntry{
		{"etc", unix.S_IFDIR | 0o755, ""},
		{"etc/hostname", unix.S_IFREG | 0o644, "guest\n"},
		{"etc/empty", unix.S_IFREG | 0o600, ""},
		{"bin/sh", unix.S_IFLNK | 0o777, "busybox"},
		{"x", unix.S_IFREG | 0o755, "abcde"},
	}
	if diff := cmp.Diff(want, readNewc(t, buf.Bytes())); diff != "" {
		t.Errorf("archive (-want +got):\n%s", diff)
	}
}

// Names the kernel would misplace are refused, and the error sticks until
// Close reports it.
func TestCPIOWriterRejects(t *testing.T) {
	for _, name := range []string{"", "/etc/passwd", "a\x00b"} {
		w := NewCPIOWriter(io.Discard)
		w.File(name, 0o644, nil)
		w.File("ok", 0o644, nil)
		if err := w.Close(); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
}

// The initramfs carries busybox, the named modules in load order (found
// whatever their directory, '-' and '_' alike), an /init that loads them
// before the script, and the extra files with their modes.
func TestWriteInitramfs(t *testing.T) {
	dir := t.TempDir()
	bb := filepath.Join(dir, "busybox")
	mods := filepath.Join(dir, "lib/modules/6.1.0-test")
	for path, data := range map[string]string{
		bb:                                   "BUSYBOX",
		mods + "/kernel/drivers/a/first.ko":  "FIRST",
		mods + "/kernel/net/b/sec-ond.ko":    "SECOND",
		mods + "/kernel/drivers/c/unused.ko": "UNUSED",
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	spec := Initramfs{
		Busybox: bb, ModulesDir: mods, Modules: []string{"sec_ond", "first"},
		Script: "echo READY",
		Files: []InitramfsFile{
			{Path: "/etc/acpi/poweroff", Mode: 0o755, Data: []byte("#!/bin/sh\npoweroff -f\n")},
			{Path: "/www/index.html", Mode: 0o644, Data: []byte("hi")},
		},
	}
	var buf bytes.Buffer
	if err := WriteInitramfs(&buf, spec); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]cpioEntry{}
	for _, e := range readNewc(t, raw) {
		if _, dup := got[e.Name]; dup {
			t.Errorf("entry %q twice", e.Name)
		}
		got[e.Name] = e
	}
	for name, want := range map[string]cpioEntry{
		"bin/busybox":               {"bin/busybox", unix.S_IFREG | 0o755, "BUSYBOX"},
		"bin/sh":                    {"bin/sh", unix.S_IFLNK | 0o777, "busybox"},
		"lib/modules/00-sec-ond.ko": {"lib/modules/00-sec-ond.ko", unix.S_IFREG | 0o644, "SECOND"},
		"lib/modules/01-first.ko":   {"lib/modules/01-first.ko", unix.S_IFREG | 0o644, "FIRST"},
		"etc/acpi":                  {"etc/acpi", unix.S_IFDIR | 0o755, ""},
		"etc/acpi/poweroff":         {"etc/acpi/poweroff", unix.S_IFREG | 0o755, "#!/bin/sh\npoweroff -f\n"},
		"www":                       {"www", unix.S_IFDIR | 0o755, ""},
		"www/index.html":            {"www/index.html", unix.S_IFREG | 0o644, "hi"},
	} {
		if diff := cmp.Diff(want, got[name]); diff != "" {
			t.Errorf("%s (-want +got):\n%s", name, diff)
		}
	}
	for name := range got {
		if strings.Contains(name, "unused") {
			t.Errorf("unrequested module %s packed", name)
		}
	}
	init := got["init"].Data
	i1 := strings.Index(init, "insmod /lib/modules/00-sec-ond.ko")
	i2 := strings.Index(init, "insmod /lib/modules/01-first.ko")
	i3 := strings.Index(init, "echo READY")
	if !strings.HasPrefix(init, "#!/bin/sh\n") || i1 < 0 || i2 < i1 || i3 < i2 {
		t.Errorf("/init does not load the modules in order before the script:\n%s", init)
	}
	if got["init"].Mode != unix.S_IFREG|0o755 {
		t.Errorf("/init mode %o", got["init"].Mode)
	}

	bad := spec
	bad.Modules = []string{"first", "nosuch"}
	if err := WriteInitramfs(io.Discard, bad); err == nil || !strings.Contains(err.Error(), "module nosuch not found") {
		t.Errorf("missing module: %v", err)
	}
	bad = spec
	bad.Files = []InitramfsFile{{Path: "/init", Mode: 0o755}}
	if err := WriteInitramfs(io.Discard, bad); err == nil {
		t.Error("a file replacing /init was accepted")
	}
}

// The Debian kernel fixture yields a bzImage and the matching modules,
// including the virtio ones test guests load, and a second call is served
// from the cache.
func TestDebianKernel(t *testing.T) {
	SkipShort(t, "downloads the Debian cloud kernel (27 MB) on first use")
	kernel, modules := DebianKernel(t)
	b, err := os.ReadFile(kernel)
	if err != nil {
		t.Fatal(err)
	}
	// The x86 boot protocol's setup header: "HdrS" at 0x202.
	if len(b) < 0x210 || string(b[0x202:0x206]) != "HdrS" {
		t.Fatalf("%s is not a bzImage", kernel)
	}
	release := strings.TrimPrefix(filepath.Base(kernel), "vmlinuz-")
	if filepath.Base(modules) != release {
		t.Errorf("modules dir %s does not match kernel %s", modules, release)
	}
	if _, err := findModules(modules, GuestModules); err != nil {
		t.Errorf("guest modules: %v", err)
	}
	k2, m2 := DebianKernel(t)
	if k2 != kernel || m2 != modules {
		t.Errorf("second call gave %s, %s", k2, m2)
	}
	bb := Busybox(t)
	if st, err := os.Stat(bb); err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("busybox %s: %v", bb, err)
	}
	entries, _ := os.ReadDir(filepath.Join(TestCacheDir(t), "debs"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".fetch-") {
			t.Errorf("download dir %s left in the cache", e.Name())
		}
	}
}

// A cached package is used when apt cannot be asked (no mirror, no lists),
// and nothing cached means a skip, not a failure.
func TestDebianPackageOffline(t *testing.T) {
	cache := t.TempDir()
	t.Setenv(EnvTestCache, cache)
	// An apt-get that always fails stands for an unreachable mirror.
	bin := t.TempDir()
	for _, tool := range []string{"apt-get", "apt-cache"} {
		script := "#!/bin/sh\necho 'E: Failed to fetch: Temporary failure resolving' >&2\nexit 100\n"
		if err := os.WriteFile(filepath.Join(bin, tool), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	RequireCommand(t, "dpkg-deb")

	// A name no other test asks for, so nothing is remembered in-process.
	cached := filepath.Join(cache, "debs", "banger-offline-fixture_1.0-1_all")
	if err := os.MkdirAll(cached, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := DebianPackage(t, "banger-offline-fixture"); got != cached {
		t.Errorf("offline DebianPackage = %s, want the cached copy %s", got, cached)
	}

	// The subtest cannot pass: it either skips or fails, and t.Run reports
	// false only for a failure.
	if !t.Run("nothing cached", func(t *testing.T) {
		DebianPackage(t, "hello")
		t.Error("DebianPackage returned without a package")
	}) {
		t.Error("an unreachable mirror failed the test instead of skipping it")
	}
}
