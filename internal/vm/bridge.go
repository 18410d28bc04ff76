package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/revert"
)

// Network modes of a VM (store.VM.NetMode, api.VMNetwork.Mode), fixed at
// create: the guest's network file is written for one of them.
const (
	// NetUser is QEMU's user-mode networking: rootless, SSH and port
	// forwards on 127.0.0.1.
	NetUser = "user"
	// NetBridge is a tap on banger's bridge, made by banger-helper, with an
	// address of the bridge's subnet, NAT to the outside and a name under
	// .banger.
	NetBridge = "bridge"
)

// Helper is what the VM service asks of banger-helper; *helperapi.Client
// implements it.
type Helper interface {
	EnsureBridge(ctx context.Context, op helperapi.EnsureBridge) (helperapi.EnsureBridgeResult, error)
	EnsureNAT(ctx context.Context, op helperapi.EnsureNAT) error
	EnsureDNSRedirect(ctx context.Context, op helperapi.EnsureDNSRedirect) (helperapi.EnsureDNSRedirectResult, error)
	CreateTap(ctx context.Context, op helperapi.CreateTap) error
	DeleteTap(ctx context.Context, op helperapi.DeleteTap) error
	DetachLoop(ctx context.Context, op helperapi.DetachLoop) error
	RemoveSnapshot(ctx context.Context, op helperapi.RemoveSnapshot) error
	LaunchJailed(ctx context.Context, op helperapi.LaunchJailed) (helperapi.LaunchJailedResult, error)
	KillJailed(ctx context.Context, op helperapi.KillJailed) error
	ListOwned(ctx context.Context) (helperapi.ListOwnedResult, error)
}

// BridgeConfig is bridge networking as configured. The service uses it
// whenever the helper answers and falls back to user-mode networking for
// new VMs when it does not.
type BridgeConfig struct {
	Helper Helper
	Bridge string // "banger0"
	Subnet network.Subnet
	// DNSPort is where the daemon's DNS server listens on the gateway; the
	// helper redirects the gateway's port 53 to it.
	DNSPort uint16
	// OwnerUID owns the taps: the uid the helper serves (the daemon's own
	// user, unless the daemon runs as root).
	OwnerUID uint32
	// SharedStateDir says the helper's state dir is the daemon's (a system
	// install), so the loop devices, snapshots and jails it lists belong
	// to this daemon's VMs and orphans among them may be removed. A
	// user-mode daemon using a system helper leaves them alone.
	SharedStateDir bool
	// DNSUpstreams overrides the resolvers names outside .banger are
	// forwarded to (tests); empty means the host's resolv.conf.
	DNSUpstreams []string
}

// bridgeNet is bridge networking in use: the bridge, NAT and the DNS
// redirect exist, and the DNS server runs.
type bridgeNet struct {
	cfg      BridgeConfig
	dns      *network.DNSServer
	splitDNS bool // the host resolves .banger through systemd-resolved
}

// probeTimeout bounds the check whether the helper answers. The helper
// answers ListOwned in milliseconds; a missing socket fails at once.
const probeTimeout = 3 * time.Second

// reprobeAfter spaces out new attempts to reach a helper that did not
// answer, so a missing helper costs creates nothing but a rare failed
// connect.
const reprobeAfter = 5 * time.Second

// ErrNoHelper means bridge networking is unavailable: no helper is
// configured, or it did not answer.
var ErrNoHelper = errors.New("banger-helper is not answering")

// EnableBridge turns bridge networking on when the helper answers: it
// makes (or converges) the bridge, the NAT table and the DNS redirect, and
// starts the DNS server for <vm>.banger on the gateway. It returns an error
// wrapping ErrNoHelper when the helper does not answer; then VMs are
// created with user-mode networking. Calling it again once enabled does
// nothing.
func (s *Service) EnableBridge(ctx context.Context) error {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	return s.enableBridgeLocked(ctx)
}

