package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"

	"github.com/bangerhq/banger/internal/testutil"
)

// elfSpec describes a minimal ELF file built by makeELF.
type elfSpec struct {
	class   elf.Class
	machine elf.Machine
	typ     elf.Type
	// extra pseudo-random bytes appended to the loadable segment, so that
	// the fixture is large and incompressible enough to exercise multi-block
	// streams.
	extra int
}

var x86Exec = elfSpec{class: elf.ELFCLASS64, machine: elf.EM_X86_64, typ: elf.ET_EXEC}

// makeELF builds a real, runnable static ELF: one PT_LOAD segment whose
// entry point calls exit(0) (for x86-64), followed by spec.extra bytes of
// pseudo-random data inside the same segment.
func makeELF(spec elfSpec) []byte {
	const (
		base   = 0x400000
		ehsize = 64
		phsize = 56
	)
	// mov eax, 60 (exit); xor edi, edi; syscall
	code := []byte{0xb8, 0x3c, 0x00, 0x00, 0x00, 0x31, 0xff, 0x0f, 0x05}
	rng := rand.New(rand.NewPCG(uint64(spec.extra), 7))
	extra := make([]byte, spec.extra)
	for i := range extra {
		extra[i] = byte(rng.Uint32())
	}
	total := ehsize + phsize + len(code) + len(extra)

	var b bytes.Buffer
	le := binary.LittleEndian
	ident := [16]byte{0x7f, 'E', 'L', 'F', byte(spec.class), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)}
	b.Write(ident[:])
	_ = binary.Write(&b, le, uint16(spec.typ))
	_ = binary.Write(&b, le, uint16(spec.machine))
	_ = binary.Write(&b, le, uint32(elf.EV_CURRENT))
	_ = binary.Write(&b, le, uint64(base+ehsize+phsize)) // e_entry: the code
	_ = binary.Write(&b, le, uint64(ehsize))             // e_phoff
	_ = binary.Write(&b, le, uint64(0))                  // e_shoff: no sections
	_ = binary.Write(&b, le, uint32(0))                  // e_flags
	_ = binary.Write(&b, le, uint16(ehsize))
	_ = binary.Write(&b, le, uint16(phsize))
	_ = binary.Write(&b, le, uint16(1)) // e_phnum
	_ = binary.Write(&b, le, uint16(64))
	_ = binary.Write(&b, le, uint16(0)) // e_shnum
	_ = binary.Write(&b, le, uint16(0)) // e_shstrndx
	// The one program header: the whole file, read + execute.
	_ = binary.Write(&b, le, uint32(elf.PT_LOAD))
	_ = binary.Write(&b, le, uint32(elf.PF_R|elf.PF_X))
	_ = binary.Write(&b, le, uint64(0))     // p_offset
	_ = binary.Write(&b, le, uint64(base))  // p_vaddr
	_ = binary.Write(&b, le, uint64(base))  // p_paddr
	_ = binary.Write(&b, le, uint64(total)) // p_filesz
	_ = binary.Write(&b, le, uint64(total)) // p_memsz
	_ = binary.Write(&b, le, uint64(0x1000))
	b.Write(code)
	b.Write(extra)
	return b.Bytes()
}

// sizeAppend mirrors the kernel's size_append: the little-endian 32-bit size
// of the uncompressed input, written after the compressed stream.
func sizeAppend(compressed []byte, uncompressed int) []byte {
	return binary.LittleEndian.AppendUint32(bytes.Clone(compressed), uint32(uncompressed))
}

// compressTool runs a compressor the way arch/x86/boot/compressed/Makefile
// does: data on stdin, the stream on stdout.
func compressTool(t *testing.T, data []byte, argv ...string) []byte {
	t.Helper()
	testutil.RequireCommand(t, argv[0])
	cmd := exec.CommandContext(t.Context(), argv[0], argv[1:]...)
	cmd.Stdin = bytes.NewReader(data)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, stderr.String())
	}
	return out.Bytes()
}

