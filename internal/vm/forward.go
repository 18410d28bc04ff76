package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// Port forwards publish a guest port on 127.0.0.1. Each is a resource of
// its VM (kind "forward", ref "tcp:8080"), so the UNIQUE constraint on
// resources keeps two VMs from claiming one host port, and a forward lives
// as long as its VM: across stops, reboots and daemon restarts. While the
// VM runs, a forward is served by QEMU's user-mode network (hostfwd) in
// user mode, and by a relay in bangerd (proxy.go) in bridge mode.

// nicID is the VM's one network interface, as the VMM names it.
const nicID = "eth0"

type forwardData struct {
	GuestPort int `json:"guest_port"`
}

func forwardRef(proto string, hostPort int) string { return proto + ":" + strconv.Itoa(hostPort) }

// decodeForward reads a forward resource back.
func decodeForward(r store.Resource) (api.PortForwardRequest, error) {
	proto, port, ok := strings.Cut(r.Ref, ":")
	hostPort, err := strconv.Atoi(port)
	var d forwardData
	if !ok || err != nil || json.Unmarshal(r.Data, &d) != nil {
		return api.PortForwardRequest{}, fmt.Errorf("malformed forward %q of vm %s", r.Ref, r.VMID)
	}
	req := api.PortForwardRequest{Proto: proto, HostPort: hostPort, GuestPort: d.GuestPort}
	return req, req.Validate()
}

func toVMMForward(req api.PortForwardRequest) vmm.Forward {
	return vmm.Forward{Proto: req.Proto, HostIP: api.ForwardHost, HostPort: req.HostPort, GuestPort: req.GuestPort}
}

// hostForwarder is a VMM that adds and removes user-mode forwards while it
// runs (*qemu.Machine).
type hostForwarder interface {
	AddHostForward(ctx context.Context, nicID string, f vmm.Forward) error
	RemoveHostForward(ctx context.Context, nicID string, f vmm.Forward) error
}

// forwardsOf lists a VM's recorded forwards, ordered by protocol and port.
func (s *Service) forwardsOf(ctx context.Context, vmID string) ([]api.PortForwardRequest, error) {
	rs, err := s.Store.ListResources(ctx, vmID)
	if err != nil {
		return nil, err
	}
	var out []api.PortForwardRequest
	for _, r := range rs {
		if r.Kind != resForward {
			continue
		}
		f, err := decodeForward(r)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b api.PortForwardRequest) int {
		if c := strings.Compare(a.Proto, b.Proto); c != 0 {
			return c
		}
		return a.HostPort - b.HostPort
	})
	return out, nil
}

// Ports lists a VM's port forwards and whether each serves now.
func (s *Service) Ports(ctx context.Context, name string) ([]api.PortForward, error) {
	row, err := s.row(ctx, name)
	if err != nil {
		return nil, err
	}
	fs, err := s.forwardsOf(ctx, row.ID)
	if err != nil {
		return nil, err
	}
	out := make([]api.PortForward, 0, len(fs))
	for _, f := range fs {
		out = append(out, api.PortForward{Proto: f.Proto, HostIP: api.ForwardHost, HostPort: f.HostPort, GuestPort: f.GuestPort,
			Active: s.forwardActive(row.ID, forwardRef(f.Proto, f.HostPort))})
	}
	return out, nil
}

