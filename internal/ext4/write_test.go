package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/testutil"
)

// baseTree is a small root file system like the ones banger clones: an
// /etc/hostname to replace, host keys to remove, /root 0700 without .ssh,
// and a merged-/usr /lib symlink.
func baseTree() map[string]treeFile {
	return map[string]treeFile{
		"etc/hostname":                 {mode: 0o644, data: "debian\n"},
		"etc/ssh/ssh_host_rsa_key":     {mode: 0o600, data: "old rsa key\n"},
		"etc/ssh/ssh_host_rsa_key.pub": {mode: 0o644, data: "ssh-rsa AAAA old\n"},
		"etc/ssh/sshd_config":          {mode: 0o644, data: "PermitRootLogin prohibit-password\n"},
		"root":                         {mode: os.ModeDir | 0o700},
		"usr/lib/os-release":           {mode: 0o644, data: "ID=debian\n"},
		"lib":                          {mode: os.ModeSymlink, data: "usr/lib"},
		"opt":                          {mode: os.ModeDir | 0o755},
		"etc/resolv.conf":              {mode: os.ModeSymlink, data: "../run/systemd/resolve/stub-resolv.conf"},
	}
}

// WriteFiles writes regular files, directories and symlinks with their
// modes and owners, creates missing parents root-owned 0755, replaces
// existing files, removes what it is told to, writes through a symlinked
// parent, and leaves e2fsck clean; a second run over its own output works.
func TestWriteFilesRoundTrip(t *testing.T) {
	requireTools(t)
	ctx := t.Context()
	img := newImage(t, 2<<30, baseTree())
	slowTarget := "../../" + strings.Repeat("long-target-", 10)
	files := []File{
		{Path: "/etc/hostname", Mode: 0o644, Data: []byte("dev\n")},
		{Path: "/etc/machine-id", Mode: 0o444, Data: []byte("0123456789abcdef0123456789abcdef\n")},
		{Path: "/root/.ssh", Dir: true, Mode: 0o700},
		{Path: "/root/.ssh/authorized_keys", Mode: 0o600, Data: []byte("ssh-ed25519 AAAA test\n")},
		{Path: "/etc/ssh/ssh_host_rsa_key", Remove: true},
		{Path: "/etc/ssh/ssh_host_rsa_key.pub", Remove: true},
		{Path: "/etc/ssh/ssh_host_dsa_key", Remove: true},
		{Path: "/opt/banger/deep/nested/data.bin", Mode: 0o640, UID: 1000, GID: 1001, Data: bytes.Repeat([]byte{0, 1, 2, 0xff}, 5000)},
		{Path: "/opt/banger/link", Symlink: "deep/nested/data.bin", UID: 1000, GID: 1000},
		{Path: "/opt/banger/slowlink", Symlink: slowTarget},
		{Path: "/opt/banger/empty", Mode: 0o600, Data: nil},
		{Path: "/opt/banger/bigid", Mode: 0o644, UID: 100000, GID: 4000000000, Data: []byte("x")},
		{Path: "/usr/local/bin/suid", Mode: os.ModeSetuid | os.ModeSetgid | 0o755, Data: []byte("#!/bin/sh\n")},
		{Path: "/tmp/sticky", Dir: true, Mode: os.ModeSticky | 0o777},
		{Path: "/lib/systemd/network/10-banger.network", Mode: 0o644, Data: []byte("[Match]\n")},
		{Path: "/etc/resolv.conf", Mode: 0o644, Data: []byte("nameserver 10.0.2.3\n")},
	}
	check := func(t *testing.T) {
		for _, f := range files {
			fi, err := Stat(ctx, img, f.Path)
			if f.Remove {
				if !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("Stat(%s) after removal = %+v, %v; want ErrNotExist", f.Path, fi, err)
				}
				continue
			}
			if err != nil {
				t.Errorf("Stat(%s): %v", f.Path, err)
				continue
			}
			want := FileInfo{Mode: f.Mode, UID: f.UID, GID: f.GID, Size: int64(len(f.Data))}
			switch {
			case f.Dir:
				want.Mode |= os.ModeDir
				want.Size = fi.Size
			case f.Symlink != "":
				want = FileInfo{Mode: os.ModeSymlink | 0o777, UID: f.UID, GID: f.GID, Size: int64(len(f.Symlink)), Target: f.Symlink}
			}
			if d := cmp.Diff(want, fi); d != "" {
				t.Errorf("Stat(%s) (-want +got):\n%s", f.Path, d)
			}
			if !f.Dir && f.Symlink == "" {
				got, err := ReadFile(ctx, img, f.Path)
				if err != nil {
					t.Errorf("ReadFile(%s): %v", f.Path, err)
				} else if !bytes.Equal(got, f.Data) {
					t.Errorf("ReadFile(%s) = %d bytes %.32q, want %d bytes %.32q", f.Path, len(got), got, len(f.Data), f.Data)
				}
			}
		}
		// Implicit parents: root-owned 0755.
		for _, p := range []string{"/opt/banger", "/opt/banger/deep", "/opt/banger/deep/nested", "/usr/local", "/usr/local/bin"} {
			fi, err := Stat(ctx, img, p)
			if err != nil {
				t.Errorf("Stat(%s): %v", p, err)
				continue
			}
			if d := cmp.Diff(FileInfo{Mode: os.ModeDir | 0o755, Size: fi.Size}, fi); d != "" {
				t.Errorf("parent %s (-want +got):\n%s", p, d)
			}
		}
		// The symlinked parent was followed, not replaced.
		if fi, err := Stat(ctx, img, "/lib"); err != nil || fi.Target != "usr/lib" {
			t.Errorf("Stat(/lib) = %+v, %v; want the usr/lib symlink kept", fi, err)
		}
		if got, err := ReadFile(ctx, img, "/usr/lib/systemd/network/10-banger.network"); err != nil || string(got) != "[Match]\n" {
			t.Errorf("file written through /lib symlink: %q, %v", got, err)
		}
		// Untouched neighbours survive.
		if got, err := ReadFile(ctx, img, "/etc/ssh/sshd_config"); err != nil || string(got) != "PermitRootLogin prohibit-password\n" {
			t.Errorf("sshd_config = %q, %v", got, err)
		}
		if err := Fsck(ctx, img); err != nil {
			t.Error(err)
		}
	}

	if err := WriteFiles(ctx, img, files); err != nil {
		t.Fatal(err)
	}
	check(t)

	// Again over the result, with new content and a changed owner: every
	// path now exists and is replaced in place.
	files[0].Data = []byte("dev2\n")
	files[7].Data = []byte("smaller")
	files[7].UID = 0
	if err := WriteFiles(ctx, img, files); err != nil {
		t.Fatal(err)
	}
	check(t)
}

