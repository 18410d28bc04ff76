package image

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
)

// The qcow2 v3 format as QEMU's docs/interop/qcow2.txt specifies it. Every
// integer in the file is big-endian.
const (
	qcow2Magic   = "QFI\xfb"
	qcow2Version = 3
	// qcow2ClusterBits is QEMU's default cluster size, 64 KiB: the unit of
	// allocation for data and for every metadata table.
	qcow2ClusterBits = 16
	qcow2ClusterSize = 1 << qcow2ClusterBits
	// qcow2RefcountOrder 4 makes refcounts 16 bits wide, QEMU's default.
	qcow2RefcountOrder = 4
	qcow2RefcountBytes = (1 << qcow2RefcountOrder) / 8
	// qcow2HeaderLength is the v3 header up to and including the
	// compression type byte (0, zlib) and its padding to 8 bytes.
	qcow2HeaderLength = 112
	// qcow2L2Entries is the number of 8-byte entries in an L2 table, one
	// cluster; each L1 entry therefore maps qcow2L2Entries clusters.
	qcow2L2Entries = qcow2ClusterSize / 8

	qcow2ExtEnd           = 0x00000000
	qcow2ExtBackingFormat = 0xe2792aca

	// qcow2MaxBackingName is the longest backing file name QEMU opens.
	qcow2MaxBackingName = 1023
	// qcow2MaxL1Bytes is QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE),
	// which caps the virtual size at 2 PiB with 64 KiB clusters.
	qcow2MaxL1Bytes = 32 << 20
)

// The clusters of an empty overlay, in the order qemu-img create lays them
// out: the header (with its extensions and the backing file name), the
// refcount table, its one refcount block, then the L1 table.
const (
	qcow2RefTableOffset = 1 * qcow2ClusterSize
	qcow2RefBlockOffset = 2 * qcow2ClusterSize
	qcow2L1Offset       = 3 * qcow2ClusterSize
)

// qcow2Overlay is an empty qcow2 v3 image whose every cluster is
// unallocated, so that QEMU reads all of it from a raw backing file and
// writes only to the image. It is all metadata, a few hundred bytes of it
// plus an all-zero L1 table, whatever the virtual size.
type qcow2Overlay struct {
	backing string // absolute path of the raw backing file
	size    uint64 // virtual size in bytes, a multiple of 512
	l1Size  uint32 // entries in the L1 table
}

// qcow2Piece is a range of the image file that holds non-zero bytes.
type qcow2Piece struct {
	off  int64
	data []byte
}

// newQCOW2Overlay checks that QEMU will open an overlay of size bytes over
// backing and computes its layout.
func newQCOW2Overlay(backing string, size int64) (qcow2Overlay, error) {
	if size < 0 || size%sectorSize != 0 {
		return qcow2Overlay{}, fmt.Errorf("qcow2 virtual size %d is not a multiple of %d bytes", size, sectorSize)
	}
	if backing == "" {
		return qcow2Overlay{}, errors.New("qcow2 backing file name is empty")
	}
	if len(backing) > qcow2MaxBackingName {
		return qcow2Overlay{}, fmt.Errorf("qcow2 backing file name is %d bytes long, more than the %d QEMU opens", len(backing), qcow2MaxBackingName)
	}
	if strings.IndexByte(backing, 0) >= 0 {
		return qcow2Overlay{}, errors.New("qcow2 backing file name contains a NUL byte")
	}
	const l1Span = qcow2L2Entries * qcow2ClusterSize // bytes mapped by one L1 entry
	l1Size := (uint64(size) + l1Span - 1) / l1Span
	if l1Size*8 > qcow2MaxL1Bytes {
		return qcow2Overlay{}, fmt.Errorf("qcow2 virtual size %d needs a %d-byte L1 table, more than the %d QEMU opens", size, l1Size*8, qcow2MaxL1Bytes)
	}
	return qcow2Overlay{backing: backing, size: uint64(size), l1Size: uint32(l1Size)}, nil
}

// l1Clusters is the number of clusters the L1 table takes.
func (o qcow2Overlay) l1Clusters() int64 {
	return (int64(o.l1Size)*8 + qcow2ClusterSize - 1) / qcow2ClusterSize
}

