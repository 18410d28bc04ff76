package guest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
)

// File sync copies the owner's files into a VM: each [[file_sync]] entry
// names a host file or directory and where it goes in the guest. A
// directory's .gitignore files are honoured. Syncs are incremental: a
// manifest per VM records, for every file banger put in the guest, the
// host file's size, mtime, mode and inode as it was sent, so the next sync
// sends only files that differ and deletes from the guest only files banger
// put there whose host file is gone. A guest file banger did not write is
// never deleted. Each file lands atomically: written beside its place
// under a temporary name, given its mode and mtime, then renamed over.
//
// Host files are read only through Home.Open, so the confinement to the
// owner's home holds for every file at the moment it is read.

// SyncEntry is one [[file_sync]] entry.
type SyncEntry struct {
	// Host is the host path as configured ("~/.gitconfig").
	Host string
	// Guest is the absolute path in the guest.
	Guest string
}

// SyncOptions configure one Sync.
type SyncOptions struct {
	// Paths limits the sync to entries holding one of these absolute host
	// paths (what a watcher saw change); empty syncs every entry.
	Paths []string
	// Full sends every file, whatever the manifest says.
	Full bool
	// Progress, when set, gets one line per entry and per file sent.
	Progress func(step, msg string)
	// Parallel uploads in flight (8 when zero).
	Parallel int
}

// testHookBeforeSend, when set, runs between the scan of a file and the
// open that sends it: the tests swap a symlink in there.
var testHookBeforeSend func(abs string)

// manifestVersion is the manifest's format; another version is ignored
// (everything is sent once and recorded again).
const manifestVersion = 1

type manifest struct {
	Version int `json:"version"`
	// Entries are keyed by guest path.
	Entries map[string]*manifestEntry `json:"entries"`
}

type manifestEntry struct {
	Host string `json:"host"`
	// Files are keyed by path relative to the entry ("" for a file entry).
	Files map[string]fileState `json:"files"`
	// Dirs are the directories of a directory entry ("" is its root).
	Dirs map[string]dirState `json:"dirs,omitempty"`
}

// fileState is a host file as it was when sent.
type fileState struct {
	Size  int64  `json:"size"`
	MTime int64  `json:"mtime_ns"`
	Mode  uint32 `json:"mode"`
	Dev   uint64 `json:"dev"`
	Ino   uint64 `json:"ino"`
}

type dirState struct {
	Mode uint32 `json:"mode"`
	// Created says banger made it, so banger may remove it (when empty)
	// once the host directory is gone.
	Created bool `json:"created,omitempty"`
}

func stateOf(fi fs.FileInfo) fileState {
	s := fileState{Size: fi.Size(), MTime: fi.ModTime().UnixNano(), Mode: uint32(fi.Mode())}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.Dev, s.Ino = st.Dev, st.Ino
	}
	return s
}

func loadManifest(p string) *manifest {
	m := &manifest{Version: manifestVersion, Entries: map[string]*manifestEntry{}}
	b, err := os.ReadFile(p)
	if err != nil {
		return m
	}
	var got manifest
	if json.Unmarshal(b, &got) != nil || got.Version != manifestVersion || got.Entries == nil {
		return m
	}
	return &got
}

func (m *manifest) save(p string) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	return writeReplace(p, b, 0o600)
}

// Sync applies entries to the guest behind sc, recording what it sent in
// the manifest at manifestPath. A host path outside the home stops the
// sync with an error naming it; what was sent before that is recorded.
func Sync(ctx context.Context, sc *sftp.Client, home *Home, entries []SyncEntry, manifestPath string, opts SyncOptions) (api.SyncReport, error) {
	m := loadManifest(manifestPath)
	s := &syncer{ctx: ctx, fs: sftpFS{c: sc, name: "guest"}, home: home, opts: opts, made: map[string]bool{}}
	rep := api.SyncReport{Entries: []api.SyncEntryReport{}}
	var err error
	for _, e := range entries {
		if !path.IsAbs(e.Guest) {
			err = fmt.Errorf("file_sync guest path %q is not absolute", e.Guest)
			break
		}
		guest := path.Clean(e.Guest)
		abs, xerr := home.Expand(e.Host)
		if xerr != nil {
			err = xerr
			break
		}
		if !s.selected(abs) {
			continue
		}
		me := m.Entries[guest]
		if me == nil || me.Host != abs {
			// New, or the entry now takes another host path: what was
			// recorded belongs to the old one and stays in the guest.
			me = &manifestEntry{Host: abs}
			m.Entries[guest] = me
		}
		if me.Files == nil {
			me.Files = map[string]fileState{}
		}
		er, eerr := s.entry(abs, guest, me)
		rep.Entries = append(rep.Entries, er)
		rep.Uploaded += er.Uploaded
		rep.Deleted += er.Deleted
		rep.Unchanged += er.Unchanged
		if eerr != nil {
			err = fmt.Errorf("sync %s to %s: %w", e.Host, guest, eerr)
			break
		}
	}
	rep.Bytes = s.bytes
	if serr := m.save(manifestPath); serr != nil && err == nil {
		err = fmt.Errorf("save sync manifest: %w", serr)
	}
	return rep, err
}

