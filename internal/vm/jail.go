package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker"
)

// A Firecracker VM in bridge mode runs under the jailer, launched by
// banger-helper as a uid of its own (docs/adr/0009-jailed-firecracker.md),
// when the helper works in the daemon's state dir: it resolves the files
// it puts in the jail as <state dir>/vms/<vm id>/<basename>, so the VM's
// kernel, initrd and disks must lie there, owned by the owner. The daemon
// then only configures and boots the process through its API socket, and
// ends it through the helper: it may not signal another uid's process.
//
// Ledger: the jail is a resource of kind resJail (ref: the VM id),
// recorded with the boot's other intents before LaunchJailed. It stands
// for the jailed process too: no resProcess is recorded for a jailed VM,
// whose release would try to signal the process itself. Releasing it is
// KillJailed, which does nothing for a VM without a jail.

// Files the daemon puts in the VM's directory for the helper to copy into
// the jail: the image's kernel and initrd, refreshed on every jailed boot.
const (
	jailKernelName = "vmlinux"
	jailInitrdName = "initrd.img"
)

// jailKillTimeout bounds one KillJailed: the helper kills the cgroup's
// processes and waits for them, which takes milliseconds.
const jailKillTimeout = 30 * time.Second

// jailedDriver is a driver that boots a VMM banger-helper launched in a
// jail; *firecracker.Driver is one.
type jailedDriver interface {
	BootJailed(ctx context.Context, j firecracker.Jailed, cfg vmm.Config, log *slog.Logger) (*firecracker.Machine, error)
	AttachJailed(ctx context.Context, h vmm.Handle, kill func() error, log *slog.Logger) (*firecracker.Machine, error)
}

var _ jailedDriver = (*firecracker.Driver)(nil)

// errNotJailable carries why a boot is not jailed.
type errNotJailable struct{ reason string }

func (e errNotJailable) Error() string { return e.reason }

// jailable returns the driver that boots the VM in a jail, or why this
// boot runs the VMM unjailed as the daemon's user.
func (s *Service) jailable(row store.VM, rt Runtime) (jailedDriver, error) {
	if rt.VMM != vmm.Firecracker {
		return nil, errNotJailable{"only firecracker runs jailed"}
	}
	n := s.liveBridge()
	if row.NetMode != NetBridge || n == nil {
		return nil, errNotJailable{"no bridge networking through banger-helper"}
	}
	if !n.cfg.SharedStateDir {
		return nil, errNotJailable{"banger-helper keeps a state dir of its own and cannot reach this daemon's VM files"}
	}
	jd, ok := s.Drivers[vmm.Firecracker].(jailedDriver)
	if !ok {
		return nil, errNotJailable{"the firecracker driver cannot boot a jailed VMM"}
	}
	dir := s.Layout.VMDir(row.ID)
	for _, f := range []string{rt.Disk.Path, rt.Seed} {
		if f == "" {
			continue
		}
		if filepath.Dir(f) != dir || helperapi.ValidateFileName(filepath.Base(f)) != nil {
			return nil, errNotJailable{fmt.Sprintf("disk %s is not a file of the VM's directory", f)}
		}
	}
	if rt.Disk.Format != image.DiskRaw || rt.Disk.Strategy == image.CloneDMSnapshot {
		return nil, errNotJailable{fmt.Sprintf("the root disk is a %s %s, not a raw file the jail can link", rt.Disk.Strategy, rt.Disk.Format)}
	}
	// The helper opens only the owner's files: a daemon running as
	// another user than the one the helper serves has none to give, unless
	// it is root and gives them (jailFiles).
	if euid := os.Geteuid(); euid != 0 && uint32(euid) != n.cfg.OwnerUID {
		return nil, errNotJailable{fmt.Sprintf("the daemon runs as uid %d and banger-helper serves uid %d", euid, n.cfg.OwnerUID)}
	}
	return jd, nil
}

