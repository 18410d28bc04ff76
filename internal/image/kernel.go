package image

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// Format is the on-disk format of a guest kernel.
type Format string

const (
	// FormatBzImage is an x86 bzImage: a real-mode setup header followed by
	// a self-decompressing protected-mode kernel. QEMU boots it directly.
	FormatBzImage Format = "bzimage"
	// FormatELF is an uncompressed x86-64 ELF vmlinux, the only kernel
	// format Firecracker 1.14–1.16 boot on x86_64.
	FormatELF Format = "elf"
)

// Compression is the compressor of a bzImage's payload.
type Compression string

// The compressions a Linux x86 bzImage payload may use (arch/x86/boot/compressed).
const (
	CompressionGzip  Compression = "gzip"
	CompressionBzip2 Compression = "bzip2"
	CompressionLZMA  Compression = "lzma"
	CompressionXZ    Compression = "xz"
	CompressionLZO   Compression = "lzo"
	CompressionLZ4   Compression = "lz4"
	CompressionZstd  Compression = "zstd"
)

// Offsets and constants of the x86 boot protocol
// (Documentation/arch/x86/boot.rst, "THE REAL-MODE KERNEL HEADER").
const (
	offSetupSects    = 0x1f1
	offBootFlag      = 0x1fe
	offHeaderMagic   = 0x202
	offVersion       = 0x206
	offLoadFlags     = 0x211
	offPayloadOffset = 0x248
	offPayloadLength = 0x24c
	// setupHeaderEnd is the end of the last field ExtractVmlinux reads.
	setupHeaderEnd = 0x250

	bootFlag        = 0xaa55
	headerMagic     = "HdrS"
	loadedHigh      = 0x01 // loadflags bit set by every bzImage (zImages load low)
	defaultSects    = 4    // setup_sects 0 means 4, for compatibility with old kernels
	sectorSize      = 512
	minBootProtocol = 0x0208 // payload_offset and payload_length appear in 2.08 (Linux 2.6.26)
)

// maxVmlinuxSize bounds what a payload may decompress to. Stripped x86-64
// vmlinux images are tens of MiB; the bound keeps a hostile kernel file from
// filling the disk through a decompression bomb.
const maxVmlinuxSize = 1 << 30

// setupHeader holds the fields of a bzImage setup header banger needs.
type setupHeader struct {
	SetupSects    int    // with 0 already mapped to 4
	Version       uint16 // boot protocol, 0x020f for protocol 2.15
	LoadFlags     byte
	PayloadOffset uint32 // from the start of the protected-mode kernel
	PayloadLength uint32
}

// payloadStart is the payload's offset in the bzImage file: the protected-mode
// kernel starts right after the boot sector and setup_sects setup sectors.
func (h setupHeader) payloadStart() int64 {
	return int64(h.SetupSects+1)*sectorSize + int64(h.PayloadOffset)
}

// errNoSetupHeader says a file is not a bzImage at all, as opposed to a
// bzImage whose header is damaged or unusable.
var errNoSetupHeader = errors.New(`no bzImage setup header ("HdrS" at 0x202)`)

