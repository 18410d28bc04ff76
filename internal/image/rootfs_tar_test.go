package image

import (
	"archive/tar"
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/testutil"
)

type tarEntry struct {
	name     string
	typ      byte
	mode     int64
	uid, gid int
	data     string
	link     string
	major    int64
	minor    int64
	xattrs   map[string]string
}

func writeTar(t *testing.T, path string, entries []tarEntry) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid, Size: int64(len(e.data)),
			Linkname: e.link, Devmajor: e.major, Devminor: e.minor, ModTime: mtime, Format: tar.FormatPAX}
		for k, v := range e.xattrs {
			if hdr.PAXRecords == nil {
				hdr.PAXRecords = map[string]string{}
			}
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

// An unprivileged build's tarball becomes an image with Debian's owners,
// modes, device nodes, FIFOs and file capabilities, although the unpacked
// tree belongs to the user and holds no device nodes.
func TestUnpackRootfsFixesOwners(t *testing.T) {
	testutil.RequireCommand(t, "mkfs.ext4", "debugfs", "e2fsck")
	ctx := t.Context()
	dir := t.TempDir()
	capability := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" // cap_net_raw+ep
	writeTar(t, filepath.Join(dir, "rootfs.tar"), []tarEntry{
		{name: "./", typ: tar.TypeDir, mode: 0o755},
		{name: "./etc/", typ: tar.TypeDir, mode: 0o755},
		{name: "./etc/shadow", typ: tar.TypeReg, mode: 0o640, gid: 42, data: "root:*:1::::::\n"},
		{name: "./etc/locked", typ: tar.TypeReg, mode: 0o000, data: "nobody reads me\n"},
		{name: "./etc/with space", typ: tar.TypeReg, mode: 0o644, data: "x"},
		{name: `./etc/system-systemd\x2dcryptsetup.slice`, typ: tar.TypeReg, mode: 0o644, data: "unit"},
		{name: "./usr/", typ: tar.TypeDir, mode: 0o755},
		{name: "./usr/bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "./usr/bin/sudo", typ: tar.TypeReg, mode: 0o4755, data: "#!/bin/sh\n"},
		{name: "./usr/bin/sudoedit", typ: tar.TypeLink, link: "./usr/bin/sudo"},
		{name: "./usr/bin/ping", typ: tar.TypeReg, mode: 0o755, data: "ping", xattrs: map[string]string{"security.capability": capability}},
		{name: "./bin", typ: tar.TypeSymlink, link: "usr/bin"},
		{name: "./long", typ: tar.TypeSymlink, link: strings.Repeat("d/", 40) + "target"},
		{name: "./var/", typ: tar.TypeDir, mode: 0o755},
		{name: "./var/partial/", typ: tar.TypeDir, mode: 0o700, uid: 100},
		{name: "./var/partial/f", typ: tar.TypeReg, mode: 0o600, uid: 100, data: "apt"},
		{name: "./proc/", typ: tar.TypeDir, mode: 0o555},
		{name: "./dev/", typ: tar.TypeDir, mode: 0o755},
		{name: "./dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{name: "./dev/loop0", typ: tar.TypeBlock, mode: 0o660, gid: 6, major: 7, minor: 0},
		{name: "./run/", typ: tar.TypeDir, mode: 0o755},
		{name: "./run/initctl", typ: tar.TypeFifo, mode: 0o600},
	})
	tree := filepath.Join(dir, "rootfs")
	if err := os.Mkdir(tree, 0o700); err != nil {
		t.Fatal(err)
	}
	fixes, err := unpackRootfs(ctx, filepath.Join(dir, "rootfs.tar"), tree)
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// Make the tree look as an unprivileged unpack leaves it: every
		// file the user's (chown clears set-id bits; put them back).
		if err := filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
			fi, _ := os.Lstat(p)
			if err := os.Lchown(p, 12345, 12345); err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&fs.ModeSymlink == 0 {
				if err := os.Chmod(p, fi.Mode()); err != nil {
					t.Fatal(err)
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(tree, "usr/bin/sudoedit")); err != nil || string(b) != "#!/bin/sh\n" {
		t.Errorf("hard link: %q, %v", b, err)
	}
	img := filepath.Join(dir, "rootfs.ext4")
	if err := ext4.Make(ctx, tree, img, 64<<20, ext4.MakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := applyFixes(ctx, img, dir, fixes); err != nil {
		t.Fatal(err)
	}
	if err := ext4.Fsck(ctx, img); err != nil {
		t.Fatalf("fsck after fixes: %v", err)
	}

	for p, want := range map[string]struct {
		uid, gid int
		mode     fs.FileMode
	}{
		"/":                 {0, 0, fs.ModeDir | 0o755},
		"/etc/shadow":       {0, 42, 0o640},
		"/etc/locked":       {0, 0, 0},
		"/usr/bin/sudo":     {0, 0, fs.ModeSetuid | 0o755},
		"/usr/bin/sudoedit": {0, 0, fs.ModeSetuid | 0o755},
		"/var/partial":      {100, 0, fs.ModeDir | 0o700},
		"/var/partial/f":    {100, 0, 0o600},
		"/proc":             {0, 0, fs.ModeDir | 0o555},
		"/dev/null":         {0, 0, fs.ModeDevice | fs.ModeCharDevice | 0o666},
		"/dev/loop0":        {0, 6, fs.ModeDevice | 0o660},
		"/run/initctl":      {0, 0, fs.ModeNamedPipe | 0o600},
		"/bin":              {0, 0, fs.ModeSymlink | 0o777},
	} {
		fi, err := ext4.Stat(ctx, img, p)
		if err != nil {
			t.Errorf("stat %s: %v", p, err)
			continue
		}
		if fi.UID != want.uid || fi.GID != want.gid || fi.Mode != want.mode {
			t.Errorf("%s: %d:%d %v, want %d:%d %v", p, fi.UID, fi.GID, fi.Mode, want.uid, want.gid, want.mode)
		}
	}
	if fi, err := ext4.Stat(ctx, img, "/long"); err != nil || fi.Target != strings.Repeat("d/", 40)+"target" {
		t.Errorf("long symlink: %+v, %v", fi, err)
	}
	if b, err := ext4.ReadFile(ctx, img, "/etc/locked"); err != nil || string(b) != "nobody reads me\n" {
		t.Errorf("mode-0 file: %q, %v", b, err)
	}
	debugfs, _ := sbinTool("debugfs")
	// ext4.Stat refuses names with spaces or backslashes; debugfs takes
	// them quoted.
	for _, p := range []string{"/etc/with space", `/etc/system-systemd\x2dcryptsetup.slice`} {
		if out, err := exec.CommandContext(ctx, debugfs, "-R", `stat "`+p+`"`, img).CombinedOutput(); err != nil ||
			!strings.Contains(string(out), "Mode:  0644") || !strings.Contains(string(out), "User:     0   Group:     0") {
			t.Errorf("%s: %v\n%s", p, err, out)
		}
	}
	out, err := exec.CommandContext(ctx, debugfs, "-R", "ea_get -x /usr/bin/ping security.capability", img).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "01 00 00 02 00 20") {
		t.Errorf("file capability of /usr/bin/ping: %v\n%s", err, out)
	}
}

// Entries that would climb out of the tree, or that debugfs could not
// name, are refused before anything is written for them.
func TestUnpackRootfsRefuses(t *testing.T) {
	for _, name := range []string{"../evil", "./a/../../evil", "./a//b", "./a\nb", `./a"b`} {
		dir := t.TempDir()
		writeTar(t, filepath.Join(dir, "x.tar"), []tarEntry{{name: name, typ: tar.TypeReg, mode: 0o644, data: "x"}})
		tree := filepath.Join(dir, "tree")
		if err := os.Mkdir(tree, 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := unpackRootfs(t.Context(), filepath.Join(dir, "x.tar"), tree); err == nil {
			t.Errorf("entry %q accepted", name)
		}
		if _, err := os.Stat(filepath.Join(dir, "evil")); err == nil {
			t.Errorf("entry %q wrote outside the tree", name)
		}
	}
	// A symlink in the tree does not lead writes out of it.
	dir := t.TempDir()
	writeTar(t, filepath.Join(dir, "x.tar"), []tarEntry{
		{name: "./out", typ: tar.TypeSymlink, link: dir},
		{name: "./out/evil", typ: tar.TypeReg, mode: 0o644, data: "x"},
	})
	tree := filepath.Join(dir, "tree")
	if err := os.Mkdir(tree, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := unpackRootfs(t.Context(), filepath.Join(dir, "x.tar"), tree); err == nil {
		t.Error("write through an escaping symlink accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "evil")); err == nil {
		t.Error("write through an escaping symlink left a file outside the tree")
	}
}

// tarEntryName never returns a path that climbs out, is absolute, or holds
// a character debugfs would split or misread.
func FuzzTarEntryName(f *testing.F) {
	for _, s := range []string{"./", "./usr/bin/ls", "../x", "./a/../b", "a//b", "./dev/null", "x\ny", `a"b`, `./a\x2db`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		got, err := tarEntryName(name)
		if err != nil {
			return
		}
		if got == "." {
			return
		}
		if strings.HasPrefix(got, "/") || strings.ContainsAny(got, "\"\n\r\x00") {
			t.Fatalf("tarEntryName(%q) = %q", name, got)
		}
		for _, c := range strings.Split(got, "/") {
			if c == "" || c == "." || c == ".." {
				t.Fatalf("tarEntryName(%q) = %q has component %q", name, got, c)
			}
		}
	})
}