func (s *Service) enableBridgeLocked(ctx context.Context) error {
	if s.net != nil {
		return nil
	}
	cfg := s.Bridge
	if cfg == nil || cfg.Helper == nil {
		return fmt.Errorf("%w: bridge networking is not configured", ErrNoHelper)
	}
	s.lastProbe = time.Now()
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	_, err := cfg.Helper.ListOwned(pctx)
	cancel()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNoHelper, err)
	}
	r := revert.New()
	defer r.Fail()
	if _, err := cfg.Helper.EnsureBridge(ctx, cfg.Subnet.EnsureBridge(cfg.Bridge)); err != nil {
		return fmt.Errorf("ensure bridge %s: %w", cfg.Bridge, err)
	}
	if err := cfg.Helper.EnsureNAT(ctx, cfg.Subnet.EnsureNAT(cfg.Bridge)); err != nil {
		return fmt.Errorf("ensure nat for %s: %w", cfg.Subnet.Prefix(), err)
	}
	dnsAddr := net.JoinHostPort(cfg.Subnet.Gateway().String(), strconv.Itoa(int(cfg.DNSPort)))
	// The server lives as long as the service, not as this request.
	dns, err := network.StartDNS(context.WithoutCancel(ctx), network.DNSConfig{
		Addr:      dnsAddr,
		Lookup:    s.lookupAddress,
		Upstreams: cfg.DNSUpstreams,
		Logger:    s.Log,
	})
	if err != nil {
		return fmt.Errorf("start the vm name server: %w", err)
	}
	r.Add(func() { _ = dns.Close() })
	res, err := cfg.Helper.EnsureDNSRedirect(ctx, cfg.Subnet.EnsureDNSRedirect(cfg.Bridge, cfg.DNSPort))
	if err != nil {
		return fmt.Errorf("redirect dns on %s to %s: %w", cfg.Bridge, dnsAddr, err)
	}
	r.Success()
	s.net = &bridgeNet{cfg: *cfg, dns: dns, splitDNS: res.SplitDNS}
	s.Log.Info("bridge networking", "bridge", cfg.Bridge, "subnet", cfg.Subnet.CIDR(), "dns", dnsAddr, "host_resolves_banger", res.SplitDNS)
	return nil
}

// bridge returns bridge networking if it is in use, trying the helper
// again (at most every reprobeAfter) when it is configured but did not
// answer before.
func (s *Service) bridge(ctx context.Context) (*bridgeNet, error) {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	if s.net != nil {
		return s.net, nil
	}
	if s.Bridge == nil {
		return nil, fmt.Errorf("%w: bridge networking is not configured", ErrNoHelper)
	}
	if !s.lastProbe.IsZero() && time.Since(s.lastProbe) < reprobeAfter {
		return nil, fmt.Errorf("%w (checked %s ago)", ErrNoHelper, time.Since(s.lastProbe).Round(time.Second))
	}
	if err := s.enableBridgeLocked(ctx); err != nil {
		s.Log.Info("bridge networking unavailable", "err", err)
		return nil, err
	}
	return s.net, nil
}

// liveBridge is the bridge in use, without trying the helper again.
func (s *Service) liveBridge() *bridgeNet {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	return s.net
}

// NetworkMode is the mode new VMs get now: NetBridge while the helper
// answers, NetUser otherwise.
func (s *Service) NetworkMode() string {
	if s.liveBridge() != nil {
		return NetBridge
	}
	return NetUser
}

// closeBridge stops the DNS server; the bridge, NAT and the VMs' taps stay
// for the running VMs and the next daemon.
func (s *Service) closeBridge() {
	s.netMu.Lock()
	n := s.net
	s.net = nil
	s.netMu.Unlock()
	if n != nil && n.dns != nil {
		_ = n.dns.Close()
	}
}

// lookupAddress answers the DNS server: the address of the bridge-mode VM
// called name. Addresses are stable, so a stopped VM's name resolves too.
func (s *Service) lookupAddress(name string) (netip.Addr, bool) {
	c, err := s.cachedList(context.Background())
	if err != nil {
		return netip.Addr{}, false
	}
	for _, v := range c.vms {
		if v.Name == name && v.Network.Mode == NetBridge && v.Network.IP != "" {
			a, err := netip.ParseAddr(v.Network.IP)
			return a, err == nil
		}
	}
	return netip.Addr{}, false
}

// usedAddresses lists the guest addresses every VM holds.
func (s *Service) usedAddresses(ctx context.Context) ([]netip.Addr, error) {
	rs, err := s.Store.ListResources(ctx, "")
	if err != nil {
		return nil, err
	}
	var used []netip.Addr
	for _, r := range rs {
		if r.Kind != resAddress {
			continue
		}
		if a, err := netip.ParseAddr(r.Ref); err == nil {
			used = append(used, a)
		}
	}
	return used, nil
}

// bridgeUnavailable explains why a bridge-mode VM cannot boot.
func bridgeUnavailable(name string, err error) error {
	return api.Errorf(api.CodeFailedPrecondition, "vm %q uses bridge networking, and %v", name, err).
		WithHint("start banger-helper as root (README, \"Bridge networking\"), then retry")
}

