package helper

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/jail"
)

func (s *Server) killJailed(ctx context.Context, op helperapi.KillJailed) error {
	if s.jail == nil {
		return errJailOff
	}
	return s.killJail(ctx, op.VMID)
}

// killJail undoes a jail, whole or in part, in the order that keeps a
// retry possible: kill every process of the VM's cgroup (and the recorded
// Firecracker, should it be elsewhere), give the tap and the disks back
// to the owner, then remove the jail and the cgroup. The record goes last:
// until then a failed step can be retried.
func (s *Server) killJail(ctx context.Context, vmID string) error {
	jc := s.jail
	log := s.logFor(ctx).With("vm", vmID)
	dirs, err := s.findJails(vmID)
	if err != nil {
		return err
	}
	cgroups := []string{jc.cgroup + "/" + vmID}
	recs := make(map[string]jailRecord)
	for _, d := range dirs {
		rec, err := readRecordAt(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue // cut short before the record: nothing was changed yet
		}
		if err != nil {
			return err
		}
		recs[d] = rec
		if rec.Cgroup != "" && !containsString(cgroups, rec.Cgroup) && validCgroupPath(rec.Cgroup) {
			cgroups = append(cgroups, rec.Cgroup)
		}
	}
	mount, merr := cgroup2Mount()
	if merr == nil {
		for _, cg := range cgroups {
			if err := killCgroup(ctx, filepath.Join(mount, cg)); err != nil {
				return err
			}
		}
	}
	for _, rec := range recs {
		if err := killProcess(ctx, rec.PID, rec.StartTime); err != nil {
			return err
		}
	}
	var errs []error
	for d, rec := range recs {
		if rec.Tap != "" {
			if err := s.setTapOwner(rec.Tap, s.cfg.OwnerUID); err != nil && !errors.Is(err, helperapi.ErrNotFound) {
				errs = append(errs, err)
			}
		}
		for _, disk := range rec.Disks {
			if err := s.restoreDisk(d, vmID, disk, log); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("give vm %s's tap and disks back (the jail stays for a retry): %w", vmID, err)
	}
	// Killing and giving back is safe wherever the jail lies; removing a
	// tree as root is safe only where nobody else can swap a directory.
	if len(dirs) > 0 {
		if err := checkTrusted(jc.dir, true); err != nil {
			return helperapi.Errorf(helperapi.CodeForbidden, "remove vm %s's jail: jail dir: %v", vmID, err)
		}
	}
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("remove jail %s: %w", d, err)
		}
		if err := removeIfEmpty(filepath.Dir(d)); err != nil {
			return err
		}
	}
	if merr == nil {
		if err := removeIfEmpty(filepath.Join(mount, jc.cgroup)); err != nil {
			return err
		}
	}
	return nil
}

// killProcess kills the process pid if it still carries start, and waits
// for it to go.
func killProcess(ctx context.Context, pid int, start uint64) error {
	if pid <= 0 {
		return nil
	}
	p, err := vmm.Find(pid, start)
	if err != nil {
		return nil // gone
	}
	if err := p.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, vmm.ErrGone) {
		return fmt.Errorf("kill firecracker pid %d: %w", pid, err)
	}
	for delay := time.Millisecond; p.Alive(); delay = min(2*delay, 50*time.Millisecond) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("kill firecracker pid %d: %w", pid, ctx.Err())
		case <-time.After(delay):
		}
	}
	return nil
}

// restoreDisk gives a disk its group and mode back. It is found through
// the jail's link, or else the VM's own file, and only when it is still
// the recorded inode: a jailed process may have replaced the link, the
// owner the file.
func (s *Server) restoreDisk(instDir, vmID string, d recordDisk, log *slog.Logger) error {
	match := func(f *os.File) bool {
		var st unix.Stat_t
		return unix.Fstat(int(f.Fd()), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Dev == d.Dev && st.Ino == d.Ino
	}
	var f *os.File
	if inst, err := os.OpenFile(instDir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err == nil {
		f, _ = openIn(inst, filepath.Join(jailRootName, strings.TrimPrefix(jail.DiskPath(d.ID), "/")), unix.O_RDONLY|unix.O_NONBLOCK, 0)
		inst.Close()
	}
	if f != nil && !match(f) {
		f.Close()
		f = nil
	}
	if f == nil {
		if vf, _, err := s.openVMFile(vmID, d.File, false); err == nil {
			if match(vf) {
				f = vf
			} else {
				vf.Close()
			}
		}
	}
	if f == nil {
		log.Warn("jailed disk is gone or replaced; nothing to give back", "disk", d.ID, "file", d.File)
		return nil
	}
	defer f.Close()
	if err := f.Chown(-1, int(d.GID)); err != nil {
		return fmt.Errorf("give disk %s back: %w", d.File, err)
	}
	if err := unix.Fchmod(int(f.Fd()), d.Mode&0o7777); err != nil {
		return fmt.Errorf("give disk %s back: %w", d.File, err)
	}
	return nil
}

// ownedJails lists jails and jail cgroups, for ListOwned.
func (s *Server) ownedJails() ([]helperapi.OwnedJail, error) {
	if s.jail == nil {
		return nil, nil
	}
	byID := make(map[string]*helperapi.OwnedJail)
	jails, err := s.allJails()
	if err != nil {
		return nil, err
	}
	for _, j := range jails {
		o := &helperapi.OwnedJail{VMID: j.vmID, Dir: j.dir}
		if rec, err := readRecordAt(j.dir); err == nil {
			o.UID, o.PID, o.StartTime = rec.UID, rec.PID, rec.StartTime
			if p, err := vmm.Find(rec.PID, rec.StartTime); err == nil && p.Alive() {
				o.Running = true
			}
		}
		byID[j.vmID] = o
	}
	if mount, err := cgroup2Mount(); err == nil {
		entries, err := os.ReadDir(filepath.Join(mount, s.jail.cgroup))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("list jail cgroups: %w", err)
		}
		for _, e := range entries {
			if !e.IsDir() || helperapi.ValidateVMID(e.Name()) != nil {
				continue
			}
			o := byID[e.Name()]
			if o == nil {
				o = &helperapi.OwnedJail{VMID: e.Name()}
				byID[e.Name()] = o
			}
			o.Cgroup = s.jail.cgroup + "/" + e.Name()
		}
	}
	out := make([]helperapi.OwnedJail, 0, len(byID))
	for _, o := range byID {
		out = append(out, *o)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VMID < out[j].VMID })
	return out, nil
}
