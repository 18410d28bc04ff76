package guest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// File sync reads host files on the owner's behalf, and in system mode the
// daemon is a service account serving one owner: a configured path must not
// become a way to read anything else the daemon can. So every host path is
// confined to the owner's home directory, checked at the moment of use by
// the kernel rather than before it: files are opened relative to a
// directory descriptor of the home with openat2(RESOLVE_BENEATH), which
// fails on any "..", absolute symlink or magic link that would leave it.
// There is no separate check to race: a symlink swapped in after a scan is
// met by the same rule when the file is opened.
//
// RESOLVE_BENEATH also refuses absolute symlinks that point back inside the
// home (~/.gitconfig -> /home/me/dotfiles/gitconfig, common with dotfile
// managers). Those, and every refusal, go through a second resolver that
// walks the path one component at a time with O_NOFOLLOW opens relative to
// descriptors it holds, reads each symlink itself, and allows it only when
// its target stays inside the home. It is as strict as the kernel and says
// precisely which symlink leads where.

// ErrOutsideHome means a host path resolves outside the owner's home.
var ErrOutsideHome = errors.New("outside the owner's home directory")

// ErrNotRegular is a host path that is neither a regular file nor a
// directory (a FIFO, a socket, a device): there is nothing to copy.
var ErrNotRegular = errors.New("not a regular file or directory")

// ConfineError is a host path refused by Home.
type ConfineError struct {
	Path   string // as given
	Home   string
	Reason string
}

func (e *ConfineError) Error() string {
	return fmt.Sprintf("host path %q is refused: %s, outside the owner's home %s (hint: file_sync only reads files under the owner's home directory)", e.Path, e.Reason, e.Home)
}

// Is makes errors.Is(err, ErrOutsideHome) true.
func (e *ConfineError) Is(target error) bool { return target == ErrOutsideHome }

// maxSymlinks bounds symlink expansions in one resolution, as the kernel's
// 40 does.
const maxSymlinks = 40

// testHookOpen, when set, runs in Home.Open after the path was checked
// lexically and before it is opened: the tests swap symlinks in there.
var testHookOpen func(rel string)

// Home is the owner's home directory, held open.
type Home struct {
	dir  string // absolute and clean, as given
	real string // dir with its own symlinks resolved
	fd   int    // O_PATH directory descriptor of dir
}

// OpenHome holds dir open as the root of confinement. dir must be an
// absolute path to a directory.
func OpenHome(dir string) (*Home, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("open home %q: not an absolute path", dir)
	}
	dir = filepath.Clean(dir)
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("open home %s: %w", dir, err)
	}
	fd, err := unix.Open(real, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open home %s: %w", dir, err)
	}
	return &Home{dir: dir, real: real, fd: fd}, nil
}

// OwnerHome returns the home directory of the user this process runs as:
// $HOME in user mode, where the daemon is the user's own process with the
// user's environment; the password database in system mode, where the
// daemon runs as the owner recorded at install under systemd, and the
// environment is not the owner's word.
func OwnerHome(system bool) (string, error) {
	if !system {
		if h := os.Getenv("HOME"); filepath.IsAbs(h) {
			return filepath.Clean(h), nil
		}
	}
	uid := strconv.Itoa(os.Getuid())
	u, err := user.LookupId(uid)
	if err != nil {
		return "", fmt.Errorf("look up home of uid %s: %w", uid, err)
	}
	if !filepath.IsAbs(u.HomeDir) {
		return "", fmt.Errorf("look up home of uid %s: %q is not an absolute path", uid, u.HomeDir)
	}
	return filepath.Clean(u.HomeDir), nil
}

// Dir is the home directory.
func (h *Home) Dir() string { return h.dir }

// Close releases the home's descriptor.
func (h *Home) Close() error { return unix.Close(h.fd) }

// Expand makes a configured host path absolute: "~" and "~/x" are in the
// home, a relative path is relative to it. It refuses "~user" forms, ".."
// segments (a path must say where it is, not climb there), and paths that
// are lexically outside the home. Symlinks are not followed here: Open
// checks them when it opens.
func (h *Home) Expand(p string) (string, error) {
	if p == "" {
		return "", errors.New("empty host path")
	}
	if strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("host path %q holds a NUL byte", p)
	}
	abs := p
	switch {
	case p == "~":
		abs = h.dir
	case strings.HasPrefix(p, "~/"):
		abs = h.dir + p[1:]
	case strings.HasPrefix(p, "~"):
		return "", fmt.Errorf("host path %q: ~user paths are not supported (hint: write ~/… for the owner's home)", p)
	case !filepath.IsAbs(p):
		abs = filepath.Join(h.dir, p)
	}
	for _, seg := range strings.Split(abs, "/") {
		if seg == ".." {
			return "", &ConfineError{Path: p, Home: h.dir, Reason: "it has '..' segments"}
		}
	}
	abs = filepath.Clean(abs)
	if _, ok := h.relTo(abs); !ok {
		return "", &ConfineError{Path: p, Home: h.dir, Reason: "it is an absolute path"}
	}
	return abs, nil
}

