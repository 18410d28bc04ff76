package helper

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// inNetNS runs f in the configured network namespace, or right here when
// none is configured.
func (s *Server) inNetNS(f func() error) error {
	if s.cfg.NetNS == "" {
		return f()
	}
	return runInNetNS(s.cfg.NetNS, f)
}

// runInNetNS runs f in the network namespace nsPath. Netlink and nftables
// sockets, /dev/net/tun and /proc/sys/net all act on the namespace of the
// thread that opens them, so f runs on a thread of its own that is switched
// first and never handed back to the scheduler: its goroutine exits still
// locked, and the runtime ends the thread.
func runInNetNS(nsPath string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", nsPath, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		_ = unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", nsPath, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// checkBridge refuses any bridge but the configured one.
func (s *Server) checkBridge(name string) error {
	if name != s.cfg.Bridge {
		return helperapi.Errorf(helperapi.CodeForbidden, "bridge %q is not the helper's bridge %q", name, s.cfg.Bridge)
	}
	return nil
}

func linkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// bridgeMAC is a stable, locally administered MAC for a bridge. Without
// one the kernel gives the bridge the lowest MAC among its ports, which
// changes as taps come and go and leaves guests with a stale gateway entry.
func bridgeMAC(name string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("banger bridge " + name))
	return append(net.HardwareAddr{0x02}, sum[:5]...)
}

func (s *Server) ensureBridge(op helperapi.EnsureBridge) (res helperapi.EnsureBridgeResult, err error) {
	if err := s.checkBridge(op.Name); err != nil {
		return res, err
	}
	prefix, err := helperapi.ParseBridgeCIDR(op.CIDR)
	if err != nil {
		return res, err
	}
	err = s.inNetNS(func() error {
		link, err := netlink.LinkByName(op.Name)
		switch {
		case linkNotFound(err):
			br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: op.Name, HardwareAddr: bridgeMAC(op.Name)}}
			if err := netlink.LinkAdd(br); err != nil {
				return fmt.Errorf("create bridge %q: %w", op.Name, err)
			}
			res.Created = true
			if link, err = netlink.LinkByName(op.Name); err != nil {
				return fmt.Errorf("find new bridge %q: %w", op.Name, err)
			}
		case err != nil:
			return fmt.Errorf("find bridge %q: %w", op.Name, err)
		case link.Type() != "bridge":
			return helperapi.Errorf(helperapi.CodeExists, "link %q exists and is a %s, not a bridge", op.Name, link.Type())
		}
		if err := setOnlyAddr(link, prefix); err != nil {
			if res.Created {
				_ = netlink.LinkDel(link)
			}
			return err
		}
		if err := netlink.LinkSetUp(link); err != nil {
			if res.Created {
				_ = netlink.LinkDel(link)
			}
			return fmt.Errorf("set bridge %q up: %w", op.Name, err)
		}
		return nil
	})
	return res, err
}

// setOnlyAddr gives link the IPv4 address prefix and removes any other
// IPv4 address from it, so a changed subnet converges.
func setOnlyAddr(link netlink.Link, prefix netip.Prefix) error {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %q: %w", link.Attrs().Name, err)
	}
	have := false
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == prefix.Addr() && ones == prefix.Bits() {
			have = true
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil {
			return fmt.Errorf("remove address %s from %q: %w", a.IPNet, link.Attrs().Name, err)
		}
	}
	if have {
		return nil
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   prefix.Addr().AsSlice(),
		Mask: net.CIDRMask(prefix.Bits(), 32),
	}}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("add address %s to %q: %w", prefix, link.Attrs().Name, err)
	}
	return nil
}

func (s *Server) deleteBridge(op helperapi.DeleteBridge) error {
	if err := s.checkBridge(op.Name); err != nil {
		return err
	}
	return s.inNetNS(func() error {
		link, err := netlink.LinkByName(op.Name)
		if linkNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("find bridge %q: %w", op.Name, err)
		}
		if link.Type() != "bridge" {
			return helperapi.Errorf(helperapi.CodeForbidden, "link %q is a %s, not a bridge", op.Name, link.Type())
		}
		if err := netlink.LinkDel(link); err != nil && !linkNotFound(err) {
			return fmt.Errorf("delete bridge %q: %w", op.Name, err)
		}
		return nil
	})
}

