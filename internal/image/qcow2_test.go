package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/testutil"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata")

// qcow2Parsed is what parseQCOW2 reads back from an image: the v3 header
// fields, the header extensions and the refcount of every cluster with one.
type qcow2Parsed struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	Extensions    []uint32 // extension types, in file order, without the end marker
	BackingFormat string
	BackingFile   string
	// Refcounts maps cluster index to refcount, for non-zero refcounts.
	Refcounts map[int64]uint16
	// L1 holds the non-zero L1 entries, by index.
	L1 map[int]uint64
	// FileSize is the length of the image file.
	FileSize int64
}

// parseQCOW2 reads an image the way the specification describes it,
// independently of the encoder, for round-trip tests. It supports what
// qcow2Overlay writes (16-bit refcounts, any layout) and fails on anything
// it does not understand.
func parseQCOW2(img []byte) (qcow2Parsed, error) {
	be := binary.BigEndian
	var p qcow2Parsed
	if len(img) < 104 || string(img[:4]) != qcow2Magic {
		return p, errors.New("not a qcow2 image")
	}
	p.Version = be.Uint32(img[4:])
	p.BackingFileOffset = be.Uint64(img[8:])
	p.BackingFileSize = be.Uint32(img[16:])
	p.ClusterBits = be.Uint32(img[20:])
	p.Size = be.Uint64(img[24:])
	p.CryptMethod = be.Uint32(img[32:])
	p.L1Size = be.Uint32(img[36:])
	p.L1TableOffset = be.Uint64(img[40:])
	p.RefcountTableOffset = be.Uint64(img[48:])
	p.RefcountTableClusters = be.Uint32(img[56:])
	p.NbSnapshots = be.Uint32(img[60:])
	p.SnapshotsOffset = be.Uint64(img[64:])
	p.IncompatibleFeatures = be.Uint64(img[72:])
	p.CompatibleFeatures = be.Uint64(img[80:])
	p.AutoclearFeatures = be.Uint64(img[88:])
	p.RefcountOrder = be.Uint32(img[96:])
	p.HeaderLength = be.Uint32(img[100:])
	p.FileSize = int64(len(img))
	if p.Version != 3 || p.HeaderLength < 104 || p.HeaderLength%8 != 0 || p.ClusterBits < 9 || p.ClusterBits > 21 || p.RefcountOrder != 4 {
		return p, fmt.Errorf("unsupported header: version %d, length %d, cluster bits %d, refcount order %d", p.Version, p.HeaderLength, p.ClusterBits, p.RefcountOrder)
	}
	if p.HeaderLength > 104 {
		p.CompressionType = img[104]
	}
	cluster := uint64(1) << p.ClusterBits
	extEnd := cluster
	if p.BackingFileOffset != 0 {
		extEnd = p.BackingFileOffset
		end := p.BackingFileOffset + uint64(p.BackingFileSize)
		if end > cluster || end > uint64(len(img)) {
			return p, fmt.Errorf("backing file name at %d+%d is outside the first cluster", p.BackingFileOffset, p.BackingFileSize)
		}
		p.BackingFile = string(img[p.BackingFileOffset:end])
	}
	for off := uint64(p.HeaderLength); ; {
		if off+8 > extEnd {
			return p, fmt.Errorf("header extensions run past %d without an end marker", extEnd)
		}
		typ, n := be.Uint32(img[off:]), uint64(be.Uint32(img[off+4:]))
		if typ == qcow2ExtEnd {
			break
		}
		data := off + 8
		if data+n > extEnd {
			return p, fmt.Errorf("header extension %#x at %d is %d bytes, past %d", typ, off, n, extEnd)
		}
		p.Extensions = append(p.Extensions, typ)
		if typ == qcow2ExtBackingFormat {
			p.BackingFormat = string(img[data : data+n])
		}
		off = data + (n+7)/8*8
	}

	within := func(off, n uint64, what string) ([]byte, error) {
		if off%cluster != 0 || off+n > uint64(len(img)) {
			return nil, fmt.Errorf("%s at %d+%d is unaligned or past the end of the file (%d)", what, off, n, len(img))
		}
		return img[off : off+n], nil
	}
	table, err := within(p.RefcountTableOffset, uint64(p.RefcountTableClusters)*cluster, "refcount table")
	if err != nil {
		return p, err
	}
	p.Refcounts = map[int64]uint16{}
	perBlock := cluster / 2
	for i := range uint64(len(table)) / 8 {
		blockOff := be.Uint64(table[i*8:])
		if blockOff == 0 {
			continue
		}
		block, err := within(blockOff, cluster, "refcount block")
		if err != nil {
			return p, err
		}
		for j := range perBlock {
			if rc := be.Uint16(block[j*2:]); rc != 0 {
				p.Refcounts[int64(i*perBlock+j)] = rc
			}
		}
	}
	if p.L1Size > 0 {
		l1, err := within(p.L1TableOffset, uint64(p.L1Size)*8, "L1 table")
		if err != nil {
			return p, err
		}
		p.L1 = map[int]uint64{}
		for i := range int(p.L1Size) {
			if e := be.Uint64(l1[i*8:]); e != 0 {
				p.L1[i] = e
			}
		}
	}
	return p, nil
}