// relTo returns abs relative to the home ("." for the home itself), and
// whether abs is inside it, under either spelling of the home.
func (h *Home) relTo(abs string) (string, bool) {
	for _, base := range []string{h.dir, h.real} {
		if abs == base {
			return ".", true
		}
		if base == "/" {
			return abs[1:], true
		}
		if strings.HasPrefix(abs, base+"/") {
			return abs[len(base)+1:], true
		}
	}
	return "", false
}

// Open opens a host path (as Expand takes it) for reading, following
// symlinks only as far as they stay inside the home. The result is a
// regular file or a directory; anything else (devices, FIFOs, sockets) is
// refused. The check and the open are one act: what is returned is what
// was checked.
func (h *Home) Open(p string) (*os.File, error) {
	abs, err := h.Expand(p)
	if err != nil {
		return nil, err
	}
	rel, _ := h.relTo(abs)
	if testHookOpen != nil {
		testHookOpen(rel)
	}
	fd, err := unix.Openat2(h.fd, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
	})
	switch {
	case err == nil:
	case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EPERM):
		// An escape, an absolute symlink, or no openat2 here: the
		// careful resolver decides, and explains a refusal.
		fd, err = h.walk(p, rel)
		if err != nil {
			return nil, err
		}
	default:
		return nil, &fs.PathError{Op: "open", Path: abs, Err: err}
	}
	f := os.NewFile(uintptr(fd), abs)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() && !st.IsDir() {
		f.Close()
		return nil, fmt.Errorf("host path %q: %s is %w (%s)", p, abs, ErrNotRegular, st.Mode().Type())
	}
	return f, nil
}

// walk resolves rel below the home one component at a time. Every open is
// relative to a descriptor the walk holds and never follows a symlink;
// ".." pops the walk's own stack instead of asking the kernel, so it can
// never climb above the home.
func (h *Home) walk(orig, rel string) (int, error) {
	stack := []int{h.fd} // stack[0] is the home; not ours to close
	defer func() {
		for _, fd := range stack[1:] {
			_ = unix.Close(fd)
		}
	}()
	pop := func() {
		_ = unix.Close(stack[len(stack)-1])
		stack = stack[:len(stack)-1]
	}
	queue := splitPath(rel)
	where := []string{} // components of the path walked so far, for errors
	links := 0
	for len(queue) > 0 {
		comp := queue[0]
		queue = queue[1:]
		switch comp {
		case ".":
			continue
		case "..":
			if len(stack) == 1 {
				return -1, &ConfineError{Path: orig, Home: h.dir, Reason: "it climbs above the home with '..'"}
			}
			pop()
			where = where[:len(where)-1]
			continue
		}
		top := stack[len(stack)-1]
		last := len(queue) == 0
		var fd int
		var err error
		if last {
			fd, err = unix.Openat(top, comp, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.ELOOP) {
				// A symlink: hold the link itself to read it.
				fd, err = unix.Openat(top, comp, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			}
		} else {
			fd, err = unix.Openat(top, comp, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		}
		here := filepath.Join(append([]string{h.dir}, append(where, comp)...)...)
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: here, Err: err}
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			_ = unix.Close(fd)
			return -1, &fs.PathError{Op: "stat", Path: here, Err: err}
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			target, err := readlinkFd(fd)
			_ = unix.Close(fd)
			if err != nil {
				return -1, &fs.PathError{Op: "readlink", Path: here, Err: err}
			}
			if links++; links > maxSymlinks {
				return -1, &fs.PathError{Op: "open", Path: orig, Err: unix.ELOOP}
			}
			if filepath.IsAbs(target) {
				r, ok := h.relTo(filepath.Clean(target))
				if !ok {
					return -1, &ConfineError{Path: orig, Home: h.dir, Reason: fmt.Sprintf("symlink %s points to %s", here, target)}
				}
				for len(stack) > 1 {
					pop()
				}
				where = where[:0]
				queue = append(splitPath(r), queue...)
			} else {
				queue = append(splitPath(target), queue...)
			}
		case unix.S_IFDIR:
			if last {
				return fd, nil
			}
			stack = append(stack, fd)
			where = append(where, comp)
		default:
			if last {
				return fd, nil
			}
			_ = unix.Close(fd)
			return -1, &fs.PathError{Op: "open", Path: here, Err: unix.ENOTDIR}
		}
	}
	// The path named a directory on the stack (the home, or one reached
	// through "..").
	top := stack[len(stack)-1]
	fd, err := unix.Openat(top, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &fs.PathError{Op: "open", Path: filepath.Join(append([]string{h.dir}, where...)...), Err: err}
	}
	return fd, nil
}

func splitPath(p string) []string {
	var out []string
	for _, s := range strings.Split(p, "/") {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

// readlinkFd reads the symlink an O_PATH|O_NOFOLLOW descriptor holds.
func readlinkFd(fd int) (string, error) {
	for size := 256; ; size *= 2 {
		b := make([]byte, size)
		n, err := unix.Readlinkat(fd, "", b)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(b[:n]), nil
		}
		if size > 1<<16 {
			return "", unix.ENAMETOOLONG
		}
	}
}
