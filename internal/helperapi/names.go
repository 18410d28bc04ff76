package helperapi

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
)

// Names banger gives to kernel objects. Everything banger creates carries
// one of these prefixes, so reconciliation finds its own orphans and never
// touches anything else.
const (
	// IDLength is the length of a VM id: lower-case hex digits. Ten digits
	// (40 random bits) keep "bgr-<id>" within the kernel's 15-byte interface
	// name limit while mapping every tap back to exactly one VM.
	IDLength = 10
	// TapPrefix starts every tap name: "bgr-<vm id>".
	TapPrefix = "bgr-"
	// BridgePrefix starts every bridge name: "banger0", "banger1" …
	BridgePrefix = "banger"
	// DMPrefix starts every device-mapper device name: "banger-<vm id>".
	DMPrefix = "banger-"
	// DMUUIDPrefix starts every device-mapper device uuid.
	DMUUIDPrefix = "BANGER-"
	// DNSDomain is the zone where VMs get names: "<vm>.banger".
	DNSDomain = "banger"
	// NFTable is the one nftables table (family inet) banger owns.
	NFTable = "banger"
	// MaxIfNameLen is IFNAMSIZ less the terminating NUL.
	MaxIfNameLen = 15
	// MinDNSPort is the lowest port EnsureDNSRedirect may redirect to: the
	// daemon runs unprivileged, so its DNS server listens on a high port.
	MinDNSPort = 1024
	// MaxJailCPUs is Firecracker's vCPU limit.
	MaxJailCPUs = 32
	// MaxJailMemoryMiB bounds a jailed VM's memory (1 TiB), far below
	// where the cgroup limit derived from it would overflow.
	MaxJailMemoryMiB = 1 << 20
	// MaxJailDisks bounds the disks of a jailed VM.
	MaxJailDisks = 8
)

var (
	vmIDRe   = regexp.MustCompile(`^[0-9a-f]{10}$`)
	tapRe    = regexp.MustCompile(`^bgr-[0-9a-f]{10}$`)
	bridgeRe = regexp.MustCompile(`^banger[0-9]{1,3}$`)
	// fileRe is a basename: no '/', and the first character is not '.', so
	// neither "." nor ".." nor a hidden file can be named.
	fileRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	loopRe = regexp.MustCompile(`^/dev/loop(0|[1-9][0-9]{0,5})$`)
	// diskIDRe is a subset of Firecracker's drive ids (letters, digits,
	// '_') that is also a plain file name: the disk is /drive_<id> in the
	// jail.
	diskIDRe = regexp.MustCompile(`^[a-z0-9_]{1,32}$`)
)

// NewVMID returns a fresh random VM id. Callers still rely on a UNIQUE
// constraint: 40 bits make a collision unlikely, not impossible.
func NewVMID() string {
	var b [IDLength / 2]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}

// ValidateVMID accepts exactly IDLength lower-case hex digits.
func ValidateVMID(id string) error {
	if !vmIDRe.MatchString(id) {
		return fmt.Errorf("vm id %q: want %d lower-case hex digits", id, IDLength)
	}
	return nil
}

// TapName is the tap device of a VM: "bgr-" + its id. It does not validate
// the id; ValidateTapName does.
func TapName(vmID string) string { return TapPrefix + vmID }

// ValidateTapName accepts only "bgr-<vm id>".
func ValidateTapName(name string) error {
	if !tapRe.MatchString(name) {
		return fmt.Errorf("tap name %q: want %q followed by a vm id", name, TapPrefix)
	}
	return nil
}

// ValidateBridgeName accepts "banger" followed by one to three digits.
func ValidateBridgeName(name string) error {
	if !bridgeRe.MatchString(name) {
		return fmt.Errorf("bridge name %q: want %q followed by 1-3 digits", name, BridgePrefix)
	}
	return nil
}

// ValidateFileName accepts a file name inside a VM's directory: a basename
// of lower-case letters, digits, '.', '_' and '-', not starting with '.'.
func ValidateFileName(name string) error {
	if !fileRe.MatchString(name) {
		return fmt.Errorf("file name %q: want a basename of [a-z0-9._-], 1-64 characters, not starting with '.'", name)
	}
	return nil
}

// ValidateDiskID accepts a jailed VM's drive id: 1-32 lower-case letters,
// digits and '_'.
func ValidateDiskID(id string) error {
	if !diskIDRe.MatchString(id) {
		return fmt.Errorf("disk id %q: want 1-32 of [a-z0-9_]", id)
	}
	return nil
}

// ValidateLoopDevice accepts "/dev/loopN".
func ValidateLoopDevice(dev string) error {
	if !loopRe.MatchString(dev) {
		return fmt.Errorf("loop device %q: want /dev/loopN", dev)
	}
	return nil
}

// ParseBridgeCIDR parses the bridge's address in CIDR notation, e.g.
// "172.30.0.1/24": an IPv4 address in a private range (RFC 1918), a prefix
// from /16 to /30, and the address must be the subnet's first host, which is
// the gateway guests use. Public ranges are refused so that a request can
// never make the host masquerade or hijack someone else's addresses.
func ParseBridgeCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: %w", s, err)
	}
	a := p.Addr()
	switch {
	case !a.Is4():
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: not IPv4", s)
	case p.String() != s:
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: not in canonical form %q", s, p.String())
	case !a.IsPrivate():
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: not in a private range (10/8, 172.16/12, 192.168/16)", s)
	case p.Bits() < 16 || p.Bits() > 30:
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: prefix length must be 16-30", s)
	case a != p.Masked().Addr().Next():
		return netip.Prefix{}, fmt.Errorf("bridge cidr %q: address must be the subnet's first host %s", s, p.Masked().Addr().Next())
	}
	return p, nil
}

// ValidateOwnerUID refuses root (a tap or device owned by root is of no use
// to the unprivileged daemon, and handing root's objects around is exactly
// what the helper must not do) and (uid_t)-1, which chown(2) reads as "leave
// unchanged".
func ValidateOwnerUID(uid uint32) error {
	switch uid {
	case 0:
		return fmt.Errorf("owner uid 0: the owner must not be root")
	case ^uint32(0):
		return fmt.Errorf("owner uid %d: not a valid uid", uid)
	}
	return nil
}

// parseBridgeIP accepts a private IPv4 address in its canonical form.
func parseBridgeIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("bridge ip %q: %w", s, err)
	}
	if !a.Is4() || !a.IsPrivate() || a.String() != s || strings.Contains(s, "%") {
		return netip.Addr{}, fmt.Errorf("bridge ip %q: want a private IPv4 address", s)
	}
	return a, nil
}