type syncer struct {
	ctx   context.Context
	fs    sftpFS
	home  *Home
	opts  SyncOptions
	mu    sync.Mutex      // guards made and bytes
	made  map[string]bool // guest directories known to exist
	bytes int64
}

func (s *syncer) progress(step, msg string) {
	if s.opts.Progress != nil {
		s.opts.Progress(step, msg)
	}
}

// selected reports whether the entry rooted at abs is to be synced.
func (s *syncer) selected(abs string) bool {
	if len(s.opts.Paths) == 0 {
		return true
	}
	for _, p := range s.opts.Paths {
		p = filepath.Clean(p)
		if p == abs || strings.HasPrefix(p, abs+"/") || strings.HasPrefix(abs, p+"/") {
			return true
		}
	}
	return false
}

// scanned is a host file found to differ from what the guest has.
type scanned struct {
	rel string
	abs string
}

// entry syncs one entry: scan the host side, delete what went away, send
// what changed.
func (s *syncer) entry(abs, guest string, me *manifestEntry) (api.SyncEntryReport, error) {
	rep := api.SyncEntryReport{Host: abs, Guest: guest}
	seenFiles := map[string]bool{}
	seenDirs := map[string]fs.FileMode{}
	var send []scanned

	f, err := s.home.Open(abs)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		rep.Missing = true
		s.progress("sync", fmt.Sprintf("%s does not exist; removing what banger synced from it", abs))
	case err != nil:
		return rep, err
	default:
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return rep, err
		}
		if fi.IsDir() {
			rep.Dir = true
			w := &treeWalk{s: s, root: abs, me: me, seenFiles: seenFiles, seenDirs: seenDirs, rep: &rep, send: &send}
			err = w.dir(f, "", fi, nil, nil)
		} else {
			f.Close()
			seenFiles[""] = true
			if old, ok := me.Files[""]; ok && !s.opts.Full && old == stateOf(fi) {
				rep.Unchanged++
			} else {
				send = append(send, scanned{rel: "", abs: abs})
			}
		}
		if err != nil {
			return rep, err
		}
	}

	if err := s.deleteGone(guest, me, seenFiles, seenDirs, &rep); err != nil {
		return rep, err
	}
	if err := s.makeDirs(guest, me, seenDirs); err != nil {
		return rep, err
	}
	return rep, s.sendAll(guest, me, send, &rep)
}

// treeWalk scans a directory entry.
type treeWalk struct {
	s         *syncer
	root      string
	me        *manifestEntry
	seenFiles map[string]bool
	seenDirs  map[string]fs.FileMode
	rep       *api.SyncEntryReport
	send      *[]scanned
}

type devIno struct{ dev, ino uint64 }

