package network

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/google/go-cmp/cmp"
)

// ParseSubnet derives the network, gateway, mask and broadcast from the
// bridge address, and refuses what the helper would refuse.
func TestParseSubnet(t *testing.T) {
	tests := []struct {
		in                      string
		prefix, gw, mask, bcast string
		wantErr                 bool
	}{
		{in: DefaultCIDR, prefix: "172.30.0.0/24", gw: "172.30.0.1", mask: "255.255.255.0", bcast: "172.30.0.255"},
		{in: "10.8.0.1/16", prefix: "10.8.0.0/16", gw: "10.8.0.1", mask: "255.255.0.0", bcast: "10.8.255.255"},
		{in: "192.168.77.65/26", prefix: "192.168.77.64/26", gw: "192.168.77.65", mask: "255.255.255.192", bcast: "192.168.77.127"},
		{in: "192.168.1.1/30", prefix: "192.168.1.0/30", gw: "192.168.1.1", mask: "255.255.255.252", bcast: "192.168.1.3"},
		{in: "172.30.0.0/24", wantErr: true}, // the network address is not a host
		{in: "172.30.0.2/24", wantErr: true}, // not the first host
		{in: "8.8.8.1/24", wantErr: true},
		{in: "172.30.0.1", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			s, err := ParseSubnet(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseSubnet(%q) succeeded", tt.in)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := []string{s.Prefix().String(), s.Gateway().String(), s.Netmask(), s.Broadcast().String(), s.CIDR()}
			want := []string{tt.prefix, tt.gw, tt.mask, tt.bcast, tt.in}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// Allocate picks the lowest free guest address, skipping the gateway and
// holes, and reports exhaustion with ErrExhausted.
func TestAllocate(t *testing.T) {
	s, err := ParseSubnet("192.168.1.1/29") // hosts .1 (gateway) to .6
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr
	tests := []struct {
		name string
		used []netip.Addr
		want string
	}{
		{"empty subnet", nil, "192.168.1.2"},
		{"first taken", []netip.Addr{ip("192.168.1.2")}, "192.168.1.3"},
		{"hole is reused", []netip.Addr{ip("192.168.1.2"), ip("192.168.1.4")}, "192.168.1.3"},
		{"foreign addresses are ignored", []netip.Addr{ip("10.0.0.2"), ip("192.168.1.2")}, "192.168.1.3"},
		{"last host", []netip.Addr{ip("192.168.1.2"), ip("192.168.1.3"), ip("192.168.1.4"), ip("192.168.1.5")}, "192.168.1.6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Allocate(tt.used)
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != tt.want {
				t.Errorf("Allocate = %s, want %s", got, tt.want)
			}
			if !s.IsGuestAddr(got) {
				t.Errorf("%s is not a guest address", got)
			}
		})
	}
	full := []netip.Addr{ip("192.168.1.2"), ip("192.168.1.3"), ip("192.168.1.4"), ip("192.168.1.5"), ip("192.168.1.6")}
	if _, err := s.Allocate(full); !errors.Is(err, ErrExhausted) {
		t.Errorf("Allocate on a full subnet: %v, want ErrExhausted", err)
	}
}

// IsGuestAddr excludes the network, gateway and broadcast addresses.
func TestIsGuestAddr(t *testing.T) {
	s, _ := ParseSubnet(DefaultCIDR)
	for addr, want := range map[string]bool{
		"172.30.0.0": false, "172.30.0.1": false, "172.30.0.255": false,
		"172.30.0.2": true, "172.30.0.254": true, "172.30.1.2": false,
	} {
		if got := s.IsGuestAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("IsGuestAddr(%s) = %v, want %v", addr, got, want)
		}
	}
}

// TapName and MAC are stable, fit the kernel's limits, pass the helper's
// validation and differ between VMs.
func TestTapNameAndMAC(t *testing.T) {
	if got := TapName("0123456789"); got != "bgr-0123456789" {
		t.Errorf("TapName = %q", got)
	}
	if got := MAC("0123456789").String(); got != "02:01:23:45:67:89" {
		t.Errorf("MAC = %s", got)
	}
	macs := make(map[string]string)
	for range 500 {
		id := helperapi.NewVMID()
		tap := TapName(id)
		if err := helperapi.ValidateTapName(tap); err != nil {
			t.Fatal(err)
		}
		if len(tap) > helperapi.MaxIfNameLen {
			t.Fatalf("tap %q longer than IFNAMSIZ-1", tap)
		}
		mac := MAC(id)
		if mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
			t.Fatalf("MAC %s is not locally administered unicast", mac)
		}
		if MAC(id).String() != mac.String() {
			t.Fatalf("MAC(%s) is not stable", id)
		}
		if other, ok := macs[mac.String()]; ok {
			t.Fatalf("ids %s and %s share MAC %s", id, other, mac)
		}
		macs[mac.String()] = id
	}
	// Any string still gets a locally administered unicast MAC.
	if mac := MAC("not-an-id"); len(mac) != 6 || mac[0] != 0x02 {
		t.Errorf("MAC(not-an-id) = %s", mac)
	}
}

// KernelIPArg writes the kernel's ip= syntax and refuses values that would
// break the command line.
func TestKernelIPArg(t *testing.T) {
	s, _ := ParseSubnet(DefaultCIDR)
	got, err := s.KernelIPArg(netip.MustParseAddr("172.30.0.7"), "dev")
	if err != nil {
		t.Fatal(err)
	}
	if want := "ip=172.30.0.7::172.30.0.1:255.255.255.0:dev:eth0:off:172.30.0.1"; got != want {
		t.Errorf("KernelIPArg = %q, want %q", got, want)
	}
	for _, bad := range []struct {
		addr, host string
	}{{"172.30.0.1", "dev"}, {"10.0.0.2", "dev"}, {"172.30.0.7", "dev:x"}, {"172.30.0.7", "dev init=/bin/sh"}, {"172.30.0.7", ""}} {
		if _, err := s.KernelIPArg(netip.MustParseAddr(bad.addr), bad.host); err == nil {
			t.Errorf("KernelIPArg(%s, %q) succeeded", bad.addr, bad.host)
		}
	}
}

// The helper requests built here pass the helper's validation.
func TestRequestsValidate(t *testing.T) {
	s, _ := ParseSubnet(DefaultCIDR)
	id := helperapi.NewVMID()
	for _, op := range []helperapi.Op{
		s.EnsureBridge(DefaultBridge),
		s.EnsureNAT(DefaultBridge),
		s.EnsureDNSRedirect(DefaultBridge, 5353),
		CreateTap(id, DefaultBridge, 1000),
	} {
		if err := op.Validate(); err != nil {
			t.Errorf("%s: %v", op.OpName(), err)
		}
	}
}