func (s *Server) createTap(op helperapi.CreateTap) error {
	if err := s.checkBridge(op.Bridge); err != nil {
		return err
	}
	if op.OwnerUID != s.cfg.OwnerUID {
		return helperapi.Errorf(helperapi.CodeForbidden, "owner uid %d is not the helper's owner %d", op.OwnerUID, s.cfg.OwnerUID)
	}
	return s.inNetNS(func() error {
		br, err := netlink.LinkByName(op.Bridge)
		if linkNotFound(err) {
			return helperapi.Errorf(helperapi.CodeNotFound, "bridge %q does not exist (hint: EnsureBridge first)", op.Bridge)
		}
		if err != nil {
			return fmt.Errorf("find bridge %q: %w", op.Bridge, err)
		}
		if br.Type() != "bridge" {
			return helperapi.Errorf(helperapi.CodeForbidden, "link %q is a %s, not a bridge", op.Bridge, br.Type())
		}
		if err := addTap(op.Name, op.OwnerUID); err != nil {
			return err
		}
		tap, err := netlink.LinkByName(op.Name)
		if err == nil {
			err = attachAndUp(tap, br)
		}
		if err != nil {
			// Undo: the tap is persistent and would outlive this request.
			_ = netlink.LinkDel(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: op.Name}})
			return fmt.Errorf("set up tap %q: %w", op.Name, err)
		}
		return nil
	})
}

func attachAndUp(tap, br netlink.Link) error {
	if mtu := br.Attrs().MTU; mtu > 0 && tap.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(tap, mtu); err != nil {
			return fmt.Errorf("set mtu %d: %w", mtu, err)
		}
	}
	if err := netlink.LinkSetMaster(tap, br); err != nil {
		return fmt.Errorf("attach to %q: %w", br.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	return nil
}

// addTap creates a persistent tap owned by uid with TUNSETIFF,
// TUNSETOWNER and TUNSETPERSIST. netlink.Tuntap would also issue
// TUNSETGROUP 0, letting any process with group root open the tap; here
// only the owner (and CAP_NET_ADMIN) can. IFF_TUN_EXCL makes creation fail
// when the name exists instead of attaching to it. The VMM re-opens the tap
// with its own IFF_NO_PI/IFF_VNET_HDR choice; only single-queue must match.
func addTap(name string, uid uint32) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("create tap %q: %w", name, err)
	}
	defer func() { _ = unix.Close(fd) }()
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("create tap %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_TUN_EXCL)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST) {
			return helperapi.Errorf(helperapi.CodeExists, "create tap %q: it already exists", name)
		}
		return fmt.Errorf("create tap %q: %w", name, err)
	}
	// Until TUNSETPERSIST succeeds, closing fd removes the device again.
	if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, int(uid)); err != nil {
		return fmt.Errorf("set owner of tap %q: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("make tap %q persistent: %w", name, err)
	}
	return nil
}

func (s *Server) deleteTap(op helperapi.DeleteTap) error {
	return s.inNetNS(func() error {
		link, err := netlink.LinkByName(op.Name)
		if linkNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("find tap %q: %w", op.Name, err)
		}
		if link.Type() != "tuntap" {
			return helperapi.Errorf(helperapi.CodeForbidden, "link %q is a %s, not a tap", op.Name, link.Type())
		}
		if err := netlink.LinkDel(link); err != nil && !linkNotFound(err) {
			return fmt.Errorf("delete tap %q: %w", op.Name, err)
		}
		return nil
	})
}

// bridgeHasAddr reports whether the configured bridge carries ip.
func bridgeHasAddr(name string, ip netip.Addr) (bool, error) {
	link, err := netlink.LinkByName(name)
	if linkNotFound(err) {
		return false, helperapi.Errorf(helperapi.CodeNotFound, "bridge %q does not exist (hint: EnsureBridge first)", name)
	}
	if err != nil {
		return false, fmt.Errorf("find bridge %q: %w", name, err)
	}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("list addresses of %q: %w", name, err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP.To4()); ok && got == ip {
			return true, nil
		}
	}
	return false, nil
}

// enableForwarding turns on IPv4 forwarding (in the current namespace)
// and reports whether it was off.
func enableForwarding() (changed bool, err error) {
	const path = "/proc/sys/net/ipv4/ip_forward"
	b, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > 0 && b[0] == '1' {
		return false, nil
	}
	if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
		return false, fmt.Errorf("enable ip forwarding: %w", err)
	}
	return true, nil
}
