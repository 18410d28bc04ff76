// Package ext4 is everything banger does to ext4 image files, without
// mounting them: read the superblock, make an image from a directory, check
// and grow it, and write or read individual files with debugfs.
//
// Images are plain files. Nothing here needs root: mkfs.ext4, e2fsck,
// resize2fs and debugfs all work on a regular file the caller may write.
package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"strings"
)

var (
	// ErrNotExt4 means the file does not hold an ext2/3/4 superblock.
	ErrNotExt4 = errors.New("not an ext4 file system")
	// ErrTruncated means the file is shorter than its file system says it is.
	ErrTruncated = errors.New("truncated ext4 image")
	// ErrUnsupported means the file system uses a feature banger cannot
	// safely write to, or a layout no kernel would mount.
	ErrUnsupported = errors.New("unsupported ext4 file system")
	// ErrNeedsRecovery means the journal holds transactions not yet replayed
	// (the file system was not cleanly unmounted). Writing past the journal
	// would be undone by the replay on the next mount; e2fsck -fy replays it.
	ErrNeedsRecovery = errors.New("ext4 journal needs recovery")
)

// The superblock is 1024 bytes at byte 1024 of the image, whatever the block
// size. Offsets below are within it (struct ext4_super_block in the kernel's
// fs/ext4/ext4.h).
const (
	superblockOffset = 1024
	superblockSize   = 1024
	ext4Magic        = 0xEF53

	offInodesCount     = 0x00
	offBlocksCountLo   = 0x04
	offFreeBlocksLo    = 0x0C
	offFreeInodes      = 0x10
	offFirstDataBlock  = 0x14
	offLogBlockSize    = 0x18
	offBlocksPerGroup  = 0x20
	offInodesPerGroup  = 0x28
	offMagic           = 0x38
	offState           = 0x3A
	offRevLevel        = 0x4C
	offInodeSize       = 0x58
	offFeatureCompat   = 0x5C
	offFeatureIncompat = 0x60
	offFeatureRoCompat = 0x64
	offUUID            = 0x68
	offVolumeName      = 0x78
	offBlocksCountHi   = 0x150
	offFreeBlocksHi    = 0x158
	offChecksumType    = 0x175
	offChecksum        = 0x3FC
)

// Feature bits, from the kernel's fs/ext4/ext4.h.
const (
	compatHasJournal = 0x4

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompatExtents     = 0x40
	incompat64Bit       = 0x80
	incompatMMP         = 0x100
	incompatFlexBG      = 0x200
	incompatEAInode     = 0x400
	incompatDirData     = 0x1000
	incompatCsumSeed    = 0x2000
	incompatLargeDir    = 0x4000
	incompatInlineData  = 0x8000
	incompatEncrypt     = 0x10000
	incompatCasefold    = 0x20000

	roCompatSparseSuper  = 0x1
	roCompatLargeFile    = 0x2
	roCompatBtreeDir     = 0x4
	roCompatHugeFile     = 0x8
	roCompatGdtCsum      = 0x10
	roCompatDirNlink     = 0x20
	roCompatExtraIsize   = 0x40
	roCompatHasSnapshot  = 0x80
	roCompatQuota        = 0x100
	roCompatBigalloc     = 0x200
	roCompatMetadataCsum = 0x400
	roCompatReplica      = 0x800
	roCompatReadonly     = 0x1000
	roCompatProject      = 0x2000
	roCompatSharedBlocks = 0x4000
	roCompatVerity       = 0x8000
	roCompatOrphan       = 0x10000
)

// supportedIncompat are the incompatible features that upstream Linux and
// e2fsprogs both implement, so debugfs can write such a file system and a
// guest kernel can mount it. Left out on purpose: compression (never
// implemented), journal_dev (an external journal, not a file system) and
// dirdata (Lustre only). recover is a state, handled as ErrNeedsRecovery.
const supportedIncompat = incompatFiletype | incompatRecover | incompatMetaBG |
	incompatExtents | incompat64Bit | incompatMMP | incompatFlexBG |
	incompatEAInode | incompatCsumSeed | incompatLargeDir |
	incompatInlineData | incompatEncrypt | incompatCasefold