// dir scans the directory open as f (closed here) at rel. ancestors guards
// against symlink loops.
func (w *treeWalk) dir(f *os.File, rel string, fi fs.FileInfo, ign ignoreStack, ancestors []devIno) error {
	defer f.Close()
	if err := w.s.ctx.Err(); err != nil {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id := devIno{st.Dev, st.Ino}
		for _, a := range ancestors {
			if a == id {
				return fmt.Errorf("%s: a symlink loop leads back to a directory above it", join(w.root, rel))
			}
		}
		ancestors = append(ancestors, id)
	}
	w.seenDirs[rel] = fi.Mode()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read %s: %w", join(w.root, rel), err)
	}
	sort.Strings(names)
	dirAbs := join(w.root, rel)
	for _, n := range names {
		if n == ".gitignore" {
			gf, err := w.s.home.Open(dirAbs + "/.gitignore")
			if err != nil {
				return err
			}
			b, err := io.ReadAll(io.LimitReader(gf, 1<<20))
			gf.Close()
			if err != nil {
				return fmt.Errorf("read %s/.gitignore: %w", dirAbs, err)
			}
			ign = append(ign[:len(ign):len(ign)], parseGitignore(rel, b))
			break
		}
	}
	for _, n := range names {
		childRel := n
		if rel != "" {
			childRel = rel + "/" + n
		}
		childAbs := dirAbs + "/" + n
		// Whether it is a directory, without following a symlink: as
		// git does, a symlink is a file to the ignore rules, even one
		// that leads to a directory.
		var lst unix.Stat_t
		err := unix.Fstatat(int(f.Fd()), n, &lst, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) {
			continue // went away while we looked
		}
		if err != nil {
			return &fs.PathError{Op: "stat", Path: childAbs, Err: err}
		}
		isLink := lst.Mode&unix.S_IFMT == unix.S_IFLNK
		if ign.ignored(childRel, lst.Mode&unix.S_IFMT == unix.S_IFDIR) {
			w.rep.Ignored++
			continue
		}
		switch lst.Mode & unix.S_IFMT {
		case unix.S_IFREG, unix.S_IFDIR, unix.S_IFLNK:
		default:
			continue // sockets, FIFOs, devices: nothing to copy
		}
		cf, err := w.s.home.Open(childAbs)
		if errors.Is(err, ErrNotRegular) {
			continue // a symlink to one of those
		}
		if errors.Is(err, fs.ErrNotExist) {
			if isLink {
				return fmt.Errorf("%s: dangling symlink", childAbs)
			}
			continue
		}
		if err != nil {
			return err
		}
		cfi, err := cf.Stat()
		if err != nil {
			cf.Close()
			return err
		}
		if cfi.IsDir() {
			if err := w.dir(cf, childRel, cfi, ign, ancestors); err != nil {
				return err
			}
			continue
		}
		cf.Close()
		w.seenFiles[childRel] = true
		if old, ok := w.me.Files[childRel]; ok && !w.s.opts.Full && old == stateOf(cfi) {
			w.rep.Unchanged++
			continue
		}
		*w.send = append(*w.send, scanned{rel: childRel, abs: childAbs})
	}
	return nil
}

func join(root, rel string) string {
	if rel == "" {
		return root
	}
	return root + "/" + rel
}

// deleteGone removes from the guest the files banger sent earlier whose
// host file is gone (or now ignored), then the directories banger made
// that the host no longer has, when empty.
func (s *syncer) deleteGone(guest string, me *manifestEntry, seenFiles map[string]bool, seenDirs map[string]fs.FileMode, rep *api.SyncEntryReport) error {
	var gone []string
	for rel := range me.Files {
		if !seenFiles[rel] {
			gone = append(gone, rel)
		}
	}
	sort.Strings(gone)
	for _, rel := range gone {
		gp := join(guest, rel)
		err := s.fs.c.Remove(gp)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("delete %s in the guest: %w", gp, err)
		}
		delete(me.Files, rel)
		rep.Deleted++
		s.progress("sync", "deleted "+gp)
	}
	var dirs []string
	for rel := range me.Dirs {
		if _, ok := seenDirs[rel]; !ok {
			dirs = append(dirs, rel)
		}
	}
	// Deepest first, so children go before their parents.
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	for _, rel := range dirs {
		if me.Dirs[rel].Created {
			// Not empty means the guest put files there: keep it.
			_ = s.fs.c.RemoveDirectory(join(guest, rel))
		}
		delete(me.Dirs, rel)
	}
	return nil
}

// makeDirs creates the guest directories of a directory entry, parents
// first, and keeps their modes in step with the host's.
func (s *syncer) makeDirs(guest string, me *manifestEntry, seen map[string]fs.FileMode) error {
	if len(seen) == 0 {
		return nil
	}
	if me.Dirs == nil {
		me.Dirs = map[string]dirState{}
	}
	rels := make([]string, 0, len(seen))
	for rel := range seen {
		rels = append(rels, rel)
	}
	sort.Strings(rels) // parents sort before their children
	for _, rel := range rels {
		gp := join(guest, rel)
		mode := uint32(modeBits(seen[rel]))
		old, known := me.Dirs[rel]
		if known && old.Mode == mode && !s.opts.Full {
			s.markMade(gp)
			continue
		}
		created := old.Created
		fi, err := s.fs.c.Stat(gp)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := s.mkdirAll(path.Dir(gp)); err != nil {
				return err
			}
			if err := s.fs.c.Mkdir(gp); err != nil {
				return fmt.Errorf("create %s in the guest: %w", gp, err)
			}
			created = true
		case err != nil:
			return fmt.Errorf("stat %s in the guest: %w", gp, err)
		case !fi.IsDir():
			return fmt.Errorf("%s in the guest is not a directory (hint: remove it, or change the file_sync entry)", gp)
		}
		if err := s.fs.c.Chmod(gp, fs.FileMode(mode)); err != nil {
			return fmt.Errorf("chmod %s in the guest: %w", gp, err)
		}
		me.Dirs[rel] = dirState{Mode: mode, Created: created}
		s.markMade(gp)
	}
	return nil
}