// writeOverlayFile writes o to a new file in dir and returns its path.
func writeOverlayFile(t *testing.T, dir string, o qcow2Overlay) string {
	t.Helper()
	f, err := os.CreateTemp(dir, "overlay-*.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := o.writeTo(f); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// The encoder writes the header, extensions, backing name, refcount
// structures and an empty L1 table that the specification describes, for
// every size from none to the largest L1 table QEMU opens.
func TestQCOW2OverlayRoundTrip(t *testing.T) {
	const backing = "/var/lib/banger/images/debian-12/rootfs.ext4"
	tests := []struct {
		name         string
		size         int64
		wantL1Size   uint32
		wantClusters int64 // clusters with refcount 1: header, refcount table and block, L1
	}{
		{"empty", 0, 0, 3},
		{"one sector", 512, 1, 4},
		{"one L2 table's worth", 512 << 20, 1, 4},
		{"one sector more", 512<<20 + 512, 2, 4},
		{"1 GiB", 1 << 30, 2, 4},
		{"1 TiB", 1 << 40, 2048, 4},
		{"4 TiB, an L1 table of exactly one cluster", 4 << 40, 8192, 4},
		{"4 TiB and a sector, an L1 table of two clusters", 4<<40 + 512, 8193, 5},
		{"2 PiB, the largest L1 table", 2 << 50, 4 << 20, 3 + 512},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := newQCOW2Overlay(backing, tt.size)
			if err != nil {
				t.Fatal(err)
			}
			img, err := os.ReadFile(writeOverlayFile(t, t.TempDir(), o))
			if err != nil {
				t.Fatal(err)
			}
			got, err := parseQCOW2(img)
			if err != nil {
				t.Fatal(err)
			}
			l1Offset := uint64(3 << 16)
			if tt.wantL1Size == 0 {
				l1Offset = 0
			}
			want := qcow2Parsed{
				Version:               3,
				BackingFileOffset:     136,
				BackingFileSize:       uint32(len(backing)),
				ClusterBits:           16,
				Size:                  uint64(tt.size),
				L1Size:                tt.wantL1Size,
				L1TableOffset:         l1Offset,
				RefcountTableOffset:   1 << 16,
				RefcountTableClusters: 1,
				RefcountOrder:         4,
				HeaderLength:          112,
				Extensions:            []uint32{qcow2ExtBackingFormat},
				BackingFormat:         "raw",
				BackingFile:           backing,
				Refcounts:             map[int64]uint16{},
				FileSize:              tt.wantClusters << 16,
			}
			for i := range tt.wantClusters {
				want.Refcounts[i] = 1
			}
			if tt.wantL1Size > 0 {
				want.L1 = map[int]uint64{}
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("parsed overlay (-want +got):\n%s", diff)
			}
		})
	}
}

