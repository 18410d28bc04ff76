package guest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"

	"github.com/bangerhq/banger/internal/ext4"
	"golang.org/x/crypto/ssh"
)

// NetMode is how a guest's network is configured.
type NetMode string

const (
	// NetUser is QEMU user networking (slirp): the guest asks DHCP.
	NetUser NetMode = "user"
	// NetStatic is bridge mode: banger allocated the address.
	NetStatic NetMode = "static"
)

// NetConfig is a guest's one NIC.
type NetConfig struct {
	Mode NetMode
	// Address (CIDR, "172.30.0.5/24"), Gateway and DNS are set in static
	// mode and must be empty in user mode.
	Address string
	Gateway string
	DNS     []string
	// MAC identifies the NIC banger gave the VM; the network file matches
	// it rather than an interface name, which differs between VMMs and
	// kernels (eth0, enp0s1…).
	MAC string
}

// DefaultDomain is the DNS domain of VMs: "<vm>.banger".
const DefaultDomain = "banger"

// Identity is what makes a clone of an image one particular VM, written
// into its disk before first boot.
type Identity struct {
	Hostname string // a DNS label: the VM's name
	Domain   string // DefaultDomain when empty
	Net      NetConfig
	// AuthorizedKeys are authorized_keys lines for root (the owner's key
	// from LoadOrCreateClientKey, and any the user added).
	AuthorizedKeys [][]byte
	HostKeys       HostKeys
	// MachineID is /etc/machine-id: 32 lowercase hex digits, fresh per VM
	// (NewMachineID), so clones of one image are distinct to systemd,
	// journald and DHCP (whose client id derives from it).
	MachineID string
}

// Paths written into the guest.
const (
	networkFile = "/etc/systemd/network/10-banger.network"
	sshDir      = "/etc/ssh"
)

// staleHostKeys are host keys an image may carry that banger does not pin.
// They are removed so sshd cannot offer them: a client negotiating one would
// fail verification, and an image's keys are shared by all its clones.
var staleHostKeys = []string{
	sshDir + "/ssh_host_rsa_key", sshDir + "/ssh_host_rsa_key.pub",
	sshDir + "/ssh_host_dsa_key", sshDir + "/ssh_host_dsa_key.pub",
}

var (
	labelRe     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	machineIDRe = regexp.MustCompile(`^[0-9a-f]{32}$`)
)

// ValidateHostname checks name is a DNS label: 1 to 63 lowercase letters,
// digits and '-', not starting or ending with '-'.
func ValidateHostname(name string) error {
	if !labelRe.MatchString(name) {
		return fmt.Errorf("hostname %q: want 1 to 63 of a-z 0-9 and '-', not starting or ending with '-'", name)
	}
	return nil
}

// NewMachineID returns a random machine id the way systemd makes one: 128
// random bits marked as a version 4 UUID, as 32 lowercase hex digits.
func NewMachineID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate machine id: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:]), nil
}

func (id Identity) domain() string {
	if id.Domain == "" {
		return DefaultDomain
	}
	return id.Domain
}

// Validate checks every field, so Files renders only what the guest reads
// the way banger means it.
func (id Identity) Validate() error {
	var errs []error
	if err := ValidateHostname(id.Hostname); err != nil {
		errs = append(errs, err)
	}
	d := id.domain()
	for _, l := range strings.Split(d, ".") {
		if !labelRe.MatchString(l) {
			errs = append(errs, fmt.Errorf("domain %q: label %q is not a DNS label", d, l))
			break
		}
	}
	if len(id.Hostname)+1+len(d) > 253 {
		errs = append(errs, fmt.Errorf("name %s.%s is over 253 bytes", id.Hostname, d))
	}
	if err := id.Net.validate(); err != nil {
		errs = append(errs, err)
	}
	if len(id.AuthorizedKeys) == 0 {
		errs = append(errs, errors.New("no authorized keys: nobody could log in"))
	}
	for i, k := range id.AuthorizedKeys {
		if err := validateAuthorizedKey(k); err != nil {
			errs = append(errs, fmt.Errorf("authorized key %d: %w", i+1, err))
		}
	}
	if err := id.HostKeys.validate(); err != nil {
		errs = append(errs, err)
	}
	if !machineIDRe.MatchString(id.MachineID) || id.MachineID == strings.Repeat("0", 32) {
		errs = append(errs, fmt.Errorf("machine id %q: want 32 lowercase hex digits, not all zero", id.MachineID))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("guest identity %q: %w", id.Hostname, err)
	}
	return nil
}

// validateAuthorizedKey accepts exactly one authorized_keys line (options,
// key, comment), a trailing newline allowed.
func validateAuthorizedKey(k []byte) error {
	line := bytes.TrimSuffix(k, []byte("\n"))
	if bytes.ContainsAny(line, "\n\r\x00") {
		return errors.New("more than one line")
	}
	if _, _, _, rest, err := ssh.ParseAuthorizedKey(line); err != nil {
		return fmt.Errorf("parse: %w", err)
	} else if len(rest) > 0 {
		return errors.New("trailing data after the key")
	}
	return nil
}