// compressGo compresses data with one of the Go libraries ExtractVmlinux
// decodes with, to check that both sides of each library agree.
func compressGo(t testing.TB, data []byte, comp Compression) []byte {
	t.Helper()
	var buf bytes.Buffer
	var w io.WriteCloser
	var err error
	switch comp {
	case CompressionGzip:
		w, err = gzip.NewWriterLevel(&buf, gzip.BestCompression)
	case CompressionLZMA:
		w, err = lzma.NewWriter(&buf)
	case CompressionXZ:
		w, err = xz.NewWriter(&buf)
	case CompressionLZ4:
		zw := lz4.NewWriter(&buf)
		err = zw.Apply(lz4.LegacyOption(true))
		w = zw
	case CompressionZstd:
		w, err = zstd.NewWriter(&buf)
	default:
		t.Fatalf("no Go compressor for %s", comp)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// bzSpec describes a bzImage-shaped file built by makeBzImage.
type bzSpec struct {
	setupSects    byte   // as written in the header; 0 means 4
	version       uint16 // 0 means 0x020f
	loadFlags     byte   // 0 means LOADED_HIGH
	payloadOffset uint32 // 0 means 0x2c0
	// lengthDelta is added to the real payload length in the header, to
	// forge headers that lie.
	lengthDelta int64
}

// makeBzImage lays out a bzImage the way arch/x86/boot/tools/build.c does:
// boot sector + setup sectors, then the protected-mode kernel, whose
// decompressor code surrounds the payload. The setup header is filled in with
// the fields the boot protocol defines; code areas hold filler.
func makeBzImage(payload []byte, s bzSpec) []byte {
	setup := makeSetup(s, len(payload))
	head := bytes.Repeat([]byte{0x90}, int(binary.LittleEndian.Uint32(setup[offPayloadOffset:]))) // decompressor head
	tail := bytes.Repeat([]byte{0x90}, 4096)                                                      // rest of the decompressor
	return bytes.Join([][]byte{setup, head, payload, tail}, nil)
}

// makeSetup returns the boot sector and setup sectors of a bzImage whose
// payload is payloadLen bytes long.
func makeSetup(s bzSpec, payloadLen int) []byte {
	if s.version == 0 {
		s.version = 0x020f
	}
	if s.loadFlags == 0 {
		s.loadFlags = loadedHigh
	}
	if s.payloadOffset == 0 {
		s.payloadOffset = 0x2c0
	}
	sects := int(s.setupSects)
	if sects == 0 {
		sects = defaultSects
	}
	setup := make([]byte, (sects+1)*sectorSize)
	for i := range setup {
		setup[i] = 0xcc // int3: nothing in the setup area may be read as a header
	}
	setup[offSetupSects] = s.setupSects
	binary.LittleEndian.PutUint16(setup[offBootFlag:], bootFlag)
	copy(setup[offHeaderMagic:], headerMagic)
	binary.LittleEndian.PutUint16(setup[offVersion:], s.version)
	setup[offLoadFlags] = s.loadFlags
	binary.LittleEndian.PutUint32(setup[offPayloadOffset:], s.payloadOffset)
	binary.LittleEndian.PutUint32(setup[offPayloadLength:], uint32(int64(payloadLen)+s.lengthDelta))
	return setup
}

func writeTempFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// dirNames lists a directory, for checks that nothing was left behind.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{}
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// The ELF fixture is a real program, so a vmlinux check that accepts it is
// tested against something the kernel's loader would also accept.
func TestFixtureELFRuns(t *testing.T) {
	p := writeTempFile(t, "exit0", makeELF(x86Exec))
	if err := os.Chmod(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(t.Context(), p).CombinedOutput(); err != nil {
		t.Skipf("cannot execute from the temp dir (noexec?): %v %s", err, out)
	}
	if err := checkVmlinux(bytes.NewReader(makeELF(x86Exec))); err != nil {
		t.Fatalf("checkVmlinux rejects the fixture: %v", err)
	}
}

// ExtractVmlinux returns the exact ELF inside a bzImage for every compressor
// the kernel build offers, compressed as the kernel's Makefile does it, and
// for each Go library's own encoder.
func TestExtractVmlinuxEveryCompression(t *testing.T) {
	small := makeELF(x86Exec)
	// Over 8 MiB, so lz4's legacy frame needs several blocks.
	large := makeELF(elfSpec{class: elf.ELFCLASS64, machine: elf.EM_X86_64, typ: elf.ET_EXEC, extra: 9 << 20})

	tests := []struct {
		name    string
		vmlinux []byte
		spec    bzSpec
		payload func(t *testing.T, vmlinux []byte) []byte
	}{
		{"gzip", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return compressTool(t, v, "gzip", "-n", "-f", "-9") // no size_append: ISIZE is the trailer
		}},
		{"bzip2", small, bzSpec{setupSects: 27}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "bzip2", "-9"), len(v))
		}},
		{"lzma", small, bzSpec{setupSects: 1}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "lzma", "-9"), len(v))
		}},
		{"xz with x86 BCJ (scripts/xz_wrap.sh)", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB"), len(v))
		}},
		{"xz lzma2 only", small, bzSpec{payloadOffset: 0x1000}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "xz", "--check=crc32", "--lzma2=dict=1MiB"), len(v))
		}},
		{"lzo", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "lzop", "-9"), len(v))
		}},
		{"lz4 legacy", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "lz4", "-l", "-9"), len(v))
		}},
		{"lz4 legacy multi-block", large, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "lz4", "-l", "-9"), len(v))
		}},
		{"zstd", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressTool(t, v, "zstd", "-22", "--ultra", "-q"), len(v))
		}},
		{"gzip (Go)", small, bzSpec{}, func(t *testing.T, v []byte) []byte { return compressGo(t, v, CompressionGzip) }},
		{"lzma (Go)", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressGo(t, v, CompressionLZMA), len(v))
		}},
		{"xz (Go)", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressGo(t, v, CompressionXZ), len(v))
		}},
		{"lz4 legacy (Go)", large, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressGo(t, v, CompressionLZ4), len(v))
		}},
		{"zstd (Go)", small, bzSpec{}, func(t *testing.T, v []byte) []byte {
			return sizeAppend(compressGo(t, v, CompressionZstd), len(v))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kernel := writeTempFile(t, "vmlinuz", makeBzImage(tt.payload(t, tt.vmlinux), tt.spec))
			format, err := KernelFormat(kernel)
			if err != nil || format != FormatBzImage {
				t.Fatalf("KernelFormat = %q, %v; want %q", format, err, FormatBzImage)
			}
			outDir := t.TempDir()
			out := filepath.Join(outDir, "vmlinux")
			if err := ExtractVmlinux(t.Context(), kernel, out); err != nil {
				t.Fatalf("ExtractVmlinux: %v", err)
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.vmlinux) {
				t.Fatalf("extracted %d bytes (sha256 %x), want the original %d bytes (sha256 %x)",
					len(got), sha256.Sum256(got), len(tt.vmlinux), sha256.Sum256(tt.vmlinux))
			}
			if format, err := KernelFormat(out); err != nil || format != FormatELF {
				t.Fatalf("KernelFormat(extracted) = %q, %v; want %q", format, err, FormatELF)
			}
			if diff := cmp.Diff([]string{"vmlinux"}, listDir(t, outDir)); diff != "" {
				t.Fatalf("output dir (-want +got):\n%s", diff)
			}
		})
	}
}