// supportedRoCompat are the read-only-compatible features we may write to.
// An unknown one means "do not write unless you understand me"; has_snapshot
// and replica are out-of-tree, readonly asks exactly that.
const supportedRoCompat = roCompatSparseSuper | roCompatLargeFile |
	roCompatBtreeDir | roCompatHugeFile | roCompatGdtCsum | roCompatDirNlink |
	roCompatExtraIsize | roCompatQuota | roCompatBigalloc |
	roCompatMetadataCsum | roCompatProject | roCompatSharedBlocks |
	roCompatVerity | roCompatOrphan

var compatNames = map[uint32]string{
	0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal",
	0x8: "ext_attr", 0x10: "resize_inode", 0x20: "dir_index",
	0x40: "lazy_bg", 0x80: "exclude_inode", 0x100: "exclude_bitmap",
	0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes",
	0x1000: "orphan_file",
}

var incompatNames = map[uint32]string{
	incompatCompression: "compression", incompatFiletype: "filetype",
	incompatRecover: "needs_recovery", incompatJournalDev: "journal_dev",
	incompatMetaBG: "meta_bg", incompatExtents: "extent",
	incompat64Bit: "64bit", incompatMMP: "mmp", incompatFlexBG: "flex_bg",
	incompatEAInode: "ea_inode", incompatDirData: "dirdata",
	incompatCsumSeed: "metadata_csum_seed", incompatLargeDir: "large_dir",
	incompatInlineData: "inline_data", incompatEncrypt: "encrypt",
	incompatCasefold: "casefold",
}

var roCompatNames = map[uint32]string{
	roCompatSparseSuper: "sparse_super", roCompatLargeFile: "large_file",
	roCompatBtreeDir: "btree_dir", roCompatHugeFile: "huge_file",
	roCompatGdtCsum: "uninit_bg", roCompatDirNlink: "dir_nlink",
	roCompatExtraIsize: "extra_isize", roCompatHasSnapshot: "snapshot",
	roCompatQuota: "quota", roCompatBigalloc: "bigalloc",
	roCompatMetadataCsum: "metadata_csum", roCompatReplica: "replica",
	roCompatReadonly: "read-only", roCompatProject: "project",
	roCompatSharedBlocks: "shared_blocks", roCompatVerity: "verity",
	roCompatOrphan: "orphan_present",
}

// Info is what the superblock says about a file system.
type Info struct {
	BlockSize  uint32 // bytes: 1024 to 65536
	BlockCount uint64
	FreeBlocks uint64
	InodeCount uint32
	FreeInodes uint32
	UUID       string // canonical 8-4-4-4-12 lowercase hex
	Label      string // volume name, at most 16 bytes
	// Raw feature words; Features() names them.
	Compat, Incompat, RoCompat uint32
	// NeedsRecovery is set when the journal must be replayed (e2fsck -fy)
	// before anything writes to the file system.
	NeedsRecovery bool
	// ErrorsDetected is set when the kernel or e2fsck recorded an error and
	// no e2fsck has fixed it since.
	ErrorsDetected bool
}

// Size is the file system's size in bytes.
func (i Info) Size() int64 { return int64(i.BlockSize) * int64(i.BlockCount) }

// HasJournal reports whether the file system has a journal (ext3/ext4).
func (i Info) HasJournal() bool { return i.Compat&compatHasJournal != 0 }

