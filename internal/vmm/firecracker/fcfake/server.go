package fcfake

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"golang.org/x/sys/unix"
)

// maxPayload is Firecracker's default --http-api-max-payload-size.
const maxPayload = 51200

// Options shape one fake process.
type Options struct {
	// ID is the instance id (--id); "" means "anonymous-instance".
	ID string
	// NoKVM makes InstanceStart fail as on a host without /dev/kvm.
	NoKVM bool
	// Stdout receives what Firecracker writes to its stdout: its log lines
	// until PUT /logger names a file, and the guest's serial console.
	Stdout io.Writer
	// Exit is called when the process would end: with 0 after the guest
	// resets (Ctrl-Alt-Del), with 1 after a failed snapshot load. It runs
	// on its own goroutine, after the response was written.
	Exit func(code int)
	// ResetDelay is how long the fake guest takes from Ctrl-Alt-Del to the
	// reset (default 20 ms).
	ResetDelay time.Duration
	// Root, when set, is where the paths in requests resolve, as if the
	// process were chrooted there by the jailer: it lets a test without
	// root serve a jailed configuration in process. The fake run as a
	// process under a jailer is really chrooted and leaves it empty.
	Root string
}

// Server is one fake Firecracker process's API. It processes one request
// at a time, as Firecracker's API thread does.
type Server struct {
	spec *Spec
	opts Options

	mu sync.Mutex // serialises requests and guards everything below
	// started is set by InstanceStart or a snapshot load; paused by
	// PATCH /vm.
	started, paused bool
	// bootPath is set by the boot-specific resources; it forbids a
	// snapshot load (rpc_interface.rs).
	bootPath bool
	exiting  bool

	logFile   *os.File
	showLevel bool
	metrics   string

	machine   map[string]any
	boot      map[string]any
	drives    map[string]map[string]any
	driveIDs  []string
	nets      map[string]map[string]any
	netIDs    []string
	vsock     map[string]any
	vsockLn   net.Listener
	taps      []*os.File // tap devices attached (jailed process only)
	entropy   map[string]any
	balloon   map[string]any
	mmds      any
	mmdsCfg   map[string]any
	serial    map[string]any
	cpuConfig bool
}

// NewServer returns the API of a fresh, unconfigured process.
func NewServer(spec *Spec, opts Options) *Server {
	if opts.ID == "" {
		opts.ID = "anonymous-instance"
	}
	if opts.Stdout == nil {
		opts.Stdout = io.Discard
	}
	if opts.Exit == nil {
		opts.Exit = func(int) {}
	}
	if opts.ResetDelay <= 0 {
		opts.ResetDelay = 20 * time.Millisecond
	}
	return &Server{
		spec:    spec,
		opts:    opts,
		machine: defaultMachine(),
		drives:  map[string]map[string]any{},
		nets:    map[string]map[string]any{},
	}
}

func defaultMachine() map[string]any {
	return map[string]any{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false, "huge_pages": "None"}
}

// Close releases what the process holds (the vsock listener, the log file).
// Like Firecracker, it leaves the sockets' files behind.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vsockLn != nil {
		s.vsockLn.(*net.UnixListener).SetUnlinkOnClose(false)
		_ = s.vsockLn.Close()
		s.vsockLn = nil
	}
	if s.logFile != nil {
		s.logFile.Close()
		s.logFile = nil
	}
	for _, f := range s.taps {
		f.Close()
	}
	s.taps = nil
}

// State returns GET /'s state.
func (s *Server) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stateLocked()
}

func (s *Server) stateLocked() string {
	switch {
	case !s.started:
		return "Not started"
	case s.paused:
		return "Paused"
	}
	return "Running"
}

// Logf writes a log line in Firecracker's format to the configured log, or
// to stdout before PUT /logger.
func (s *Server) Logf(level, format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logfLocked(level, format, args...)
}

func (s *Server) logfLocked(level, format string, args ...any) {
	tag := s.opts.ID + ":main"
	if s.showLevel {
		tag += ":" + level
	}
	line := fmt.Sprintf("%s [%s] %s\n", time.Now().Format("2006-01-02T15:04:05.000000000"), tag, fmt.Sprintf(format, args...))
	if s.logFile != nil {
		_, _ = s.logFile.WriteString(line)
		return
	}
	_, _ = io.WriteString(s.opts.Stdout, line)
}