// detectCompression names each compressor from the payload's first bytes
// alone, and names none for data that merely resembles one.
func TestDetectCompression(t *testing.T) {
	tests := []struct {
		head    []byte
		want    Compression
		wantErr string
	}{
		{[]byte{0x1f, 0x8b, 0x08, 0x00}, CompressionGzip, ""},
		{[]byte("BZh91AY&SY"), CompressionBzip2, ""},
		{[]byte{0x5d, 0x00, 0x00, 0x00, 0x04}, CompressionLZMA, ""},
		{[]byte{0xfd, '7', 'z', 'X', 'Z', 0x00, 0x00, 0x01}, CompressionXZ, ""},
		{[]byte{0x89, 'L', 'Z', 'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a, 0x10}, CompressionLZO, ""},
		{[]byte{0x02, 0x21, 0x4c, 0x18, 0x00}, CompressionLZ4, ""},
		{[]byte{0x28, 0xb5, 0x2f, 0xfd, 0x04}, CompressionZstd, ""},
		{[]byte{0x04, 0x22, 0x4d, 0x18}, "", "unknown payload compression (first bytes 04 22 4d 18)"}, // lz4 frame format: not what the kernel writes
		{[]byte{0x89, 'L', 'Z', 'O', 0x00}, "", "unknown payload compression"},                        // lzop magic cut short
		{[]byte{0x7f, 'E', 'L', 'F'}, "", "unknown payload compression"},
		{nil, "", "unknown payload compression"},
	}
	for _, tt := range tests {
		got, err := detectCompression(bytes.NewReader(tt.head))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("detectCompression(% x) = %q, %v; want error containing %q", tt.head, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("detectCompression(% x) = %q, %v; want %q", tt.head, got, err, tt.want)
		}
	}
}

// xzFirstBlockFilters reads the filter chain that decides between the Go
// decoder (LZMA2 alone) and the xz tool (BCJ in front).
func TestXZFirstBlockFilters(t *testing.T) {
	v := makeELF(x86Exec)
	tests := []struct {
		name   string
		stream []byte
		want   []uint64
	}{
		{"lzma2", compressTool(t, v, "xz", "--check=crc32", "--lzma2=dict=1MiB"), []uint64{0x21}},
		{"x86 bcj + lzma2", compressTool(t, v, "xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB"), []uint64{0x04, 0x21}},
		{"go writer", compressGo(t, v, CompressionXZ), []uint64{0x21}},
	}
	for _, tt := range tests {
		got, err := xzFirstBlockFilters(tt.stream)
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s: filters (-want +got):\n%s", tt.name, diff)
		}
	}
	if _, err := xzFirstBlockFilters([]byte{0xfd, '7', 'z', 'X', 'Z', 0x00}); err == nil {
		t.Error("a stream header alone was accepted")
	}
}

// KernelFormat tells bzImages from ELF vmlinux files and names what is wrong
// with everything else, truncation included.
func TestKernelFormat(t *testing.T) {
	vmlinux := makeELF(x86Exec)
	payload := compressGo(t, vmlinux, CompressionGzip)
	bz := makeBzImage(payload, bzSpec{})
	tests := []struct {
		name    string
		data    []byte
		want    Format
		wantErr string
	}{
		{"bzImage", bz, FormatBzImage, ""},
		{"bzImage with setup_sects 27", makeBzImage(payload, bzSpec{setupSects: 27}), FormatBzImage, ""},
		{"vmlinux", vmlinux, FormatELF, ""},
		{"empty", nil, "", "0 bytes is too short"},
		{"garbage", bytes.Repeat([]byte("not a kernel "), 100), "", "not a kernel: neither an ELF vmlinux nor a bzImage"},
		{"bzImage cut inside the setup header", bz[:0x220], "", "setup header truncated"},
		{"bzImage cut inside the payload", bz[:len(bz)-4096-len(payload)/2], "", "ends past the file"},
		{"payload_length past the end", makeBzImage(payload, bzSpec{lengthDelta: 8192}), "", "ends past the file"},
		{"payload_length too small", makeBzImage(payload, bzSpec{lengthDelta: -int64(len(payload)) + 3}), "", "payload_length 3 is too small"},
		{"boot protocol 2.04", makeBzImage(payload, bzSpec{version: 0x0204}), "", "boot protocol 2.04 predates"},
		{"zImage", makeBzImage(payload, bzSpec{loadFlags: 0x80}), "", "a zImage, not a bzImage"},
		{"bad boot_flag", func() []byte {
			b := bytes.Clone(bz)
			b[offBootFlag] = 0
			return b
		}(), "", "boot_flag at 0x1fe is 0xaa00"},
		{"aarch64 ELF", makeELF(elfSpec{class: elf.ELFCLASS64, machine: elf.EM_AARCH64, typ: elf.ET_EXEC}), "", "EM_AARCH64, want"},
		{"32-bit ELF", makeELF(elfSpec{class: elf.ELFCLASS32, machine: elf.EM_386, typ: elf.ET_EXEC}), "", "parse ELF"},
		{"shared object", makeELF(elfSpec{class: elf.ELFCLASS64, machine: elf.EM_X86_64, typ: elf.ET_DYN}), "", "ELF type is ET_DYN"},
		{"ELF cut short", vmlinux[:40], "", "parse ELF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := KernelFormat(writeTempFile(t, "kernel", tt.data))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("KernelFormat = %q, %v; want error containing %q", got, err, tt.wantErr)
				}
				t.Log(err)
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("KernelFormat = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	if _, err := KernelFormat(t.TempDir()); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("KernelFormat(directory) = %v, want a not-a-regular-file error", err)
	}
}

// ExtractVmlinux refuses damaged and mislabelled kernels with an error that
// names the problem, and leaves nothing in the output directory.
func TestExtractVmlinuxRejects(t *testing.T) {
	vmlinux := makeELF(x86Exec)
	gz := compressGo(t, vmlinux, CompressionGzip)
	zst := sizeAppend(compressGo(t, vmlinux, CompressionZstd), len(vmlinux))
	lz := sizeAppend(compressTool(t, vmlinux, "lz4", "-l", "-9"), len(vmlinux))
	flip := func(b []byte, at int) []byte {
		b = bytes.Clone(b)
		b[at] ^= 0xff
		return b
	}
	tests := []struct {
		name    string
		kernel  []byte
		wantErr string
	}{
		{"truncated kernel", makeBzImage(gz, bzSpec{})[:5*sectorSize+0x2c0+len(gz)/2], "ends past the file"},
		{"wrong payload_offset", func() []byte {
			b := makeBzImage(gz, bzSpec{})
			binary.LittleEndian.PutUint32(b[offPayloadOffset:], 0x100)
			return b
		}(), "unknown payload compression (first bytes 90 90 90 90"},
		{"unknown compression", makeBzImage(bytes.Repeat([]byte{0xab}, 512), bzSpec{}), "unknown payload compression (first bytes ab ab"},
		{"corrupt gzip stream", makeBzImage(flip(gz, len(gz)/2), bzSpec{}), "decompress gzip payload"},
		{"corrupt zstd stream", makeBzImage(flip(zst, len(zst)/2), bzSpec{}), "decompress zstd payload"},
		{"corrupt lz4 stream", makeBzImage(flip(lz, 8), bzSpec{}), "lz4 payload"},
		{"trailer larger than the kernel", makeBzImage(sizeAppend(zst[:len(zst)-4], len(vmlinux)+100), bzSpec{}),
			fmt.Sprintf("decompressed to %d bytes, its trailer says %d", len(vmlinux), len(vmlinux)+100)},
		{"trailer smaller than the kernel", makeBzImage(sizeAppend(zst[:len(zst)-4], len(vmlinux)-100), bzSpec{}),
			fmt.Sprintf("decompressed to more than %d bytes", len(vmlinux)-100)},
		{"trailer over the size limit", makeBzImage(sizeAppend(zst[:len(zst)-4], maxVmlinuxSize+1), bzSpec{}), "over the 1073741824-byte limit"},
		{"payload is not an ELF", makeBzImage(compressGo(t, bytes.Repeat([]byte("text "), 100), CompressionGzip), bzSpec{}), "not an x86-64 vmlinux: parse ELF"},
		{"payload is an arm64 ELF", makeBzImage(compressGo(t, makeELF(elfSpec{class: elf.ELFCLASS64, machine: elf.EM_AARCH64, typ: elf.ET_EXEC}), CompressionGzip), bzSpec{}), "EM_AARCH64"},
		{"an ELF, not a bzImage", vmlinux, "already an ELF vmlinux"},
		{"not a kernel", bytes.Repeat([]byte{1}, 4096), `no bzImage setup header`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kernel := writeTempFile(t, "vmlinuz", tt.kernel)
			outDir := t.TempDir()
			err := ExtractVmlinux(t.Context(), kernel, filepath.Join(outDir, "vmlinux"))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ExtractVmlinux = %v; want error containing %q", err, tt.wantErr)
			}
			t.Log(err)
			if left := listDir(t, outDir); len(left) != 0 {
				t.Fatalf("left behind after a failed extraction: %v", left)
			}
		})
	}
}