// parseSetupHeader decodes the setup header at the start of a bzImage of
// fileSize bytes. b holds at least the file's first setupHeaderEnd bytes.
// Everything it returns is checked against fileSize, so callers may read the
// payload range without further bounds checks.
func parseSetupHeader(b []byte, fileSize int64) (setupHeader, error) {
	if len(b) < offHeaderMagic+len(headerMagic) || string(b[offHeaderMagic:offHeaderMagic+len(headerMagic)]) != headerMagic {
		return setupHeader{}, errNoSetupHeader
	}
	if len(b) < setupHeaderEnd {
		return setupHeader{}, fmt.Errorf("setup header truncated: %d bytes, need %d", len(b), setupHeaderEnd)
	}
	if f := binary.LittleEndian.Uint16(b[offBootFlag:]); f != bootFlag {
		return setupHeader{}, fmt.Errorf("boot_flag at 0x1fe is %#04x, want 0xaa55", f)
	}
	h := setupHeader{
		SetupSects:    int(b[offSetupSects]),
		Version:       binary.LittleEndian.Uint16(b[offVersion:]),
		LoadFlags:     b[offLoadFlags],
		PayloadOffset: binary.LittleEndian.Uint32(b[offPayloadOffset:]),
		PayloadLength: binary.LittleEndian.Uint32(b[offPayloadLength:]),
	}
	if h.SetupSects == 0 {
		h.SetupSects = defaultSects
	}
	if h.Version < minBootProtocol {
		return setupHeader{}, fmt.Errorf("boot protocol %d.%02d predates the payload fields of 2.08 (Linux 2.6.26)", h.Version>>8, h.Version&0xff)
	}
	if h.LoadFlags&loadedHigh == 0 {
		return setupHeader{}, errors.New("loadflags lack LOADED_HIGH: a zImage, not a bzImage")
	}
	// The smallest payload is a compressor's magic plus the 4-byte
	// decompressed size every x86 payload ends with.
	if h.PayloadLength < 8 {
		return setupHeader{}, fmt.Errorf("payload_length %d is too small for a compressed kernel", h.PayloadLength)
	}
	start := h.payloadStart()
	if end := start + int64(h.PayloadLength); end > fileSize {
		return setupHeader{}, fmt.Errorf("payload [%#x, %#x) ends past the file's %d bytes (truncated kernel, or wrong payload_offset/payload_length)", start, end, fileSize)
	}
	return h, nil
}

// KernelFormat reports whether path is a bzImage or an x86-64 ELF vmlinux,
// and rejects anything else (truncated files included) with the reason.
func KernelFormat(path string) (Format, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("open kernel: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("stat kernel %q: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("kernel %q is not a regular file", path)
	}
	format, err := kernelFormat(f, st.Size())
	if err != nil {
		return "", fmt.Errorf("kernel %q: %w", path, err)
	}
	return format, nil
}

// kernelFormat does KernelFormat's work on any reader of a file of size
// bytes; it is the entry point the fuzz target drives.
func kernelFormat(r io.ReaderAt, size int64) (Format, error) {
	head := make([]byte, setupHeaderEnd)
	n, err := r.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read header: %w", err)
	}
	head = head[:n]
	if bytes.HasPrefix(head, []byte(elf.ELFMAG)) {
		if err := checkVmlinux(r); err != nil {
			return "", err
		}
		return FormatELF, nil
	}
	if _, err := parseSetupHeader(head, size); err != nil {
		if errors.Is(err, errNoSetupHeader) {
			if size < setupHeaderEnd {
				return "", fmt.Errorf("%d bytes is too short for a bzImage setup header or an ELF vmlinux (empty or truncated file?)", size)
			}
			return "", fmt.Errorf("not a kernel: neither an ELF vmlinux nor a bzImage (%w)", err)
		}
		return "", fmt.Errorf("bzImage: %w", err)
	}
	return FormatBzImage, nil
}

// checkVmlinux checks that r holds an ELF that a VMM can load as an x86-64
// kernel: 64-bit little-endian x86-64, an executable, with something to load.
func checkVmlinux(r io.ReaderAt) error {
	ef, err := elf.NewFile(r)
	if err != nil {
		return fmt.Errorf("parse ELF: %w", err)
	}
	defer func() { _ = ef.Close() }()
	if ef.Class != elf.ELFCLASS64 || ef.Data != elf.ELFDATA2LSB || ef.Machine != elf.EM_X86_64 {
		return fmt.Errorf("ELF is %v %v %v, want ELFCLASS64 ELFDATA2LSB EM_X86_64", ef.Class, ef.Data, ef.Machine)
	}
	if ef.Type != elf.ET_EXEC {
		return fmt.Errorf("ELF type is %v, a vmlinux is ET_EXEC", ef.Type)
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_LOAD && p.Filesz > 0 {
			return nil
		}
	}
	return errors.New("ELF has no loadable segment")
}

// ExtractVmlinux writes the uncompressed ELF vmlinux held in the bzImage at
// bzImagePath to outPath. The payload is located through the setup header and
// its compressor identified from the payload's own magic, never by scanning
// the file. outPath appears only once a verified x86-64 ELF has been written
// in full; on any error, ctx cancellation included, nothing is left behind.
func ExtractVmlinux(ctx context.Context, bzImagePath, outPath string) error {
	if err := extractVmlinux(ctx, bzImagePath, outPath); err != nil {
		return fmt.Errorf("extract vmlinux from %q: %w", bzImagePath, err)
	}
	return nil
}