type reply struct {
	status     int
	body       any // nil: no body
	deprecated bool
}

func fault(msg string) reply {
	return reply{status: http.StatusBadRequest, body: map[string]string{"fault_message": msg}}
}

// Firecracker's fixed texts (rpc_interface.rs, parsed_request.rs).
const (
	msgPostBoot   = "The requested operation is not supported after starting the microVM."
	msgPreBoot    = "The requested operation is not supported before starting the microVM."
	msgEmptyID    = "The ID cannot be empty."
	msgInvalidID  = "API Resource IDs can only contain alphanumeric characters and underscores."
	msgIDMismatch = "The id from the path does not match the id from the body!"
	msgSerdePref  = "An error occurred when deserializing the json body of a request: "
)

// preBootOnly and postBootOnly are the operations each controller refuses
// (rpc_interface.rs handle_preboot_request / handle_request). PUT on
// drives, network interfaces and pmem after boot is a hotplug at 1.16+ that
// needs --enable-pci, which the fake does not model: it refuses them as
// v1.14.2 does.
var (
	preBootOnly = set("putGuestBootSource", "putLogger", "putMetrics", "putSerialDevice",
		"putCpuConfiguration", "putMachineConfiguration", "patchMachineConfiguration", "putBalloon",
		"putGuestVsock", "putMmdsConfig", "putEntropyDevice", "putMemoryHotplug", "loadSnapshot",
		"putGuestDriveByID", "putGuestNetworkInterfaceByID", "putGuestPmemByID")
	postBootOnly = set("patchVm", "createSnapshot", "patchGuestDriveByID", "patchGuestNetworkInterfaceByID",
		"patchBalloon", "describeBalloonStats", "patchBalloonStatsInterval", "startBalloonHinting",
		"describeBalloonHinting", "stopBalloonHinting", "getMemoryHotplug", "patchMemoryHotplug",
		"patchGuestPmemByID")
	// bootPathOps configure boot-specific resources; after any of them a
	// snapshot load is refused.
	bootPathOps = set("putGuestBootSource", "putGuestDriveByID", "putGuestNetworkInterfaceByID",
		"putGuestPmemByID", "putBalloon", "putMmdsConfig", "putMachineConfiguration",
		"patchMachineConfiguration", "putGuestVsock", "putEntropyDevice", "putMemoryHotplug")
	// idRoutes take a resource id as second path segment.
	idRoutes = set("drives", "network-interfaces", "pmem")
)

func set(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

// ServeHTTP answers one API request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxPayload+1))
	var rep reply
	switch {
	case err != nil:
		rep = fault(fmt.Sprintf("Failed to read the request body: %v", err))
	case len(body) > maxPayload:
		// approximate: micro_http's text for an oversized body.
		rep = fault(fmt.Sprintf("Request payload with size %d is larger than the limit of %d allowed by server.", r.ContentLength, maxPayload))
	default:
		s.mu.Lock()
		rep = s.handleLocked(r.Method, r.URL.Path, body)
		s.mu.Unlock()
	}
	w.Header().Set("Server", "Firecracker API")
	if rep.deprecated {
		w.Header().Set("Deprecation", "true")
	}
	if rep.body == nil {
		w.WriteHeader(rep.status)
		return
	}
	b, _ := json.Marshal(rep.body)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(rep.status)
	_, _ = w.Write(b)
}

