package guest_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/guest/guesttest"
)

type syncEnv struct {
	t        *testing.T
	d        *guesttest.SSHD
	home     *guest.Home
	dir      string // the home
	outside  string
	guest    string // where the test sshd's "guest" files land
	manifest string
	entries  []guest.SyncEntry
}

func newSyncEnv(t *testing.T) *syncEnv {
	h, dir, outside := newHome(t)
	e := &syncEnv{
		t: t, d: guesttest.StartSSHD(t, guesttest.Options{}), home: h, dir: dir, outside: outside,
		guest: t.TempDir(), manifest: filepath.Join(t.TempDir(), "vm", "file-sync.json"),
	}
	e.entries = []guest.SyncEntry{
		{Host: "~/.gitconfig", Guest: e.guest + "/root/.gitconfig"},
		{Host: "~/proj", Guest: e.guest + "/src/proj"},
		{Host: "~/not-there", Guest: e.guest + "/nothing"},
	}
	_ = os.RemoveAll(dir + "/proj")
	e.write("proj/.gitignore", "*.log\nbuild/\n")
	e.write("proj/a.txt", "a")
	e.write("proj/b.txt", "b")
	e.write("proj/sub/c.txt", "c")
	e.write("proj/sub/.gitignore", "!keep.log\n")
	e.write("proj/sub/keep.log", "kept despite *.log")
	e.write("proj/x.log", "ignored")
	e.write("proj/build/out.bin", "ignored dir")
	return e
}

func (e *syncEnv) write(rel, data string) {
	e.t.Helper()
	p := filepath.Join(e.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		e.t.Fatal(err)
	}
	// Distinct, past mtimes, so a rewrite within the same second still
	// shows as a change.
	mt := time.Now().Add(-time.Duration(len(data)+len(rel)) * time.Hour).Truncate(time.Second)
	if err := os.Chtimes(p, mt, mt); err != nil {
		e.t.Fatal(err)
	}
}

func (e *syncEnv) sync(opts guest.SyncOptions) (api.SyncReport, error) {
	e.t.Helper()
	return guest.Sync(e.t.Context(), sftpTo(e.t, e.d), e.home, e.entries, e.manifest, opts)
}

// counts is the part of a report the tests compare.
type counts struct{ Uploaded, Deleted, Unchanged int }

func (e *syncEnv) mustSync(opts guest.SyncOptions, want counts) api.SyncReport {
	e.t.Helper()
	rep, err := e.sync(opts)
	if err != nil {
		e.t.Fatalf("sync: %v", err)
	}
	if diff := cmp.Diff(want, counts{rep.Uploaded, rep.Deleted, rep.Unchanged}); diff != "" {
		e.t.Fatalf("sync moved (-want +got):\n%s\nreport: %+v", diff, rep)
	}
	return rep
}

