package helper

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// openVMFile opens <state dir>/vms/<vmID>/<name> for the loop driver. The
// path is resolved by the kernel (openat2) beneath the state dir without
// following any symlink, so neither a link at <name> nor one at <vmID>
// leads out; it must then be a regular file owned by the owner. O_NONBLOCK
// keeps a FIFO planted there from hanging the helper.
func (s *Server) openVMFile(vmID, name string, write bool) (*os.File, string, error) {
	if err := errors.Join(helperapi.ValidateVMID(vmID), helperapi.ValidateFileName(name)); err != nil {
		return nil, "", helperapi.Errorf(helperapi.CodeInvalid, "%v", err)
	}
	rel := filepath.Join("vms", vmID, name)
	display := filepath.Join(s.cfg.StateDir, rel)
	dir, err := unix.Open(s.cfg.StateDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", helperapi.Errorf(helperapi.CodeNotFound, "open state dir %s: %v", s.cfg.StateDir, err)
	}
	defer func() { _ = unix.Close(dir) }()
	flags := unix.O_RDONLY
	if write {
		flags = unix.O_RDWR
	}
	how := &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_NOCTTY),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	var fd int
	for range 8 {
		// EAGAIN: a concurrent rename made the kernel give up the walk.
		if fd, err = unix.Openat2(dir, rel, how); !errors.Is(err, unix.EAGAIN) {
			break
		}
	}
	switch {
	case errors.Is(err, unix.ELOOP):
		return nil, "", helperapi.Errorf(helperapi.CodeForbidden, "open %s: a path component is a symlink", display)
	case errors.Is(err, unix.EXDEV):
		return nil, "", helperapi.Errorf(helperapi.CodeForbidden, "open %s: path escapes the state dir", display)
	case errors.Is(err, unix.EISDIR):
		return nil, "", helperapi.Errorf(helperapi.CodeForbidden, "open %s: not a regular file", display)
	case errors.Is(err, unix.ENOENT):
		return nil, "", helperapi.Errorf(helperapi.CodeNotFound, "open %s: no such file", display)
	case errors.Is(err, unix.ENOSYS):
		return nil, "", helperapi.Errorf(helperapi.CodeUnsupported, "open %s: the kernel lacks openat2 (Linux 5.6+)", display)
	case err != nil:
		return nil, "", fmt.Errorf("open %s: %w", display, err)
	}
	f := os.NewFile(uintptr(fd), display)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, "", fmt.Errorf("stat %s: %w", display, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, "", helperapi.Errorf(helperapi.CodeForbidden, "open %s: not a regular file", display)
	}
	if st.Uid != s.cfg.OwnerUID {
		f.Close()
		return nil, "", helperapi.Errorf(helperapi.CodeForbidden, "open %s: owned by uid %d, not the owner %d", display, st.Uid, s.cfg.OwnerUID)
	}
	return f, display, nil
}

// attachLoopFile binds backing to a free loop device in one LOOP_CONFIGURE
// call, with autoclear (the loop detaches when its last opener closes it)
// and without partition scanning (the kernel never parses a guest's
// partition table), and returns the opened device.
func attachLoopFile(backing *os.File, name string, readOnly bool) (string, *os.File, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("attach loop for %s: %w", name, err)
	}
	defer ctl.Close()
	mode := os.O_RDWR
	flags := uint32(unix.LO_FLAGS_AUTOCLEAR)
	if readOnly {
		mode = os.O_RDONLY
		flags |= unix.LO_FLAGS_READ_ONLY
	}
	cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Info: unix.LoopInfo64{Flags: flags}}
	copy(cfg.Info.File_name[:unix.LO_NAME_SIZE-1], name)
	for range 16 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("attach loop for %s: find a free loop device: %w", name, err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		lf, err := os.OpenFile(dev, mode|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", nil, fmt.Errorf("attach loop for %s: %w", name, err)
		}
		err = unix.IoctlLoopConfigure(int(lf.Fd()), &cfg)
		if errors.Is(err, unix.EBUSY) {
			lf.Close() // another process took this one between GET_FREE and CONFIGURE
			continue
		}
		if err != nil {
			lf.Close()
			return "", nil, fmt.Errorf("attach loop for %s: configure %s: %w", name, dev, err)
		}
		return dev, lf, nil
	}
	return "", nil, fmt.Errorf("attach loop for %s: every free loop device was taken concurrently", name)
}

func (s *Server) attachLoop(op helperapi.AttachLoop) (helperapi.AttachLoopResult, *os.File, error) {
	f, path, err := s.openVMFile(op.VMID, op.File, !op.ReadOnly)
	if err != nil {
		return helperapi.AttachLoopResult{}, nil, err
	}
	defer f.Close() // the loop holds its own reference
	dev, lf, err := attachLoopFile(f, path, op.ReadOnly)
	if err != nil {
		return helperapi.AttachLoopResult{}, nil, err
	}
	return helperapi.AttachLoopResult{Device: dev}, lf, nil
}

// loopBacking returns the backing file of /dev/loopN, "" when unbound.
func loopBacking(dev string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read backing file of %s: %w", dev, err)
	}
	return strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)"), nil
}

// vmsDir is <state dir>/vms with symlinks resolved, as the kernel reports
// backing files.
func (s *Server) vmsDir() string {
	dir := filepath.Join(s.cfg.StateDir, "vms")
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		return real
	}
	return dir
}

// ownedBacking reports whether a backing file lies under <state dir>/vms,
// and its VM id and path relative to that directory.
func (s *Server) ownedBacking(backing string) (vmID, rel string, ok bool) {
	rel, err := filepath.Rel(s.vmsDir(), backing)
	if err != nil || rel == "." || strings.HasPrefix(rel, "../") || rel == ".." {
		return "", "", false
	}
	if id, _, found := strings.Cut(rel, "/"); found && helperapi.ValidateVMID(id) == nil {
		vmID = id
	}
	return vmID, rel, true
}

func (s *Server) detachLoop(op helperapi.DetachLoop) error {
	// Holding the device open pins its binding: it cannot be cleared and
	// re-bound to someone else's file between the check and the detach.
	lf, err := os.OpenFile(op.Device, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", op.Device, err)
	}
	defer lf.Close()
	backing, err := loopBacking(op.Device)
	if err != nil {
		return err
	}
	if backing == "" {
		return nil // not bound: already detached
	}
	if _, _, ok := s.ownedBacking(backing); !ok {
		return helperapi.Errorf(helperapi.CodeForbidden, "detach %s: backing file %s is not under %s", op.Device, backing, s.vmsDir())
	}
	if err := unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", op.Device, err)
	}
	return nil
}

// ownedLoops lists loop devices backed by files under <state dir>/vms.
func (s *Server) ownedLoops() ([]helperapi.OwnedLoop, error) {
	paths, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	var out []helperapi.OwnedLoop
	for _, p := range paths {
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p)))
		backing, err := loopBacking(dev)
		if err != nil || backing == "" {
			continue // detached meanwhile
		}
		if id, rel, ok := s.ownedBacking(backing); ok {
			out = append(out, helperapi.OwnedLoop{Device: dev, VMID: id, File: rel})
		}
	}
	return out, nil
}