// A cancelled extraction stops, reports the cancellation and leaves no
// partial vmlinux, whether the decoder runs in Go or as a child process.
func TestExtractVmlinuxCancelled(t *testing.T) {
	v := makeELF(elfSpec{class: elf.ELFCLASS64, machine: elf.EM_X86_64, typ: elf.ET_EXEC, extra: 1 << 20})
	tests := []struct {
		name    string
		payload func(t *testing.T) []byte
	}{
		{"zstd", func(t *testing.T) []byte { return sizeAppend(compressGo(t, v, CompressionZstd), len(v)) }},
		{"lzo", func(t *testing.T) []byte { return sizeAppend(compressTool(t, v, "lzop", "-9"), len(v)) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kernel := writeTempFile(t, "vmlinuz", makeBzImage(tt.payload(t), bzSpec{}))
			outDir := t.TempDir()
			ctx, cancel := context.WithCancel(t.Context())
			cancel()
			err := ExtractVmlinux(ctx, kernel, filepath.Join(outDir, "vmlinux"))
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("ExtractVmlinux = %v; want context.Canceled", err)
			}
			if left := listDir(t, outDir); len(left) != 0 {
				t.Fatalf("left behind after a cancelled extraction: %v", left)
			}
		})
	}
}

// debianCloudKernel returns the path of the Debian cloud kernel's bzImage,
// downloaded with apt into the test cache once, or skips the test when apt
// cannot fetch it.
func debianCloudKernel(t *testing.T) string {
	t.Helper()
	testutil.RequireCommand(t, "apt-get", "dpkg-deb")
	cache := os.Getenv("BANGER_TEST_CACHE")
	if cache == "" {
		cache = "/var/cache/banger-test"
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Skipf("cannot create test cache %s: %v (set BANGER_TEST_CACHE)", cache, err)
	}
	download := func(pkg string) string {
		cmd := exec.CommandContext(t.Context(), "apt-get", "download", pkg)
		cmd.Dir = cache
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Skipf("apt-get download %s failed (apt unreachable?): %v\n%s", pkg, err, out)
		}
		debs, _ := filepath.Glob(filepath.Join(cache, pkg+"_*.deb"))
		if len(debs) == 0 {
			t.Fatalf("apt-get download %s left no .deb in %s", pkg, cache)
		}
		return debs[len(debs)-1]
	}
	// linux-image-cloud-amd64 is a metapackage: the kernel is in the
	// versioned package it depends on.
	meta := download("linux-image-cloud-amd64")
	dep, err := exec.CommandContext(t.Context(), "dpkg-deb", "-f", meta, "Depends").Output()
	if err != nil {
		t.Fatalf("read Depends of %s: %v", meta, err)
	}
	pkg, _, _ := strings.Cut(strings.TrimSpace(string(dep)), " ")
	pkg = strings.TrimSuffix(pkg, ",")
	if !strings.HasPrefix(pkg, "linux-image-") {
		t.Fatalf("unexpected Depends of %s: %q", meta, dep)
	}
	unpacked := filepath.Join(cache, pkg)
	if kernels, _ := filepath.Glob(filepath.Join(unpacked, "boot", "vmlinuz-*")); len(kernels) == 1 {
		return kernels[0]
	}
	deb := download(pkg)
	tmp, err := os.MkdirTemp(cache, ".unpack-*")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	if out, err := exec.CommandContext(t.Context(), "dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x %s: %v\n%s", deb, err, out)
	}
	// Keep only /boot; the modules are a few hundred MB unpacked.
	if err := os.RemoveAll(unpacked); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(unpacked, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(tmp, "boot"), filepath.Join(unpacked, "boot")); err != nil {
		t.Fatal(err)
	}
	kernels, _ := filepath.Glob(filepath.Join(unpacked, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		t.Fatalf("%s holds %d boot/vmlinuz-* files, want 1", deb, len(kernels))
	}
	return kernels[0]
}