// launchJailed has banger-helper start Firecracker in a jail with the VM's
// files and tap, then boots it through its API socket. The jail's intent
// is recorded already (markStarting). On error nothing of the jail runs:
// BootJailed kills it through the helper, and the deferred release of the
// boot removes it.
func (s *Service) launchJailed(ctx context.Context, row store.VM, rt Runtime, jd jailedDriver, files BootFiles, cfg vmm.Config, log *slog.Logger) (vmm.Machine, helperapi.LaunchJailedResult, error) {
	var res helperapi.LaunchJailedResult
	n := s.liveBridge()
	if n == nil {
		return nil, res, bridgeUnavailable(row.Name, ErrNoHelper)
	}
	op, err := s.jailFiles(ctx, row, rt, files, n.cfg.OwnerUID)
	if err != nil {
		return nil, res, err
	}
	h := n.cfg.Helper
	res, err = h.LaunchJailed(ctx, op)
	if errors.Is(err, helperapi.ErrExists) {
		// A jail left from an earlier boot (its removal found no helper):
		// replace it, as makeTap does a tap.
		log.Warn("replacing a jail left from an earlier boot")
		if err = h.KillJailed(ctx, helperapi.KillJailed{VMID: row.ID}); err == nil {
			res, err = h.LaunchJailed(ctx, op)
		}
	}
	if err != nil {
		return nil, res, fmt.Errorf("launch jailed firecracker: %w", err)
	}
	crashpoint("start:jailed")
	dir := s.Layout.VMDir(row.ID)
	cfg.Kernel = filepath.Join(dir, jailKernelName)
	cfg.Initrd = ""
	if op.Initrd != "" {
		cfg.Initrd = filepath.Join(dir, jailInitrdName)
	}
	m, err := jd.BootJailed(ctx, firecracker.Jailed{
		PID: res.PID, StartTime: res.StartTime,
		Socket: res.Socket, Root: res.Root, Log: res.Log, ConsoleLog: res.ConsoleLog,
		Kill: s.jailKill(row.ID),
	}, cfg, log)
	if err != nil {
		return nil, res, fmt.Errorf("boot jailed firecracker: %w", err)
	}
	return m, res, nil
}

// jailFiles puts the image's kernel and initrd in the VM's directory and
// describes the VM to LaunchJailed. A daemon running as root gives the
// directory and the files the helper opens to the owner, the only user
// whose files the helper accepts.
func (s *Service) jailFiles(ctx context.Context, row store.VM, rt Runtime, files BootFiles, owner uint32) (helperapi.LaunchJailed, error) {
	dir := s.Layout.VMDir(row.ID)
	chown := os.Geteuid() == 0 && owner != 0
	op := helperapi.LaunchJailed{
		VMID:      row.ID,
		CPUs:      row.CPUs,
		MemoryMiB: int(row.MemoryBytes / api.MiB),
		Kernel:    jailKernelName,
		Disks:     []helperapi.JailDisk{{ID: "root", File: filepath.Base(rt.Disk.Path)}},
		Tap:       true,
	}
	if err := placeBootFile(ctx, files.Vmlinux, filepath.Join(dir, jailKernelName), !chown); err != nil {
		return op, err
	}
	owned := []string{dir, filepath.Join(dir, jailKernelName), rt.Disk.Path}
	if files.Initrd != "" {
		op.Initrd = jailInitrdName
		if err := placeBootFile(ctx, files.Initrd, filepath.Join(dir, jailInitrdName), !chown); err != nil {
			return op, err
		}
		owned = append(owned, filepath.Join(dir, jailInitrdName))
	} else if err := removeIfExists(filepath.Join(dir, jailInitrdName)); err != nil {
		return op, err
	}
	if rt.Seed != "" {
		op.Disks = append(op.Disks, helperapi.JailDisk{ID: "seed", File: filepath.Base(rt.Seed), ReadOnly: true})
		owned = append(owned, rt.Seed)
	}
	if !chown {
		return op, nil
	}
	gid := ownerGID(owner)
	// The console log is written by a logger the helper runs as the owner.
	if _, err := os.Lstat(consoleLogPath(dir)); err == nil {
		owned = append(owned, consoleLogPath(dir))
	}
	for _, p := range owned {
		if err := os.Lchown(p, int(owner), gid); err != nil {
			return op, fmt.Errorf("give %s to the helper's owner: %w", p, err)
		}
	}
	return op, nil
}

