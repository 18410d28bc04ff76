package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// CopyOptions configure Upload and Download.
type CopyOptions struct {
	// Recursive copies directories (cp -r); without it a directory source
	// is an error.
	Recursive bool
	// Progress, when set, is called with the bytes copied so far and the
	// total, from several goroutines but never concurrently.
	Progress func(done, total int64)
	// Parallel files in flight for a directory (8 when zero). Each large
	// file is also sent with many requests in flight.
	Parallel int
}

// CopyStats count what a copy made.
type CopyStats struct {
	Files    int
	Dirs     int
	Symlinks int
	Bytes    int64
}

// NewSFTP opens an SFTP session tuned for bulk transfers: 64 requests in
// flight per file, in both directions. pkg/sftp writes concurrently only
// when asked; sftp-server applies writes at their offsets, so out-of-order
// completion is safe, and a failed write fails the copy.
func NewSFTP(c *ssh.Client) (*sftp.Client, error) {
	sc, err := sftp.NewClient(c,
		sftp.UseConcurrentWrites(true),
		sftp.UseConcurrentReads(true),
		sftp.MaxConcurrentRequestsPerFile(64),
		sftp.UseFstat(true),
	)
	if err != nil {
		return nil, fmt.Errorf("start sftp: %w", err)
	}
	return sc, nil
}

// Upload copies the local file or directory src to dst in the guest, cp
// style: into dst when dst is an existing directory, else as dst. Modes
// are kept, and mtimes to the second (SFTP's resolution); symlinks are
// copied as symlinks. name is the VM, for messages.
func Upload(ctx context.Context, sc *sftp.Client, name, src, dst string, opts CopyOptions) (CopyStats, error) {
	src, err := filepath.Abs(src)
	if err != nil {
		return CopyStats{}, err
	}
	if dst, err = expandRemote(sc, dst); err != nil {
		return CopyStats{}, fmt.Errorf("resolve %s:%s: %w", name, dst, err)
	}
	return copyTree(ctx, localFS{}, sftpFS{sc, name}, src, dst, opts)
}

// Download copies the guest's file or directory src to the local dst, as
// Upload does the other way.
func Download(ctx context.Context, sc *sftp.Client, name, src, dst string, opts CopyOptions) (CopyStats, error) {
	src, err := expandRemote(sc, src)
	if err != nil {
		return CopyStats{}, fmt.Errorf("resolve %s:%s: %w", name, src, err)
	}
	if dst, err = filepath.Abs(dst); err != nil {
		return CopyStats{}, err
	}
	return copyTree(ctx, sftpFS{sc, name}, localFS{}, src, dst, opts)
}

type copyItem struct {
	src, dst string
	info     fs.FileInfo
}