// An entry that conflicts with what the image holds is refused after the
// read-only probe, before anything is written: the image is byte-identical.
func TestWriteFilesRefusesConflicts(t *testing.T) {
	requireTools(t)
	img := newImage(t, 64<<20, map[string]treeFile{
		"etc/hostname": {mode: 0o644, data: "debian\n"},
		"etc/ssh":      {mode: os.ModeDir | 0o755},
		"dangling":     {mode: os.ModeSymlink, data: "nowhere"},
		"filelink":     {mode: os.ModeSymlink, data: "etc/hostname"},
	})
	before := testutil.SHA256File(t, img)
	tests := []struct {
		name  string
		files []File
		want  string
	}{
		{"parent is a regular file", []File{{Path: "/etc/hostname/x", Data: []byte("x")}}, "parent /etc/hostname is a regular file"},
		{"parent is a dangling symlink", []File{{Path: "/dangling/x", Data: []byte("x")}}, "parent /dangling is a symlink not leading to a directory"},
		{"parent is a symlink to a file", []File{{Path: "/filelink/x", Dir: true}}, "parent /filelink is a symlink not leading to a directory"},
		{"file over a directory", []File{{Path: "/etc/ssh", Data: []byte("x")}}, "/etc/ssh is a directory"},
		{"symlink over a directory", []File{{Path: "/etc", Symlink: "/usr/etc"}}, "/etc is a directory"},
		{"removing a directory", []File{{Path: "/etc/ssh", Remove: true}}, "/etc/ssh is a directory"},
		{"entry under a file made earlier in the call", []File{
			{Path: "/opt/a", Data: []byte("x")},
			{Path: "/opt/a/b", Data: []byte("y")},
		}, "parent /opt/a is a regular file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := WriteFiles(t.Context(), img, tt.files)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("WriteFiles = %v, want an error containing %q", err, tt.want)
			}
			if testutil.SHA256File(t, img) != before {
				t.Fatal("image changed")
			}
		})
	}
}