func (s *Server) handleLocked(method, path string, body []byte) reply {
	hasBody := len(body) > 0
	s.logfLocked("INFO", "The API server received a %s request on %q.", strings.ToUpper(method[:1])+strings.ToLower(method[1:]), path)
	segs := strings.Split(strings.Trim(path, "/"), "/")
	tok := segs[0]
	switch {
	case method == http.MethodGet && hasBody:
		return fault("GET request cannot have a body.")
	case method == http.MethodPut && !hasBody:
		return fault("Empty PUT request.")
	case method == http.MethodPatch && !hasBody && tok != "balloon":
		return fault("Empty PATCH request.")
	}
	op, params, ok := s.spec.Lookup(method, path)
	if !ok {
		if idRoutes[tok] && len(segs) == 1 && (method == http.MethodPut || method == http.MethodPatch) {
			return fault(msgEmptyID)
		}
		return fault(fmt.Sprintf("Invalid request method and/or path: %s %s.", method, tok))
	}
	for _, id := range params {
		if id == "" {
			return fault(msgEmptyID)
		}
		if !checkedID(id) {
			return fault(msgInvalidID)
		}
	}
	var obj *Object
	if op.Body != nil && hasBody {
		// PATCH /machine-config is parsed into MachineConfigUpdate, whose
		// members are all optional, whatever the spec's schema requires.
		v, err := op.Body.decode(body, op.ID == "patchMachineConfiguration")
		if err != nil {
			return fault(msgSerdePref + err.Error() + ".")
		}
		obj, _ = v.(*Object)
	}
	// The body's id must name the resource of the path.
	for param, id := range params {
		if bid, ok := obj.Get(param); ok && bid != id {
			return fault(msgIDMismatch)
		}
	}
	action := ""
	if op.ID == "createSyncAction" {
		action, _ = mustString(obj, "action_type")
	}
	switch {
	case s.started && (preBootOnly[op.ID] || action == "InstanceStart"):
		return fault(msgPostBoot)
	case !s.started && (postBootOnly[op.ID] || action == "SendCtrlAltDel" || action == "FlushMetrics"):
		return fault(msgPreBoot)
	}
	rep := s.dispatchLocked(op, params, obj, body)
	if rep.status/100 == 2 && bootPathOps[op.ID] {
		s.bootPath = true
	}
	if rep.status/100 == 2 && rep.body == nil {
		rep.status = op.SuccessStatus()
	}
	rep.deprecated = obj.has("vsock_id") || obj.has("mem_file_path") || obj.has("enable_diff_snapshots")
	if rep.status/100 == 2 {
		s.logfLocked("INFO", "The request was executed successfully. Status code: %d %s.", rep.status, http.StatusText(rep.status))
	} else if msg, ok := rep.body.(map[string]string); ok {
		s.logfLocked("ERROR", "Received Error. Status code: 400 Bad Request. Message: %s", msg["fault_message"])
	}
	return rep
}

// checkedID is parsed_request.rs checked_id: Rust's char::is_alphanumeric
// (Unicode letters and digits) or '_'.
func checkedID(id string) bool {
	for _, r := range id {
		if r != '_' && !unicode.IsLetter(r) && !unicode.IsDigit(r) && !unicode.IsNumber(r) {
			return false
		}
	}
	return true
}

var noContent = reply{status: http.StatusNoContent}