func (s *syncer) markMade(p string) {
	s.mu.Lock()
	s.made[p] = true
	s.mu.Unlock()
}

func (s *syncer) mkdirAll(p string) error {
	s.mu.Lock()
	ok := s.made[p]
	s.mu.Unlock()
	if ok {
		return nil
	}
	if err := s.fs.c.MkdirAll(p); err != nil {
		return fmt.Errorf("create %s in the guest: %w", p, err)
	}
	s.markMade(p)
	return nil
}

// sendAll uploads the scanned files, several at a time.
func (s *syncer) sendAll(guest string, me *manifestEntry, send []scanned, rep *api.SyncEntryReport) error {
	if len(send) == 0 {
		return nil
	}
	par := s.opts.Parallel
	if par <= 0 {
		par = 8
	}
	var mu sync.Mutex // guards me.Files, rep and firstErr
	var firstErr error
	work := make(chan scanned)
	var wg sync.WaitGroup
	for range min(par, len(send)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sc := range work {
				st, err := s.sendFile(sc.abs, join(guest, sc.rel))
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
				} else {
					me.Files[sc.rel] = st
					rep.Uploaded++
				}
				mu.Unlock()
			}
		}()
	}
	for _, sc := range send {
		mu.Lock()
		failed := firstErr != nil
		mu.Unlock()
		if failed || s.ctx.Err() != nil {
			break
		}
		work <- sc
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return s.ctx.Err()
}

// sendFile uploads one host file to gp atomically and returns the state
// of the file it read, taken from the descriptor it read (not from the
// scan, which a swap could have outdated).
func (s *syncer) sendFile(abs, gp string) (fileState, error) {
	if testHookBeforeSend != nil {
		testHookBeforeSend(abs)
	}
	f, err := s.home.Open(abs)
	if err != nil {
		return fileState{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileState{}, err
	}
	if !fi.Mode().IsRegular() {
		return fileState{}, fmt.Errorf("%s: is a directory now, it was a file when scanned (hint: sync again)", abs)
	}
	if err := s.mkdirAll(path.Dir(gp)); err != nil {
		return fileState{}, err
	}
	tmp, err := tempName(gp)
	if err != nil {
		return fileState{}, err
	}
	w, err := s.fs.CreateExcl(tmp, 0o600)
	if err != nil {
		return fileState{}, fmt.Errorf("create %s in the guest: %w", tmp, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = s.fs.c.Remove(tmp)
		}
	}()
	n, err := copyData(w, f, fi.Size(), func(int64) {})
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fileState{}, fmt.Errorf("send %s to the guest: %w", abs, err)
	}
	mtime := fi.ModTime()
	if err := s.fs.Chmod(tmp, modeBits(fi.Mode())); err != nil {
		return fileState{}, fmt.Errorf("chmod %s in the guest: %w", tmp, err)
	}
	if err := s.fs.Chtimes(tmp, time.Now(), mtime); err != nil {
		return fileState{}, fmt.Errorf("set times of %s in the guest: %w", tmp, err)
	}
	if err := s.fs.Rename(tmp, gp); err != nil {
		return fileState{}, fmt.Errorf("move %s into place in the guest: %w", gp, err)
	}
	ok = true
	s.mu.Lock()
	s.bytes += n
	s.mu.Unlock()
	s.progress("sync", "sent "+gp)
	return stateOf(fi), nil
}

// tempName is a fresh hidden name beside p, within NAME_MAX.
func tempName(p string) (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	base := path.Base(p)
	if len(base) > 200 {
		base = base[:200]
	}
	return path.Join(path.Dir(p), ".banger-sync-"+hex.EncodeToString(b[:])+"-"+base), nil
}
