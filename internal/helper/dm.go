package helper

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// Device-mapper through its ioctls on /dev/mapper/control, as dmsetup
// does (include/uapi/linux/dm-ioctl.h). Each call sends one buffer: a
// struct dm_ioctl header followed by the command's data; the kernel writes
// its answer into the same buffer.

const (
	dmHeaderSize = 312 // sizeof(struct dm_ioctl)
	dmNameLen    = 128
	dmUUIDLen    = 129
	dmSpecSize   = 40 // sizeof(struct dm_target_spec)
	dmTypeLen    = 16

	// Field offsets in struct dm_ioctl.
	dmOffDataSize    = 12
	dmOffDataStart   = 16
	dmOffTargetCount = 20
	dmOffOpenCount   = 24
	dmOffFlags       = 28
	dmOffDev         = 40
	dmOffName        = 48
	dmOffUUID        = dmOffName + dmNameLen

	// The interface version this code speaks; the kernel accepts any
	// request with the same major version.
	dmVersionMajor = 4

	dmBufferFullFlag = 1 << 8
	dmDeferredRemove = 1 << 17

	dmControl = "/dev/mapper/control"
	dmSysfs   = "/sys/class/misc/device-mapper/dev"

	// snapshotChunk is the COW chunk size in 512-byte sectors (4 KiB).
	snapshotChunk = 8
)

// The ioctl commands: _IOWR(0xfd, nr, struct dm_ioctl).
const (
	dmListDevicesCmd = 2
	dmDevCreateCmd   = 3
	dmDevRemoveCmd   = 4
	dmDevSuspendCmd  = 6
	dmDevStatusCmd   = 7
	dmTableLoadCmd   = 9
)

func dmIoctlNum(nr uint) uint {
	const iocReadWrite = 3
	return iocReadWrite<<30 | dmHeaderSize<<16 | 0xfd<<8 | nr
}

// dmTarget is one line of a device-mapper table.
type dmTarget struct {
	Start, Length uint64 // in 512-byte sectors
	Type          string
	Params        string
}

// snapshotTarget is "0 <sectors> snapshot <origin> <cow> P 8": a
// persistent snapshot (its exception table lives in the COW device, so it
// survives a host reboot) over devices named by major:minor.
func snapshotTarget(sectors, origin, cow uint64) dmTarget {
	return dmTarget{
		Start:  0,
		Length: sectors,
		Type:   "snapshot",
		Params: fmt.Sprintf("%d:%d %d:%d P %d", unix.Major(origin), unix.Minor(origin), unix.Major(cow), unix.Minor(cow), snapshotChunk),
	}
}

// dmRequest builds an ioctl buffer: the header for name/uuid/flags, then
// data, in a buffer of at least size bytes (room for the kernel's answer).
func dmRequest(name, uuid string, flags uint32, targets int, data []byte, size int) ([]byte, error) {
	if len(name) >= dmNameLen || len(uuid) >= dmUUIDLen {
		return nil, fmt.Errorf("device-mapper name %q or uuid %q too long", name, uuid)
	}
	size = max(size, dmHeaderSize+len(data))
	b := make([]byte, size)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], dmVersionMajor)
	ne.PutUint32(b[4:], 0)
	ne.PutUint32(b[8:], 0)
	ne.PutUint32(b[dmOffDataSize:], uint32(size))
	ne.PutUint32(b[dmOffDataStart:], dmHeaderSize)
	ne.PutUint32(b[dmOffTargetCount:], uint32(targets))
	ne.PutUint32(b[dmOffFlags:], flags)
	copy(b[dmOffName:dmOffName+dmNameLen-1], name)
	copy(b[dmOffUUID:dmOffUUID+dmUUIDLen-1], uuid)
	copy(b[dmHeaderSize:], data)
	return b, nil
}

// dmTableData encodes targets as DM_TABLE_LOAD wants them: each a struct
// dm_target_spec followed by its NUL-terminated parameters, padded to 8
// bytes; "next" is the distance from one spec to the next.
func dmTableData(targets []dmTarget) ([]byte, error) {
	var out []byte
	ne := binary.NativeEndian
	for _, t := range targets {
		if len(t.Type) >= dmTypeLen || t.Type == "" {
			return nil, fmt.Errorf("device-mapper target type %q", t.Type)
		}
		if strings.ContainsRune(t.Params, 0) {
			return nil, errors.New("device-mapper target parameters contain NUL")
		}
		params := len(t.Params) + 1
		params = (params + 7) &^ 7
		spec := make([]byte, dmSpecSize+params)
		ne.PutUint64(spec[0:], t.Start)
		ne.PutUint64(spec[8:], t.Length)
		ne.PutUint32(spec[16:], 0) // status: output only
		ne.PutUint32(spec[20:], uint32(len(spec)))
		copy(spec[24:24+dmTypeLen], t.Type)
		copy(spec[dmSpecSize:], t.Params)
		out = append(out, spec...)
	}
	return out, nil
}

// dmDevice is one entry of DM_LIST_DEVICES.
type dmDevice struct {
	Name string
	Dev  uint64
}