func extractVmlinux(ctx context.Context, bzImagePath, outPath string) error {
	in, err := os.Open(bzImagePath)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return errors.New("not a regular file")
	}
	head := make([]byte, setupHeaderEnd)
	n, err := in.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read setup header: %w", err)
	}
	if bytes.HasPrefix(head[:n], []byte(elf.ELFMAG)) {
		return errors.New("already an ELF vmlinux, not a bzImage (hint: use it as it is)")
	}
	h, err := parseSetupHeader(head[:n], st.Size())
	if err != nil {
		return fmt.Errorf("parse setup header: %w", err)
	}
	payload := io.NewSectionReader(in, h.payloadStart(), int64(h.PayloadLength))
	comp, err := detectCompression(payload)
	if err != nil {
		return fmt.Errorf("payload at %#x: %w", h.payloadStart(), err)
	}
	// Every x86 payload ends with the little-endian size of the kernel it
	// decompresses to (mkpiggy reads it there). For gzip it is the stream's
	// own ISIZE trailer; the other compressors get it appended by the
	// kernel's size_append, so it is not part of their stream.
	var tail [4]byte
	if _, err := payload.ReadAt(tail[:], int64(h.PayloadLength)-4); err != nil {
		return fmt.Errorf("read payload size trailer: %w", err)
	}
	want := int64(binary.LittleEndian.Uint32(tail[:]))
	if want > maxVmlinuxSize {
		return fmt.Errorf("payload declares a %d-byte kernel, over the %d-byte limit", want, maxVmlinuxSize)
	}
	stream := io.Reader(io.NewSectionReader(payload, 0, int64(h.PayloadLength)))
	if comp != CompressionGzip {
		stream = io.NewSectionReader(payload, 0, int64(h.PayloadLength)-4)
	}

	zr, err := decompress(ctx, comp, stream)
	if err != nil {
		return fmt.Errorf("decompress %s payload: %w", comp, err)
	}
	dec := &closeOnce{ReadCloser: zr}
	defer func() { _ = dec.Close() }()
	return writeFileAtomic(outPath, 0o644, func(out *os.File) error {
		// Read one byte more than declared so that a payload that
		// decompresses to more than its trailer says is caught too.
		got, err := io.Copy(out, io.LimitReader(ctxReader{ctx, dec}, want+1))
		if err != nil {
			return fmt.Errorf("decompress %s payload: %w", comp, err)
		}
		if err := dec.Close(); err != nil {
			return fmt.Errorf("decompress %s payload: %w", comp, err)
		}
		if got != want {
			return fmt.Errorf("%s payload decompressed to %s bytes, its trailer says %d (corrupt payload?)", comp, atLeast(got, want), want)
		}
		if err := checkVmlinux(out); err != nil {
			return fmt.Errorf("decompressed payload is not an x86-64 vmlinux: %w", err)
		}
		return nil
	})
}

// atLeast formats a byte count read through a limit of want+1 bytes.
func atLeast(got, want int64) string {
	if got > want {
		return fmt.Sprintf("more than %d", want)
	}
	return fmt.Sprint(got)
}