func (s *Server) dispatchLocked(op *Operation, params map[string]string, obj *Object, raw []byte) reply {
	switch op.ID {
	case "describeInstance":
		return reply{status: 200, body: map[string]any{"id": s.opts.ID, "state": s.stateLocked(), "vmm_version": s.spec.Version, "app_name": "Firecracker"}}
	case "getFirecrackerVersion":
		return reply{status: 200, body: map[string]any{"firecracker_version": s.spec.Version}}
	case "getMachineConfiguration":
		return reply{status: 200, body: s.machine}
	case "getExportVmConfig":
		return reply{status: 200, body: s.vmConfigLocked()}
	case "putLogger":
		return s.putLoggerLocked(obj)
	case "putMetrics":
		return s.putMetricsLocked(obj)
	case "putMachineConfiguration", "patchMachineConfiguration":
		return s.putMachineLocked(obj, op.ID == "putMachineConfiguration")
	case "putGuestBootSource":
		return s.putBootLocked(obj)
	case "putGuestDriveByID":
		return s.putDriveLocked(params["drive_id"], obj)
	case "patchGuestDriveByID":
		return s.patchDriveLocked(params["drive_id"], obj)
	case "putGuestNetworkInterfaceByID":
		return s.putNetLocked(params["iface_id"], obj)
	case "patchGuestNetworkInterfaceByID":
		if _, ok := s.nets[params["iface_id"]]; !ok {
			// approximate
			return fault("Network config error: Device not found: " + params["iface_id"])
		}
		return noContent
	case "putGuestVsock":
		return s.putVsockLocked(obj)
	case "putEntropyDevice":
		s.entropy = toMap(obj)
		return noContent
	case "putSerialDevice":
		s.serial = toMap(obj)
		return noContent
	case "putCpuConfiguration":
		s.cpuConfig = true
		return noContent
	case "putBalloon":
		s.balloon = toMap(obj)
		return noContent
	case "describeBalloonConfig":
		if s.balloon == nil {
			return fault("Balloon config error: No balloon device found.") // approximate
		}
		return reply{status: 200, body: s.balloon}
	case "putMmdsConfig":
		return s.putMmdsConfigLocked(obj)
	case "putMmds":
		s.mmds = mmdsValue(raw)
		return noContent
	case "patchMmds":
		if s.mmds == nil {
			return fault("MMDS error: The MMDS data store is not initialized.") // approximate
		}
		s.mmds = mergePatch(s.mmds, mmdsValue(raw))
		return noContent
	case "getMmds":
		if s.mmds == nil {
			return reply{status: 200, body: map[string]any{}}
		}
		return reply{status: 200, body: s.mmds}
	case "createSyncAction":
		a, _ := mustString(obj, "action_type")
		return s.actionLocked(a)
	case "patchVm":
		st, _ := mustString(obj, "state")
		s.paused = st == "Paused"
		return noContent
	case "createSnapshot":
		return s.createSnapshotLocked(obj)
	case "loadSnapshot":
		return s.loadSnapshotLocked(obj)
	}
	if op.Method == http.MethodGet {
		// Not modelled: say so instead of inventing an answer.
		return fault(fmt.Sprintf("fcfake does not model GET %s", op.Path))
	}
	return noContent
}

func (s *Server) putLoggerLocked(obj *Object) reply {
	path, _ := mustString(obj, "log_path")
	if path != "" {
		// Firecracker opens the log without O_CREAT.
		f, err := os.OpenFile(s.hostPath(path), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return fault("Logger error: Failed to open target file: " + rustIOError(err)) // approximate
		}
		if s.logFile != nil {
			s.logFile.Close()
		}
		s.logFile = f
	}
	if v, ok := obj.Get("show_level"); ok {
		s.showLevel = v == true
	}
	return noContent
}

func (s *Server) putMetricsLocked(obj *Object) reply {
	if s.metrics != "" {
		return fault("Metrics error: Reinitialization of metrics not allowed.") // approximate
	}
	path, _ := mustString(obj, "metrics_path")
	f, err := os.OpenFile(s.hostPath(path), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fault("Metrics error: Failed to open target file: " + rustIOError(err)) // approximate
	}
	f.Close()
	s.metrics = path
	return noContent
}

func (s *Server) putMachineLocked(obj *Object, put bool) reply {
	next := map[string]any{}
	if put {
		next = defaultMachine()
	} else {
		for k, v := range s.machine {
			next[k] = v
		}
		if len(obj.Members) == 0 {
			return fault("Empty PATCH request.")
		}
	}
	for _, m := range obj.Members {
		if m.Value != nil {
			next[m.Key] = plain(m.Value)
		}
	}
	vcpus := asInt(next["vcpu_count"])
	smt := next["smt"] == true
	if vcpus < 1 || vcpus > 32 || (smt && vcpus > 1 && vcpus%2 == 1) {
		return fault("Machine config error: The vCPU number is invalid: it must be 1 to 32, and 1 or even when SMT is enabled.") // approximate
	}
	mem := asInt(next["mem_size_mib"])
	if mem < 1 {
		return fault("Machine config error: The memory size (MiB) is invalid.")
	}
	if next["huge_pages"] == "2M" && mem%2 != 0 {
		return fault("Machine config error: The memory size (MiB) must be a multiple of the huge page size.") // approximate
	}
	s.machine = next
	return noContent
}