// parseDMNameList decodes the struct dm_name_list entries that
// DM_LIST_DEVICES writes at data_start: {u64 dev; u32 next; char name[]},
// "next" being the distance to the following entry, 0 after the last. A
// lone entry with dev 0 means no devices.
func parseDMNameList(b []byte) ([]dmDevice, error) {
	if len(b) < dmHeaderSize {
		return nil, errors.New("device-mapper answer shorter than its header")
	}
	ne := binary.NativeEndian
	start := int(ne.Uint32(b[dmOffDataStart:]))
	size := min(int(ne.Uint32(b[dmOffDataSize:])), len(b))
	var out []dmDevice
	for off := start; ; {
		if off < dmHeaderSize || off+12 > size {
			if off == start && off == size {
				return nil, nil // no data at all: no devices
			}
			return nil, fmt.Errorf("device-mapper name list entry at %d out of bounds (%d)", off, size)
		}
		dev := ne.Uint64(b[off:])
		next := int(ne.Uint32(b[off+8:]))
		if dev == 0 && off == start {
			return nil, nil
		}
		name := b[off+12 : size]
		end := bytes.IndexByte(name, 0)
		if end < 0 {
			return nil, fmt.Errorf("device-mapper name at %d is not terminated", off)
		}
		out = append(out, dmDevice{Name: string(name[:end]), Dev: dev})
		if next == 0 {
			return out, nil
		}
		if next < 12 {
			return nil, fmt.Errorf("device-mapper name list entry at %d: bad next %d", off, next)
		}
		off += next
	}
}

// dmCtl is an open /dev/mapper/control.
type dmCtl struct{ f *os.File }

// openDM opens the control device, making its node from sysfs when udev
// has not (as "dmsetup mknodes" would). Without device-mapper in the
// kernel it fails with ErrUnsupported.
func openDM() (*dmCtl, error) {
	f, err := os.OpenFile(dmControl, os.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		b, serr := os.ReadFile(dmSysfs)
		if serr != nil {
			return nil, helperapi.Errorf(helperapi.CodeUnsupported, "device-mapper is not available on this host (no %s, no %s)", dmControl, dmSysfs)
		}
		var major, minor uint32
		if _, perr := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); perr != nil {
			return nil, fmt.Errorf("parse %s: %w", dmSysfs, perr)
		}
		if err := os.MkdirAll("/dev/mapper", 0o755); err != nil {
			return nil, fmt.Errorf("create /dev/mapper: %w", err)
		}
		if err := unix.Mknod(dmControl, unix.S_IFCHR|0o600, int(unix.Mkdev(major, minor))); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create %s: %w", dmControl, err)
		}
		f, err = os.OpenFile(dmControl, os.O_RDWR|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dmControl, err)
	}
	return &dmCtl{f: f}, nil
}

func (c *dmCtl) Close() error { return c.f.Close() }

func (c *dmCtl) ioctl(nr uint, buf []byte) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, c.f.Fd(), uintptr(dmIoctlNum(nr)), uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

func (c *dmCtl) create(name, uuid string) error {
	buf, err := dmRequest(name, uuid, 0, 0, nil, 0)
	if err == nil {
		err = c.ioctl(dmDevCreateCmd, buf)
	}
	if errors.Is(err, unix.EBUSY) {
		return helperapi.Errorf(helperapi.CodeExists, "create device-mapper device %q: it already exists", name)
	}
	if err != nil {
		return fmt.Errorf("create device-mapper device %q: %w", name, err)
	}
	return nil
}

func (c *dmCtl) load(name string, targets []dmTarget) error {
	data, err := dmTableData(targets)
	if err != nil {
		return err
	}
	buf, err := dmRequest(name, "", 0, len(targets), data, 0)
	if err == nil {
		err = c.ioctl(dmTableLoadCmd, buf)
	}
	if err != nil {
		return fmt.Errorf("load table of %q: %w", name, err)
	}
	return nil
}

// resume activates the loaded table and returns the device number.
func (c *dmCtl) resume(name string) (uint64, error) {
	buf, err := dmRequest(name, "", 0, 0, nil, 0)
	if err == nil {
		err = c.ioctl(dmDevSuspendCmd, buf) // without DM_SUSPEND_FLAG: resume
	}
	if err != nil {
		return 0, fmt.Errorf("resume %q: %w", name, err)
	}
	return binary.NativeEndian.Uint64(buf[dmOffDev:]), nil
}

// remove removes a device; deferred, a device still open is removed on
// its last close. A missing device is not an error.
func (c *dmCtl) remove(name string, deferred bool) error {
	var flags uint32
	if deferred {
		flags = dmDeferredRemove
	}
	buf, err := dmRequest(name, "", flags, 0, nil, 0)
	if err == nil {
		err = c.ioctl(dmDevRemoveCmd, buf)
	}
	if errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove device-mapper device %q: %w", name, err)
	}
	return nil
}