// The encoder refuses what QEMU would not open, naming the limit.
func TestQCOW2OverlayRejects(t *testing.T) {
	tests := []struct {
		name    string
		backing string
		size    int64
		wantErr string
	}{
		{"negative size", "/rootfs", -512, "not a multiple of 512"},
		{"size not a multiple of 512", "/rootfs", 1<<20 + 1, "not a multiple of 512"},
		{"L1 table past QEMU's limit", "/rootfs", 2<<50 + 512, "more than the 33554432 QEMU opens"},
		{"no backing file", "", 1 << 20, "backing file name is empty"},
		{"backing file name past QEMU's limit", "/" + strings.Repeat("a", 1023), 1 << 20, "1024 bytes long, more than the 1023"},
		{"NUL in the backing file name", "/root\x00fs", 1 << 20, "NUL byte"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newQCOW2Overlay(tt.backing, tt.size)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("newQCOW2Overlay = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

// hexdumpZeroRuns renders b as offset, hex and ASCII lines of 16 bytes and
// collapses each run of all-zero lines after the first into "*", like
// xxd -a; the last line is always shown, so the dump pins b's length.
func hexdumpZeroRuns(b []byte) string {
	var sb strings.Builder
	zero := make([]byte, 16)
	prevZero := false
	for off := 0; off < len(b); off += 16 {
		line := b[off:min(off+16, len(b))]
		last := off+16 >= len(b)
		if bytes.Equal(line, zero[:len(line)]) && !last {
			if prevZero {
				if !strings.HasSuffix(sb.String(), "*\n") {
					sb.WriteString("*\n")
				}
				continue
			}
			prevZero = true
		} else {
			prevZero = false
		}
		fmt.Fprintf(&sb, "%08x: % x", off, line)
		sb.WriteString(strings.Repeat("   ", 16-len(line)))
		sb.WriteString("  |")
		for _, c := range line {
			if c < 0x20 || c > 0x7e {
				c = '.'
			}
			sb.WriteByte(c)
		}
		sb.WriteString("|\n")
	}
	return sb.String()
}

// The bytes of a 1 GiB overlay are pinned, so that any change to the
// format banger writes is a reviewed change (go test -run
// TestQCOW2OverlayGolden -update rewrites the file).
func TestQCOW2OverlayGolden(t *testing.T) {
	o, err := newQCOW2Overlay("/var/lib/banger/images/debian-12/rootfs.ext4", 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(writeOverlayFile(t, t.TempDir(), o))
	if err != nil {
		t.Fatal(err)
	}
	got := hexdumpZeroRuns(img)
	golden := filepath.Join("testdata", "qcow2_overlay_1GiB.golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (hint: go test -run TestQCOW2OverlayGolden -update)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Fatalf("overlay bytes (-%s +got):\n%s", golden, diff)
	}
}

// qemuImgCheck is the part of `qemu-img check --output=json` that a clean
// image has at zero (its other counts, fragmentation and such, are not
// errors).
type qemuImgCheck struct {
	CheckErrors int `json:"check-errors"`
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
}

// requireQemuImgCheck runs qemu-img check on a qcow2 image and fails the
// test on any error, corruption or leaked cluster.
func requireQemuImgCheck(t *testing.T, path string) {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var res qemuImgCheck
	if jerr := json.Unmarshal(out, &res); jerr != nil || err != nil || res != (qemuImgCheck{}) {
		t.Fatalf("qemu-img check %s: %v (%+v, decode: %v)\n%s%s", path, err, res, jerr, out, stderr.Bytes())
	}
}

// qemuIO runs qemu-io commands against a qcow2 image, one process for all
// of them, and fails the test if any fails (a read -P that finds another
// pattern fails).
func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("qemu-io %s: %v\n%s", strings.Join(cmds, "; "), err, out)
	}
}

// patternExtent is a range filled with one byte value.
type patternExtent struct {
	off, len int64
	b        byte
}

// makePatternSource writes a sparse file of size bytes whose extents hold
// their byte and whose other ranges are holes.
func makePatternSource(t *testing.T, path string, size int64, extents []patternExtent) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, e := range extents {
		if _, err := f.WriteAt(bytes.Repeat([]byte{e.b}, int(e.len)), e.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

// sparseSum identifies a file's content and allocation without reading its
// holes, so that a terabyte source is checksummed in milliseconds: the size
// and modification time, then each data extent's offset, length and bytes.
// A write anywhere, even of zeros into a hole, changes it.
func sparseSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	_, _ = fmt.Fprintf(h, "size %d mtime %d\n", st.Size(), st.ModTime().UnixNano())
	fd := int(f.Fd())
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = fmt.Fprintf(h, "extent %d+%d\n", data, hole-data)
		if _, err := io.Copy(h, io.NewSectionReader(f, data, hole-data)); err != nil {
			t.Fatal(err)
		}
		off = hole
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// expectedReads returns qemu-io commands that check a disk of size bytes
// reads as extents over zeros: for each run of one byte value, its first
// and last MiB (all of it when shorter), so every boundary is read without
// reading a terabyte of zeros. Later extents win where they overlap.
func expectedReads(size int64, extents []patternExtent) []string {
	cuts := []int64{0, size}
	for _, e := range extents {
		cuts = append(cuts, max(0, min(size, e.off)), max(0, min(size, e.off+e.len)))
	}
	slices.Sort(cuts)
	cuts = slices.Compact(cuts)
	at := func(off int64) byte {
		b := byte(0)
		for _, e := range extents {
			if off >= e.off && off < e.off+e.len {
				b = e.b
			}
		}
		return b
	}
	const edge = 1 << 20
	var cmds []string
	for i := 0; i+1 < len(cuts); i++ {
		a, z := cuts[i], cuts[i+1]
		b := at(a)
		if z-a <= 2*edge {
			cmds = append(cmds, fmt.Sprintf("read -q -P %#x %d %d", b, a, z-a))
			continue
		}
		cmds = append(cmds, fmt.Sprintf("read -q -P %#x %d %d", b, a, edge), fmt.Sprintf("read -q -P %#x %d %d", b, z-edge, edge))
	}
	return cmds
}

// An overlay opens in QEMU as a clean qcow2 image of the source's size over
// the source as a raw backing file; reads through it return the source's
// bytes; QEMU's writes land in the overlay, never in the source, and leave
// the image clean; for sizes from a few sectors to a terabyte and sizes
// that are not a multiple of the cluster or even the sector size.
func TestQCOW2CloneWithQemu(t *testing.T) {
	testutil.RequireCommand(t, "qemu-img", "qemu-io")
	tests := []struct {
		name string
		size int64 // of the source
	}{
		{"tiny", 4096},
		{"1 GiB", 1 << 30},
		{"4 GiB", 4 << 30},
		{"1 TiB", 1 << 40},
		{"not a multiple of the cluster size", 1<<30 + 3*512},
		{"not a multiple of the sector size", 10<<20 + 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			src, dst := filepath.Join(dir, "rootfs.ext4"), filepath.Join(dir, "disk.qcow2")
			vsize := (tt.size + 511) / 512 * 512
			// Data at the start and at the very end of the source; holes
			// between, and past the source's end up to the last sector.
			srcData := []patternExtent{{0, min(tt.size, 192<<10), 0x11}}
			if tt.size > 1<<20 {
				srcData = append(srcData, patternExtent{tt.size - 100<<10, 100 << 10, 0x22})
			}
			makePatternSource(t, src, tt.size, srcData)
			srcSum := sparseSum(t, src)

			if err := (qcow2Cloner{}).Clone(t.Context(), src, dst); err != nil {
				t.Fatal(err)
			}
			requireQemuImgCheck(t, dst)
			info, err := readQCOW2Info(t.Context(), "qemu-img", dst)
			if err != nil {
				t.Fatal(err)
			}
			want := qcow2Info{Format: "qcow2", VirtualSize: vsize, BackingFilename: src, BackingFilenameFull: src, BackingFormat: "raw"}
			if diff := cmp.Diff(want, info); diff != "" {
				t.Fatalf("qemu-img info (-want +got):\n%s", diff)
			}
			if a := allocatedBytes(t, dst); a > 64<<10 {
				t.Fatalf("the overlay allocates %d bytes, want a few metadata blocks", a)
			}
			// Past the source's end QEMU reads zeros, so the two compare
			// identical (qemu-img compare's default) even where the
			// overlay is the longer by a partial sector.
			if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", dst, src).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare overlay source: %v\n%s", err, out)
			}
			qemuIO(t, dst, expectedReads(vsize, srcData)...)

			// Writes: a sector inside a cluster of source data (QEMU must
			// copy the rest of the cluster from the source), a page in a
			// hole, and the last sector.
			writes := []patternExtent{{512, 512, 0xab}, {vsize - 512, 512, 0xef}}
			if vsize > 1<<20 {
				writes = append(writes, patternExtent{vsize / 2 / 512 * 512, 4096, 0xcd})
			}
			var cmds []string
			for _, w := range writes {
				cmds = append(cmds, fmt.Sprintf("write -q -P %#x %d %d", w.b, w.off, w.len))
			}
			qemuIO(t, dst, cmds...)
			if got := sparseSum(t, src); got != srcSum {
				t.Fatal("writing to the overlay changed the source")
			}
			qemuIO(t, dst, expectedReads(vsize, append(slices.Clone(srcData), writes...))...)
			requireQemuImgCheck(t, dst)
			if out, err := exec.Command("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", dst, src).CombinedOutput(); err == nil {
				t.Fatalf("qemu-img compare finds the written overlay identical to its source:\n%s", out)
			}
		})
	}
}

// The overlay reads to QEMU exactly like the one qemu-img create makes for
// the same source: same format options, size, backing file and format.
func TestQCOW2CloneMatchesQemuImgCreate(t *testing.T) {
	testutil.RequireCommand(t, "qemu-img")
	for _, size := range []int64{1 << 20, 1 << 30, 1<<30 + 512} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "rootfs.ext4")
			makePatternSource(t, src, size, nil)
			ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
			if err := (qcow2Cloner{}).Clone(t.Context(), src, ours); err != nil {
				t.Fatal(err)
			}
			runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", src, theirs)
			info := func(path string) map[string]any {
				out := runTool(t, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
				var m map[string]any
				if err := json.Unmarshal([]byte(out), &m); err != nil {
					t.Fatal(err)
				}
				// What differs between any two files.
				delete(m, "filename")
				delete(m, "actual-size")
				return m
			}
			if diff := cmp.Diff(info(theirs), info(ours)); diff != "" {
				t.Fatalf("qemu-img info (-qemu-img create +ours):\n%s", diff)
			}
		})
	}
}