func (s *Server) putBootLocked(obj *Object) reply {
	kernel, _ := mustString(obj, "kernel_image_path")
	if err := openRead(s.hostPath(kernel)); err != nil {
		return fault("Boot source error: The kernel file cannot be opened: " + rustIOError(err))
	}
	if initrd, ok := mustString(obj, "initrd_path"); ok {
		if err := openRead(s.hostPath(initrd)); err != nil {
			return fault("Boot source error: The initrd file cannot be opened: " + rustIOError(err))
		}
	}
	s.boot = toMap(obj)
	return noContent
}

func (s *Server) putDriveLocked(id string, obj *Object) reply {
	if _, sock := mustString(obj, "socket"); !sock {
		path, ok := mustString(obj, "path_on_host")
		if !ok {
			return fault("Drive config error: Unable to create the virtio block device: no path_on_host given.") // approximate
		}
		flag := os.O_RDWR
		if ro, _ := obj.Get("is_read_only"); ro == true {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(s.hostPath(path), flag, 0)
		if err != nil {
			return fault("Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: " + rustIOError(err) + " " + path) // approximate
		}
		f.Close()
	}
	if root, _ := obj.Get("is_root_device"); root == true {
		for _, other := range s.driveIDs {
			if other != id && s.drives[other]["is_root_device"] == true {
				return fault("Drive config error: A root block device already exists!")
			}
		}
	}
	if _, ok := s.drives[id]; !ok {
		s.driveIDs = append(s.driveIDs, id)
	}
	s.drives[id] = toMap(obj)
	return noContent
}

func (s *Server) patchDriveLocked(id string, obj *Object) reply {
	d, ok := s.drives[id]
	if !ok {
		return fault("Drive config error: Device not found: " + id) // approximate
	}
	if path, ok := mustString(obj, "path_on_host"); ok {
		if err := openRead(s.hostPath(path)); err != nil {
			return fault("Drive config error: Unable to patch the block device: " + rustIOError(err)) // approximate
		}
		d["path_on_host"] = path
	}
	return noContent
}

func (s *Server) putNetLocked(id string, obj *Object) reply {
	tap, _ := mustString(obj, "host_dev_name")
	mac, hasMAC := mustString(obj, "guest_mac")
	if hasMAC {
		if hw, err := net.ParseMAC(mac); err != nil || len(hw) != 6 {
			return fault(msgSerdePref + "invalid MAC address: " + mac + ".") // approximate
		}
	}
	for _, other := range s.netIDs {
		if other == id {
			continue
		}
		if s.nets[other]["host_dev_name"] == tap {
			return fault(fmt.Sprintf("Network config error: The host device name %s is already in use.", tap)) // approximate
		}
		if hasMAC && s.nets[other]["guest_mac"] == mac {
			return fault(fmt.Sprintf("Network config error: The guest MAC address %s is already in use.", mac)) // approximate
		}
	}
	if err := s.openTapLocked(tap); err != nil {
		return fault(fmt.Sprintf("Network config error: Could not create the network device: Open tap device failed: %s. Invalid TUN/TAP Backend provided by %s. Check our documentation on setting up the network devices.", err, tap)) // approximate
	}
	if _, ok := s.nets[id]; !ok {
		s.netIDs = append(s.netIDs, id)
	}
	s.nets[id] = toMap(obj)
	return noContent
}

// openTapLocked stands for TUNSETIFF on /dev/net/tun: the name must fit
// IFNAMSIZ, and an existing interface must be a tun/tap device. A missing
// one is created by the kernel when the process may (CAP_NET_ADMIN, here:
// root). A process without /sys is a jailed one (the jailer mounts none);
// it does what Firecracker does, so the kernel decides whether its uid may
// attach to the tap.
func (s *Server) openTapLocked(name string) error {
	if len(name) == 0 || len(name) > 15 {
		return errors.New("Error while creating ifreq structure: Invalid argument (os error 22)")
	}
	if _, err := os.Stat("/sys/class/net"); err != nil {
		f, err := attachTap(name)
		if err != nil {
			return err
		}
		s.taps = append(s.taps, f) // held while the process runs, as Firecracker holds it
		return nil
	}
	if _, err := os.Stat(filepath.Join("/sys/class/net", name)); err == nil {
		if _, err := os.Stat(filepath.Join("/sys/class/net", name, "tun_flags")); err != nil {
			return errors.New("Error while creating ifreq structure: Invalid argument (os error 22)")
		}
		return nil
	}
	if os.Geteuid() != 0 {
		return errors.New("Error while creating ifreq structure: Operation not permitted (os error 1)")
	}
	return nil
}

// attachTap opens /dev/net/tun and attaches it to the tap with
// Firecracker's flags.
func attachTap(name string) (*os.File, error) {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, errors.New("Error while opening /dev/net/tun: " + rustIOError(err))
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		err = unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr)
	}
	if err != nil {
		f.Close()
		return nil, errors.New("Error while creating ifreq structure: " + rustIOError(err))
	}
	return f, nil
}

