package firecracker

import (
	"errors"
	"slices"
	"testing"

	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// Versions parse as Firecracker prints them, and pre-releases sort before
// their release.
func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Version
		ok   bool
	}{
		{"1.14.2", Version{1, 14, 2, ""}, true},
		{"v1.16.1", Version{1, 16, 1, ""}, true},
		{"1.17.0-dev", Version{1, 17, 0, "dev"}, true},
		{" 1.15.0 ", Version{1, 15, 0, ""}, true},
		{"1.14", Version{}, false},
		{"1.14.x", Version{}, false},
		{"1.014.2", Version{}, false},
		{"1.14.2-", Version{}, false},
		{"", Version{}, false},
		{"Firecracker v1.14.2", Version{}, false},
	} {
		got, err := ParseVersion(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseVersion(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	order := []string{"1.13.9", "1.14.0", "1.16.0-dev", "1.16.0", "1.17.0-dev", "1.17.0", "2.0.0"}
	for i := 1; i < len(order); i++ {
		a, _ := ParseVersion(order[i-1])
		b, _ := ParseVersion(order[i])
		if a.Compare(b) != -1 || b.Compare(a) != 1 || a.Compare(a) != 0 {
			t.Errorf("%s should sort before %s", a, b)
		}
	}
}

// Each version gets the newest table row it has reached: versions between
// two known specs get the older row, newer ones the newest, and anything
// before 1.14 is refused.
func TestCapabilitiesFor(t *testing.T) {
	for _, tc := range []struct {
		version string
		table   string
	}{
		{"1.14.0", "1.14"},
		{"1.14.2", "1.14"},
		{"1.15.3", "1.14"},
		{"1.16.0-dev", "1.14"},
		{"1.16.1", "1.16"},
		{"1.17.0-dev", "1.17-dev"},
		{"1.17.0", "1.17-dev"},
		{"2.3.0", "1.17-dev"},
	} {
		caps := mustCaps(t, tc.version)
		if caps.Table != tc.table || caps.Version.String() != tc.version {
			t.Errorf("%s: table %s (version %s), want %s", tc.version, caps.Table, caps.Version, tc.table)
		}
	}
	for _, old := range []string{"1.13.1", "1.14.0-dev", "0.25.0"} {
		v, _ := ParseVersion(old)
		if _, err := CapabilitiesFor(v); !errors.Is(err, ErrUnsupportedVersion) {
			t.Errorf("%s: %v, want ErrUnsupportedVersion", old, err)
		}
	}
}

// The capability table agrees with the specs it was derived from: a
// capability is on exactly where that version's swagger has the field.
func TestCapabilitiesMatchSpecs(t *testing.T) {
	checks := []struct {
		name      string
		cap       func(Capabilities) bool
		def, prop string
	}{
		{"NetMTU", func(c Capabilities) bool { return c.NetMTU }, "NetworkInterface", "mtu"},
		{"SerialRateLimiter", func(c Capabilities) bool { return c.SerialRateLimiter }, "SerialDevice", "rate_limiter"},
		{"PmemRateLimiter", func(c Capabilities) bool { return c.PmemRateLimiter }, "Pmem", "rate_limiter"},
		{"SnapshotVsockOverride", func(c Capabilities) bool { return c.SnapshotVsockOverride }, "SnapshotLoadParams", "vsock_override"},
		{"SnapshotClockRealtime", func(c Capabilities) bool { return c.SnapshotClockRealtime }, "SnapshotLoadParams", "clock_realtime"},
		{"SnapshotHugePages", func(c Capabilities) bool { return c.SnapshotHugePages }, "SnapshotLoadParams", "huge_pages"},
		{"MetricsEmitID", func(c Capabilities) bool { return c.MetricsEmitID }, "Metrics", "emit_id"},
	}
	for _, version := range fcfake.Versions() {
		spec, err := fcfake.LoadSpec(version)
		if err != nil {
			t.Fatal(err)
		}
		caps := mustCaps(t, version)
		for _, c := range checks {
			if got, want := c.cap(caps), spec.Has(c.def, c.prop); got != want {
				t.Errorf("%s: %s = %v, but the spec has %s.%s: %v", version, c.name, got, c.def, c.prop, want)
			}
		}
		hp := spec.Definition("MachineConfiguration").Property("huge_pages")
		hasTHP := hp != nil && slices.Contains(hp.Enum, "Transparent")
		if caps.HugePagesTransparent != hasTHP {
			t.Errorf("%s: HugePagesTransparent = %v, spec enum has Transparent: %v", version, caps.HugePagesTransparent, hasTHP)
		}
		_, _, hasEntropy := spec.Lookup("PUT", "/entropy")
		if caps.Entropy != hasEntropy {
			t.Errorf("%s: Entropy = %v, spec has PUT /entropy: %v", version, caps.Entropy, hasEntropy)
		}
	}
}