// A journal awaiting replay is refused: the replay at mount would undo
// what debugfs wrote.
func TestWriteFilesRefusesNeedsRecovery(t *testing.T) {
	requireTools(t)
	img := newImage(t, 64<<20, nil)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	sb := make([]byte, superblockSize)
	if _, err := f.ReadAt(sb, superblockOffset); err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(sb[offFeatureIncompat:], binary.LittleEndian.Uint32(sb[offFeatureIncompat:])|incompatRecover)
	resum(sb)
	if _, err := f.WriteAt(sb, superblockOffset); err != nil {
		t.Fatal(err)
	}
	f.Close()
	err = WriteFiles(t.Context(), img, []File{{Path: "/x", Data: []byte("x")}})
	if !errors.Is(err, ErrNeedsRecovery) {
		t.Fatalf("WriteFiles = %v, want ErrNeedsRecovery", err)
	}
}

// ReadFile and Stat say "not found" with fs.ErrNotExist, and ReadFile
// refuses what is not a regular file.
func TestReadFileErrors(t *testing.T) {
	requireTools(t)
	ctx := t.Context()
	img := newImage(t, 64<<20, map[string]treeFile{"etc/hostname": {mode: 0o644, data: "x\n"}})
	if _, err := ReadFile(ctx, img, "/etc/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadFile(missing) = %v, want ErrNotExist", err)
	}
	if _, err := Stat(ctx, img, "/etc/hostname/below-a-file"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat(below a file) = %v, want ErrNotExist", err)
	}
	if _, err := ReadFile(ctx, img, "/etc"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("ReadFile(dir) = %v, want not a regular file", err)
	}
	if _, err := ReadFile(ctx, img, "/etc/../etc/hostname"); err == nil {
		t.Error("ReadFile accepted a path with ..")
	}
}

// validatePath rejects each input that debugfs would misparse or that
// names something other than what it says, and the message names the
// attack.
func TestValidatePathRejects(t *testing.T) {
	tests := []struct {
		name, path, want string
	}{
		{"newline smuggles a second command", "/etc/x\nrm /etc/passwd", "line break"},
		{"newline smuggles a shell escape", "/etc/x\n!sh -c id", "line break"},
		{"carriage return ends the line too", "/etc/x\rmkdir /evil", "line break"},
		{"NUL truncates the name", "/etc/x\x00y", "NUL"},
		{"space splits arguments", "/etc/a b", "whitespace"},
		{"tab splits arguments", "/etc/a\tb", "whitespace"},
		{"double quote starts debugfs quoting", `/etc/"x`, "double quote"},
		{"dot-dot climbs out", "/etc/../root/.ssh/authorized_keys", `".."`},
		{"dot-dot at the end", "/etc/..", `".."`},
		{"relative path resolves against cwd", "etc/passwd", "relative"},
		{"inode syntax <N>", "<2>", "'<'"},
		{"option-looking component", "/tmp/-rf", "starting with '-'"},
		{"root itself", "/", "root directory"},
		{"empty", "", "empty"},
		{"trailing slash", "/etc/", "not clean"},
		{"double slash", "/etc//passwd", "not clean"},
		{"dot component", "/etc/./passwd", "not clean"},
		{"backslash", `/etc/a\b`, `'\\'`},
		{"shell metacharacters", "/etc/$(id)", "'$'"},
		{"non-ASCII", "/etc/caf\u00e9", "only letters"},
		{"overlong path", "/" + strings.Repeat("a/", 600) + "a", "over 1024"},
		{"overlong component", "/" + strings.Repeat("a", 256), "over 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validatePath(tt.path)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("validatePath(%q) = %v, want an error containing %q", tt.path, err, tt.want)
			}
		})
	}
}