// AddPort records a forward and, if the VM runs, starts serving it. A host
// port that another VM forwards, or that another program holds now, is
// refused with nothing recorded.
func (s *Service) AddPort(ctx context.Context, name string, req api.PortForwardRequest) (api.PortForward, error) {
	if err := req.Validate(); err != nil {
		return api.PortForward{}, err
	}
	row, err := s.row(ctx, name)
	if err != nil {
		return api.PortForward{}, err
	}
	unlock := s.lock(row.ID)
	defer unlock()
	if row, err = s.Store.GetVMByID(ctx, row.ID); err != nil {
		return api.PortForward{}, err
	}
	switch api.VMState(row.State) {
	case api.VMCreating, api.VMDeleting, api.VMStarting, api.VMStopping:
		return api.PortForward{}, api.Errorf(api.CodeConflict, "vm %q is %s", name, row.State).WithHint("wait for it to finish, then retry")
	}
	ref := forwardRef(req.Proto, req.HostPort)
	spec := api.PortSpec(req.Proto, req.HostPort, req.GuestPort)
	if req.Proto == api.ProtoTCP {
		// A user-mode VM's SSH port is a resource of another kind.
		if held, err := s.Store.ResourceHeld(ctx, resPort, portRef(req.HostPort)); err != nil {
			return api.PortForward{}, err
		} else if held {
			return api.PortForward{}, portInUse(req, "it carries a VM's SSH")
		}
	}
	err = s.Store.AddResourceIntent(ctx, row.ID, resForward, ref, mustJSON(forwardData{GuestPort: req.GuestPort}))
	if errors.Is(err, store.ErrExists) {
		return api.PortForward{}, s.forwardTaken(ctx, row, req)
	}
	if err != nil {
		return api.PortForward{}, err
	}
	m := s.machine(row.ID)
	running := row.State == string(api.VMRunning) && m != nil
	if running {
		rt, derr := decodeRuntime(row.Runtime)
		if err = derr; err == nil {
			err = s.activateForward(ctx, row, rt, m, req)
		}
	} else {
		err = probePort(req)
	}
	if err != nil {
		if derr := s.Store.DeleteResource(ctx, row.ID, resForward, ref); derr != nil {
			s.Log.Error("forget refused port forward", "vm", name, "forward", spec, "err", derr)
		}
		return api.PortForward{}, err
	}
	if err := s.Store.MarkResourceCreated(ctx, row.ID, resForward, ref, nil); err != nil {
		return api.PortForward{}, err
	}
	s.Log.Info("port forward added", "vm", name, "forward", spec, "active", running)
	s.publish(name, "vm.port", "added "+spec)
	return api.PortForward{Proto: req.Proto, HostIP: api.ForwardHost, HostPort: req.HostPort, GuestPort: req.GuestPort, Active: running}, nil
}

// forwardTaken explains a host port already recorded as a forward.
func (s *Service) forwardTaken(ctx context.Context, row store.VM, req api.PortForwardRequest) error {
	ref := forwardRef(req.Proto, req.HostPort)
	rs, err := s.Store.ListResources(ctx, "")
	if err != nil {
		return err
	}
	for _, r := range rs {
		if r.Kind != resForward || r.Ref != ref {
			continue
		}
		if r.VMID == row.ID {
			return api.Errorf(api.CodeAlreadyExists, "vm %q already forwards 127.0.0.1:%d/%s", row.Name, req.HostPort, req.Proto).
				WithHint("banger vm port " + row.Name + " lists its forwards")
		}
		other := r.VMID
		if o, err := s.Store.GetVMByID(ctx, r.VMID); err == nil {
			other = o.Name
		}
		return api.Errorf(api.CodeConflict, "127.0.0.1:%d/%s is already forwarded to vm %q", req.HostPort, req.Proto, other).
			WithHint(fmt.Sprintf("pick another host port, or banger vm port %s --remove %d%s", other, req.HostPort, udpSuffix(req.Proto)))
	}
	return api.Errorf(api.CodeConflict, "127.0.0.1:%d/%s is already forwarded", req.HostPort, req.Proto)
}

func udpSuffix(proto string) string {
	if proto == api.ProtoUDP {
		return "/udp"
	}
	return ""
}

// RemovePort stops serving a forward and forgets it. With a guest port
// other than 0, the recorded forward must lead there.
func (s *Service) RemovePort(ctx context.Context, name string, req api.PortForwardRequest) error {
	if req.GuestPort == 0 {
		req.GuestPort = 1 // only the host side names a forward
		if err := req.Validate(); err != nil {
			return err
		}
		req.GuestPort = 0
	} else if err := req.Validate(); err != nil {
		return err
	}
	row, err := s.row(ctx, name)
	if err != nil {
		return err
	}
	unlock := s.lock(row.ID)
	defer unlock()
	fs, err := s.forwardsOf(ctx, row.ID)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(fs, func(f api.PortForwardRequest) bool { return f.Proto == req.Proto && f.HostPort == req.HostPort })
	if i < 0 {
		return api.Errorf(api.CodeNotFound, "vm %q has no forward of 127.0.0.1:%d/%s", name, req.HostPort, req.Proto).
			WithHint("banger vm port " + name + " lists its forwards")
	}
	f := fs[i]
	if req.GuestPort != 0 && req.GuestPort != f.GuestPort {
		return api.Errorf(api.CodeInvalidArgument, "vm %q forwards 127.0.0.1:%d/%s to guest port %d, not %d",
			name, f.HostPort, f.Proto, f.GuestPort, req.GuestPort)
	}
	s.deactivateForward(ctx, row.ID, f)
	if err := s.Store.DeleteResource(ctx, row.ID, resForward, forwardRef(f.Proto, f.HostPort)); err != nil {
		return err
	}
	spec := api.PortSpec(f.Proto, f.HostPort, f.GuestPort)
	s.Log.Info("port forward removed", "vm", name, "forward", spec)
	s.publish(name, "vm.port", "removed "+spec)
	return nil
}

