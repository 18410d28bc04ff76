package helper

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/testutil"
)

// The ioctl numbers match include/uapi/linux/dm-ioctl.h as the kernel and
// dmsetup compute them (_IOWR(0xfd, nr, struct dm_ioctl)).
func TestDMIoctlNumbers(t *testing.T) {
	for nr, want := range map[uint]uint{
		0:                0xc138fd00, // DM_VERSION
		dmListDevicesCmd: 0xc138fd02,
		dmDevCreateCmd:   0xc138fd03,
		dmDevRemoveCmd:   0xc138fd04,
		dmDevSuspendCmd:  0xc138fd06,
		dmDevStatusCmd:   0xc138fd07,
		dmTableLoadCmd:   0xc138fd09,
	} {
		if got := dmIoctlNum(nr); got != want {
			t.Errorf("ioctl %d = %#x, want %#x", nr, got, want)
		}
	}
}

// A request carries the version, sizes, flags, name and uuid at the offsets
// of struct dm_ioctl, and the data right after the 312-byte header.
func TestDMRequestLayout(t *testing.T) {
	data := []byte("payload!")
	b, err := dmRequest("banger-0123456789", "BANGER-0123456789", dmDeferredRemove, 1, data, 0)
	if err != nil {
		t.Fatal(err)
	}
	ne := binary.NativeEndian
	got := map[string]any{
		"len":          len(b),
		"version":      [3]uint32{ne.Uint32(b[0:]), ne.Uint32(b[4:]), ne.Uint32(b[8:])},
		"data_size":    ne.Uint32(b[12:]),
		"data_start":   ne.Uint32(b[16:]),
		"target_count": ne.Uint32(b[20:]),
		"flags":        ne.Uint32(b[28:]),
		"dev":          ne.Uint64(b[40:]),
		"name":         string(bytes.TrimRight(b[48:48+128], "\x00")),
		"uuid":         string(bytes.TrimRight(b[176:176+129], "\x00")),
		"data":         string(b[312:]),
	}
	want := map[string]any{
		"len":          320,
		"version":      [3]uint32{4, 0, 0},
		"data_size":    uint32(320),
		"data_start":   uint32(312),
		"target_count": uint32(1),
		"flags":        uint32(1 << 17),
		"dev":          uint64(0),
		"name":         "banger-0123456789",
		"uuid":         "BANGER-0123456789",
		"data":         "payload!",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if _, err := dmRequest(string(make([]byte, 128)), "", 0, 0, nil, 0); err == nil {
		t.Error("a 128-byte name (no room for NUL) was accepted")
	}
	if b, _ := dmRequest("", "", 0, 0, nil, 16384); len(b) != 16384 || ne.Uint32(b[12:]) != 16384 {
		t.Error("answer room not reflected in data_size")
	}
}

// The snapshot table is "0 <sectors> snapshot <origin> <cow> P 8" with the
// devices by major:minor, encoded as struct dm_target_spec + parameters
// padded to 8 bytes.
func TestDMSnapshotTable(t *testing.T) {
	tgt := snapshotTarget(16384, unix.Mkdev(7, 3), unix.Mkdev(7, 260))
	if diff := cmp.Diff(dmTarget{Start: 0, Length: 16384, Type: "snapshot", Params: "7:3 7:260 P 8"}, tgt); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	got, err := dmTableData([]dmTarget{tgt, {Start: 16384, Length: 8, Type: "zero"}})
	if err != nil {
		t.Fatal(err)
	}
	var want []byte
	ne := binary.NativeEndian
	spec := func(start, length uint64, typ, params string) {
		padded := (len(params) + 1 + 7) &^ 7
		s := make([]byte, 40+padded)
		ne.PutUint64(s[0:], start)
		ne.PutUint64(s[8:], length)
		ne.PutUint32(s[20:], uint32(len(s)))
		copy(s[24:], typ)
		copy(s[40:], params)
		want = append(want, s...)
	}
	spec(0, 16384, "snapshot", "7:3 7:260 P 8") // 13 chars + NUL → 16
	spec(16384, 8, "zero", "")                  // NUL → 8
	if !bytes.Equal(got, want) {
		t.Errorf("table data\n got %x\nwant %x", got, want)
	}
	if len(got) != 40+16+40+8 {
		t.Errorf("table data is %d bytes, want %d", len(got), 40+16+40+8)
	}
	for _, bad := range []dmTarget{{Type: ""}, {Type: "a-very-long-target"}, {Type: "linear", Params: "x\x00y"}} {
		if _, err := dmTableData([]dmTarget{bad}); err == nil {
			t.Errorf("dmTableData(%+v) succeeded", bad)
		}
	}
}

// nameList builds a DM_LIST_DEVICES answer as the kernel lays it out.
func nameList(devs ...dmDevice) []byte {
	b, _ := dmRequest("", "", 0, 0, nil, 0)
	ne := binary.NativeEndian
	var data []byte
	for i, d := range devs {
		entry := make([]byte, (12+len(d.Name)+1+8+7)&^7) // name, then event_nr and flags as newer kernels add
		ne.PutUint64(entry[0:], d.Dev)
		if i < len(devs)-1 {
			ne.PutUint32(entry[8:], uint32(len(entry)))
		}
		copy(entry[12:], d.Name)
		data = append(data, entry...)
	}
	if len(devs) == 0 {
		data = make([]byte, 16) // a zeroed entry: no devices
	}
	b = append(b, data...)
	ne.PutUint32(b[dmOffDataSize:], uint32(len(b)))
	return b
}

// parseDMNameList reads the kernel's list and refuses malformed ones
// without reading out of bounds.
func TestParseDMNameList(t *testing.T) {
	two := []dmDevice{{Name: "banger-0123456789", Dev: unix.Mkdev(253, 0)}, {Name: "vg-root", Dev: unix.Mkdev(253, 1)}}
	got, err := parseDMNameList(nameList(two...))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(two, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got, err := parseDMNameList(nameList()); err != nil || got != nil {
		t.Errorf("empty list: %v, %v", got, err)
	}
	bad := nameList(two...)
	binary.NativeEndian.PutUint32(bad[312+8:], 1<<20) // next points far beyond
	if _, err := parseDMNameList(bad); err == nil {
		t.Error("out-of-bounds next accepted")
	}
	unterminated := nameList(dmDevice{Name: "x", Dev: 1})
	for i := 312 + 12; i < len(unterminated); i++ {
		unterminated[i] = 'a'
	}
	if _, err := parseDMNameList(unterminated); err == nil {
		t.Error("unterminated name accepted")
	}
}

// FuzzParseDMNameList: whatever the buffer, parsing returns or errs, never
// panics or reads out of bounds.
func FuzzParseDMNameList(f *testing.F) {
	f.Add(nameList(dmDevice{Name: "banger-0123456789", Dev: 1}, dmDevice{Name: "b", Dev: 2}))
	f.Add(nameList())
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseDMNameList(b)
	})
}

