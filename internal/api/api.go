// Package api holds the daemon's wire types: the JSON bodies of /v1/...
// requests and responses, the event stream, and the error codes. It imports
// only the standard library so that every client (CLI, TUI, tests, other
// tools) can depend on it cheaply.
package api

import "time"

// Prefix is the versioned path prefix of every endpoint.
const Prefix = "/v1"

// MaxRequestBody caps every request body the daemon decodes.
const MaxRequestBody = 1 << 20

// ContentTypeNDJSON is the media type of streamed responses: one JSON value
// per line.
const ContentTypeNDJSON = "application/x-ndjson"

// EnvReadyFD names a file descriptor on which a daemon started by the CLI
// reports "ok" once it serves, or "error: …" when it cannot start. The CLI
// passes a pipe there instead of polling the socket.
const EnvReadyFD = "BANGER_READY_FD"

// VersionInfo answers GET /v1/version.
type VersionInfo struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	BuiltAt   string `json:"built_at"`
	GoVersion string `json:"go_version"`
	Platform  string `json:"platform"`
	// Daemon process facts, used by the CLI to spot a stale daemon.
	PID        int       `json:"pid"`
	StartedAt  time.Time `json:"started_at"`
	Mode       string    `json:"mode"` // "user" or "system"
	Executable Binary    `json:"executable"`
}

// Binary identifies the daemon's executable file as it was when the daemon
// started. A rebuilt binary at the same path has a different inode or mtime.
type Binary struct {
	Path    string `json:"path"`
	Inode   uint64 `json:"inode"`
	Size    int64  `json:"size"`
	ModTime int64  `json:"mtime_ns"`
}

// Health answers GET /v1/health.
type Health struct {
	Status string `json:"status"` // "ok"
	// InFlight counts requests being served, not counting this one or event
	// streams.
	InFlight int `json:"in_flight"`
}

// ShutdownRequest is the body of POST /v1/shutdown.
type ShutdownRequest struct {
	// Reason is logged by the daemon.
	Reason string `json:"reason"`
	// WhenIdle makes the daemon wait until no other request is in flight
	// before it stops. New requests are refused meanwhile.
	WhenIdle bool `json:"when_idle"`
}

// ShutdownResponse acknowledges a shutdown request.
type ShutdownResponse struct {
	PID int `json:"pid"`
}

// VMState is a VM's observed state.
type VMState string

const (
	VMCreating VMState = "creating"
	VMStarting VMState = "starting"
	VMRunning  VMState = "running"
	VMStopping VMState = "stopping"
	VMStopped  VMState = "stopped"
	VMError    VMState = "error"
	VMDeleting VMState = "deleting"
)