func (c *dmCtl) openCount(name string) (int, error) {
	buf, err := dmRequest(name, "", 0, 0, nil, 0)
	if err == nil {
		err = c.ioctl(dmDevStatusCmd, buf)
	}
	if err != nil {
		return 0, fmt.Errorf("status of %q: %w", name, err)
	}
	return int(int32(binary.NativeEndian.Uint32(buf[dmOffOpenCount:]))), nil
}

func (c *dmCtl) list() ([]dmDevice, error) {
	for size := 16 << 10; size <= 4<<20; size *= 2 {
		buf, err := dmRequest("", "", 0, 0, nil, size)
		if err != nil {
			return nil, err
		}
		if err := c.ioctl(dmListDevicesCmd, buf); err != nil {
			return nil, fmt.Errorf("list device-mapper devices: %w", err)
		}
		if binary.NativeEndian.Uint32(buf[dmOffFlags:])&dmBufferFullFlag != 0 {
			continue
		}
		return parseDMNameList(buf)
	}
	return nil, errors.New("list device-mapper devices: answer too large")
}

func (s *Server) createSnapshot(op helperapi.CreateSnapshot) (res helperapi.CreateSnapshotResult, dev *os.File, err error) {
	// Check for device-mapper before touching anything, so a host without
	// it is told so with nothing attached.
	dm, err := openDM()
	if err != nil {
		return res, nil, err
	}
	defer func() { _ = dm.Close() }()
	origin, originPath, err := s.openVMFile(op.VMID, op.Origin, false)
	if err != nil {
		return res, nil, err
	}
	defer origin.Close()
	cow, cowPath, err := s.openVMFile(op.VMID, op.COW, true)
	if err != nil {
		return res, nil, err
	}
	defer cow.Close()

	// The loops are autoclear: once the snapshot holds them, closing these
	// descriptors leaves the snapshot as their only user, and removing it
	// detaches them. On failure, closing them detaches them at once.
	_, originLoop, err := attachLoopFile(origin, originPath, true)
	if err != nil {
		return res, nil, err
	}
	defer originLoop.Close()
	_, cowLoop, err := attachLoopFile(cow, cowPath, false)
	if err != nil {
		return res, nil, err
	}
	defer cowLoop.Close()

	size, err := unix.IoctlGetUint64(int(originLoop.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return res, nil, fmt.Errorf("size of %s: %w", originPath, err)
	}
	if size == 0 || size%512 != 0 {
		return res, nil, helperapi.Errorf(helperapi.CodeInvalid, "origin %s: size %d is not a positive multiple of 512", originPath, size)
	}
	originDev, err := rdev(originLoop)
	if err != nil {
		return res, nil, err
	}
	cowDev, err := rdev(cowLoop)
	if err != nil {
		return res, nil, err
	}

	name := helperapi.DMName(op.VMID)
	if err := dm.create(name, helperapi.DMUUIDPrefix+op.VMID); err != nil {
		return res, nil, err
	}
	defer func() {
		if err != nil {
			_ = dm.remove(name, false) // undo: nothing holds it yet
		}
	}()
	if err := dm.load(name, []dmTarget{snapshotTarget(size/512, originDev, cowDev)}); err != nil {
		return res, nil, err
	}
	num, err := dm.resume(name)
	if err != nil {
		return res, nil, err
	}
	path := fmt.Sprintf("/dev/dm-%d", unix.Minor(num))
	dev, err = os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return res, nil, fmt.Errorf("open %s: %w", path, err)
	}
	if got, err := rdev(dev); err != nil || unix.Major(got) != unix.Major(num) || unix.Minor(got) != unix.Minor(num) {
		dev.Close()
		return res, nil, fmt.Errorf("open %s: not the device %d:%d of %q", path, unix.Major(num), unix.Minor(num), name)
	}
	return helperapi.CreateSnapshotResult{Name: name, Device: path, Sectors: size / 512}, dev, nil
}

func rdev(f *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("%s is not a block device", f.Name())
	}
	return st.Rdev, nil
}

func (s *Server) removeSnapshot(op helperapi.RemoveSnapshot) error {
	dm, err := openDM()
	if errors.Is(err, helperapi.ErrUnsupported) {
		return nil // no device-mapper: no snapshot can exist
	}
	if err != nil {
		return err
	}
	defer func() { _ = dm.Close() }()
	return dm.remove(helperapi.DMName(op.VMID), true)
}

// ownedSnapshots lists device-mapper devices named banger-<vm id>; none
// when the host has no device-mapper.
func ownedSnapshots() ([]helperapi.OwnedSnapshot, error) {
	dm, err := openDM()
	if errors.Is(err, helperapi.ErrUnsupported) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = dm.Close() }()
	devs, err := dm.list()
	if err != nil {
		return nil, err
	}
	var out []helperapi.OwnedSnapshot
	for _, d := range devs {
		id, ok := strings.CutPrefix(d.Name, helperapi.DMPrefix)
		if !ok || helperapi.ValidateVMID(id) != nil {
			continue
		}
		open, err := dm.openCount(d.Name)
		if err != nil {
			continue // removed meanwhile
		}
		out = append(out, helperapi.OwnedSnapshot{Name: d.Name, VMID: id, Open: open})
	}
	return out, nil
}