// Features lists the feature flags by their mke2fs names (as dumpe2fs prints
// them), unknown bits as hex.
func (i Info) Features() []string {
	var out []string
	for _, w := range []struct {
		bits  uint32
		names map[uint32]string
		kind  string
	}{{i.Compat, compatNames, "compat"}, {i.Incompat, incompatNames, "incompat"}, {i.RoCompat, roCompatNames, "ro_compat"}} {
		for b := w.bits; b != 0; b &= b - 1 {
			bit := uint32(1) << bits.TrailingZeros32(b)
			if n, ok := w.names[bit]; ok {
				out = append(out, n)
			} else {
				out = append(out, fmt.Sprintf("%s_%#x", w.kind, bit))
			}
		}
	}
	return out
}

// CheckSuperblock reads and validates the primary superblock of the image at
// path and checks the file is as long as the file system. It returns
// ErrNotExt4, ErrTruncated or ErrUnsupported (wrapped) for files banger must
// not touch. NeedsRecovery is reported in Info, not as an error, because
// e2fsck (Fsck, Resize) handles it; WriteFiles refuses it.
func CheckSuperblock(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	// Seek to the end rather than Stat: a block device reports size 0.
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return Info{}, fmt.Errorf("size image %s: %w", path, err)
	}
	buf := make([]byte, superblockSize)
	n, err := f.ReadAt(buf, superblockOffset)
	if err != nil && !errors.Is(err, io.EOF) {
		return Info{}, fmt.Errorf("read superblock of %s: %w", path, err)
	}
	if n < superblockSize {
		if n >= offMagic+2 && binary.LittleEndian.Uint16(buf[offMagic:]) == ext4Magic {
			return Info{}, fmt.Errorf("%s: %w: %d bytes, superblock cut short", path, ErrTruncated, size)
		}
		return Info{}, fmt.Errorf("%s: %w: %d bytes is too short to hold a superblock", path, ErrNotExt4, size)
	}
	info, err := ParseSuperblock(buf)
	if err != nil {
		return Info{}, fmt.Errorf("%s: %w", path, err)
	}
	if size < info.Size() {
		return Info{}, fmt.Errorf("%s: %w: file is %d bytes, its file system spans %d", path, ErrTruncated, size, info.Size())
	}
	return info, nil
}

