package helperapi

import (
	"errors"
	"fmt"
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
		// LaunchJailed
		{"jail: ours", goodLaunch(), true},
		{"jail: no initrd, no disks, no tap", LaunchJailed{VMID: goodID, CPUs: 1, MemoryMiB: 128, Kernel: "vmlinux"}, true},
		{"jail: the largest VM", func() LaunchJailed { o := goodLaunch(); o.CPUs, o.MemoryMiB = MaxJailCPUs, MaxJailMemoryMiB; return o }(), true},
		{"jail: vm id with ../ picks another VM's directory", func() LaunchJailed { o := goodLaunch(); o.VMID = "../0123456"; return o }(), false},
		{"jail: upper-case vm id names a second jail for the same VM", func() LaunchJailed { o := goodLaunch(); o.VMID = "ABCDEF0123"; return o }(), false},
		{"jail: ../ in the kernel escapes the VM's directory", func() LaunchJailed { o := goodLaunch(); o.Kernel = "../../../boot/vmlinuz"; return o }(), false},
		{"jail: absolute kernel path", func() LaunchJailed { o := goodLaunch(); o.Kernel = "/boot/vmlinuz"; return o }(), false},
		{"jail: empty kernel", func() LaunchJailed { o := goodLaunch(); o.Kernel = ""; return o }(), false},
		{"jail: hidden initrd", func() LaunchJailed { o := goodLaunch(); o.Initrd = ".initrd"; return o }(), false},
		{"jail: absolute disk path links /etc/shadow into the jail", func() LaunchJailed { o := goodLaunch(); o.Disks[0].File = "/etc/shadow"; return o }(), false},
		{"jail: ../ in a disk file", func() LaunchJailed { o := goodLaunch(); o.Disks[0].File = "../other/root.img"; return o }(), false},
		{"jail: ../ in a disk id escapes the jail root (/drive_../x)", func() LaunchJailed { o := goodLaunch(); o.Disks[0].ID = "../x"; return o }(), false},
		{"jail: slash in a disk id", func() LaunchJailed { o := goodLaunch(); o.Disks[0].ID = "a/b"; return o }(), false},
		{"jail: newline in a disk id", func() LaunchJailed { o := goodLaunch(); o.Disks[0].ID = "root\n"; return o }(), false},
		{"jail: empty disk id", func() LaunchJailed { o := goodLaunch(); o.Disks[0].ID = ""; return o }(), false},
		{"jail: overlong disk id", func() LaunchJailed { o := goodLaunch(); o.Disks[0].ID = strings.Repeat("d", 33); return o }(), false},
		{"jail: one disk id twice collides in the jail", func() LaunchJailed {
			o := goodLaunch()
			o.Disks = append(o.Disks, JailDisk{ID: "root", File: "data.img"})
			return o
		}(), false},
		{"jail: one file as two disks is re-owned and restored twice", func() LaunchJailed {
			o := goodLaunch()
			o.Disks = append(o.Disks, JailDisk{ID: "data", File: o.Disks[0].File})
			return o
		}(), false},
		{"jail: the kernel as a writable disk", func() LaunchJailed {
			o := goodLaunch()
			o.Disks = append(o.Disks, JailDisk{ID: "data", File: o.Kernel})
			return o
		}(), false},
		{"jail: too many disks", func() LaunchJailed {
			o := goodLaunch()
			for i := range MaxJailDisks {
				o.Disks = append(o.Disks, JailDisk{ID: fmt.Sprintf("d%d", i), File: fmt.Sprintf("d%d.img", i)})
			}
			return o
		}(), false},
		{"jail: zero cpus", func() LaunchJailed { o := goodLaunch(); o.CPUs = 0; return o }(), false},
		{"jail: negative cpus", func() LaunchJailed { o := goodLaunch(); o.CPUs = -1; return o }(), false},
		{"jail: more cpus than firecracker takes", func() LaunchJailed { o := goodLaunch(); o.CPUs = MaxJailCPUs + 1; return o }(), false},
		{"jail: zero memory", func() LaunchJailed { o := goodLaunch(); o.MemoryMiB = 0; return o }(), false},
		{"jail: memory that overflows the cgroup limit", func() LaunchJailed { o := goodLaunch(); o.MemoryMiB = 1 << 50; return o }(), false},
		// KillJailed
		{"kill jail: ours", KillJailed{VMID: goodID}, true},
		{"kill jail: a glob kills every jail", KillJailed{VMID: "*"}, false},
		{"kill jail: ../ reaches outside the jail dir", KillJailed{VMID: "../../etc"}, false},
		{"kill jail: empty", KillJailed{}, false},
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

func goodLaunch() LaunchJailed {
	return LaunchJailed{
		VMID: goodID, CPUs: 2, MemoryMiB: 512,
		Kernel: "vmlinux", Initrd: "initrd.img",
		Disks: []JailDisk{{ID: "root", File: "root.img"}},
		Tap:   true,
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
