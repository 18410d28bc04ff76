package vm

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/vmm"
)

// Runtime is the observed part of a VM, kept as JSON in vms.runtime. It
// holds what the daemon must know to find the VM again after a restart.
type Runtime struct {
	Network api.VMNetwork `json:"network"`
	// VMM and Accel are what the VM runs on (resolved from "auto").
	VMM   vmm.Kind  `json:"vmm,omitempty"`
	Accel vmm.Accel `json:"accel,omitempty"`
	// Handle identifies the running VMM process; nil when stopped.
	Handle *vmm.Handle `json:"handle,omitempty"`
	// Jailed says the running VMM is a Firecracker banger-helper launched
	// under the jailer: it runs as another uid, so it is re-attached,
	// killed and released through the helper (jail.go).
	Jailed bool `json:"jailed,omitempty"`
	Disk   Disk `json:"disk"`
	// Seed is a small ext4 disk holding the VM's identity, for clones the
	// daemon cannot write into (qcow2 overlays, dm-snapshots); the image's
	// banger-seed.service applies it at boot. Empty when the identity was
	// written into the clone itself.
	Seed      string `json:"seed,omitempty"`
	MachineID string `json:"machine_id"`
	// HostKeys are the public halves of the VM's pinned SSH host keys.
	HostKeys  []string   `json:"host_keys"`
	StartedAt *time.Time `json:"started_at,omitempty"`
	// Creating is set until Create returns successfully: a daemon that
	// finds it set on start-up rolls the VM back, whatever its state.
	Creating bool `json:"creating,omitempty"`
}

// Disk is a VM's root disk.
type Disk struct {
	Path     string              `json:"path"`
	Format   image.DiskFormat    `json:"format"`
	Strategy image.CloneStrategy `json:"strategy"`
}

// clearProcess forgets the VMM process and how to reach its guest, once it
// is gone.
func (rt *Runtime) clearProcess() {
	rt.Handle, rt.StartedAt, rt.Jailed = nil, nil, false
	rt.Network.SSHHost, rt.Network.SSHPort = "", 0
}

func decodeRuntime(b []byte) (Runtime, error) {
	var rt Runtime
	if len(b) == 0 {
		return rt, nil
	}
	if err := json.Unmarshal(b, &rt); err != nil {
		return rt, fmt.Errorf("decode runtime: %w", err)
	}
	return rt, nil
}

func encodeRuntime(rt Runtime) []byte {
	b, err := json.Marshal(rt)
	if err != nil {
		// Runtime holds only plain data; Marshal cannot fail on it.
		panic(err)
	}
	return b
}