// Grow enlarges an overlay through qemu-img resize, including past what its
// first L1 table maps (QEMU then moves the table and frees the clusters
// banger's refcounts gave the old one), keeping it clean, its data and its
// raw backing file.
func TestQCOW2GrowOverlay(t *testing.T) {
	testutil.RequireCommand(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "rootfs.ext4"), filepath.Join(dir, "disk.qcow2")
	srcData := []patternExtent{{0, 1 << 20, 0x11}}
	makePatternSource(t, src, 1<<30, srcData)
	if err := (qcow2Cloner{}).Clone(t.Context(), src, dst); err != nil {
		t.Fatal(err)
	}
	w := patternExtent{1<<30 - 4096, 4096, 0xab}
	qemuIO(t, dst, fmt.Sprintf("write -q -P %#x %d %d", w.b, w.off, w.len))
	for _, size := range []int64{1<<30 + 512, 4 << 30, 1 << 40} {
		if err := Grow(t.Context(), dst, DiskQCOW2, size); err != nil {
			t.Fatal(err)
		}
		requireQemuImgCheck(t, dst)
		info, err := readQCOW2Info(t.Context(), "qemu-img", dst)
		if err != nil {
			t.Fatal(err)
		}
		if info.VirtualSize != size || info.BackingFilename != src || info.BackingFormat != "raw" {
			t.Fatalf("after Grow to %d: %+v, want that size over %q as raw", size, info, src)
		}
		qemuIO(t, dst, expectedReads(size, append(slices.Clone(srcData), w))...)
	}
}