// VM is a virtual machine as the API shows it.
type VM struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Image       string    `json:"image"`
	VMM         string    `json:"vmm"`
	CPUs        int       `json:"cpus"`
	MemoryBytes int64     `json:"memory_bytes"`
	DiskBytes   int64     `json:"disk_bytes"`
	State       VMState   `json:"state"`
	StateReason string    `json:"state_reason,omitempty"`
	Network     VMNetwork `json:"network"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// VMNetwork is how a VM is reached.
type VMNetwork struct {
	Mode    string `json:"mode,omitempty"` // "user" or "bridge"
	IP      string `json:"ip,omitempty"`
	SSHHost string `json:"ssh_host,omitempty"`
	SSHPort int    `json:"ssh_port,omitempty"`
}

// Image is a bootable image: kernel, optional initrd and an ext4 rootfs.
type Image struct {
	ID        string      `json:"id"`
	Name      string      `json:"name"`
	Source    string      `json:"source"` // "build" or "import"
	CreatedAt time.Time   `json:"created_at"`
	SizeBytes int64       `json:"size_bytes"`
	Files     []ImageFile `json:"files"`
	Recipe    *Recipe     `json:"recipe,omitempty"`
}

// ImageFile is one file of an image with its checksum.
type ImageFile struct {
	Role   string `json:"role"` // "kernel", "vmlinux", "initrd", "rootfs"
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Recipe is how a built image was made.
type Recipe struct {
	Suite      string   `json:"suite"`
	Mirror     string   `json:"mirror"`
	Packages   []string `json:"packages"`
	Customize  []string `json:"customize,omitempty"` // script names with their sha256
	SizeBytes  int64    `json:"size_bytes,omitempty"`
	RecipeHash string   `json:"recipe_hash"`
}

// Event is one entry of the event stream (GET /v1/events) and of the
// progress stream of a long operation.
type Event struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Type     string    `json:"type"`         // "vm.state", "image.build", "op.progress", …
	Op       string    `json:"op,omitempty"` // operation id, for long operations
	Kind     string    `json:"kind,omitempty"`
	Name     string    `json:"name,omitempty"`
	Message  string    `json:"message,omitempty"`
	Progress *Progress `json:"progress,omitempty"`
	Error    *Error    `json:"error,omitempty"`
}

// Progress of one step of a long operation. Total is 0 when unknown.
type Progress struct {
	Step  string `json:"step"`
	Done  int64  `json:"done"`
	Total int64  `json:"total,omitempty"`
	Unit  string `json:"unit,omitempty"` // "bytes", "files", …
}

// StreamMessage is one line of a long operation's NDJSON response: progress
// events, then exactly one final line carrying either Result or Error.
type StreamMessage struct {
	Event  *Event `json:"event,omitempty"`
	Result any    `json:"result,omitempty"`
	Error  *Error `json:"error,omitempty"`
}

// ImageBuildRequest is the body of POST /v1/images/build. The response is
// an NDJSON stream of StreamMessage ending with the built Image.
type ImageBuildRequest struct {
	Name     string   `json:"name"`
	Suite    string   `json:"suite,omitempty"`    // default from config: bookworm
	Mirror   string   `json:"mirror,omitempty"`   // default from config
	Packages []string `json:"packages,omitempty"` // added to the default set
	// Customize scripts run in the new rootfs in order. The CLI sends their
	// content, so the daemon never reads the caller's files.
	Customize []Script `json:"customize,omitempty"`
	SizeBytes int64    `json:"size_bytes,omitempty"` // 0: content plus headroom
}

// Script is a customization script.
type Script struct {
	Name    string `json:"name"`
	Content string `json:"content"`
}

// ImageImportRequest is the body of POST /v1/images/import: host paths the
// daemon reads (absolute; the CLI resolves them).
type ImageImportRequest struct {
	Name   string `json:"name"`
	Rootfs string `json:"rootfs"`
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd,omitempty"`
}

// VMCreateRequest is the body of POST /v1/vms. The response is an NDJSON
// stream of StreamMessage ending with the VM. Zero values take the
// configured defaults.
type VMCreateRequest struct {
	Name        string `json:"name"`
	Image       string `json:"image,omitempty"`
	CPUs        int    `json:"cpus,omitempty"`
	MemoryBytes int64  `json:"memory_bytes,omitempty"`
	DiskBytes   int64  `json:"disk_bytes,omitempty"`
	VMM         string `json:"vmm,omitempty"` // auto, qemu, firecracker
	// NoStart creates the VM stopped.
	NoStart bool `json:"no_start,omitempty"`
	// NoWait returns once the VMM runs, without waiting for SSH.
	NoWait bool `json:"no_wait,omitempty"`
}

// VMStartRequest is the body of POST /v1/vms/{name}/start (and restart).
type VMStartRequest struct {
	NoWait bool `json:"no_wait,omitempty"`
}

// VMStopRequest is the body of POST /v1/vms/{name}/stop.
type VMStopRequest struct {
	// Force kills the VMM instead of asking the guest to power off.
	Force bool `json:"force,omitempty"`
	// TimeoutSeconds bounds the graceful stop before the VMM is killed;
	// 0 takes the configured stop_timeout.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// SSHInfo says how to reach a VM over SSH with its pinned host key. It
// answers GET /v1/vms/{name}/ssh.
type SSHInfo struct {
	Name         string `json:"name"`
	User         string `json:"user"`
	Host         string `json:"host"`
	Port         int    `json:"port"`
	IdentityFile string `json:"identity_file"`
	// KnownHostsFile holds the VM's pinned keys under HostKeyAlias.
	KnownHostsFile string `json:"known_hosts_file"`
	HostKeyAlias   string `json:"host_key_alias"`
}