func (s *Server) putVsockLocked(obj *Object) reply {
	path, _ := mustString(obj, "uds_path")
	ln, err := bindVsock(s.hostPath(path))
	if err != nil {
		return fault("Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: " + rustIOError(err)) // approximate
	}
	if s.vsockLn != nil {
		_ = s.vsockLn.Close() // the previous device goes; its socket file is removed
	}
	s.vsockLn = ln
	s.vsock = toMap(obj)
	return noContent
}

func bindVsock(path string) (net.Listener, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// Firecracker leaves the socket file behind when it exits.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	go func() {
		// Host-initiated connections: "CONNECT <port>\n". No guest listens
		// in the fake, so each is closed, as Firecracker does when nothing
		// listens on the port.
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	return ln, nil
}

func (s *Server) putMmdsConfigLocked(obj *Object) reply {
	ifs, _ := obj.Get("network_interfaces")
	list, _ := ifs.([]any)
	for _, it := range list {
		name, _ := it.(string)
		if _, ok := s.nets[name]; !ok {
			return fault("MMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.") // approximate
		}
	}
	s.mmdsCfg = toMap(obj)
	return noContent
}

func (s *Server) actionLocked(action string) reply {
	switch action {
	case "InstanceStart":
		if s.boot == nil {
			return fault("Start microvm error: Cannot start microvm without kernel configuration.")
		}
		if s.opts.NoKVM {
			return fault("Start microvm error: Kvm error: Error creating KVM object: No such file or directory (os error 2) Make sure the user launching the firecracker process is configured on the /dev/kvm file's ACL.") // approximate
		}
		s.started, s.paused = true, false
		s.bootConsoleLocked()
		return noContent
	case "SendCtrlAltDel":
		if !s.exiting {
			s.exiting = true
			go s.resetAfter(s.opts.ResetDelay)
		}
		return noContent
	case "FlushMetrics":
		return noContent
	}
	return fault(msgSerdePref + "unknown variant `" + action + "`.")
}

// bootConsoleLocked prints what the guest's serial console would show
// first, when boot_args enable it: Firecracker appends its own arguments
// to the command line (reference/guest-boot.md saw exactly these).
func (s *Server) bootConsoleLocked() {
	args, _ := s.boot["boot_args"].(string)
	if !strings.Contains(args, "console=ttyS0") {
		return
	}
	args += " pci=off"
	for _, id := range s.driveIDs {
		if d := s.drives[id]; d["is_root_device"] == true {
			mode := "rw"
			if d["is_read_only"] == true {
				mode = "ro"
			}
			args += " root=/dev/vda " + mode
		}
	}
	args += " virtio_mmio.device=4K@0xc0001000:6"
	_, _ = fmt.Fprintf(s.opts.Stdout, "[    0.000000] Linux version 6.1.0-fcfake (fcfake emulating firecracker %s)\n", s.spec.Version)
	_, _ = fmt.Fprintf(s.opts.Stdout, "[    0.000000] Command line: %s\n", args)
}

// resetAfter is the guest reacting to Ctrl-Alt-Del: it shuts down, resets
// the CPU, and Firecracker exits with status 0.
func (s *Server) resetAfter(d time.Duration) {
	time.Sleep(d)
	_, _ = fmt.Fprintln(s.opts.Stdout, "[    1.000000] reboot: Restarting system")
	s.Logf("INFO", "Firecracker exiting successfully. exit_code=0")
	s.opts.Exit(0)
}

