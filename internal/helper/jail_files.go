package helper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

// openIn opens name beneath the directory dir with openat2, following no
// symlink on the way or at the end, and no magic link.
func openIn(dir *os.File, name string, flags int, mode uint32) (*os.File, error) {
	how := &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	if flags&unix.O_CREAT != 0 {
		how.Mode = uint64(mode)
	}
	path := filepath.Join(dir.Name(), name)
	var fd int
	var err error
	for range 8 {
		// EAGAIN: a concurrent rename made the kernel give up the walk.
		if fd, err = unix.Openat2(int(dir.Fd()), name, how); !errors.Is(err, unix.EAGAIN) {
			break
		}
	}
	switch {
	case errors.Is(err, unix.ELOOP):
		return nil, helperapi.Errorf(helperapi.CodeForbidden, "open %s: a path component is a symlink", path)
	case errors.Is(err, unix.EXDEV):
		return nil, helperapi.Errorf(helperapi.CodeForbidden, "open %s: path escapes %s", path, dir.Name())
	case errors.Is(err, unix.ENOSYS):
		return nil, helperapi.Errorf(helperapi.CodeUnsupported, "open %s: the kernel lacks openat2 (Linux 5.6+)", path)
	case err != nil:
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// placeInJail puts one planned file in the jail root: a copy for the
// kernel and initrd (root:<gid> 0440), a hard link for a disk, whose
// group becomes the jail's with read (and for a writable disk, write)
// access, the owner's bits kept and others' cleared.
func placeInJail(root *os.File, l jail.HardLink, vf *vmFile, gid uint32) error {
	if vf == nil {
		return fmt.Errorf("place %s in the jail: the file was not opened", l.Source)
	}
	name, err := filepath.Rel(root.Name(), l.Target)
	if err != nil || strings.Contains(name, "/") || name == ".." {
		return fmt.Errorf("place %s in the jail: target %s is not in %s", l.Source, l.Target, root.Name())
	}
	switch vf.kind {
	case copied:
		dst, err := openIn(root, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o400)
		if err != nil {
			return fmt.Errorf("copy %s into the jail: %w", l.Source, err)
		}
		defer dst.Close()
		if _, err := io.Copy(dst, vf.f); err != nil {
			return fmt.Errorf("copy %s into the jail: %w", l.Source, err)
		}
		if err := dst.Chown(0, int(gid)); err != nil {
			return fmt.Errorf("copy %s into the jail: %w", l.Source, err)
		}
		if err := dst.Chmod(0o440); err != nil {
			return fmt.Errorf("copy %s into the jail: %w", l.Source, err)
		}
		return dst.Close()
	case linked:
		err := unix.Linkat(int(vf.f.Fd()), "", int(root.Fd()), name, unix.AT_EMPTY_PATH)
		if errors.Is(err, unix.EXDEV) {
			return helperapi.Errorf(helperapi.CodeUnsupported, "link %s into the jail: another file system (hint: --jail-dir on the state dir's file system)", l.Source)
		}
		if err != nil {
			return fmt.Errorf("link %s into the jail: %w", l.Source, err)
		}
		group := uint32(0o040)
		if !vf.disk.ReadOnly {
			group = 0o060
		}
		if err := vf.f.Chown(-1, int(gid)); err != nil {
			return fmt.Errorf("give disk %s to the jail: %w", l.Source, err)
		}
		if err := unix.Fchmod(int(vf.f.Fd()), vf.st.Mode&0o700|group); err != nil {
			return fmt.Errorf("give disk %s to the jail: %w", l.Source, err)
		}
		return nil
	}
	return fmt.Errorf("place %s in the jail: unknown kind", l.Source)
}

// createJailLog creates the file Firecracker's logger appends to (it opens
// it without O_CREAT): the owner's, with write access for the jail's gid,
// hard-linked into the instance dir where the owner reads it.
func createJailLog(inst, root *os.File, owner, gid uint32) error {
	name := strings.TrimPrefix(jail.JailLog, "/")
	f, err := openIn(root, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create firecracker log: %w", err)
	}
	defer f.Close()
	if err := f.Chown(int(owner), int(gid)); err != nil {
		return fmt.Errorf("create firecracker log: %w", err)
	}
	if err := f.Chmod(0o620); err != nil {
		return fmt.Errorf("create firecracker log: %w", err)
	}
	if err := unix.Linkat(int(f.Fd()), "", int(inst.Fd()), jail.HostLogName, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("link firecracker log: %w", err)
	}
	return nil
}

// handOverSocket waits for Firecracker's API socket in the jail, links it
// into the instance dir (which only root can change) and gives that inode
// to the owner alone. The socket must be one the jail's uid made: a jailed
// process cannot plant anything else there, since it can link only its
// own files.
func handOverSocket(ctx context.Context, inst, root *os.File, pid int, start uint64, uid, owner, ownerGID uint32) error {
	dir, base := filepath.Split(strings.TrimPrefix(jail.JailAPISocket, "/"))
	ctx, cancel := context.WithTimeout(ctx, jailReadyTimeout)
	defer cancel()
	for delay := 2 * time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		if run, err := openIn(root, dir, unix.O_PATH|unix.O_DIRECTORY, 0); err == nil {
			var st unix.Stat_t
			err := unix.Fstatat(int(run.Fd()), base, &st, unix.AT_SYMLINK_NOFOLLOW)
			if err == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK && st.Uid == uid {
				err = linkSocket(inst, run, base, st, owner, ownerGID)
				run.Close()
				return err
			}
			run.Close()
		}
		if p, err := vmm.Find(pid, start); err != nil || !p.Alive() {
			return fmt.Errorf("firecracker pid %d exited before its api socket appeared", pid)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for firecracker's api socket in %s: %w", root.Name(), ctx.Err())
		case <-t.C:
		}
	}
}

func linkSocket(inst, run *os.File, name string, want unix.Stat_t, owner, ownerGID uint32) error {
	if err := unix.Linkat(int(run.Fd()), name, int(inst.Fd()), jail.HostSocketName, 0); err != nil {
		return fmt.Errorf("link firecracker's api socket: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(int(inst.Fd()), jail.HostSocketName, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("link firecracker's api socket: %w", err)
	}
	if st.Dev != want.Dev || st.Ino != want.Ino || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return helperapi.Errorf(helperapi.CodeForbidden, "firecracker's api socket was replaced while linking it")
	}
	if err := unix.Fchownat(int(inst.Fd()), jail.HostSocketName, int(owner), int(ownerGID), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("give the api socket to the owner: %w", err)
	}
	if err := unix.Fchmodat(int(inst.Fd()), jail.HostSocketName, 0o600, 0); err != nil {
		return fmt.Errorf("give the api socket to the owner: %w", err)
	}
	return nil
}

// jailAt is one instance dir under the jail dir.
type jailAt struct {
	vmID string
	dir  string
}

// allJails lists <jail dir>/<exec name>/<vm id> directories; a jail made
// with another firecracker binary name is still found.
func (s *Server) allJails() ([]jailAt, error) {
	execs, err := os.ReadDir(s.jail.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list jails: %w", err)
	}
	var out []jailAt
	for _, e := range execs {
		if !e.IsDir() || !plainName(e.Name()) {
			continue
		}
		vms, err := os.ReadDir(filepath.Join(s.jail.dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("list jails: %w", err)
		}
		for _, v := range vms {
			if v.IsDir() && helperapi.ValidateVMID(v.Name()) == nil {
				out = append(out, jailAt{vmID: v.Name(), dir: filepath.Join(s.jail.dir, e.Name(), v.Name())})
			}
		}
	}
	return out, nil
}

// findJails returns the instance dirs of vmID's jail (one, normally).
func (s *Server) findJails(vmID string) ([]string, error) {
	all, err := s.allJails()
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, j := range all {
		if j.vmID == vmID {
			dirs = append(dirs, j.dir)
		}
	}
	return dirs, nil
}

func writeRecord(inst *os.File, rec jailRecord) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode jail record: %w", err)
	}
	tmp := jailRecordName + ".new"
	f, err := openIn(inst, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("write jail record: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(int(inst.Fd()), tmp, int(inst.Fd()), jailRecordName)
	}
	if err != nil {
		return fmt.Errorf("write jail record: %w", err)
	}
	return nil
}

func readRecordAt(dir string) (jailRecord, error) {
	var rec jailRecord
	b, err := os.ReadFile(filepath.Join(dir, jailRecordName))
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("read jail record %s: %w", dir, err)
	}
	return rec, nil
}