// payloadMagics identifies a payload's compressor by the header each
// compressor writes at the start of its stream, in the order
// lib/decompress.c tries them.
var payloadMagics = []struct {
	magic []byte
	comp  Compression
}{
	{[]byte{0x1f, 0x8b}, CompressionGzip},                                       // RFC 1952 ID1 ID2
	{[]byte("BZh"), CompressionBzip2},                                           // bzip2 stream header
	{[]byte{0x5d, 0x00, 0x00}, CompressionLZMA},                                 // lzma_alone: lc=3 lp=0 pb=2, then dict size LE
	{[]byte{0xfd, '7', 'z', 'X', 'Z', 0x00}, CompressionXZ},                     // xz stream header
	{[]byte{0x89, 'L', 'Z', 'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a}, CompressionLZO}, // lzop file header
	{[]byte{0x02, 0x21, 0x4c, 0x18}, CompressionLZ4},                            // lz4 legacy frame (lz4 -l)
	{[]byte{0x28, 0xb5, 0x2f, 0xfd}, CompressionZstd},                           // zstd frame
}

// detectCompression reads the payload's first bytes and names its compressor.
func detectCompression(payload io.ReaderAt) (Compression, error) {
	var head [16]byte
	n, err := payload.ReadAt(head[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read payload header: %w", err)
	}
	for _, m := range payloadMagics {
		if bytes.HasPrefix(head[:n], m.magic) {
			return m.comp, nil
		}
	}
	return "", fmt.Errorf("unknown payload compression (first bytes % x); supported: gzip, bzip2, lzma, xz, lzo, lz4, zstd (hint: a wrong payload_offset also looks like this)", head[:min(n, 8)])
}

// decompress returns a reader of the decompressed stream. Close releases the
// decoder and, for decoders run as a child process, reports how it exited.
func decompress(ctx context.Context, comp Compression, r io.Reader) (io.ReadCloser, error) {
	switch comp {
	case CompressionGzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, err
		}
		// The payload is exactly one member; anything after it is not ours.
		zr.Multistream(false)
		return zr, nil
	case CompressionBzip2:
		return io.NopCloser(bzip2.NewReader(r)), nil
	case CompressionLZMA:
		zr, err := lzma.ReaderConfig{DictCap: maxVmlinuxSize}.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(zr), nil
	case CompressionXZ:
		return decompressXZ(ctx, r)
	case CompressionLZO:
		// No maintained pure-Go LZO1X decoder handles lzop's container, so
		// the lzop tool the kernel build itself uses decodes it.
		return decompressCommand(ctx, r, "lzop", "-d", "-c")
	case CompressionLZ4:
		// The kernel writes lz4's legacy frame (lz4 -l); pierrec/lz4 reads it
		// to the end of the stream, which is why the size trailer is cut off
		// before it gets here.
		zr := lz4.NewReader(r)
		if err := zr.Apply(lz4.ConcurrencyOption(1)); err != nil {
			return nil, err
		}
		return io.NopCloser(zr), nil
	case CompressionZstd:
		// The kernel compresses with zstd -22 --ultra: a 128 MiB window.
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<28), zstd.WithDecoderMaxMemory(maxVmlinuxSize))
		if err != nil {
			return nil, err
		}
		return zr.IOReadCloser(), nil
	}
	return nil, fmt.Errorf("unsupported compression %q", comp)
}

// xzFilterLZMA2 is the xz filter ID of LZMA2, the only filter
// github.com/ulikunitz/xz decodes.
const xzFilterLZMA2 = 0x21