func haveDM() bool {
	_, err := os.Stat(dmSysfs)
	return err == nil
}

// On a host without device-mapper, CreateSnapshot says so and attaches
// nothing; RemoveSnapshot has nothing to do.
func TestCreateSnapshotUnsupported(t *testing.T) {
	if haveDM() {
		t.Skip("device-mapper is present; TestSnapshot covers this host")
	}
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	h.vmFile(testID, "origin.ext4", 4<<20)
	h.vmFile(testID, "cow.img", 4<<20)
	_, f, err := h.client.CreateSnapshot(t.Context(), helperapi.CreateSnapshot{VMID: testID, Origin: "origin.ext4", COW: "cow.img"})
	if !errors.Is(err, helperapi.ErrUnsupported) || f != nil {
		t.Fatalf("CreateSnapshot: %v, want ErrUnsupported", err)
	}
	if got := loopsUnder(t, h.stateDir); len(got) != 0 {
		t.Errorf("loops left behind: %v", got)
	}
	if err := h.client.RemoveSnapshot(t.Context(), helperapi.RemoveSnapshot{VMID: testID}); err != nil {
		t.Errorf("RemoveSnapshot: %v", err)
	}
}

// A real dm-snapshot reads the origin, takes writes into the COW file
// only, is listed as banger's, and on RemoveSnapshot plus last close
// disappears with its loop devices.
func TestSnapshot(t *testing.T) {
	if !haveDM() {
		t.Skip("device-mapper is not available on this host (no " + dmSysfs + "); hosts with dm-mod (CI) run this")
	}
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	ctx := t.Context()
	origin := h.vmFile(testID, "origin.ext4", 8<<20)
	h.vmFile(testID, "cow.img", 4<<20)
	pattern := bytes.Repeat([]byte("origin-block "), 315)
	of, err := os.OpenFile(origin, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := of.WriteAt(pattern, 0); err != nil {
		t.Fatal(err)
	}
	of.Close()

	res, f, err := h.client.CreateSnapshot(ctx, helperapi.CreateSnapshot{VMID: testID, Origin: "origin.ext4", COW: "cow.img"})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if res.Name != "banger-"+testID || res.Sectors != (8<<20)/512 {
		t.Errorf("result %+v", res)
	}
	got := make([]byte, len(pattern))
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, int64(len(got))), got); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("snapshot does not read the origin (%v)", err)
	}
	if _, err := f.WriteAt([]byte("guest write"), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(origin); !bytes.HasPrefix(b, pattern[:32]) {
		t.Error("a write to the snapshot reached the origin")
	}
	owned, err := h.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(owned.Snapshots) != 1 || owned.Snapshots[0].VMID != testID || owned.Snapshots[0].Open < 1 {
		t.Errorf("ListOwned snapshots: %+v", owned.Snapshots)
	}
	if n := len(owned.Loops); n != 2 {
		t.Errorf("ListOwned loops: %+v, want origin and cow", owned.Loops)
	}
	if err := h.client.RemoveSnapshot(ctx, helperapi.RemoveSnapshot{VMID: testID}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	testutil.WaitFor(t, 10*time.Second, "snapshot and its loops gone", func() bool {
		o, err := h.client.ListOwned(ctx)
		return err == nil && len(o.Snapshots) == 0 && len(loopsUnder(t, h.stateDir)) == 0
	})
}