// activateForward starts serving one forward of a running VM: a relay to
// the guest's address in bridge mode, a hostfwd rule in QEMU otherwise.
func (s *Service) activateForward(ctx context.Context, row store.VM, rt Runtime, m vmm.Machine, f api.PortForwardRequest) error {
	ref := forwardRef(f.Proto, f.HostPort)
	listen := net.JoinHostPort(api.ForwardHost, strconv.Itoa(f.HostPort))
	var closer io.Closer
	if row.NetMode == NetBridge {
		if rt.Network.IP == "" {
			return fmt.Errorf("forward %s of vm %s: the vm has no address", ref, row.Name)
		}
		target := net.JoinHostPort(rt.Network.IP, strconv.Itoa(f.GuestPort))
		p, err := startProxy(f.Proto, listen, target, s.Log.With("vm", row.Name, "forward", ref))
		if err != nil {
			return bindError(f, err)
		}
		closer = p
	} else {
		hf, ok := m.(hostForwarder)
		if !ok {
			return api.Errorf(api.CodeFailedPrecondition, "vm %q's %s cannot add port forwards while it runs", row.Name, rt.VMM).
				WithHint("stop the VM; the forward starts with its next boot")
		}
		// QEMU's own error does not say why a bind failed: try it first.
		if err := probePort(f); err != nil {
			return err
		}
		if err := hf.AddHostForward(ctx, nicID, toVMMForward(f)); err != nil {
			return fmt.Errorf("forward %s of vm %s: %w", ref, row.Name, err)
		}
	}
	s.fwdMu.Lock()
	defer s.fwdMu.Unlock()
	if s.fwds == nil {
		s.fwds = map[string]map[string]io.Closer{}
	}
	if s.fwds[row.ID] == nil {
		s.fwds[row.ID] = map[string]io.Closer{}
	}
	s.fwds[row.ID][ref] = closer
	return nil
}

// deactivateForward stops serving one forward, if it is served.
func (s *Service) deactivateForward(ctx context.Context, vmID string, f api.PortForwardRequest) {
	ref := forwardRef(f.Proto, f.HostPort)
	s.fwdMu.Lock()
	closer, ok := s.fwds[vmID][ref]
	delete(s.fwds[vmID], ref)
	s.fwdMu.Unlock()
	if !ok {
		return
	}
	if closer != nil {
		_ = closer.Close()
		return
	}
	if hf, ok := s.machine(vmID).(hostForwarder); ok {
		if err := hf.RemoveHostForward(ctx, nicID, toVMMForward(f)); err != nil && !errors.Is(err, vmm.ErrGone) {
			s.Log.Warn("remove host forward", "vm", vmID, "forward", ref, "err", err)
		}
	}
}

// deactivateAll stops the relays of a VM whose VMM is gone (or of every
// VM when the daemon stops) and forgets which forwards were served. QEMU's
// own forwards go with QEMU, or keep serving while the daemon restarts.
func (s *Service) deactivateAll(vmID string) {
	s.fwdMu.Lock()
	var closers []io.Closer
	for id, m := range s.fwds {
		if vmID != "" && id != vmID {
			continue
		}
		for _, c := range m {
			if c != nil {
				closers = append(closers, c)
			}
		}
		delete(s.fwds, id)
	}
	s.fwdMu.Unlock()
	for _, c := range closers {
		_ = c.Close()
	}
}

