package firecracker

// Wire types of the Firecracker HTTP API, named after the swagger
// definitions they mirror (testdata/spec/firecracker-*.yaml). Optional
// fields carry omitempty so that a zero value is never sent: Firecracker
// rejects unknown fields, so a field absent from an older version must be
// left out, not sent empty. Fields the driver never sets (vhost-user
// sockets, CPU templates, deprecated vsock_id and mem_file_path) are left out
// of the structs altogether.

// InstanceInfo is the answer of GET / (definition InstanceInfo).
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

// InstanceInfo.State values.
const (
	StateNotStarted = "Not started"
	StateRunning    = "Running"
	StatePaused     = "Paused"
)

// versionInfo is the answer of GET /version (definition FirecrackerVersion).
type versionInfo struct {
	FirecrackerVersion string `json:"firecracker_version"`
}

// Logger is PUT /logger. LogPath must exist before the request.
type Logger struct {
	LogPath       string `json:"log_path,omitempty"`
	Level         string `json:"level,omitempty"` // Error, Warning, Info, Debug, Trace, Off
	ShowLevel     bool   `json:"show_level,omitempty"`
	ShowLogOrigin bool   `json:"show_log_origin,omitempty"`
	Module        string `json:"module,omitempty"`
}

// MachineConfig is PUT /machine-config (definition MachineConfiguration).
type MachineConfig struct {
	VCPUCount       int    `json:"vcpu_count"`
	MemSizeMiB      int    `json:"mem_size_mib"`
	SMT             bool   `json:"smt,omitempty"`
	TrackDirtyPages bool   `json:"track_dirty_pages,omitempty"`
	HugePages       string `json:"huge_pages,omitempty"` // None, 2M; Transparent needs Capabilities.HugePagesTransparent
}

// BootSource is PUT /boot-source. Firecracker opens both files at PUT time.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

// Drive is PUT /drives/{drive_id} for a virtio-block device; DriveID must
// equal the id in the path.
type Drive struct {
	DriveID      string       `json:"drive_id"`
	PathOnHost   string       `json:"path_on_host"`
	IsRootDevice bool         `json:"is_root_device"`
	IsReadOnly   bool         `json:"is_read_only"`
	PartUUID     string       `json:"partuuid,omitempty"`
	CacheType    string       `json:"cache_type,omitempty"` // Unsafe, Writeback
	IOEngine     string       `json:"io_engine,omitempty"`  // Sync, Async
	RateLimiter  *RateLimiter `json:"rate_limiter,omitempty"`
}

// NetworkInterface is PUT /network-interfaces/{iface_id}. Firecracker opens
// the tap named HostDevName at PUT time.
type NetworkInterface struct {
	IfaceID       string       `json:"iface_id"`
	HostDevName   string       `json:"host_dev_name"`
	GuestMAC      string       `json:"guest_mac,omitempty"`
	MTU           int          `json:"mtu,omitempty"` // Capabilities.NetMTU
	RxRateLimiter *RateLimiter `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter *RateLimiter `json:"tx_rate_limiter,omitempty"`
}

// Vsock is PUT /vsock. Firecracker binds UDSPath at PUT time, so it must
// not exist yet.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// EntropyDevice is PUT /entropy (a virtio-rng device).
type EntropyDevice struct {
	RateLimiter *RateLimiter `json:"rate_limiter,omitempty"`
}

// RateLimiter limits an I/O device with two token buckets.
type RateLimiter struct {
	Bandwidth *TokenBucket `json:"bandwidth,omitempty"`
	Ops       *TokenBucket `json:"ops,omitempty"`
}

// TokenBucket holds Size tokens refilled every RefillTime milliseconds.
type TokenBucket struct {
	Size         int64 `json:"size"`
	OneTimeBurst int64 `json:"one_time_burst,omitempty"`
	RefillTime   int64 `json:"refill_time"`
}

// instanceAction is PUT /actions (definition InstanceActionInfo).
type instanceAction struct {
	ActionType string `json:"action_type"`
}

// Action types.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionSendCtrlAltDel = "SendCtrlAltDel"
	ActionFlushMetrics   = "FlushMetrics"
)

// vmState is PATCH /vm (definition Vm).
type vmState struct {
	State string `json:"state"` // Paused, Resumed
}

// SnapshotCreate is PUT /snapshot/create. The VM must be paused.
type SnapshotCreate struct {
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
	SnapshotType string `json:"snapshot_type,omitempty"` // Full, Diff
}

// SnapshotLoad is PUT /snapshot/load, accepted only by a fresh process.
type SnapshotLoad struct {
	SnapshotPath     string            `json:"snapshot_path"`
	MemBackend       *MemoryBackend    `json:"mem_backend,omitempty"`
	TrackDirtyPages  bool              `json:"track_dirty_pages,omitempty"`
	ResumeVM         bool              `json:"resume_vm,omitempty"`
	NetworkOverrides []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *VsockOverride    `json:"vsock_override,omitempty"` // Capabilities.SnapshotVsockOverride
	ClockRealtime    bool              `json:"clock_realtime,omitempty"` // Capabilities.SnapshotClockRealtime
	HugePages        string            `json:"huge_pages,omitempty"`     // Capabilities.SnapshotHugePages
}

// MemoryBackend says where a snapshot's guest memory comes from.
type MemoryBackend struct {
	BackendType string `json:"backend_type"` // File, Uffd
	BackendPath string `json:"backend_path"`
}

// NetworkOverride moves a restored interface to another tap.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride moves a restored vsock device to another unix socket.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// faultBody is every error response (definition Error).
type faultBody struct {
	FaultMessage string `json:"fault_message"`
}