// snapshotFile is what the fake writes as a snapshot's state file.
type snapshotFile struct {
	Fcfake  string                    `json:"fcfake_snapshot"` // the version that wrote it
	Machine map[string]any            `json:"machine"`
	Drives  map[string]map[string]any `json:"drives"`
	Nets    map[string]map[string]any `json:"nets"`
	Vsock   map[string]any            `json:"vsock,omitempty"`
}

func (s *Server) createSnapshotLocked(obj *Object) reply {
	if !s.paused {
		return fault("Create snapshot error: Cannot save the microVM state: the microVM must be paused.") // approximate
	}
	if t, _ := mustString(obj, "snapshot_type"); t == "Diff" && s.machine["track_dirty_pages"] != true {
		return fault("Create snapshot error: Diff snapshots require dirty page tracking (track_dirty_pages).") // approximate
	}
	state, _ := mustString(obj, "snapshot_path")
	mem, _ := mustString(obj, "mem_file_path")
	b, _ := json.Marshal(snapshotFile{Fcfake: s.spec.Version, Machine: s.machine, Drives: s.drives, Nets: s.nets, Vsock: s.vsock})
	if err := os.WriteFile(s.hostPath(state), b, 0o600); err != nil {
		return fault("Create snapshot error: Cannot write the microVM state: " + rustIOError(err)) // approximate
	}
	f, err := os.OpenFile(s.hostPath(mem), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		err = f.Truncate(int64(asInt(s.machine["mem_size_mib"])) << 20) // sparse
		f.Close()
	}
	if err != nil {
		return fault("Create snapshot error: Cannot write the guest memory: " + rustIOError(err)) // approximate
	}
	return noContent
}

func (s *Server) loadSnapshotLocked(obj *Object) reply {
	if s.bootPath {
		return fault("Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.")
	}
	_, hasFile := mustString(obj, "mem_file_path")
	backend, hasBackend := obj.Get("mem_backend")
	if hasFile == hasBackend {
		return fault(msgSerdePref + "either `mem_backend` or `mem_file_path` must be present, not both.") // approximate
	}
	memPath, _ := mustString(obj, "mem_file_path")
	if hasBackend {
		bo, _ := backend.(*Object)
		if t, _ := mustString(bo, "backend_type"); t != "File" {
			return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: the Uffd backend is not modelled by fcfake")
		}
		memPath, _ = mustString(bo, "backend_path")
	}
	statePath, _ := mustString(obj, "snapshot_path")
	raw, err := os.ReadFile(s.hostPath(statePath))
	if err != nil {
		return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: Cannot open snapshot file: " + rustIOError(err)) // approximate
	}
	var snap snapshotFile
	if err := json.Unmarshal(raw, &snap); err != nil || snap.Fcfake == "" {
		return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: Cannot deserialize the microVM state: CRC64 validation failed.") // approximate
	}
	if err := openRead(s.hostPath(memPath)); err != nil {
		return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: Cannot open the memory file: " + rustIOError(err)) // approximate
	}
	if ov, ok := obj.Get("network_overrides"); ok {
		for _, it := range ov.([]any) {
			o, _ := it.(*Object)
			id, _ := mustString(o, "iface_id")
			tap, _ := mustString(o, "host_dev_name")
			n, ok := snap.Nets[id]
			if !ok {
				return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: invalid network override: no interface " + id) // approximate
			}
			n["host_dev_name"] = tap
		}
	}
	if snap.Vsock != nil {
		path, _ := snap.Vsock["uds_path"].(string)
		if vo, ok := obj.Get("vsock_override"); ok {
			path, _ = mustString(vo.(*Object), "uds_path")
			snap.Vsock["uds_path"] = path
		}
		ln, err := bindVsock(s.hostPath(path))
		if err != nil {
			return s.fatalLocked("Load snapshot error: Failed to restore from snapshot: Cannot restore the vsock device: " + rustIOError(err)) // approximate
		}
		s.vsockLn = ln
	}
	s.machine, s.drives, s.nets, s.vsock = snap.Machine, snap.Drives, snap.Nets, snap.Vsock
	s.driveIDs, s.netIDs = sortedKeys(snap.Drives), sortedKeys(snap.Nets)
	s.started = true
	resume, _ := obj.Get("resume_vm")
	s.paused = resume != true
	return noContent
}