// validatePath accepts the paths banger writes.
func TestValidatePathAccepts(t *testing.T) {
	for _, p := range []string{
		"/etc/hostname", "/root/.ssh/authorized_keys", "/etc/systemd/network/10-banger.network",
		"/etc/ssh/ssh_host_ed25519_key.pub", "/var/lib/a+b@c:d,e=f~g%h", "/" + strings.Repeat("a", 255),
	} {
		if err := validatePath(p); err != nil {
			t.Errorf("validatePath(%q) = %v", p, err)
		}
	}
}

// A File is refused when its fields contradict each other or its symlink
// target could be misparsed; WriteFiles refuses it before touching the
// image (so an image path that does not exist is never reached).
func TestFileValidate(t *testing.T) {
	tests := []struct {
		name  string
		files []File
		want  string
	}{
		{"dir and symlink", []File{{Path: "/a", Dir: true, Symlink: "b"}}, "more than one"},
		{"data on a directory", []File{{Path: "/a", Dir: true, Data: []byte("x")}}, "Data set"},
		{"type bits in mode", []File{{Path: "/a", Mode: os.ModeDir | 0o755}}, "type bits"},
		{"mode on a symlink", []File{{Path: "/a", Symlink: "b", Mode: 0o644}}, "mode"},
		{"owner on a removal", []File{{Path: "/a", Remove: true, UID: 5}}, "owner set"},
		{"negative uid", []File{{Path: "/a", UID: -1}}, "out of range"},
		{"uid 2^32-1 means unchanged", []File{{Path: "/a", GID: 1<<32 - 1}}, "out of range"},
		{"symlink target with a newline", []File{{Path: "/a", Symlink: "b\nrm /etc/passwd"}}, "line break"},
		{"symlink target with a space", []File{{Path: "/a", Symlink: "b c"}}, "whitespace"},
		{"symlink target like an option", []File{{Path: "/a", Symlink: "-f"}}, "starts with '-'"},
		{"same path twice", []File{{Path: "/a", Data: []byte("1")}, {Path: "/a", Data: []byte("2")}}, "listed twice"},
		{"bad path", []File{{Path: "/a/../b"}}, `".."`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := WriteFiles(t.Context(), "/nonexistent/image.ext4", tt.files)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("WriteFiles = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// The identity set banger writes into every new VM (see internal/guest):
// the same paths, kinds and sizes.
func identitySet() []File {
	key := bytes.Repeat([]byte("k"), 400)
	pub := bytes.Repeat([]byte("p"), 100)
	return []File{
		{Path: "/etc/hostname", Mode: 0o644, Data: []byte("dev\n")},
		{Path: "/etc/hosts", Mode: 0o644, Data: bytes.Repeat([]byte("h"), 200)},
		{Path: "/etc/machine-id", Mode: 0o444, Data: []byte("0123456789abcdef0123456789abcdef\n")},
		{Path: "/etc/systemd/network/10-banger.network", Mode: 0o644, Data: bytes.Repeat([]byte("n"), 150)},
		{Path: "/root/.ssh", Dir: true, Mode: 0o700},
		{Path: "/root/.ssh/authorized_keys", Mode: 0o600, Data: pub},
		{Path: "/etc/ssh/ssh_host_ed25519_key", Mode: 0o600, Data: key},
		{Path: "/etc/ssh/ssh_host_ed25519_key.pub", Mode: 0o644, Data: pub},
		{Path: "/etc/ssh/ssh_host_ecdsa_key", Mode: 0o600, Data: key},
		{Path: "/etc/ssh/ssh_host_ecdsa_key.pub", Mode: 0o644, Data: pub},
		{Path: "/etc/ssh/ssh_host_rsa_key", Remove: true},
		{Path: "/etc/ssh/ssh_host_rsa_key.pub", Remove: true},
		{Path: "/etc/ssh/ssh_host_dsa_key", Remove: true},
		{Path: "/etc/ssh/ssh_host_dsa_key.pub", Remove: true},
	}
}

// BenchmarkWriteFilesIdentity measures WriteFiles of the identity set into
// a 2 GiB image (probe + write + verify, two debugfs runs).
func BenchmarkWriteFilesIdentity(b *testing.B) {
	requireTools(b)
	img := newImage(b, 2<<30, baseTree())
	files := identitySet()
	for b.Loop() {
		if err := WriteFiles(b.Context(), img, files); err != nil {
			b.Fatal(err)
		}
	}
}

// Root-level entries stay at the root after a write deeper down changed
// debugfs's current directory (mkdir, rm and symlink resolve an empty
// parent against it), and nothing of the same name in that directory is
// touched.
func TestWriteFilesRootLevelAfterDeepWrite(t *testing.T) {
	requireTools(t)
	ctx := t.Context()
	img := newImage(t, 64<<20, map[string]treeFile{
		"decoy":               {mode: 0o644, data: "remove me\n"},
		"usr/local/bin/decoy": {mode: 0o644, data: "keep me\n"},
	})
	files := []File{
		{Path: "/usr/local/bin/tool", Mode: 0o755, Data: []byte("#!/bin/sh\n")},
		{Path: "/decoy", Remove: true},
		{Path: "/newdir", Dir: true, Mode: 0o750},
		{Path: "/newlink", Symlink: "usr/local/bin/tool"},
		{Path: "/newfile", Mode: 0o644, Data: []byte("top\n")},
	}
	if err := WriteFiles(ctx, img, files); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadFile(ctx, img, "/usr/local/bin/decoy"); err != nil || string(got) != "keep me\n" {
		t.Errorf("/usr/local/bin/decoy = %q, %v; want it untouched", got, err)
	}
	for _, p := range []string{"/usr/local/bin/newdir", "/usr/local/bin/newlink", "/usr/local/bin/newfile"} {
		if _, err := Stat(ctx, img, p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Stat(%s) = %v, want ErrNotExist (written into the wrong directory)", p, err)
		}
	}
	for _, p := range []string{"/newdir", "/newlink", "/newfile"} {
		if _, err := Stat(ctx, img, p); err != nil {
			t.Errorf("Stat(%s): %v", p, err)
		}
	}
	if _, err := Stat(ctx, img, "/decoy"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat(/decoy) = %v, want removed", err)
	}
	if err := Fsck(ctx, img); err != nil {
		t.Error(err)
	}
}

// A file debugfs cannot open is reported from the transcript's preamble,
// not mistaken for an empty result.
func TestRunDebugfsOpenFailure(t *testing.T) {
	requireTools(t)
	img := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(img, bytes.Repeat([]byte("junk"), 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := runDebugfs(t.Context(), img, t.TempDir(), false, []string{"stat /etc"})
	if err == nil || !strings.Contains(err.Error(), "debugfs open") {
		t.Fatalf("runDebugfs = %v, want an open error", err)
	}
}
