package cli

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watcher reports changes under the file_sync host paths with inotify:
// directories are watched recursively (new ones as they appear), a file
// through its parent directory, so an editor that saves by renaming a new
// file over the old one is seen too. A path that does not exist yet is
// watched for in its parent.
//
// Symlinked subdirectories are not followed: changes behind them are
// picked up by the next full sync.
type watcher struct {
	// f is the inotify descriptor, non-blocking under Go's poller so that
	// Close ends a Read; fd is the same descriptor for inotify_add_watch
	// (f.Fd() would switch it to blocking).
	f  *os.File
	fd int

	mu    sync.Mutex // guards wds, dirs
	wds   map[int32]*watchDir
	dirs  map[string]int32
	roots []string
}

// watchDir is one watched directory. names limits the events that count
// to those entries (a file root's parent); nil means all.
type watchDir struct {
	path      string
	names     map[string]bool
	recursive bool
}

const watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_ATTRIB |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

func newWatcher(roots []string) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("start inotify: %w", err)
	}
	w := &watcher{f: os.NewFile(uintptr(fd), "inotify"), fd: fd, wds: map[int32]*watchDir{}, dirs: map[string]int32{}, roots: roots}
	for _, r := range roots {
		if err := w.addRoot(r); err != nil {
			w.f.Close()
			return nil, err
		}
	}
	return w, nil
}

func (w *watcher) Close() error { return w.f.Close() }

// addRoot watches one host path: a directory recursively, anything else
// (a file, a missing path) by name in its parent.
func (w *watcher) addRoot(root string) error {
	if fi, err := os.Stat(root); err == nil && fi.IsDir() {
		return w.addTree(root)
	}
	return w.add(filepath.Dir(root), filepath.Base(root), false)
}

// add watches dir; name restricts it to one entry unless dir is already
// watched whole.
func (w *watcher) add(dir, name string, recursive bool) error {
	wd, err := unix.InotifyAddWatch(w.fd, dir, watchMask)
	if err != nil {
		if errors.Is(err, unix.ENOSPC) {
			return fmt.Errorf("watch %s: the inotify watch limit is reached (hint: raise fs.inotify.max_user_watches)", dir)
		}
		return fmt.Errorf("watch %s: %w", dir, err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	d := w.wds[int32(wd)]
	if d == nil {
		d = &watchDir{path: dir, names: map[string]bool{}}
		w.wds[int32(wd)] = d
		w.dirs[dir] = int32(wd)
	}
	switch {
	case recursive || name == "":
		d.names, d.recursive = nil, d.recursive || recursive
	case d.names != nil:
		d.names[name] = true
	}
	return nil
}

// addTree watches dir and every directory below it.
func (w *watcher) addTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // gone while we walked
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		return w.add(p, "", true)
	})
}

// run reads events until ctx ends, and sends the changed paths in batches:
// a batch goes once no event came for quiet, or maxWait after its first
// event. A queue overflow sends the roots, asking for a full sync.
func (w *watcher) run(ctx context.Context, quiet, maxWait time.Duration, out chan<- []string) error {
	events := make(chan []string)
	errc := make(chan error, 1)
	go func() { errc <- w.read(events) }()
	stop := context.AfterFunc(ctx, func() { w.f.Close() })
	defer stop()

	pending := map[string]bool{}
	var timer <-chan time.Time
	var first time.Time
	for {
		select {
		case paths := <-events:
			if len(paths) == 0 {
				continue
			}
			if len(pending) == 0 {
				first = time.Now()
			}
			for _, p := range paths {
				pending[p] = true
			}
			wait := min(quiet, maxWait-time.Since(first))
			timer = time.After(max(wait, 0))
		case <-timer:
			batch := make([]string, 0, len(pending))
			for p := range pending {
				batch = append(batch, p)
			}
			sort.Strings(batch)
			pending = map[string]bool{}
			timer = nil
			select {
			case out <- batch:
			case <-ctx.Done():
				return nil
			}
		case err := <-errc:
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// read decodes inotify events into changed paths.
func (w *watcher) read(events chan<- []string) error {
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return err
		}
		var paths []string
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			name := strings.TrimRight(string(nameBytes), "\x00")
			paths = append(paths, w.handle(ev.Wd, ev.Mask, name)...)
		}
		events <- paths
	}
}

// handle turns one event into the paths it changed, watching new
// directories as they appear.
func (w *watcher) handle(wd int32, mask uint32, name string) []string {
	if mask&unix.IN_Q_OVERFLOW != 0 {
		return w.roots
	}
	w.mu.Lock()
	d := w.wds[wd]
	if mask&unix.IN_IGNORED != 0 && d != nil {
		delete(w.wds, wd)
		delete(w.dirs, d.path)
	}
	w.mu.Unlock()
	if d == nil {
		return nil
	}
	if name == "" {
		return []string{d.path} // the directory itself moved or went
	}
	if d.names != nil && !d.names[name] {
		return nil
	}
	p := filepath.Join(d.path, name)
	if mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 {
		if fi, err := os.Stat(p); err == nil && fi.IsDir() && (d.recursive || d.names != nil) {
			// A new directory (or a root that now exists): watch it
			// and everything already in it.
			_ = w.addTree(p)
		}
	}
	return []string{p}
}
