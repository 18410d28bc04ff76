package guest_test

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/guest"
)

// newHome makes a home directory with a few files and a secret outside it.
func newHome(t *testing.T) (home *guest.Home, dir, outside string) {
	t.Helper()
	root := t.TempDir()
	dir = filepath.Join(root, "home", "me")
	outside = filepath.Join(root, "outside")
	for _, d := range []string{dir + "/dotfiles/nvim", dir + "/proj/sub", outside + "/sub"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, c := range map[string]string{
		dir + "/.gitconfig":             "[user]\n",
		dir + "/dotfiles/nvim/init.lua": "-- init\n",
		dir + "/proj/sub/file":          "inside\n",
		outside + "/secret":             "SECRET\n",
		outside + "/sub/file":           "SECRET\n",
	} {
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	h, err := guest.OpenHome(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h, dir, outside
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// Each way out of the owner's home is refused by name, with an error that
// names the path; the ways that stay inside are allowed.
func TestHomeConfinement(t *testing.T) {
	cases := []struct {
		name    string
		setup   func(t *testing.T, dir, outside string)
		path    string // %h is the home
		refused bool
		want    string // content read when allowed
	}{
		{name: "dotdot segments climbing out", path: "~/../../outside/secret", refused: true},
		{name: "dotdot segments that come back in", path: "~/proj/../.gitconfig", refused: true},
		{name: "absolute path outside home", path: "/etc/shadow", refused: true},
		{name: "absolute path to the outside secret", path: "%o/secret", refused: true},
		{name: "symlink inside home to /etc/shadow", setup: func(t *testing.T, d, o string) { symlink(t, "/etc/shadow", d+"/shadow") }, path: "~/shadow", refused: true},
		{name: "relative symlink climbing out", setup: func(t *testing.T, d, o string) { symlink(t, "../../outside/secret", d+"/rel") }, path: "~/rel", refused: true},
		{name: "symlinked directory leading out", setup: func(t *testing.T, d, o string) { symlink(t, o, d+"/out") }, path: "~/out/secret", refused: true},
		{name: "chain of symlinks whose last step leaves", setup: func(t *testing.T, d, o string) {
			symlink(t, "b", d+"/a")
			symlink(t, "c", d+"/b")
			symlink(t, o+"/secret", d+"/c")
		}, path: "~/a", refused: true},
		{name: "symlink to the home's parent via dotdot inside it", setup: func(t *testing.T, d, o string) { symlink(t, "proj/../..", d+"/up") }, path: "~/up/me/.gitconfig", refused: true},
		{name: "~user form", path: "~root/.bashrc", refused: true},
		{name: "magic link into procfs", setup: func(t *testing.T, d, o string) { symlink(t, "/proc/self/root/etc/passwd", d+"/magic") }, path: "~/magic", refused: true},
		{name: "plain file", path: "~/.gitconfig", want: "[user]\n"},
		{name: "absolute path inside home", path: "%h/.gitconfig", want: "[user]\n"},
		{name: "relative path is in the home", path: ".gitconfig", want: "[user]\n"},
		{name: "relative symlink staying inside", setup: func(t *testing.T, d, o string) { symlink(t, "dotfiles/nvim/init.lua", d+"/init") }, path: "~/init", want: "-- init\n"},
		{name: "absolute symlink back into home", setup: func(t *testing.T, d, o string) { symlink(t, d+"/dotfiles/nvim", d+"/nvim") }, path: "~/nvim/init.lua", want: "-- init\n"},
		{name: "symlink with dotdot staying inside", setup: func(t *testing.T, d, o string) { symlink(t, "../dotfiles/nvim/init.lua", d+"/proj/init") }, path: "~/proj/init", want: "-- init\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h, dir, outside := newHome(t)
			if tc.setup != nil {
				tc.setup(t, dir, outside)
			}
			p := strings.NewReplacer("%h", dir, "%o", outside).Replace(tc.path)
			f, err := h.Open(p)
			if tc.refused {
				if err == nil {
					b, _ := io.ReadAll(f)
					f.Close()
					t.Fatalf("Open(%q) read %q, want a refusal", p, b)
				}
				if !errors.Is(err, guest.ErrOutsideHome) && !strings.Contains(tc.path, "~root") {
					t.Fatalf("Open(%q) = %v, want ErrOutsideHome", p, err)
				}
				if !strings.Contains(err.Error(), p) {
					t.Errorf("the error does not name the path %q: %v", p, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open(%q): %v", p, err)
			}
			defer f.Close()
			b, _ := io.ReadAll(f)
			if string(b) != tc.want {
				t.Fatalf("read %q, want %q", b, tc.want)
			}
		})
	}
}

// Devices and FIFOs are refused even inside the home, and opening a FIFO
// does not block.
func TestHomeRefusesSpecialFiles(t *testing.T) {
	h, dir, _ := newHome(t)
	if err := unix.Mkfifo(dir+"/fifo", 0o644); err != nil {
		t.Fatal(err)
	}
	symlink(t, "/dev/null", dir+"/null")
	if _, err := h.Open("~/fifo"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("fifo: %v", err)
	}
	if _, err := h.Open("~/null"); err == nil {
		t.Fatal("a symlink to /dev/null was opened")
	}
}

// A directory replaced by a symlink to the outside after the path was
// checked and before it is opened (the TOCTOU swap) is refused when it
// is opened: the check is the open.
func TestHomeSwapAfterCheck(t *testing.T) {
	h, dir, outside := newHome(t)
	guest.SetTestHookOpen(func(rel string) {
		if rel != "proj/sub/file" {
			return
		}
		if err := os.Rename(dir+"/proj/sub", dir+"/proj/sub.real"); err != nil {
			t.Error(err)
		}
		symlink(t, outside+"/sub", dir+"/proj/sub")
	})
	defer guest.SetTestHookOpen(nil)
	f, err := h.Open("~/proj/sub/file")
	if err == nil {
		b, _ := io.ReadAll(f)
		f.Close()
		t.Fatalf("read %q through a swapped-in symlink", b)
	}
	if !errors.Is(err, guest.ErrOutsideHome) {
		t.Fatalf("err = %v, want ErrOutsideHome", err)
	}
}

// Under a racing swap (a directory and a symlink to the outside exchanged
// atomically, over and over) no open ever reads the outside.
func TestHomeSwapRace(t *testing.T) {
	h, dir, outside := newHome(t)
	real, link := dir+"/proj/sub", dir+"/proj/swap"
	symlink(t, outside+"/sub", link)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = unix.Renameat2(unix.AT_FDCWD, real, unix.AT_FDCWD, link, unix.RENAME_EXCHANGE)
		}
	}()
	var inside, refused atomic.Int64
	for range 20000 {
		f, err := h.Open("~/proj/sub/file")
		if err != nil {
			if errors.Is(err, guest.ErrOutsideHome) {
				refused.Add(1)
			}
			continue
		}
		b, _ := io.ReadAll(f)
		f.Close()
		if string(b) == "SECRET\n" {
			close(stop)
			wg.Wait()
			t.Fatal("read the outside secret through a swapped symlink")
		}
		inside.Add(1)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d opens read the inside file, %d were refused", inside.Load(), refused.Load())
	if refused.Load() == 0 {
		t.Error("the swap never won a race: the test exercised nothing")
	}
}

// Expand spells out ~ and relative paths, and refuses what cannot be
// confined before looking at the disk.
func TestHomeExpand(t *testing.T) {
	h, dir, _ := newHome(t)
	cases := []struct {
		in, want string
		bad      bool
	}{
		{in: "~", want: dir},
		{in: "~/", want: dir},
		{in: "~/.gitconfig", want: dir + "/.gitconfig"},
		{in: "dotfiles//nvim/", want: dir + "/dotfiles/nvim"},
		{in: dir + "/x", want: dir + "/x"},
		{in: "", bad: true},
		{in: "~/a/../b", bad: true},
		{in: "/etc", bad: true},
		{in: dir + "x", bad: true}, // a sibling sharing the prefix
		{in: "~other", bad: true},
		{in: "a\x00b", bad: true},
	}
	for _, tc := range cases {
		got, err := h.Expand(tc.in)
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("Expand(%q) = %q, %v; want %q (refused %v)", tc.in, got, err, tc.want, tc.bad)
		}
	}
}