// makeTap makes the VM's tap on the bridge for one boot. A tap left from
// an earlier boot (its removal found no helper) is replaced.
func (s *Service) makeTap(ctx context.Context, vmName, vmID string) error {
	n, err := s.bridge(ctx)
	if err != nil {
		return bridgeUnavailable(vmName, err)
	}
	op := network.CreateTap(vmID, n.cfg.Bridge, n.cfg.OwnerUID)
	err = n.cfg.Helper.CreateTap(ctx, op)
	if errors.Is(err, helperapi.ErrExists) {
		if err = n.cfg.Helper.DeleteTap(ctx, helperapi.DeleteTap{Name: op.Name}); err == nil {
			err = n.cfg.Helper.CreateTap(ctx, op)
		}
	}
	if err != nil {
		return fmt.Errorf("create tap %s: %w", op.Name, err)
	}
	return nil
}

// deleteTap removes a tap through the helper. Without a helper there is no
// way to remove it now; it is forgotten with a warning and removed as an
// orphan when a daemon next finds the helper (sweepOwned).
func (s *Service) deleteTap(ctx context.Context, name string) error {
	n, err := s.bridge(ctx)
	if err == nil {
		err = n.cfg.Helper.DeleteTap(ctx, helperapi.DeleteTap{Name: name})
		if err == nil {
			return nil
		}
		if !unreachable(err) {
			return fmt.Errorf("delete tap %s: %w", name, err)
		}
	}
	s.Log.Warn("cannot remove tap now; it goes once banger-helper answers again", "tap", name, "err", err)
	return nil
}

// unreachable reports whether err is the helper's socket refusing or
// missing, as opposed to an answer.
func unreachable(err error) bool {
	var oe *net.OpError
	return errors.Is(err, ErrNoHelper) || (errors.As(err, &oe) && oe.Op == "dial")
}

// sweepOwned removes what the helper lists as banger's but no VM holds:
// taps no VM recorded, and, when the helper shares the daemon's state dir,
// loop devices, snapshots and jails of VMs that no longer exist. It runs
// after the VMs are reconciled, so every tap still wanted is recorded.
// Only objects carrying banger's names are ever listed, so nothing else on
// the host is touched.
func (s *Service) sweepOwned(ctx context.Context) error {
	n := s.liveBridge()
	if n == nil {
		return nil
	}
	owned, err := n.cfg.Helper.ListOwned(ctx)
	if err != nil {
		return fmt.Errorf("list helper objects: %w", err)
	}
	rows, err := s.Store.ListVMs(ctx)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, r := range rows {
		known[r.ID] = true
	}
	rs, err := s.Store.ListResources(ctx, "")
	if err != nil {
		return err
	}
	taps, running := map[string]bool{}, map[string]bool{}
	for _, r := range rs {
		switch r.Kind {
		case resTap:
			taps[r.Ref] = true
		case resProcess, resJail:
			// A jailed VM's jail resource stands for its process.
			running[r.VMID] = true
		}
	}
	h := n.cfg.Helper
	var errs []error
	sweep := func(what, name string, f func() error) {
		s.Log.Warn("removing orphaned "+what, what, name)
		if err := f(); err != nil {
			errs = append(errs, fmt.Errorf("remove orphaned %s %s: %w", what, name, err))
		}
	}
	for _, tap := range owned.Taps {
		if !taps[tap] {
			sweep("tap", tap, func() error { return h.DeleteTap(ctx, helperapi.DeleteTap{Name: tap}) })
		}
	}
	if n.cfg.SharedStateDir {
		for _, j := range owned.Jails {
			if !known[j.VMID] || !running[j.VMID] {
				sweep("jail", j.VMID, func() error { return h.KillJailed(ctx, helperapi.KillJailed{VMID: j.VMID}) })
			}
		}
		for _, sn := range owned.Snapshots {
			if !known[sn.VMID] {
				sweep("snapshot", sn.Name, func() error { return h.RemoveSnapshot(ctx, helperapi.RemoveSnapshot{VMID: sn.VMID}) })
			}
		}
		for _, l := range owned.Loops {
			if l.VMID != "" && !known[l.VMID] {
				sweep("loop device", l.Device, func() error { return h.DetachLoop(ctx, helperapi.DetachLoop{Device: l.Device}) })
			}
		}
	}
	return errors.Join(errs...)
}