// fatalLocked answers a request whose failure leaves the process unusable
// (a failed snapshot load): Firecracker reports the error, then exits.
func (s *Server) fatalLocked(msg string) reply {
	if !s.exiting {
		s.exiting = true
		go func() {
			time.Sleep(10 * time.Millisecond) // after the response is written
			s.Logf("ERROR", "Firecracker exiting with error. exit_code=1")
			s.opts.Exit(1)
		}()
	}
	return fault(msg)
}

func (s *Server) vmConfigLocked() map[string]any {
	cfg := map[string]any{"machine-config": s.machine}
	if s.boot != nil {
		cfg["boot-source"] = s.boot
	}
	drives := []any{}
	for _, id := range s.driveIDs {
		drives = append(drives, s.drives[id])
	}
	cfg["drives"] = drives
	nets := []any{}
	for _, id := range s.netIDs {
		nets = append(nets, s.nets[id])
	}
	cfg["network-interfaces"] = nets
	if s.vsock != nil {
		cfg["vsock"] = s.vsock
	}
	if s.entropy != nil {
		cfg["entropy"] = s.entropy
	}
	if s.balloon != nil {
		cfg["balloon"] = s.balloon
	}
	if s.mmdsCfg != nil {
		cfg["mmds-config"] = s.mmdsCfg
	}
	return cfg
}

// rustIOError formats an error as Rust's io::Error does:
// "No such file or directory (os error 2)".
func rustIOError(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		msg := errno.Error()
		return strings.ToUpper(msg[:1]) + msg[1:] + fmt.Sprintf(" (os error %d)", int(errno))
	}
	return err.Error()
}

// hostPath is where a path from a request lies: itself, or under
// Options.Root resolved as a chroot would (".." stops at the root).
func (s *Server) hostPath(p string) string {
	if s.opts.Root == "" {
		return p
	}
	return filepath.Join(s.opts.Root, filepath.Clean("/"+p))
}

func openRead(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.IsDir() {
		return &fs.PathError{Op: "open", Path: path, Err: syscall.EISDIR}
	}
	return nil
}

func (o *Object) has(key string) bool {
	_, ok := o.Get(key)
	return ok
}

func mustString(o *Object, key string) (string, bool) {
	v, ok := o.Get(key)
	if !ok {
		return "", false
	}
	str, ok := v.(string)
	return str, ok
}

// plain turns decoded values into what encoding/json writes back: numbers
// as int64 where they fit, objects as maps.
func plain(v any) any {
	switch x := v.(type) {
	case json.Number:
		if n, err := x.Int64(); err == nil {
			return n
		}
		f, _ := x.Float64()
		return f
	case *Object:
		return toMap(x)
	case []any:
		out := make([]any, len(x))
		for i, it := range x {
			out[i] = plain(it)
		}
		return out
	}
	return v
}

func toMap(o *Object) map[string]any {
	m := map[string]any{}
	if o == nil {
		return m
	}
	for _, mem := range o.Members {
		if mem.Value != nil {
			m[mem.Key] = plain(mem.Value)
		}
	}
	return m
}

// mmdsValue decodes MMDS data, which may be any JSON value; nulls stay, as
// a merge patch needs them.
func mmdsValue(raw []byte) any {
	var v any
	_ = json.Unmarshal(raw, &v)
	return v
}

// mergePatch applies an RFC 7396 merge patch, as PATCH /mmds does.
func mergePatch(target, patch any) any {
	pm, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	tm, ok := target.(map[string]any)
	if !ok {
		tm = map[string]any{}
	}
	for k, v := range pm {
		if v == nil {
			delete(tm, k)
			continue
		}
		tm[k] = mergePatch(tm[k], v)
	}
	return tm
}

func asInt(v any) int {
	switch x := v.(type) {
	case int:
		return x
	case int64:
		return int(x)
	case float64:
		return int(x)
	}
	return 0
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
