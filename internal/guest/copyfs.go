package guest

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"github.com/pkg/sftp"
)

// copyFS is one side of a copy: the local file system or a guest's over
// SFTP. Both sides of banger are Linux, so paths are slash-separated on
// either.
type copyFS interface {
	Stat(p string) (fs.FileInfo, error)
	Lstat(p string) (fs.FileInfo, error)
	ReadDir(p string) ([]fs.FileInfo, error)
	Open(p string) (io.ReadCloser, error)
	// Create opens p for writing, truncating or creating it with perm.
	Create(p string, perm fs.FileMode) (io.WriteCloser, error)
	// CreateExcl creates p, which must not exist, with perm.
	CreateExcl(p string, perm fs.FileMode) (io.WriteCloser, error)
	Mkdir(p string, perm fs.FileMode) error
	MkdirAll(p string) error
	Chmod(p string, mode fs.FileMode) error
	Chtimes(p string, atime, mtime time.Time) error
	Readlink(p string) (string, error)
	Symlink(target, p string) error
	// Rename replaces newpath atomically.
	Rename(oldpath, newpath string) error
	Remove(p string) error
	String() string
}

// localFS is the host's file system, for the CLI's copies as the user.
type localFS struct{}

func (localFS) Stat(p string) (fs.FileInfo, error)  { return os.Stat(p) }
func (localFS) Lstat(p string) (fs.FileInfo, error) { return os.Lstat(p) }
func (localFS) ReadDir(p string) ([]fs.FileInfo, error) {
	des, err := os.ReadDir(p)
	if err != nil {
		return nil, err
	}
	out := make([]fs.FileInfo, 0, len(des))
	for _, d := range des {
		fi, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed while we listed
		}
		if err != nil {
			return nil, err
		}
		out = append(out, fi)
	}
	return out, nil
}
func (localFS) Open(p string) (io.ReadCloser, error) { return os.Open(p) }
func (localFS) Create(p string, perm fs.FileMode) (io.WriteCloser, error) {
	return os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
}
func (localFS) CreateExcl(p string, perm fs.FileMode) (io.WriteCloser, error) {
	return os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
}
func (localFS) Mkdir(p string, perm fs.FileMode) error { return os.Mkdir(p, perm) }
func (localFS) MkdirAll(p string) error                { return os.MkdirAll(p, 0o755) }
func (localFS) Chmod(p string, mode fs.FileMode) error { return os.Chmod(p, mode) }
func (localFS) Chtimes(p string, a, m time.Time) error { return os.Chtimes(p, a, m) }
func (localFS) Readlink(p string) (string, error)      { return os.Readlink(p) }
func (localFS) Symlink(target, p string) error         { return os.Symlink(target, p) }
func (localFS) Rename(oldpath, newpath string) error   { return os.Rename(oldpath, newpath) }
func (localFS) Remove(p string) error                  { return os.Remove(p) }
func (localFS) String() string                         { return "local" }

// sftpFS is a guest's file system over SFTP.
type sftpFS struct {
	c    *sftp.Client
	name string // the VM, for messages
}

func (s sftpFS) Stat(p string) (fs.FileInfo, error)      { return s.c.Stat(p) }
func (s sftpFS) Lstat(p string) (fs.FileInfo, error)     { return s.c.Lstat(p) }
func (s sftpFS) ReadDir(p string) ([]fs.FileInfo, error) { return s.c.ReadDir(p) }
func (s sftpFS) Open(p string) (io.ReadCloser, error)    { return s.c.Open(p) }
func (s sftpFS) Create(p string, perm fs.FileMode) (io.WriteCloser, error) {
	f, err := s.c.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC)
	if err != nil {
		return nil, err
	}
	// SFTP opens without a mode (sftp-server creates 0666 &^ umask):
	// narrow it before any data lands, the caller sets the final mode.
	if err := f.Chmod(perm); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}
func (s sftpFS) CreateExcl(p string, perm fs.FileMode) (io.WriteCloser, error) {
	f, err := s.c.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(perm); err != nil {
		_ = f.Close()
		_ = s.c.Remove(p)
		return nil, err
	}
	return f, nil
}
func (s sftpFS) Mkdir(p string, perm fs.FileMode) error {
	if err := s.c.Mkdir(p); err != nil {
		return err
	}
	return s.c.Chmod(p, perm)
}
func (s sftpFS) MkdirAll(p string) error                { return s.c.MkdirAll(p) }
func (s sftpFS) Chmod(p string, mode fs.FileMode) error { return s.c.Chmod(p, mode) }
func (s sftpFS) Chtimes(p string, a, m time.Time) error { return s.c.Chtimes(p, a, m) }
func (s sftpFS) Readlink(p string) (string, error)      { return s.c.ReadLink(p) }
func (s sftpFS) Symlink(target, p string) error         { return s.c.Symlink(target, p) }
func (s sftpFS) Rename(oldpath, newpath string) error   { return s.c.PosixRename(oldpath, newpath) }
func (s sftpFS) Remove(p string) error                  { return s.c.Remove(p) }
func (s sftpFS) String() string                         { return s.name }

// expandRemote makes a guest path absolute the way scp does: relative
// paths and "~/…" are in the login user's home.
func expandRemote(c *sftp.Client, p string) (string, error) {
	switch {
	case p == "" || p == "~" || p == ".":
		return c.Getwd()
	case strings.HasPrefix(p, "~/"):
		home, err := c.Getwd()
		if err != nil {
			return "", err
		}
		return path.Join(home, p[2:]), nil
	case !strings.HasPrefix(p, "/"):
		home, err := c.Getwd()
		if err != nil {
			return "", err
		}
		return path.Join(home, p), nil
	}
	return path.Clean(p), nil
}

// modeBits is what chmod sets: permissions plus setuid, setgid and sticky.
func modeBits(m fs.FileMode) fs.FileMode {
	return m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}