func (n NetConfig) validate() error {
	mac, err := net.ParseMAC(n.MAC)
	if err != nil || len(mac) != 6 {
		return fmt.Errorf("mac %q: want six colon-separated hex octets", n.MAC)
	}
	if mac[0]&1 != 0 {
		return fmt.Errorf("mac %q is a multicast address", n.MAC)
	}
	switch n.Mode {
	case NetUser:
		if n.Address != "" || n.Gateway != "" || len(n.DNS) > 0 {
			return errors.New("user networking takes its address, gateway and DNS from QEMU's DHCP: leave them empty")
		}
	case NetStatic:
		prefix, err := netip.ParsePrefix(n.Address)
		if err != nil {
			return fmt.Errorf("address %q: want CIDR like 172.30.0.5/24: %w", n.Address, err)
		}
		gw, err := netip.ParseAddr(n.Gateway)
		if err != nil {
			return fmt.Errorf("gateway %q: %w", n.Gateway, err)
		}
		if !prefix.Masked().Contains(gw) || gw == prefix.Addr() {
			return fmt.Errorf("gateway %s is not another address of %s", gw, prefix)
		}
		for _, d := range n.DNS {
			if _, err := netip.ParseAddr(d); err != nil {
				return fmt.Errorf("dns server %q: %w", d, err)
			}
		}
	default:
		return fmt.Errorf("network mode %q: want %q or %q", n.Mode, NetUser, NetStatic)
	}
	return nil
}

func (h HostKeys) validate() error {
	for _, k := range []struct {
		key HostKey
		typ string
	}{{h.ED25519, ssh.KeyAlgoED25519}, {h.ECDSA, ssh.KeyAlgoECDSA256}} {
		if k.key.Public == nil || len(k.key.PrivatePEM) == 0 {
			return fmt.Errorf("%s host key missing", k.typ)
		}
		signer, err := ssh.ParsePrivateKey(k.key.PrivatePEM)
		if err != nil {
			return fmt.Errorf("%s host key: %w", k.typ, err)
		}
		if signer.PublicKey().Type() != k.typ || !bytes.Equal(signer.PublicKey().Marshal(), k.key.Public.Marshal()) {
			return fmt.Errorf("%s host key: private and public halves do not match", k.typ)
		}
	}
	return nil
}

// Files renders the identity as files for ext4.WriteFiles, all owned by
// root:
//
//   - /etc/hostname, and /etc/hosts naming the VM on 127.0.1.1 (Debian's
//     convention for a host without a fixed address in DNS).
//   - a systemd-networkd file matching the NIC by MAC: the static address,
//     gateway and DNS in static mode; DHCP in user mode. QEMU's slirp
//     answers DHCP with the same values banger would write (10.0.2.15/24,
//     gateway 10.0.2.2, DNS 10.0.2.3), and asking for them keeps the guest
//     right if a user changes QEMU's user-network options; a lease costs
//     milliseconds there.
//   - /root 0700, /root/.ssh 0700, /root/.ssh/authorized_keys 0600.
//   - the ed25519 and ECDSA host keys (0600, .pub 0644), and removal of
//     the RSA and DSA keys an image may carry (staleHostKeys).
//   - /etc/machine-id 0444.
func (id Identity) Files() ([]ext4.File, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	fqdn := id.Hostname + "." + id.domain()
	hosts := fmt.Sprintf(`# Written by banger.
127.0.0.1	localhost
127.0.1.1	%s %s

::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
`, fqdn, id.Hostname)

	var keys bytes.Buffer
	for _, k := range id.AuthorizedKeys {
		keys.Write(bytes.TrimSuffix(k, []byte("\n")))
		keys.WriteByte('\n')
	}

	file := func(path string, mode os.FileMode, data []byte) ext4.File {
		return ext4.File{Path: path, Mode: mode, Data: data}
	}
	hostComment := "root@" + id.Hostname
	files := []ext4.File{
		file("/etc/hostname", 0o644, []byte(id.Hostname+"\n")),
		file("/etc/hosts", 0o644, []byte(hosts)),
		file(networkFile, 0o644, id.Net.render()),
		{Path: "/root", Dir: true, Mode: 0o700},
		{Path: "/root/.ssh", Dir: true, Mode: 0o700},
		file("/root/.ssh/authorized_keys", 0o600, keys.Bytes()),
	}
	for _, k := range []struct {
		name string
		key  HostKey
	}{{"ed25519", id.HostKeys.ED25519}, {"ecdsa", id.HostKeys.ECDSA}} {
		base := sshDir + "/ssh_host_" + k.name + "_key"
		files = append(files,
			file(base, 0o600, bytes.Clone(k.key.PrivatePEM)),
			file(base+".pub", 0o644, append(authorizedLine(k.key.Public, hostComment), '\n')),
		)
	}
	for _, p := range staleHostKeys {
		files = append(files, ext4.File{Path: p, Remove: true})
	}
	files = append(files, file("/etc/machine-id", 0o444, []byte(id.MachineID+"\n")))
	return files, nil
}

// render is the systemd-networkd .network file.
func (n NetConfig) render() []byte {
	mac, _ := net.ParseMAC(n.MAC) // validated
	var b strings.Builder
	b.WriteString("# Written by banger: the VM's NIC, matched by the MAC banger gave it.\n")
	fmt.Fprintf(&b, "[Match]\nMACAddress=%s\n\n[Network]\n", mac)
	switch n.Mode {
	case NetUser:
		b.WriteString("DHCP=ipv4\n")
	case NetStatic:
		fmt.Fprintf(&b, "Address=%s\nGateway=%s\n", netip.MustParsePrefix(n.Address), netip.MustParseAddr(n.Gateway))
		for _, d := range n.DNS {
			fmt.Fprintf(&b, "DNS=%s\n", netip.MustParseAddr(d))
		}
	}
	return []byte(b.String())
}
