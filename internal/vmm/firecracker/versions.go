package firecracker

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Version is a Firecracker release as GET /version reports it ("1.14.2",
// "1.17.0-dev").
type Version struct {
	Major, Minor, Patch int
	// Pre is the pre-release suffix without its dash ("dev"); a pre-release
	// sorts before the release it precedes, as in semver.
	Pre string
}

// ParseVersion parses "1.14.2", "v1.14.2" or "1.17.0-dev".
func ParseVersion(s string) (Version, error) {
	orig := s
	s = strings.TrimPrefix(strings.TrimSpace(s), "v")
	var v Version
	if i := strings.IndexByte(s, '-'); i >= 0 {
		s, v.Pre = s[:i], s[i+1:]
		if v.Pre == "" {
			return Version{}, fmt.Errorf("parse firecracker version %q: empty pre-release", orig)
		}
	}
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return Version{}, fmt.Errorf("parse firecracker version %q: want MAJOR.MINOR.PATCH", orig)
	}
	nums := [3]*int{&v.Major, &v.Minor, &v.Patch}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || p == "" || (len(p) > 1 && p[0] == '0') {
			return Version{}, fmt.Errorf("parse firecracker version %q: bad number %q", orig, p)
		}
		*nums[i] = n
	}
	return v, nil
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
	if v.Pre != "" {
		s += "-" + v.Pre
	}
	return s
}

// Compare returns -1, 0 or +1 as v sorts before, equal to or after o.
func (v Version) Compare(o Version) int {
	for _, d := range [3]int{v.Major - o.Major, v.Minor - o.Minor, v.Patch - o.Patch} {
		if d != 0 {
			if d < 0 {
				return -1
			}
			return 1
		}
	}
	switch {
	case v.Pre == o.Pre:
		return 0
	case v.Pre == "":
		return 1
	case o.Pre == "":
		return -1
	case v.Pre < o.Pre:
		return -1
	default:
		return 1
	}
}

// Capabilities says which optional parts of the API a Firecracker version
// accepts. Every request struct Firecracker parses uses
// deny_unknown_fields, so sending a field an older version does not know
// fails the whole request with 400: the driver consults this table before
// it fills any field that not every supported version has.
type Capabilities struct {
	// Version is the version that was asked for; Table names the row of the
	// table that answered ("1.14", "1.16", "1.17-dev").
	Version Version
	Table   string

	Entropy bool // PUT /entropy (virtio-rng)
	// NetMTU is NetworkInterface.mtu (v1.16+).
	NetMTU bool
	// SerialRateLimiter is SerialDevice.rate_limiter (v1.16+).
	SerialRateLimiter bool
	// PmemRateLimiter is Pmem.rate_limiter and PATCH /pmem/{id} (v1.16+).
	PmemRateLimiter bool
	// SnapshotVsockOverride and SnapshotClockRealtime are fields of
	// SnapshotLoadParams (v1.16+).
	SnapshotVsockOverride bool
	SnapshotClockRealtime bool
	// SnapshotHugePages is SnapshotLoadParams.huge_pages (1.17).
	SnapshotHugePages bool
	// MetricsEmitID is Metrics.emit_id and Metrics.properties (1.17).
	MetricsEmitID bool
	// HugePagesTransparent is the "Transparent" value of
	// MachineConfiguration.huge_pages (1.17).
	HugePagesTransparent bool
	// KernelBzImage: x86_64 boots a bzImage as well as an ELF vmlinux (1.17,
	// firecracker #6037). Earlier versions boot only the ELF.
	KernelBzImage bool
}

// MinVersion is the oldest Firecracker the driver supports.
var MinVersion = Version{Major: 1, Minor: 14}

// ErrUnsupportedVersion is returned for Firecracker older than MinVersion.
var ErrUnsupportedVersion = errors.New("unsupported firecracker version")

// capabilityTable holds one row per spec we have (testdata: the v1.14.2,
// v1.16.1 and 1.17.0-dev swagger files), oldest first. A version uses the
// newest row whose From it has reached, so an unknown release between two
// rows gets the older, safe row, and anything newer than the last row gets
// the last one.
var capabilityTable = []struct {
	From Version
	Caps Capabilities
}{
	{Version{Major: 1, Minor: 14}, Capabilities{Table: "1.14", Entropy: true}},
	{Version{Major: 1, Minor: 16}, Capabilities{
		Table: "1.16", Entropy: true, NetMTU: true, SerialRateLimiter: true,
		PmemRateLimiter: true, SnapshotVsockOverride: true, SnapshotClockRealtime: true,
	}},
	{Version{Major: 1, Minor: 17, Pre: "dev"}, Capabilities{
		Table: "1.17-dev", Entropy: true, NetMTU: true, SerialRateLimiter: true,
		PmemRateLimiter: true, SnapshotVsockOverride: true, SnapshotClockRealtime: true,
		SnapshotHugePages: true, MetricsEmitID: true, HugePagesTransparent: true,
		KernelBzImage: true,
	}},
}

// CapabilitiesFor returns what v accepts, or ErrUnsupportedVersion when v is
// older than MinVersion.
func CapabilitiesFor(v Version) (Capabilities, error) {
	if v.Compare(MinVersion) < 0 {
		return Capabilities{}, fmt.Errorf("firecracker %s: %w (banger needs %s or newer; hint: install a newer firecracker or use --vmm qemu)",
			v, ErrUnsupportedVersion, MinVersion)
	}
	var caps Capabilities
	for _, row := range capabilityTable {
		if v.Compare(row.From) >= 0 {
			caps = row.Caps
		}
	}
	caps.Version = v
	return caps, nil
}