// The Debian cloud kernel, the one banger's default image boots, yields an
// x86-64 ELF vmlinux byte-identical to what the lz4 tool decodes from the
// payload the setup header points at.
func TestExtractVmlinuxDebianCloudKernel(t *testing.T) {
	testutil.SkipShort(t, "downloads and decompresses the Debian cloud kernel")
	kernel := debianCloudKernel(t)
	format, err := KernelFormat(kernel)
	if err != nil || format != FormatBzImage {
		t.Fatalf("KernelFormat(%s) = %q, %v; want bzimage", kernel, format, err)
	}
	out := filepath.Join(t.TempDir(), "vmlinux")
	if err := ExtractVmlinux(t.Context(), kernel, out); err != nil {
		t.Fatal(err)
	}
	if format, err := KernelFormat(out); err != nil || format != FormatELF {
		t.Fatalf("KernelFormat(extracted) = %q, %v; want elf", format, err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}

	// Cross-check against an independent decoder fed the same payload.
	raw, err := os.ReadFile(kernel)
	if err != nil {
		t.Fatal(err)
	}
	h, err := parseSetupHeader(raw, int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	payload := raw[h.payloadStart() : h.payloadStart()+int64(h.PayloadLength)]
	comp, err := detectCompression(bytes.NewReader(payload))
	if err != nil {
		t.Fatal(err)
	}
	tools := map[Compression][]string{
		CompressionGzip: {"gzip", "-dc"}, CompressionBzip2: {"bzip2", "-dc"}, CompressionLZMA: {"lzma", "-dc"},
		CompressionXZ: {"xz", "-dc"}, CompressionLZO: {"lzop", "-dc"}, CompressionLZ4: {"lz4", "-dc"},
		CompressionZstd: {"zstd", "-dc"},
	}
	stream := payload
	if comp != CompressionGzip {
		stream = payload[:len(payload)-4]
	}
	want := compressTool(t, stream, tools[comp]...)
	if !bytes.Equal(got, want) {
		t.Fatalf("%s payload: ExtractVmlinux wrote %d bytes (sha256 %x), %s -dc wrote %d (sha256 %x)",
			comp, len(got), sha256.Sum256(got), tools[comp][0], len(want), sha256.Sum256(want))
	}
	t.Logf("%s: %s payload of %d bytes -> %d-byte vmlinux", filepath.Base(kernel), comp, len(payload), len(got))
}

// FuzzParseSetupHeader pins that the setup-header parser never panics and
// that whatever it accepts describes a payload inside the file.
func FuzzParseSetupHeader(f *testing.F) {
	f.Add(makeSetup(bzSpec{}, 30)[:setupHeaderEnd], int64(8192))
	f.Add(makeSetup(bzSpec{setupSects: 255, payloadOffset: 0xffffffff}, 64), int64(1<<40))
	f.Add([]byte("HdrS"), int64(0))
	f.Fuzz(func(t *testing.T, b []byte, extra int64) {
		if extra < 0 {
			extra = -extra
		}
		size := int64(len(b)) + extra%(1<<40)
		h, err := parseSetupHeader(b, size)
		if err != nil {
			return
		}
		if h.SetupSects < 1 || h.SetupSects > 255 {
			t.Fatalf("setup_sects %d out of range", h.SetupSects)
		}
		if h.Version < minBootProtocol || h.PayloadLength < 8 {
			t.Fatalf("accepted %+v", h)
		}
		if start := h.payloadStart(); start < int64(h.SetupSects+1)*sectorSize || start+int64(h.PayloadLength) > size {
			t.Fatalf("payload [%d, +%d) outside a %d-byte file", start, h.PayloadLength, size)
		}
	})
}

// FuzzKernelFormat pins that classifying an arbitrary file never panics and
// never calls something a bzImage whose header does not parse.
func FuzzKernelFormat(f *testing.F) {
	f.Add(makeBzImage(bytes.Repeat([]byte{0x28, 0xb5, 0x2f, 0xfd}, 4), bzSpec{}))
	f.Add(makeELF(x86Exec))
	f.Add([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		format, err := kernelFormat(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		switch format {
		case FormatBzImage:
			if _, err := parseSetupHeader(b, int64(len(b))); err != nil {
				t.Fatalf("bzImage whose header does not parse: %v", err)
			}
		case FormatELF:
			if err := checkVmlinux(bytes.NewReader(b)); err != nil {
				t.Fatalf("ELF that checkVmlinux rejects: %v", err)
			}
		default:
			t.Fatalf("format %q", format)
		}
	})
}

// FuzzXZFirstBlockFilters pins that the xz block-header peek never panics and
// returns only filter chains the format allows.
func FuzzXZFirstBlockFilters(f *testing.F) {
	f.Add(compressGo(f, []byte("seed"), CompressionXZ))
	f.Add([]byte{0xfd, '7', 'z', 'X', 'Z', 0, 0, 1, 0, 0, 0, 0, 2, 0x01, 0x04, 0x00, 0x21, 0x01, 0x16})
	f.Fuzz(func(t *testing.T, b []byte) {
		ids, err := xzFirstBlockFilters(b)
		if err == nil && (len(ids) < 1 || len(ids) > 4) {
			t.Fatalf("%d filters", len(ids))
		}
	})
}