// ownerGID is the primary group of uid, or uid itself when it has no
// account.
func ownerGID(uid uint32) int {
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		if g, err := strconv.Atoi(u.Gid); err == nil {
			return g
		}
	}
	return int(uid)
}

// placeBootFile makes dst the same content as src, replacing what was
// there: a hard link where allowed (the daemon owns the image's files, and
// the helper copies a kernel into the jail, never links it), else a
// reflink, else a copy. A kernel is tens of MiB; nothing is copied twice
// when the file system shares extents.
func placeBootFile(ctx context.Context, src, dst string, link bool) error {
	if err := removeIfExists(dst); err != nil {
		return fmt.Errorf("replace %s: %w", dst, err)
	}
	if link {
		if err := os.Link(src, dst); err == nil {
			return nil
		}
	}
	var errs []error
	for _, strategy := range []image.CloneStrategy{image.CloneReflink, image.CloneSparseCopy} {
		c, err := image.NewCloner(strategy, image.CloneOptions{})
		if err == nil {
			if err = c.Clone(ctx, src, dst); err == nil {
				return nil
			}
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("place %s in the vm directory: %w", src, errors.Join(errs...))
}

// jailKill is how a jailed VM's Machine kills it: through the helper,
// which ends every process of the VM's cgroup and removes the jail.
func (s *Service) jailKill(vmID string) func() error {
	return func() error {
		h := s.jailHelper()
		if h == nil {
			return fmt.Errorf("kill jailed vm %s: %w", vmID, ErrNoHelper)
		}
		ctx, cancel := context.WithTimeout(context.Background(), jailKillTimeout)
		defer cancel()
		if err := h.KillJailed(ctx, helperapi.KillJailed{VMID: vmID}); err != nil {
			return fmt.Errorf("kill jailed vm %s: %w", vmID, err)
		}
		return nil
	}
}

// jailHelper is the configured helper, whether or not it answered lately:
// killing a jail is worth a try whenever one may exist.
func (s *Service) jailHelper() Helper {
	if s.Bridge == nil {
		return nil
	}
	return s.Bridge.Helper
}

// releaseJail removes a VM's jail, if any. A helper that runs no jails has
// none to remove; one that does not answer is warned about, and the jail
// goes as an orphan when a daemon next finds the helper (sweepOwned).
func (s *Service) releaseJail(ctx context.Context, vmID string) error {
	h := s.jailHelper()
	var err error
	if h == nil {
		err = ErrNoHelper
	} else {
		err = h.KillJailed(ctx, helperapi.KillJailed{VMID: vmID})
	}
	switch {
	case err == nil, errors.Is(err, helperapi.ErrUnsupported):
		return nil
	case unreachable(err):
		s.Log.Warn("cannot remove jail now; it goes once banger-helper answers again", "vm_id", vmID, "err", err)
		return nil
	}
	return fmt.Errorf("kill jail: %w", err)
}

// attach re-attaches to the VMM a previous daemon started: a jailed one
// with a kill through the helper.
func (s *Service) attach(ctx context.Context, row store.VM, rt Runtime, log *slog.Logger) (vmm.Machine, error) {
	drv, ok := s.Drivers[rt.Handle.Kind]
	if !ok {
		return nil, fmt.Errorf("no %s driver on this host", rt.Handle.Kind)
	}
	if !rt.Jailed {
		return drv.Attach(ctx, *rt.Handle, log)
	}
	jd, ok := drv.(jailedDriver)
	if !ok || s.jailHelper() == nil {
		return nil, errors.New("a jailed vmm needs banger-helper and the firecracker driver")
	}
	m, err := jd.AttachJailed(ctx, *rt.Handle, s.jailKill(row.ID), log)
	if err != nil {
		return nil, err
	}
	return m, nil
}
