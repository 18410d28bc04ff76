package vm

import (
	"bufio"
	"bytes"
	"os"
	"regexp"
	"runtime"
	"strconv"

	"github.com/bangerhq/banger/internal/api"
)

// Limits bound what a VM may ask for on this host.
type Limits struct {
	MaxCPUs        int
	MinMemoryBytes int64
	MaxMemoryBytes int64
	MaxDiskBytes   int64
}

// HostLimits reads the host's CPU count and memory size.
func HostLimits() Limits {
	l := Limits{
		MaxCPUs:        runtime.NumCPU(),
		MinMemoryBytes: 256 * api.MiB,
		MaxMemoryBytes: memTotal(),
		MaxDiskBytes:   16 * api.TiB,
	}
	if l.MaxMemoryBytes <= 0 {
		l.MaxMemoryBytes = 1 * api.TiB
	}
	return l
}

func memTotal() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) >= 2 && string(f[0]) == "MemTotal:" {
			kib, _ := strconv.ParseInt(string(f[1]), 10, 64)
			return kib * api.KiB
		}
	}
	return 0
}

var nameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidateName accepts a DNS label: lowercase letters, digits and '-', 1 to
// 63 characters, not starting or ending with '-'. The name becomes the
// guest's hostname and <name>.banger.
func ValidateName(name string) error {
	if nameRe.MatchString(name) {
		return nil
	}
	hint := "use lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-'"
	switch {
	case name == "":
		return api.Errorf(api.CodeInvalidArgument, "a VM name is required").WithHint(hint)
	case len(name) > 63:
		return api.Errorf(api.CodeInvalidArgument, "VM name is %d characters long, the limit is 63", len(name)).WithHint(hint)
	default:
		return api.Errorf(api.CodeInvalidArgument, "VM name %q is not a DNS label", name).WithHint(hint)
	}
}

// validateSpec checks a create request after defaults were applied.
func validateSpec(req api.VMCreateRequest, l Limits) error {
	if err := ValidateName(req.Name); err != nil {
		return err
	}
	if req.CPUs < 1 || req.CPUs > l.MaxCPUs {
		return api.Errorf(api.CodeInvalidArgument, "%d CPUs requested; this host allows 1 to %d", req.CPUs, l.MaxCPUs)
	}
	if req.MemoryBytes < l.MinMemoryBytes {
		return api.Errorf(api.CodeInvalidArgument, "memory %s is below the guest's minimum of %s",
			api.FormatSize(req.MemoryBytes), api.FormatSize(l.MinMemoryBytes))
	}
	if req.MemoryBytes > l.MaxMemoryBytes {
		return api.Errorf(api.CodeInvalidArgument, "memory %s is more than this host has (%s)",
			api.FormatSize(req.MemoryBytes), api.FormatSize(l.MaxMemoryBytes))
	}
	if req.MemoryBytes%api.MiB != 0 {
		return api.Errorf(api.CodeInvalidArgument, "memory %d bytes is not a whole number of MiB", req.MemoryBytes)
	}
	if req.DiskBytes%api.MiB != 0 || req.DiskBytes <= 0 || req.DiskBytes > l.MaxDiskBytes {
		return api.Errorf(api.CodeInvalidArgument, "disk %s must be a whole number of MiB up to %s",
			api.FormatSize(req.DiskBytes), api.FormatSize(l.MaxDiskBytes))
	}
	switch req.VMM {
	case "auto", "qemu", "firecracker":
	default:
		return api.Errorf(api.CodeInvalidArgument, "vmm %q is not one of auto, firecracker, qemu", req.VMM)
	}
	return nil
}