// decompressXZ decodes xz in Go when the stream uses LZMA2 alone. x86 kernels
// are compressed with the x86 BCJ filter in front of LZMA2 (scripts/xz_wrap.sh),
// which no maintained Go library decodes, so those go through the xz tool.
func decompressXZ(ctx context.Context, r io.Reader) (io.ReadCloser, error) {
	var head [1024 + 12]byte
	n, err := io.ReadFull(r, head[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	r = io.MultiReader(bytes.NewReader(head[:n]), r)
	ids, err := xzFirstBlockFilters(head[:n])
	if err != nil {
		return nil, err
	}
	if len(ids) == 1 && ids[0] == xzFilterLZMA2 {
		zr, err := xz.ReaderConfig{SingleStream: true}.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(zr), nil
	}
	return decompressCommand(ctx, r, "xz", "-d", "-c", "--single-stream")
}

// xzFirstBlockFilters returns the filter IDs of the first block of an xz
// stream (xz file format 1.2.1, sections 2.1 and 3.1), given the stream's
// first bytes.
func xzFirstBlockFilters(b []byte) ([]uint64, error) {
	const streamHeaderLen = 12
	if len(b) < streamHeaderLen+1 {
		return nil, errors.New("xz stream truncated before its first block")
	}
	b = b[streamHeaderLen:]
	if b[0] == 0 {
		return nil, errors.New("xz stream has no block")
	}
	hlen := (int(b[0]) + 1) * 4
	if len(b) < hlen {
		return nil, errors.New("xz block header truncated")
	}
	hdr := b[1 : hlen-4] // without the size byte and the CRC32
	if len(hdr) < 1 {
		return nil, errors.New("xz block header truncated")
	}
	flags := hdr[0]
	if flags&0x3c != 0 {
		return nil, fmt.Errorf("xz block flags %#02x set reserved bits", flags)
	}
	rd := bytes.NewReader(hdr[1:])
	if flags&0x40 != 0 { // compressed size present
		if _, err := binary.ReadUvarint(rd); err != nil {
			return nil, fmt.Errorf("xz block header compressed size: %w", err)
		}
	}
	if flags&0x80 != 0 { // uncompressed size present
		if _, err := binary.ReadUvarint(rd); err != nil {
			return nil, fmt.Errorf("xz block header uncompressed size: %w", err)
		}
	}
	count := int(flags&0x03) + 1
	ids := make([]uint64, 0, count)
	for range count {
		id, err := binary.ReadUvarint(rd)
		if err != nil {
			return nil, fmt.Errorf("xz filter id: %w", err)
		}
		psize, err := binary.ReadUvarint(rd)
		if err != nil {
			return nil, fmt.Errorf("xz filter properties size: %w", err)
		}
		if psize > uint64(rd.Len()) {
			return nil, errors.New("xz filter properties truncated")
		}
		if _, err := rd.Seek(int64(psize), io.SeekCurrent); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// commandReader is the stdout of a decompressor child process.
type commandReader struct {
	io.Reader
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	eof    bool // stdout was read to its end: the child is exiting by itself
	done   bool
	err    error
}

func (c *commandReader) Read(p []byte) (int, error) {
	n, err := c.Reader.Read(p)
	if errors.Is(err, io.EOF) {
		c.eof = true
	}
	return n, err
}

// decompressCommand runs name args with r on stdin and returns its stdout.
// Close kills it if it is still running and reports a failed exit with the
// tool's own message.
func decompressCommand(ctx context.Context, r io.Reader, name string, args ...string) (io.ReadCloser, error) {
	if _, err := exec.LookPath(name); err != nil {
		return nil, fmt.Errorf("find %s: %w (hint: install the package that provides %s)", name, err, name)
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = r
	stderr := &bytes.Buffer{}
	cmd.Stderr = &limitedBuffer{buf: stderr, max: 4096}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &commandReader{Reader: out, cmd: cmd, stderr: stderr}, nil
}

func (c *commandReader) Close() error {
	if c.done {
		return c.err
	}
	c.done = true
	// Reading stopped early (error, limit or cancellation): the child may
	// be blocked writing to the pipe, so end it rather than wait forever.
	// After a full read it is left to exit, so that its status is its own.
	if !c.eof {
		if err := c.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			c.err = fmt.Errorf("kill %s: %w", c.cmd.Path, err)
		}
	}
	if err := c.cmd.Wait(); err != nil && c.err == nil {
		c.err = fmt.Errorf("%s: %w", filepath.Base(c.cmd.Path), err)
		if msg := strings.TrimSpace(c.stderr.String()); msg != "" {
			c.err = fmt.Errorf("%w: %s", c.err, msg)
		}
	}
	return c.err
}

// closeOnce lets a decoder be closed both on the success path, where its
// error matters, and by a deferred cleanup.
type closeOnce struct {
	io.ReadCloser
	closed bool
	err    error
}

func (c *closeOnce) Close() error {
	if !c.closed {
		c.closed = true
		c.err = c.ReadCloser.Close()
	}
	return c.err
}

// limitedBuffer keeps the first max bytes written to it and drops the rest,
// so a chatty child cannot grow the daemon's memory.
type limitedBuffer struct {
	buf *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.max - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

// ctxReader fails reads once ctx is done, so long copies stop promptly.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// writeFileAtomic creates path with mode through a temporary file in the same
// directory that fill writes; path appears, complete and synced, only when
// fill succeeds, and the temporary file is removed on any failure.
func writeFileAtomic(path string, mode os.FileMode, fill func(*os.File) error) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := fill(tmp); err != nil {
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %q: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %q: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %q: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename %q: %w", tmp.Name(), err)
	}
	return syncDir(dir)
}

// syncDir makes a rename or creation in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %q: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %q: %w", dir, err)
	}
	return nil
}