func (s *Service) forwardActive(vmID, ref string) bool {
	s.fwdMu.Lock()
	defer s.fwdMu.Unlock()
	_, ok := s.fwds[vmID][ref]
	return ok
}

// markForwardsActive records forwards QEMU serves from its command line.
func (s *Service) markForwardsActive(vmID string, fs []api.PortForwardRequest) {
	s.fwdMu.Lock()
	defer s.fwdMu.Unlock()
	if s.fwds == nil {
		s.fwds = map[string]map[string]io.Closer{}
	}
	m := map[string]io.Closer{}
	for _, f := range fs {
		m[forwardRef(f.Proto, f.HostPort)] = nil
	}
	s.fwds[vmID] = m
}

// startForwards serves the forwards of a VM that just started or was
// re-attached. In user mode a fresh QEMU already serves those on its
// command line (boot passes them); a re-attached one gets each rule
// removed and added again, since what it served is not recorded anywhere
// else. A port another program took is reported and left inactive: the VM
// runs regardless.
func (s *Service) startForwards(ctx context.Context, row store.VM, rt Runtime, m vmm.Machine, reattached bool, progress ProgressFunc) {
	fs, err := s.forwardsOf(ctx, row.ID)
	if err != nil {
		s.Log.Error("list port forwards", "vm", row.Name, "err", err)
		return
	}
	for _, f := range fs {
		if row.NetMode != NetBridge {
			if !reattached {
				continue
			}
			if hf, ok := m.(hostForwarder); ok {
				_ = hf.RemoveHostForward(ctx, nicID, toVMMForward(f))
			}
		}
		if err := s.activateForward(ctx, row, rt, m, f); err != nil {
			s.forwardFailed(row.Name, f, err, progress)
		}
	}
}

func (s *Service) forwardFailed(name string, f api.PortForwardRequest, err error, progress ProgressFunc) {
	spec := api.PortSpec(f.Proto, f.HostPort, f.GuestPort)
	s.Log.Warn("port forward not served", "vm", name, "forward", spec, "err", err)
	msg := fmt.Sprintf("warning: port forward %s is not served: %v", spec, err)
	s.publish(name, "vm.notice", msg)
	if progress != nil {
		progress(api.Event{Type: "vm.notice", Name: name, Message: msg})
	}
}

// userForwards returns the forwards a user-mode VM's QEMU should serve
// from its command line: those whose host port is free now.
func (s *Service) userForwards(ctx context.Context, row store.VM, progress ProgressFunc) []api.PortForwardRequest {
	fs, err := s.forwardsOf(ctx, row.ID)
	if err != nil {
		s.Log.Error("list port forwards", "vm", row.Name, "err", err)
		return nil
	}
	var ok []api.PortForwardRequest
	for _, f := range fs {
		if err := probePort(f); err != nil {
			s.forwardFailed(row.Name, f, err, progress)
			continue
		}
		ok = append(ok, f)
	}
	return ok
}

// probePort checks that the forward's host port can be bound now.
func probePort(f api.PortForwardRequest) error {
	addr := net.JoinHostPort(api.ForwardHost, strconv.Itoa(f.HostPort))
	var c io.Closer
	var err error
	if f.Proto == api.ProtoUDP {
		c, err = net.ListenPacket("udp4", addr)
	} else {
		c, err = net.Listen("tcp4", addr)
	}
	if err != nil {
		return bindError(f, err)
	}
	return c.Close()
}

// bindError says why a host port cannot be used, with a hint.
func bindError(f api.PortForwardRequest, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return portInUse(f, "another program holds it")
	case errors.Is(err, syscall.EACCES):
		return api.Errorf(api.CodeFailedPrecondition, "binding 127.0.0.1:%d/%s needs privileges bangerd does not have", f.HostPort, f.Proto).
			WithHint("pick a host port from 1024 up")
	}
	return fmt.Errorf("bind 127.0.0.1:%d/%s: %w", f.HostPort, f.Proto, err)
}

func portInUse(f api.PortForwardRequest, why string) error {
	return api.Errorf(api.CodeConflict, "127.0.0.1:%d/%s is in use: %s", f.HostPort, f.Proto, why).
		WithHint("pick another host port")
}