func copyTree(ctx context.Context, from, to copyFS, src, dst string, opts CopyOptions) (CopyStats, error) {
	where := func(fsys copyFS, p string) string {
		if _, ok := fsys.(localFS); ok {
			return p
		}
		return fsys.String() + ":" + p
	}
	si, err := from.Stat(src)
	if err != nil {
		return CopyStats{}, fmt.Errorf("copy %s: %w", where(from, src), err)
	}
	if si.IsDir() && !opts.Recursive {
		return CopyStats{}, fmt.Errorf("copy %s: it is a directory (hint: -r copies directories)", where(from, src))
	}
	if !si.IsDir() && !si.Mode().IsRegular() {
		return CopyStats{}, fmt.Errorf("copy %s: not a regular file or directory (%s)", where(from, src), si.Mode().Type())
	}
	target := dst
	if di, err := to.Stat(dst); err == nil && di.IsDir() {
		target = path.Join(dst, path.Base(src))
	} else if err == nil && si.IsDir() {
		return CopyStats{}, fmt.Errorf("copy %s to %s: the destination is not a directory", where(from, src), where(to, dst))
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return CopyStats{}, fmt.Errorf("copy to %s: %w", where(to, dst), err)
	} else if err != nil && dst != "/" && len(dst) > 1 && dst[len(dst)-1] == '/' {
		return CopyStats{}, fmt.Errorf("copy to %s: no such directory", where(to, dst))
	}
	// Walk first: directories are made parents first, files go out in
	// parallel, and the total is known for the progress bar.
	var dirs, files, links []copyItem
	var total int64
	var walk func(s, d string, fi fs.FileInfo) error
	walk = func(s, d string, fi fs.FileInfo) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			dirs = append(dirs, copyItem{s, d, fi})
			kids, err := from.ReadDir(s)
			if err != nil {
				return fmt.Errorf("read %s: %w", where(from, s), err)
			}
			for _, k := range kids {
				if err := walk(path.Join(s, k.Name()), path.Join(d, k.Name()), k); err != nil {
					return err
				}
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			links = append(links, copyItem{s, d, fi})
		case fi.Mode().IsRegular():
			files = append(files, copyItem{s, d, fi})
			total += fi.Size()
		default:
			// Devices, FIFOs and sockets cannot be copied as data.
			return fmt.Errorf("copy %s: not a regular file, directory or symlink (%s)", where(from, s), fi.Mode().Type())
		}
		return nil
	}
	if err := walk(src, target, si); err != nil {
		return CopyStats{}, err
	}

	var stats CopyStats
	for _, d := range dirs {
		// Owner-writable while we fill it; the real mode comes last.
		err := to.Mkdir(d.dst, 0o700)
		if errors.Is(err, fs.ErrExist) || err != nil && isExist(to, d.dst) {
			err = nil
		}
		if err != nil {
			return stats, fmt.Errorf("create %s: %w", where(to, d.dst), err)
		}
		stats.Dirs++
	}

	var done atomic.Int64
	var progressMu sync.Mutex
	report := func(n int64) {
		d := done.Add(n)
		if opts.Progress != nil {
			progressMu.Lock()
			opts.Progress(d, total)
			progressMu.Unlock()
		}
	}
	report(0)
	par := opts.Parallel
	if par <= 0 {
		par = 8
	}
	work := make(chan copyItem)
	errc := make(chan error, par)
	var wg sync.WaitGroup
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for range min(par, max(len(files), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range work {
				if err := copyFile(from, to, it, report); err != nil {
					errc <- fmt.Errorf("copy %s to %s: %w", where(from, it.src), where(to, it.dst), err)
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, f := range files {
		select {
		case work <- f:
		case <-cctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return stats, err
	}
	if err := ctx.Err(); err != nil {
		return stats, err
	}
	stats.Files = len(files)
	stats.Bytes = done.Load()

	for _, l := range links {
		target, err := from.Readlink(l.src)
		if err != nil {
			return stats, fmt.Errorf("read link %s: %w", where(from, l.src), err)
		}
		_ = to.Remove(l.dst) // replace what is there, as cp does
		if err := to.Symlink(target, l.dst); err != nil {
			return stats, fmt.Errorf("create link %s: %w", where(to, l.dst), err)
		}
		stats.Symlinks++
	}
	// Deepest first: setting a directory's mtime after its children are
	// in place, and its mode after we no longer write into it.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := to.Chmod(d.dst, modeBits(d.info.Mode())); err != nil {
			return stats, fmt.Errorf("chmod %s: %w", where(to, d.dst), err)
		}
		if err := to.Chtimes(d.dst, d.info.ModTime(), d.info.ModTime()); err != nil {
			return stats, fmt.Errorf("set times of %s: %w", where(to, d.dst), err)
		}
	}
	return stats, nil
}

func isExist(fsys copyFS, p string) bool {
	fi, err := fsys.Lstat(p)
	return err == nil && fi.IsDir()
}

// copyFile copies one regular file's data, mode and mtime.
func copyFile(from, to copyFS, it copyItem, report func(int64)) error {
	r, err := from.Open(it.src)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := to.Create(it.dst, 0o600)
	if err != nil {
		return err
	}
	if _, err := copyData(w, r, it.info.Size(), report); err != nil {
		w.Close()
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := to.Chmod(it.dst, modeBits(it.info.Mode())); err != nil {
		return err
	}
	return to.Chtimes(it.dst, it.info.ModTime(), it.info.ModTime())
}

// copyData moves the bytes with SFTP's pipelined transfers: a remote
// source pulls with concurrent reads (WriteTo), a remote destination is
// fed with concurrent writes (ReadFrom), which needs the size up front.
func copyData(w io.Writer, r io.Reader, size int64, report func(int64)) (int64, error) {
	if sf, ok := r.(*sftp.File); ok {
		return sf.WriteTo(&countWriter{w: w, report: report})
	}
	if sf, ok := w.(*sftp.File); ok {
		return sf.ReadFrom(&sizedReader{r: r, size: size, report: report})
	}
	return io.Copy(&countWriter{w: w, report: report}, r)
}

type countWriter struct {
	w      io.Writer
	report func(int64)
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.report(int64(n))
	return n, err
}

// sizedReader counts what is read and tells pkg/sftp the size, which it
// needs to send with requests in flight.
type sizedReader struct {
	r      io.Reader
	size   int64
	report func(int64)
}

func (s *sizedReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.report(int64(n))
	return n, err
}

func (s *sizedReader) Size() int64 { return s.size }