// ParseSuperblock decodes a 1024-byte ext2/3/4 superblock. The input is
// untrusted (an imported image): every field used for arithmetic is range
// checked, and a metadata_csum superblock must carry a valid checksum.
func ParseSuperblock(b []byte) (Info, error) {
	if len(b) < superblockSize {
		return Info{}, fmt.Errorf("%w: superblock is %d bytes, want %d", ErrTruncated, len(b), superblockSize)
	}
	b = b[:superblockSize]
	le := binary.LittleEndian
	if m := le.Uint16(b[offMagic:]); m != ext4Magic {
		return Info{}, fmt.Errorf("%w: magic %#04x, want %#04x", ErrNotExt4, m, ext4Magic)
	}
	var i Info
	i.Compat = le.Uint32(b[offFeatureCompat:])
	i.Incompat = le.Uint32(b[offFeatureIncompat:])
	i.RoCompat = le.Uint32(b[offFeatureRoCompat:])

	rev := le.Uint32(b[offRevLevel:])
	if rev > 1 {
		return Info{}, fmt.Errorf("%w: revision %d (only 0 and 1 exist)", ErrUnsupported, rev)
	}
	if rev == 0 && (i.Compat|i.Incompat|i.RoCompat) != 0 {
		return Info{}, fmt.Errorf("%w: revision 0 superblock with feature flags", ErrUnsupported)
	}
	if i.Incompat&incompatJournalDev != 0 {
		return Info{}, fmt.Errorf("%w: this is an external journal device, not a file system", ErrUnsupported)
	}
	if bad := i.Incompat &^ supportedIncompat; bad != 0 {
		return Info{}, fmt.Errorf("%w: incompatible features %s", ErrUnsupported, strings.Join(Info{Incompat: bad}.Features(), ", "))
	}
	if bad := i.RoCompat &^ supportedRoCompat; bad != 0 {
		return Info{}, fmt.Errorf("%w: read-only features %s", ErrUnsupported, strings.Join(Info{RoCompat: bad}.Features(), ", "))
	}

	logBS := le.Uint32(b[offLogBlockSize:])
	if logBS > 6 {
		return Info{}, fmt.Errorf("%w: block size 2^%d KiB is over the 64 KiB maximum", ErrUnsupported, logBS)
	}
	i.BlockSize = 1024 << logBS
	i.BlockCount = uint64(le.Uint32(b[offBlocksCountLo:]))
	i.FreeBlocks = uint64(le.Uint32(b[offFreeBlocksLo:]))
	if i.Incompat&incompat64Bit != 0 {
		i.BlockCount |= uint64(le.Uint32(b[offBlocksCountHi:])) << 32
		i.FreeBlocks |= uint64(le.Uint32(b[offFreeBlocksHi:])) << 32
	}
	// 2^48 blocks is ext4's addressing limit; anything above cannot be real
	// and would overflow Size().
	if i.BlockCount == 0 || i.BlockCount > 1<<48 {
		return Info{}, fmt.Errorf("%w: block count %d", ErrUnsupported, i.BlockCount)
	}
	if i.FreeBlocks > i.BlockCount {
		return Info{}, fmt.Errorf("%w: %d free blocks of %d", ErrUnsupported, i.FreeBlocks, i.BlockCount)
	}
	firstData := le.Uint32(b[offFirstDataBlock:])
	// 1 with 1 KiB blocks (the superblock fills block 1), else 0.
	if firstData > 1 || uint64(firstData) >= i.BlockCount {
		return Info{}, fmt.Errorf("%w: first data block %d of %d", ErrUnsupported, firstData, i.BlockCount)
	}
	bpg := le.Uint32(b[offBlocksPerGroup:])
	if bpg < 8 || bpg > 8*i.BlockSize {
		return Info{}, fmt.Errorf("%w: %d blocks per group with %d-byte blocks", ErrUnsupported, bpg, i.BlockSize)
	}
	ipg := le.Uint32(b[offInodesPerGroup:])
	i.InodeCount = le.Uint32(b[offInodesCount:])
	i.FreeInodes = le.Uint32(b[offFreeInodes:])
	if ipg == 0 || i.InodeCount == 0 || i.FreeInodes > i.InodeCount {
		return Info{}, fmt.Errorf("%w: %d inodes (%d free), %d per group", ErrUnsupported, i.InodeCount, i.FreeInodes, ipg)
	}
	if rev >= 1 {
		is := uint32(le.Uint16(b[offInodeSize:]))
		if is < 128 || is > i.BlockSize || is&(is-1) != 0 {
			return Info{}, fmt.Errorf("%w: inode size %d", ErrUnsupported, is)
		}
	}

	if i.RoCompat&roCompatMetadataCsum != 0 {
		if t := b[offChecksumType]; t != 1 {
			return Info{}, fmt.Errorf("%w: checksum type %d (only crc32c exists)", ErrUnsupported, t)
		}
		// e2fsprogs: ext2fs_crc32c_le(~0, sb, offsetof(s_checksum)), no
		// final inversion; Go's Checksum inverts on both ends.
		want := le.Uint32(b[offChecksum:])
		got := ^crc32.Checksum(b[:offChecksum], castagnoli)
		if got != want {
			return Info{}, fmt.Errorf("%w: superblock checksum %#08x, computed %#08x (corrupt superblock)", ErrUnsupported, want, got)
		}
	}

	state := le.Uint16(b[offState:])
	i.ErrorsDetected = state&0x2 != 0
	i.NeedsRecovery = i.Incompat&incompatRecover != 0
	i.UUID = formatUUID(b[offUUID : offUUID+16])
	label := b[offVolumeName : offVolumeName+16]
	if n := strings.IndexByte(string(label), 0); n >= 0 {
		label = label[:n]
	}
	i.Label = string(label)
	return i, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func formatUUID(u []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