// guestFiles lists the regular files under the guest root with contents.
func (e *syncEnv) guestFiles() map[string]string {
	e.t.Helper()
	out := map[string]string{}
	if err := filepath.Walk(e.guest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(e.guest, p)
			out[rel] = string(b)
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// Sync sends everything once, then only what changed: edits, mode
// changes and new files go, deleted and newly ignored files are removed,
// unchanged files are counted and left alone, and guest files banger did
// not write are never touched.
func TestSyncIncremental(t *testing.T) {
	e := newSyncEnv(t)
	e.write(".gitconfig", "[user]\n")

	rep := e.mustSync(guest.SyncOptions{}, counts{Uploaded: 7})
	want := map[string]string{
		"root/.gitconfig":         "[user]\n",
		"src/proj/.gitignore":     "*.log\nbuild/\n",
		"src/proj/a.txt":          "a",
		"src/proj/b.txt":          "b",
		"src/proj/sub/c.txt":      "c",
		"src/proj/sub/.gitignore": "!keep.log\n",
		"src/proj/sub/keep.log":   "kept despite *.log",
	}
	if diff := cmp.Diff(want, e.guestFiles()); diff != "" {
		t.Fatalf("guest after the first sync (-want +got):\n%s", diff)
	}
	wantEntries := []api.SyncEntryReport{
		{Host: e.dir + "/.gitconfig", Guest: e.guest + "/root/.gitconfig", Uploaded: 1},
		{Host: e.dir + "/proj", Guest: e.guest + "/src/proj", Dir: true, Uploaded: 6, Ignored: 2},
		{Host: e.dir + "/not-there", Guest: e.guest + "/nothing", Missing: true},
	}
	if diff := cmp.Diff(wantEntries, rep.Entries); diff != "" {
		t.Fatalf("entries (-want +got):\n%s", diff)
	}
	// Mode and mtime arrive with the file.
	hi, _ := os.Stat(e.dir + "/proj/a.txt")
	gi, _ := os.Stat(e.guest + "/src/proj/a.txt")
	if gi.Mode() != hi.Mode() || gi.ModTime().Unix() != hi.ModTime().Unix() {
		t.Errorf("guest a.txt %v %v, host %v %v", gi.Mode(), gi.ModTime(), hi.Mode(), hi.ModTime())
	}

	e.mustSync(guest.SyncOptions{}, counts{Unchanged: 7})

	if err := os.WriteFile(e.guest+"/src/proj/guest-only.txt", []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.write("proj/a.txt", "a, edited")
	if err := os.Chmod(e.dir+"/proj/b.txt", 0o600); err != nil {
		t.Fatal(err)
	}
	e.write("proj/sub/new.txt", "new")
	_ = os.Remove(e.dir + "/proj/sub/c.txt")
	e.mustSync(guest.SyncOptions{}, counts{Uploaded: 3, Deleted: 1, Unchanged: 4})
	if fi, _ := os.Stat(e.guest + "/src/proj/b.txt"); fi.Mode().Perm() != 0o600 {
		t.Errorf("b.txt mode in the guest %v, want 0600", fi.Mode().Perm())
	}

	// A file newly ignored is removed from the guest.
	e.write("proj/.gitignore", "*.log\nbuild/\nb.txt\n")
	e.mustSync(guest.SyncOptions{}, counts{Uploaded: 1, Deleted: 1, Unchanged: 5})
	want = map[string]string{
		"root/.gitconfig":         "[user]\n",
		"src/proj/.gitignore":     "*.log\nbuild/\nb.txt\n",
		"src/proj/a.txt":          "a, edited",
		"src/proj/sub/new.txt":    "new",
		"src/proj/sub/.gitignore": "!keep.log\n",
		"src/proj/sub/keep.log":   "kept despite *.log",
		"src/proj/guest-only.txt": "mine",
	}
	if diff := cmp.Diff(want, e.guestFiles()); diff != "" {
		t.Fatalf("guest after the edits (-want +got):\n%s", diff)
	}

	// Full sends everything again.
	e.mustSync(guest.SyncOptions{Full: true}, counts{Uploaded: 6})

	// The host directory goes: what banger sent goes, the guest's own
	// file and so its directory stay.
	_ = os.RemoveAll(e.dir + "/proj")
	e.mustSync(guest.SyncOptions{}, counts{Deleted: 5, Unchanged: 1})
	if diff := cmp.Diff(map[string]string{"root/.gitconfig": "[user]\n", "src/proj/guest-only.txt": "mine"}, e.guestFiles()); diff != "" {
		t.Fatalf("guest after the host dir went (-want +got):\n%s", diff)
	}
	if _, err := os.Stat(e.guest + "/src/proj/sub"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the empty directory banger made is still there: %v", err)
	}
}

// With Paths, only the entries holding a changed path are synced.
func TestSyncOnlyChangedEntries(t *testing.T) {
	e := newSyncEnv(t)
	e.write(".gitconfig", "[user]\n")
	e.mustSync(guest.SyncOptions{}, counts{Uploaded: 7})
	e.write("proj/a.txt", "edited")
	e.write(".gitconfig", "[user]\n\tname = x\n")
	rep := e.mustSync(guest.SyncOptions{Paths: []string{e.dir + "/proj/a.txt"}}, counts{Uploaded: 1, Unchanged: 5})
	if len(rep.Entries) != 1 || rep.Entries[0].Host != e.dir+"/proj" {
		t.Fatalf("entries synced: %+v", rep.Entries)
	}
	if b, _ := os.ReadFile(e.guest + "/root/.gitconfig"); string(b) != "[user]\n" {
		t.Fatalf("an entry outside Paths was synced: %q", b)
	}
}

// Entries that lead outside the home are refused by name, and nothing of
// the outside reaches the guest.
func TestSyncRefusesEscapes(t *testing.T) {
	cases := []struct {
		name  string
		setup func(e *syncEnv)
		entry guest.SyncEntry
	}{
		{"absolute path outside home", nil, guest.SyncEntry{Host: "/etc/passwd", Guest: "/x"}},
		{"dotdot segments", nil, guest.SyncEntry{Host: "~/../outside/secret", Guest: "/x"}},
		{"symlink to /etc/shadow", func(e *syncEnv) { symlink(e.t, "/etc/shadow", e.dir+"/shadow") }, guest.SyncEntry{Host: "~/shadow", Guest: "/x"}},
		{"symlink inside a synced directory", func(e *syncEnv) { symlink(e.t, e.outside+"/secret", e.dir+"/proj/secret") }, guest.SyncEntry{Host: "~/proj", Guest: "/x"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newSyncEnv(t)
			if tc.setup != nil {
				tc.setup(e)
			}
			tc.entry.Guest = e.guest + tc.entry.Guest
			e.entries = []guest.SyncEntry{tc.entry}
			_, err := e.sync(guest.SyncOptions{})
			if !errors.Is(err, guest.ErrOutsideHome) {
				t.Fatalf("err = %v, want ErrOutsideHome", err)
			}
			for p, c := range e.guestFiles() {
				if strings.Contains(c, "SECRET") || strings.Contains(c, "root:") {
					t.Fatalf("outside content reached the guest at %s", p)
				}
			}
		})
	}
}

// A directory swapped for a symlink to the outside between the scan and
// the upload (TOCTOU) is refused at the upload: the secret never lands.
func TestSyncSwapBetweenScanAndSend(t *testing.T) {
	e := newSyncEnv(t)
	e.entries = e.entries[1:2]
	if err := os.WriteFile(e.outside+"/sub/c.txt", []byte("SECRET\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	swapped := false
	guest.SetTestHookBeforeSend(func(abs string) {
		if swapped || !strings.HasSuffix(abs, "/proj/sub/c.txt") {
			return
		}
		swapped = true
		if err := os.Rename(e.dir+"/proj/sub", e.dir+"/proj/sub.moved"); err != nil {
			t.Fatal(err)
		}
		symlink(t, e.outside+"/sub", e.dir+"/proj/sub")
	})
	defer guest.SetTestHookBeforeSend(nil)
	_, err := guest.Sync(t.Context(), sftpTo(t, e.d), e.home, e.entries, e.manifest, guest.SyncOptions{Parallel: 1})
	if !swapped {
		t.Fatal("the hook never ran")
	}
	if !errors.Is(err, guest.ErrOutsideHome) {
		t.Fatalf("err = %v, want ErrOutsideHome", err)
	}
	for p, c := range e.guestFiles() {
		if strings.Contains(c, "SECRET") {
			t.Fatalf("the outside secret reached the guest at %s", p)
		}
	}
}

// What a sync sent is recorded even when it stops on an error, so the
// next sync does not send it again.
func TestSyncRecordsProgressOnError(t *testing.T) {
	e := newSyncEnv(t)
	e.write(".gitconfig", "[user]\n")
	e.entries = append(e.entries[:1], guest.SyncEntry{Host: "/etc/passwd", Guest: e.guest + "/x"})
	if _, err := e.sync(guest.SyncOptions{}); !errors.Is(err, guest.ErrOutsideHome) {
		t.Fatalf("err = %v", err)
	}
	e.entries = e.entries[:1]
	e.mustSync(guest.SyncOptions{}, counts{Unchanged: 1})
}

// FIFOs, sockets and symlinks to them in a synced directory are skipped: there is nothing to copy, and the rest of the tree still goes.
func TestSyncSkipsSpecialFiles(t *testing.T) {
	e := newSyncEnv(t)
	e.entries = e.entries[1:2]
	if err := unix.Mkfifo(e.dir+"/proj/fifo", 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", e.dir+"/proj/sock")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	symlink(t, "fifo", e.dir+"/proj/tofifo")
	e.mustSync(guest.SyncOptions{}, counts{Uploaded: 6})
	for _, n := range []string{"fifo", "sock", "tofifo"} {
		if _, err := os.Lstat(e.guest + "/src/proj/" + n); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s reached the guest: %v", n, err)
		}
	}
}
