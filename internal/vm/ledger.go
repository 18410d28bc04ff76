package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// Resource kinds a VM holds. Each is recorded in vm_resources (state
// "intent") before it is created and marked "created" after, so a daemon
// killed at any step knows what may exist and releases it on restart.
const (
	resVMDir      = "vmdir"      // ref: the VM's persistent directory
	resDisk       = "disk"       // ref: clone path; data: diskData
	resSeed       = "seed"       // ref: seed image path
	resKnownHosts = "knownhosts" // ref: the known_hosts alias
	resRunDir     = "rundir"     // ref: the runtime directory (sockets)
	resPort       = "port"       // ref: "tcp:127.0.0.1:PORT", user mode's SSH
	resProcess    = "process"    // ref: "pid:starttime"; data: vmm.Handle
	resTap        = "tap"        // ref: the tap (bgr-<id>), made by the helper for one boot
	resAddress    = "address"    // ref: the guest's IPv4 address on the bridge, for the VM's life
	resForward    = "forward"    // ref: "tcp:8080"; data: forwardData (forward.go)
	resJail       = "jail"       // ref: the VM id; banger-helper's jail and the Firecracker in it (jail.go)
)

// runtimeKinds are released when a VM stops; the rest live until delete.
var runtimeKinds = []string{resProcess, resPort, resTap, resJail, resRunDir}

// Intents are recorded in the same commit as the lifecycle step that is
// about to create them (store.VMChange), so a step costs one durable write.

type diskData struct {
	Strategy image.CloneStrategy `json:"strategy"`
}

// release frees a VM's resources of the given kinds (all kinds when none
// are given), newest first, and forgets them. It keeps going after errors
// and reports them together.
func (s *Service) release(ctx context.Context, vmID string, kinds ...string) error {
	rs, err := s.Store.ListResources(ctx, vmID)
	if err != nil {
		return err
	}
	var errs []error
	for i := len(rs) - 1; i >= 0; i-- {
		r := rs[i]
		if len(kinds) > 0 && !slices.Contains(kinds, r.Kind) {
			continue
		}
		if err := s.releaseOne(ctx, r); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// releaseOne undoes one resource, whether it was fully created or only
// intended, then forgets it. Releasing something already gone succeeds.
func (s *Service) releaseOne(ctx context.Context, r store.Resource) error {
	var err error
	switch r.Kind {
	case resVMDir:
		err = os.RemoveAll(r.Ref)
	case resDisk:
		var d diskData
		_ = json.Unmarshal(r.Data, &d)
		var c image.Cloner
		if c, err = image.NewCloner(d.Strategy, s.cloneOptions(r.VMID, false)); err == nil {
			err = c.Remove(ctx, r.Ref)
		}
	case resSeed:
		err = removeIfExists(r.Ref)
	case resKnownHosts:
		err = guest.Remove(s.Layout.KnownHosts(), []string{r.Ref})
	case resRunDir:
		killProcessesUsing(r.Ref)
		err = os.RemoveAll(r.Ref)
	case resPort:
		// Nothing on the host: the VMM that bound it is gone.
	case resProcess:
		err = killHandle(r.Ref)
	case resTap:
		err = s.deleteTap(ctx, r.Ref)
	case resJail:
		err = s.releaseJail(ctx, r.Ref)
	case resAddress:
		// Nothing on the host: the row is the allocation.
	case resForward:
		// Its relay, if any, stopped with the VMM (deactivateAll).
	default:
		err = fmt.Errorf("unknown resource kind %q", r.Kind)
	}
	if err != nil {
		return fmt.Errorf("release %s %s of vm %s: %w", r.Kind, r.Ref, r.VMID, err)
	}
	return s.Store.DeleteResource(ctx, r.VMID, r.Kind, r.Ref)
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func processRef(h vmm.Handle) string {
	return "pid:" + strconv.Itoa(h.PID) + ":" + strconv.FormatUint(h.StartTime, 10)
}

// killHandle kills the process a "pid:PID:START" ref names, if it still is
// that process.
func killHandle(ref string) error {
	parts := strings.Split(ref, ":")
	if len(parts) != 3 {
		return fmt.Errorf("malformed process ref %q", ref)
	}
	pid, err1 := strconv.Atoi(parts[1])
	st, err2 := strconv.ParseUint(parts[2], 10, 64)
	if err1 != nil || err2 != nil {
		return fmt.Errorf("malformed process ref %q", ref)
	}
	p, err := vmm.Find(pid, st)
	if errors.Is(err, vmm.ErrGone) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := p.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, vmm.ErrGone) {
		return err
	}
	p.Wait()
	return nil
}

// killProcessesUsing kills every process whose command line mentions dir:
// a VMM spawned just before the daemon died, whose pid was never recorded,
// still names its sockets under the VM's runtime directory.
func killProcessesUsing(dir string) {
	if dir == "" || !filepath.IsAbs(dir) {
		return
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(cmd), dir+"/") {
			continue
		}
		st, err := vmm.ProcStartTime(pid)
		if err != nil {
			continue
		}
		if p, err := vmm.Find(pid, st); err == nil {
			_ = p.Signal(syscall.SIGKILL)
			p.Wait()
		}
	}
}