// fileSize is the length of the image file: every cluster the image uses,
// whole. The L1 table's clusters are left as a hole, which reads as the
// zeros of an empty table.
func (o qcow2Overlay) fileSize() int64 {
	return qcow2L1Offset + o.l1Clusters()*qcow2ClusterSize
}

// pieces encodes the image: the header cluster, the refcount table's one
// entry and the refcount block's entries. Everything else in the file is
// zero.
func (o qcow2Overlay) pieces() []qcow2Piece {
	be := binary.BigEndian
	// The header extensions follow the header, each padded to 8 bytes; the
	// backing file name follows them, unterminated, as qemu-img writes it.
	const backingFormat = "raw"
	const extLen = 8 + (len(backingFormat)+7)/8*8
	backingOffset := uint64(qcow2HeaderLength + extLen + 8)
	l1Offset := uint64(qcow2L1Offset)
	if o.l1Size == 0 {
		// No table at all, as qemu-img writes a zero-sized image.
		l1Offset = 0
	}

	h := make([]byte, 0, int(backingOffset)+len(o.backing))
	h = append(h, qcow2Magic...)
	h = be.AppendUint32(h, qcow2Version)
	h = be.AppendUint64(h, backingOffset)                    // backing_file_offset
	h = be.AppendUint32(h, uint32(len(o.backing)))           // backing_file_size
	h = be.AppendUint32(h, qcow2ClusterBits)                 // cluster_bits
	h = be.AppendUint64(h, o.size)                           // size
	h = be.AppendUint32(h, 0)                                // crypt_method: none
	h = be.AppendUint32(h, o.l1Size)                         // l1_size
	h = be.AppendUint64(h, l1Offset)                         // l1_table_offset
	h = be.AppendUint64(h, qcow2RefTableOffset)              // refcount_table_offset
	h = be.AppendUint32(h, 1)                                // refcount_table_clusters
	h = be.AppendUint32(h, 0)                                // nb_snapshots
	h = be.AppendUint64(h, 0)                                // snapshots_offset
	h = be.AppendUint64(h, 0)                                // incompatible_features
	h = be.AppendUint64(h, 0)                                // compatible_features
	h = be.AppendUint64(h, 0)                                // autoclear_features
	h = be.AppendUint32(h, qcow2RefcountOrder)               // refcount_order
	h = be.AppendUint32(h, qcow2HeaderLength)                // header_length
	h = append(h, 0)                                         // compression_type: zlib
	h = append(h, make([]byte, qcow2HeaderLength-len(h))...) // padding

	// The backing format is what makes QEMU open the backing file as raw
	// without probing it: a guest that wrote a qcow2 header into its rootfs
	// must not make this overlay read whatever file that header names.
	h = be.AppendUint32(h, qcow2ExtBackingFormat)
	h = be.AppendUint32(h, uint32(len(backingFormat)))
	h = append(h, backingFormat...)
	h = append(h, make([]byte, extLen-8-len(backingFormat))...)
	h = be.AppendUint32(h, qcow2ExtEnd)
	h = be.AppendUint32(h, 0)
	h = append(h, o.backing...)

	// One refcount block covers qcow2ClusterSize/qcow2RefcountBytes
	// clusters (2 GiB of image file), far more than the header, the
	// refcount structures and the largest L1 table QEMU opens: each of those
	// clusters is used once.
	used := 3 + o.l1Clusters()
	refTable := be.AppendUint64(nil, qcow2RefBlockOffset)
	refBlock := make([]byte, 0, used*qcow2RefcountBytes)
	for range used {
		refBlock = be.AppendUint16(refBlock, 1)
	}
	return []qcow2Piece{{0, h}, {qcow2RefTableOffset, refTable}, {qcow2RefBlockOffset, refBlock}}
}

// writeTo writes the overlay into f, an empty file, without syncing it.
func (o qcow2Overlay) writeTo(f *os.File) error {
	for _, p := range o.pieces() {
		if _, err := f.WriteAt(p.data, p.off); err != nil {
			return err
		}
	}
	// Extending the file past the L1 table leaves the table a hole of
	// zeros, so that a 2 PiB disk costs no more than a small one.
	return f.Truncate(o.fileSize())
}
