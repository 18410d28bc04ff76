// Package network plans banger's bridge networking: the subnet and its
// gateway, tap names, guest MACs and addresses, and the requests the daemon
// sends to banger-helper. It also holds the DNS server the daemon runs for
// "<vm>.banger" (dns.go). Nothing here needs root: the kernel objects
// themselves are made by the helper (internal/helper).
package network

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/bangerhq/banger/internal/helperapi"
)

// Defaults for bridge mode.
const (
	DefaultBridge = "banger0"
	DefaultCIDR   = "172.30.0.1/24"
	// Domain is the DNS zone the daemon answers for: "<vm>.banger".
	Domain = helperapi.DNSDomain
)

// ErrExhausted means every host address of the subnet is in use.
var ErrExhausted = errors.New("no free address in the subnet")

// Subnet is the bridge's network: its prefix and the gateway, which is the
// first host address and the bridge's own address.
type Subnet struct {
	cidr netip.Prefix // the gateway address with the prefix length
}

// ParseSubnet parses the bridge address in CIDR notation ("172.30.0.1/24")
// under the helper's rules (private IPv4, /16 to /30, the address being the
// first host), so a subnet the daemon accepts is one the helper accepts.
func ParseSubnet(cidr string) (Subnet, error) {
	p, err := helperapi.ParseBridgeCIDR(cidr)
	if err != nil {
		return Subnet{}, fmt.Errorf("parse subnet: %w", err)
	}
	return Subnet{cidr: p}, nil
}

// CIDR is the bridge address with the prefix length: "172.30.0.1/24".
func (s Subnet) CIDR() string { return s.cidr.String() }

// Prefix is the network: "172.30.0.0/24".
func (s Subnet) Prefix() netip.Prefix { return s.cidr.Masked() }

// Gateway is the bridge's address, the guests' default route and DNS server.
func (s Subnet) Gateway() netip.Addr { return s.cidr.Addr() }

// Netmask is the dotted mask, as the kernel's ip= parameter wants it.
func (s Subnet) Netmask() string {
	return net.IP(net.CIDRMask(s.cidr.Bits(), 32)).String()
}

// Broadcast is the subnet's last address.
func (s Subnet) Broadcast() netip.Addr {
	a := s.Prefix().Addr().As4()
	host := ^uint32(0) >> s.cidr.Bits()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// IsGuestAddr reports whether a may be given to a guest: inside the subnet
// and neither the network, the gateway nor the broadcast address.
func (s Subnet) IsGuestAddr(a netip.Addr) bool {
	return a.Is4() && s.Prefix().Contains(a) &&
		a != s.Prefix().Addr() && a != s.Gateway() && a != s.Broadcast()
}

// Allocate returns the lowest guest address not in used. The daemon records
// the result under a UNIQUE constraint, which is what makes concurrent
// allocations safe; this only picks.
func (s Subnet) Allocate(used []netip.Addr) (netip.Addr, error) {
	taken := make(map[netip.Addr]bool, len(used))
	for _, a := range used {
		taken[a] = true
	}
	bcast := s.Broadcast()
	for a := s.Gateway().Next(); a.IsValid() && a != bcast; a = a.Next() {
		if !taken[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("allocate address in %s (%d in use): %w", s.Prefix(), len(taken), ErrExhausted)
}

// KernelIPArg is the kernel command line's static configuration for a
// guest's first interface: ip=<addr>::<gateway>:<mask>:<hostname>:eth0:off:<dns>.
// The gateway serves DNS (redirected to the daemon). hostname must be a
// valid host name label; it is refused otherwise, since ':' or a space would
// break the command line.
func (s Subnet) KernelIPArg(addr netip.Addr, hostname string) (string, error) {
	if !s.IsGuestAddr(addr) {
		return "", fmt.Errorf("kernel ip argument: %s is not a guest address of %s", addr, s.Prefix())
	}
	if !validLabel(hostname) {
		return "", fmt.Errorf("kernel ip argument: hostname %q is not a valid DNS label", hostname)
	}
	return fmt.Sprintf("ip=%s::%s:%s:%s:eth0:off:%s", addr, s.Gateway(), s.Netmask(), hostname, s.Gateway()), nil
}

// EnsureBridge is the helper request that creates the bridge for s.
func (s Subnet) EnsureBridge(bridge string) helperapi.EnsureBridge {
	return helperapi.EnsureBridge{Name: bridge, CIDR: s.CIDR()}
}

// EnsureNAT is the helper request that lets s's guests reach out.
func (s Subnet) EnsureNAT(bridge string) helperapi.EnsureNAT {
	return helperapi.EnsureNAT{Bridge: bridge, CIDR: s.CIDR()}
}

// EnsureDNSRedirect is the helper request that sends port 53 on the
// gateway to the daemon's DNS server on dnsPort.
func (s Subnet) EnsureDNSRedirect(bridge string, dnsPort uint16) helperapi.EnsureDNSRedirect {
	return helperapi.EnsureDNSRedirect{Bridge: bridge, BridgeIP: s.Gateway().String(), Port: dnsPort}
}

// CreateTap is the helper request for a VM's tap on bridge, owned by the
// daemon's user.
func CreateTap(vmID, bridge string, ownerUID uint32) helperapi.CreateTap {
	return helperapi.CreateTap{Name: TapName(vmID), Bridge: bridge, OwnerUID: ownerUID}
}

// TapName is a VM's tap device: "bgr-<vm id>", at most 15 bytes for a valid
// id (helperapi.ValidateVMID).
func TapName(vmID string) string { return helperapi.TapName(vmID) }

// MAC is a VM's guest MAC address: locally administered, unicast and stable.
// For a valid id it is 02 followed by the id's five bytes, so two VMs never
// share one; any other string gets 02 followed by five bytes of its SHA-256.
func MAC(vmID string) net.HardwareAddr {
	b, err := hex.DecodeString(vmID)
	if err != nil || helperapi.ValidateVMID(vmID) != nil {
		sum := sha256.Sum256([]byte("banger mac " + vmID))
		b = sum[:5]
	}
	return append(net.HardwareAddr{0x02}, b...)
}

func validLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-'
	}) < 0
}
