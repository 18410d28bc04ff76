package helperapi

import (
	"errors"
	"strings"
	"testing"
)

const (
	goodID  = "0123456789"
	goodTap = "bgr-0123456789"
)

// Validate accepts banger's own names and refuses every input that stands
// for an attack on the root helper; each case names the attack.
func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		op   Op
		ok   bool
	}{
		// EnsureBridge
		{"bridge: the default", EnsureBridge{Name: "banger0", CIDR: "172.30.0.1/24"}, true},
		{"bridge: another private range", EnsureBridge{Name: "banger12", CIDR: "10.77.0.1/16"}, true},
		{"bridge: a name without banger's prefix hijacks docker0", EnsureBridge{Name: "docker0", CIDR: "172.30.0.1/24"}, false},
		{"bridge: the host's uplink", EnsureBridge{Name: "eth0", CIDR: "172.30.0.1/24"}, false},
		{"bridge: newline smuggles a second name", EnsureBridge{Name: "banger0\neth0", CIDR: "172.30.0.1/24"}, false},
		{"bridge: space", EnsureBridge{Name: "banger 0", CIDR: "172.30.0.1/24"}, false},
		{"bridge: overlong name", EnsureBridge{Name: "banger0123456789", CIDR: "172.30.0.1/24"}, false},
		{"bridge: a public range would masquerade someone else's addresses", EnsureBridge{Name: "banger0", CIDR: "8.8.8.1/24"}, false},
		{"bridge: IPv6", EnsureBridge{Name: "banger0", CIDR: "fd00::1/64"}, false},
		{"bridge: a /8 swallows the host's LAN", EnsureBridge{Name: "banger0", CIDR: "10.0.0.1/8"}, false},
		{"bridge: a /31 has no hosts", EnsureBridge{Name: "banger0", CIDR: "172.30.0.1/31"}, false},
		{"bridge: address is not the gateway", EnsureBridge{Name: "banger0", CIDR: "172.30.0.7/24"}, false},
		{"bridge: trailing text", EnsureBridge{Name: "banger0", CIDR: "172.30.0.1/24 "}, false},
		{"bridge: empty", EnsureBridge{}, false},
		// DeleteBridge
		{"delete bridge: ours", DeleteBridge{Name: "banger0"}, true},
		{"delete bridge: someone else's", DeleteBridge{Name: "virbr0"}, false},
		// CreateTap
		{"tap: ours", CreateTap{Name: goodTap, Bridge: "banger0", OwnerUID: 1000}, true},
		{"tap: uid 0 as owner hands root's tap around", CreateTap{Name: goodTap, Bridge: "banger0", OwnerUID: 0}, false},
		{"tap: uid -1 means 'unchanged' to chown", CreateTap{Name: goodTap, Bridge: "banger0", OwnerUID: ^uint32(0)}, false},
		{"tap: a name without banger's prefix", CreateTap{Name: "tap0123456789", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: the host's uplink", CreateTap{Name: "eth0", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: newline", CreateTap{Name: goodTap + "\n", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: space", CreateTap{Name: "bgr- 123456789", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: ../", CreateTap{Name: "bgr-../../etc", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: overlong beyond IFNAMSIZ", CreateTap{Name: goodTap + "0", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: upper-case id", CreateTap{Name: "bgr-ABCDEF0123", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: kernel name template", CreateTap{Name: "bgr-%d", Bridge: "banger0", OwnerUID: 1000}, false},
		{"tap: attached to a foreign bridge", CreateTap{Name: goodTap, Bridge: "br-lan", OwnerUID: 1000}, false},
		// DeleteTap
		{"delete tap: ours", DeleteTap{Name: goodTap}, true},
		{"delete tap: the host's uplink", DeleteTap{Name: "eth0"}, false},
		{"delete tap: wildcard", DeleteTap{Name: "bgr-*"}, false},
		// EnsureNAT
		{"nat: ours", EnsureNAT{Bridge: "banger0", CIDR: "172.30.0.1/24"}, true},
		{"nat: a public range", EnsureNAT{Bridge: "banger0", CIDR: "1.2.3.1/24"}, false},
		{"nat: rule injection in the cidr", EnsureNAT{Bridge: "banger0", CIDR: "172.30.0.1/24 accept"}, false},
		{"nat: foreign bridge", EnsureNAT{Bridge: "wlan0", CIDR: "172.30.0.1/24"}, false},
		{"remove nat", RemoveNAT{}, true},
		// EnsureDNSRedirect
		{"dns: ours", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.1", Port: 5353}, true},
		{"dns: redirect to a privileged port (sshd)", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.1", Port: 22}, false},
		{"dns: port 0", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.1", Port: 0}, false},
		{"dns: a public address", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "1.1.1.1", Port: 5353}, false},
		{"dns: loopback (needs route_localnet)", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "127.0.0.1", Port: 5353}, false},
		{"dns: zone suffix", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.1%eth0", Port: 5353}, false},
		{"dns: IPv4-mapped IPv6", EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "::ffff:172.30.0.1", Port: 5353}, false},
		// AttachLoop
		{"loop: ours", AttachLoop{VMID: goodID, File: "rootfs.ext4"}, true},
		{"loop: read-only", AttachLoop{VMID: goodID, File: "cow-1.img", ReadOnly: true}, true},
		{"loop: ../ escapes the VM's directory", AttachLoop{VMID: goodID, File: "../../../etc/shadow"}, false},
		{"loop: .. alone", AttachLoop{VMID: goodID, File: ".."}, false},
		{"loop: absolute path", AttachLoop{VMID: goodID, File: "/etc/shadow"}, false},
		{"loop: a subdirectory", AttachLoop{VMID: goodID, File: "a/b"}, false},
		{"loop: hidden file", AttachLoop{VMID: goodID, File: ".rootfs"}, false},
		{"loop: newline", AttachLoop{VMID: goodID, File: "rootfs\n"}, false},
		{"loop: space", AttachLoop{VMID: goodID, File: "root fs"}, false},
		{"loop: NUL truncates the path in C", AttachLoop{VMID: goodID, File: "rootfs\x00.ext4"}, false},
		{"loop: overlong file name", AttachLoop{VMID: goodID, File: strings.Repeat("a", 65)}, false},
		{"loop: vm id with ../", AttachLoop{VMID: "../../etc", File: "shadow"}, false},
		{"loop: overlong vm id", AttachLoop{VMID: goodID + "0", File: "rootfs.ext4"}, false},
		{"loop: upper-case vm id", AttachLoop{VMID: "ABCDEF0123", File: "rootfs.ext4"}, false},
		{"loop: empty vm id", AttachLoop{File: "rootfs.ext4"}, false},
		// DetachLoop
		{"detach: ours", DetachLoop{Device: "/dev/loop7"}, true},
		{"detach: not a loop device", DetachLoop{Device: "/dev/sda"}, false},
		{"detach: ../ out of /dev", DetachLoop{Device: "/dev/loop0/../../etc/passwd"}, false},
		{"detach: leading zero aliasing", DetachLoop{Device: "/dev/loop07"}, false},
		{"detach: newline", DetachLoop{Device: "/dev/loop1\n"}, false},
		// CreateSnapshot
		{"snapshot: ours", CreateSnapshot{VMID: goodID, Origin: "origin.ext4", COW: "cow.img"}, true},
		{"snapshot: origin and cow are one file", CreateSnapshot{VMID: goodID, Origin: "disk.img", COW: "disk.img"}, false},
		{"snapshot: origin outside the VM", CreateSnapshot{VMID: goodID, Origin: "../other/origin.ext4", COW: "cow.img"}, false},
		{"snapshot: bad vm id", CreateSnapshot{VMID: "x", Origin: "origin.ext4", COW: "cow.img"}, false},
		// RemoveSnapshot
		{"remove snapshot: ours", RemoveSnapshot{VMID: goodID}, true},
		{"remove snapshot: a dm table injection", RemoveSnapshot{VMID: goodID + " 0 1 linear"}, false},
		{"list owned", ListOwned{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op.Validate()
			if tt.ok && err != nil {
				t.Fatalf("Validate(%#v) = %v, want nil", tt.op, err)
			}
			if !tt.ok {
				if err == nil {
					t.Fatalf("Validate(%#v) = nil, want an error", tt.op)
				}
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Validate error %v is not ErrInvalid", err)
				}
				if !strings.HasPrefix(err.Error(), tt.op.OpName()+": ") {
					t.Fatalf("error %q does not name the op", err)
				}
			}
		})
	}
}

// NewVMID makes ids that pass ValidateVMID and whose tap names fit IFNAMSIZ.
func TestNewVMID(t *testing.T) {
	seen := make(map[string]bool)
	for range 1000 {
		id := NewVMID()
		if err := ValidateVMID(id); err != nil {
			t.Fatal(err)
		}
		if err := ValidateTapName(TapName(id)); err != nil {
			t.Fatal(err)
		}
		if len(TapName(id)) > MaxIfNameLen {
			t.Fatalf("tap name %q exceeds %d bytes", TapName(id), MaxIfNameLen)
		}
		if seen[id] {
			t.Fatalf("duplicate id %s after %d", id, len(seen))
		}
		seen[id] = true
	}
}
