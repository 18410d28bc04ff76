package guest_test

import (
	"crypto/rand"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pkg/sftp"

	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/guest/guesttest"
	"github.com/bangerhq/banger/internal/testutil"
)

func sftpTo(t testing.TB, d *guesttest.SSHD) *sftp.Client {
	t.Helper()
	c, err := guest.Dial(t.Context(), d.Target())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	sc, err := guest.NewSFTP(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sc.Close() })
	return sc
}

func randomFile(t testing.TB, p string, size int64) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// A 100 MiB file goes to the guest and back unchanged (sha256), with its
// mode, and the progress callback reaches the total.
func TestCopyLargeFileBothWays(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	sc := sftpTo(t, d)
	local, remote := t.TempDir(), t.TempDir() // "remote" is where the test sshd writes
	src := filepath.Join(local, "big.bin")
	randomFile(t, src, 100<<20)
	if err := os.Chmod(src, 0o640); err != nil {
		t.Fatal(err)
	}
	want := testutil.SHA256File(t, src)

	var last, total int64
	st, err := guest.Upload(t.Context(), sc, "vm", src, remote+"/", guest.CopyOptions{Progress: func(d, tot int64) { last, total = d, tot }})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 1 || st.Bytes != 100<<20 || last != total || total != 100<<20 {
		t.Fatalf("stats %+v, progress %d/%d", st, last, total)
	}
	if got := testutil.SHA256File(t, remote+"/big.bin"); got != want {
		t.Fatal("uploaded file differs")
	}
	back := filepath.Join(local, "back.bin")
	if _, err := guest.Download(t.Context(), sc, "vm", remote+"/big.bin", back, guest.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := testutil.SHA256File(t, back); got != want {
		t.Fatal("downloaded file differs")
	}
	for _, p := range []string{remote + "/big.bin", back} {
		if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o640 {
			t.Errorf("%s mode %v, want 0640", p, fi.Mode().Perm())
		}
	}
}

type node struct {
	Mode  fs.FileMode
	MTime int64 // seconds
	Data  string
	Link  string
}

// snapshot describes a tree for comparison: modes, mtimes to the second,
// contents, symlink targets.
func snapshot(t *testing.T, root string) map[string]node {
	t.Helper()
	out := map[string]node{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		n := node{Mode: fi.Mode(), MTime: fi.ModTime().Unix()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			n.Link, _ = os.Readlink(p)
			n.MTime = 0 // symlink times are not copied
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			n.Data = string(b)
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// makeTree writes a tree with varied modes and old mtimes.
func makeTree(t *testing.T, root string) {
	t.Helper()
	old := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	for _, d := range []struct {
		p    string
		mode fs.FileMode
	}{{"", 0o755}, {"bin", 0o750}, {"private", 0o700}, {"empty", 0o711}, {"a/b/c", 0o755}} {
		if err := os.MkdirAll(filepath.Join(root, d.p), 0o755); err != nil {
			t.Fatal(err)
		}
		// Directory times and modes are set last, once their entries are
		// written.
		defer func() {
			p := filepath.Join(root, d.p)
			if err := os.Chtimes(p, old, old.Add(time.Duration(len(d.p))*time.Hour)); err != nil {
				t.Error(err)
			}
			if err := os.Chmod(p, d.mode); err != nil {
				t.Error(err)
			}
		}()
	}
	for i, f := range []struct {
		p    string
		mode fs.FileMode
	}{{"bin/run.sh", 0o755}, {"private/key", 0o600}, {"readonly.txt", 0o444}, {"a/b/c/deep.txt", 0o640}, {"setgid", 0o2755}} {
		p := filepath.Join(root, f.p)
		if err := os.WriteFile(p, []byte(strings.Repeat(f.p, i+1)), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, f.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, old, old.Add(time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	symlink(t, "bin/run.sh", filepath.Join(root, "link"))
}

// A directory tree goes to the guest and back with modes, mtimes (to the
// second), contents and symlinks kept; without -r a directory is refused.
func TestCopyTreeKeepsModesAndTimes(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	sc := sftpTo(t, d)
	local, remote := t.TempDir(), t.TempDir()
	src := filepath.Join(local, "tree")
	makeTree(t, src)
	want := snapshot(t, src)

	if _, err := guest.Upload(t.Context(), sc, "vm", src, remote, guest.CopyOptions{}); err == nil || !strings.Contains(err.Error(), "-r") {
		t.Fatalf("directory without -r: %v", err)
	}
	st, err := guest.Upload(t.Context(), sc, "vm", src, remote, guest.CopyOptions{Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 5 || st.Dirs != 7 || st.Symlinks != 1 {
		t.Errorf("stats %+v", st)
	}
	if diff := cmp.Diff(want, snapshot(t, filepath.Join(remote, "tree"))); diff != "" {
		t.Fatalf("tree in the guest (-want +got):\n%s", diff)
	}
	// Back, to a new name (the destination does not exist yet).
	back := filepath.Join(local, "back")
	if _, err := guest.Download(t.Context(), sc, "vm", filepath.Join(remote, "tree"), back, guest.CopyOptions{Recursive: true}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, snapshot(t, back)); diff != "" {
		t.Fatalf("tree back on the host (-want +got):\n%s", diff)
	}
}

// cp's destination rules: into an existing directory, as a new name, and
// errors for a missing parent or a directory onto a file.
func TestCopyDestinations(t *testing.T) {
	d := guesttest.StartSSHD(t, guesttest.Options{})
	sc := sftpTo(t, d)
	local, remote := t.TempDir(), t.TempDir()
	src := filepath.Join(local, "f.txt")
	if err := os.WriteFile(src, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(local, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(remote, "file"), []byte("y"), 0o644); err != nil {
		t.Fatal(err)
	}

	if _, err := guest.Upload(t.Context(), sc, "vm", src, remote, guest.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(remote, "f.txt")); err != nil {
		t.Errorf("into a directory: %v", err)
	}
	if _, err := guest.Upload(t.Context(), sc, "vm", src, remote+"/renamed", guest.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(remote + "/renamed"); string(b) != "x" {
		t.Errorf("as a new name: %q", b)
	}
	if _, err := guest.Upload(t.Context(), sc, "vm", src, remote+"/missing/x", guest.CopyOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing parent: %v", err)
	}
	if _, err := guest.Upload(t.Context(), sc, "vm", filepath.Join(local, "dir"), remote+"/file", guest.CopyOptions{Recursive: true}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("directory onto a file: %v", err)
	}
	if _, err := guest.Download(t.Context(), sc, "vm", remote+"/nope", local, guest.CopyOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing remote source: %v", err)
	}
}

// A guest whose host key changed cannot be copied to or from: the
// connection fails before any byte moves.
func TestCopyRefusesChangedHostKey(t *testing.T) {
	other, err := guest.GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	d := guesttest.StartSSHD(t, guesttest.Options{Pinned: &other})
	_, err = guest.Dial(t.Context(), d.Target())
	if !errors.Is(err, guest.ErrHostKeyChanged) {
		t.Fatalf("dial err = %v, want ErrHostKeyChanged", err)
	}
}

// BenchmarkUpload100MiB measures a 100 MiB upload over SFTP to a local
// sshd; compare with BenchmarkSCP100MiB from the same run.
func BenchmarkUpload100MiB(b *testing.B) {
	d := guesttest.StartSSHD(b, guesttest.Options{})
	sc := sftpTo(b, d)
	local, remote := b.TempDir(), b.TempDir()
	src := filepath.Join(local, "big.bin")
	randomFile(b, src, 100<<20)
	b.SetBytes(100 << 20)
	for b.Loop() {
		if _, err := guest.Upload(b.Context(), sc, "vm", src, remote+"/big.bin", guest.CopyOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDownload100MiB is BenchmarkUpload100MiB the other way.
func BenchmarkDownload100MiB(b *testing.B) {
	d := guesttest.StartSSHD(b, guesttest.Options{})
	sc := sftpTo(b, d)
	local, remote := b.TempDir(), b.TempDir()
	randomFile(b, remote+"/big.bin", 100<<20)
	b.SetBytes(100 << 20)
	for b.Loop() {
		if _, err := guest.Download(b.Context(), sc, "vm", remote+"/big.bin", local+"/big.bin", guest.CopyOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSCP100MiB is the peer of BenchmarkUpload100MiB: OpenSSH's scp
// (SFTP protocol since OpenSSH 9) to the same kind of sshd.
func BenchmarkSCP100MiB(b *testing.B) {
	if _, err := exec.LookPath("scp"); err != nil {
		b.Skip("requires scp")
	}
	d := guesttest.StartSSHD(b, guesttest.Options{})
	local, remote := b.TempDir(), b.TempDir()
	src := filepath.Join(local, "big.bin")
	randomFile(b, src, 100<<20)
	args := append(scpArgs(d.SSHArgs()), src, d.User+"@127.0.0.1:"+remote+"/big.bin")
	b.SetBytes(100 << 20)
	for b.Loop() {
		if out, err := exec.Command("scp", args...).CombinedOutput(); err != nil {
			b.Fatalf("scp: %v %s", err, out)
		}
	}
}

// scpArgs turns ssh options into scp's (-p is -P there).
func scpArgs(sshArgs []string) []string {
	out := append([]string{"-q"}, sshArgs...)
	for i, a := range out {
		if a == "-p" {
			out[i] = "-P"
		}
	}
	return out
}
