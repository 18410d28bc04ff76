package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The KVM probe answers "do KVM guests really run here?" by running one.
// The existence of /dev/kvm proves nothing: on the machines banger is built
// on, /dev/kvm opens and KVM_CREATE_VM succeeds, yet QEMU+KVM crawls through
// the kernel's decompressor for minutes and Firecracker dies with
// KVM_EXIT_INTERNAL_ERROR. Measured there with the probe's own test guest:
// touching 32 MiB took 9.4 s under KVM and 0.3 s under TCG, and a 100M
// iteration loop did not finish in 20 s under KVM (0.7 s under TCG).
//
// So after the cheap checks (open, KVM_GET_API_VERSION, KVM_CREATE_VM) the
// probe boots a 64 KiB firmware image it generates (probeGuest) under
// `qemu-system-x86_64 -accel kvm -cpu host`, the same accelerator and CPU
// model the QEMU driver uses. The guest enters 64-bit mode, touches 32 MiB,
// runs a short loop, prints a marker on the serial port and exits through
// isa-debug-exit. A healthy KVM host finishes in a few milliseconds of guest
// time and software emulation in well under a second, so a deadline of a few
// seconds separates "KVM works" from "KVM is there but guests crawl" without
// being sensitive to a loaded machine.

// DefaultProbeTimeout bounds the test guest's run, QEMU start included.
const DefaultProbeTimeout = 3 * time.Second

// ProbeOptions configures ProbeKVM. The zero value probes /dev/kvm with
// qemu-system-x86_64 from PATH, without a cache.
type ProbeOptions struct {
	// CacheFile keeps the last result as JSON, e.g.
	// filepath.Join(layout.CacheDir(), "kvm-probe.json"). Empty: no cache.
	CacheFile string
	// Force ignores a cached result (doctor --recheck).
	Force bool
	// QEMU is the QEMU binary (default qemu-system-x86_64 from PATH).
	QEMU string
	// Timeout bounds the test guest (default DefaultProbeTimeout).
	Timeout time.Duration
	// DevKVM is the KVM device (default /dev/kvm); tests point it elsewhere.
	DevKVM string
	Log    *slog.Logger

	// accel is "kvm" except in tests that check the test guest itself
	// under TCG; cpu follows it.
	accel string
}

// ProbeKey is what a cached result depends on: a new kernel, a new QEMU or
// a reboot (module parameters, firmware settings) may change the answer.
type ProbeKey struct {
	KernelRelease string `json:"kernel_release"`
	QEMUVersion   string `json:"qemu_version"` // first line of --version; empty without QEMU
	DevKVM        bool   `json:"dev_kvm"`
	BootID        string `json:"boot_id"`
}

// ProbeResult is the probe's verdict.
type ProbeResult struct {
	Usable bool `json:"usable"`
	// Reason says why KVM is not usable, or what proved it is.
	Reason  string        `json:"reason"`
	Checked time.Time     `json:"checked"`
	Elapsed time.Duration `json:"elapsed_ns"`
	Key     ProbeKey      `json:"key"`
	// Cached is true when the result came from CacheFile.
	Cached bool `json:"-"`
}

// Explain renders the result for `banger doctor`.
func (r ProbeResult) Explain() string {
	var b strings.Builder
	if r.Usable {
		fmt.Fprintf(&b, "KVM: usable: %s\n", r.Reason)
	} else {
		fmt.Fprintf(&b, "KVM: not usable: %s\n", r.Reason)
	}
	src := "probed"
	if r.Cached {
		src = "cached result, probed"
	}
	qemu := r.Key.QEMUVersion
	if qemu == "" {
		qemu = "no QEMU"
	}
	fmt.Fprintf(&b, "  %s %s in %s (kernel %s, %s)\n", src, r.Checked.Local().Format(time.DateTime),
		r.Elapsed.Round(time.Millisecond), r.Key.KernelRelease, qemu)
	if !r.Usable {
		b.WriteString("  hint: VMs run under QEMU with TCG (software emulation): they work, but boot and run several times slower\n")
	}
	return b.String()
}

// ProbeKVM reports whether KVM guests really run on this host, from the
// cache when its key still matches.
func ProbeKVM(ctx context.Context, o ProbeOptions) ProbeResult {
	o.defaults()
	key := probeKey(ctx, o)
	if o.CacheFile != "" && !o.Force {
		if r, err := loadProbe(o.CacheFile); err == nil && r.Key == key {
			r.Cached = true
			return r
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			o.Log.Warn("ignoring unreadable KVM probe cache", "file", o.CacheFile, "err", err)
		}
	}
	start := time.Now()
	usable, reason := runProbe(ctx, o, key)
	r := ProbeResult{Usable: usable, Reason: reason, Checked: start.UTC(), Elapsed: time.Since(start), Key: key}
	o.Log.Info("probed KVM", "usable", r.Usable, "reason", r.Reason, "elapsed", r.Elapsed)
	// A cancelled probe says nothing about the host; do not remember it.
	if o.CacheFile != "" && ctx.Err() == nil {
		if err := saveProbe(o.CacheFile, r); err != nil {
			o.Log.Warn("cannot cache KVM probe result", "file", o.CacheFile, "err", err)
		}
	}
	return r
}

func (o *ProbeOptions) defaults() {
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultProbeTimeout
	}
	if o.DevKVM == "" {
		o.DevKVM = "/dev/kvm"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.accel == "" {
		o.accel = "kvm"
	}
}

func probeKey(ctx context.Context, o ProbeOptions) ProbeKey {
	var k ProbeKey
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		k.KernelRelease = unix.ByteSliceToString(u.Release[:])
	}
	if _, err := os.Stat(o.DevKVM); err == nil {
		k.DevKVM = true
	}
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		k.BootID = strings.TrimSpace(string(b))
	}
	k.QEMUVersion, _ = qemuVersion(ctx, o.QEMU)
	return k
}

func qemuVersion(ctx context.Context, qemu string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, qemu, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", qemu, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line), nil
}

// KVM ioctls from <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01).
const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
	kvmAPIVersion    = 12 // stable since Linux 2.6.22
)

// runProbe returns the verdict and its reason; it never caches.
func runProbe(ctx context.Context, o ProbeOptions, key ProbeKey) (bool, string) {
	if o.accel == "kvm" {
		if reason := checkDevKVM(o.DevKVM); reason != "" {
			return false, reason
		}
	}
	if key.QEMUVersion == "" {
		if _, err := exec.LookPath(o.QEMU); err != nil {
			return false, fmt.Sprintf("KVM_CREATE_VM works, but %s is not installed, so no test guest could prove that KVM guests run (hint: install qemu-system-x86)", o.QEMU)
		}
	}
	dir, err := os.MkdirTemp("", "banger-kvm-probe-")
	if err != nil {
		return false, fmt.Sprintf("cannot create a directory for the test guest: %v", err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	fw := filepath.Join(dir, "probe.bin")
	if err := os.WriteFile(fw, probeGuest(), 0o600); err != nil {
		return false, fmt.Sprintf("cannot write the test guest: %v", err)
	}

	cpu := "host"
	if o.accel != "kvm" {
		cpu = "max"
	}
	rctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := exec.CommandContext(rctx, o.QEMU,
		"-M", "microvm", "-accel", o.accel, "-cpu", cpu, "-m", "64", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "stdio", "-bios", fw,
		"-device", fmt.Sprintf("isa-debug-exit,iobase=%#x,iosize=4", probeExitPort))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = time.Second
	start := time.Now()
	err = cmd.Run()
	took := time.Since(start).Round(time.Millisecond)

	out := stdout.String()
	code := -1
	if cmd.ProcessState != nil {
		code = cmd.ProcessState.ExitCode()
	}
	what := fmt.Sprintf("%s -accel %s", filepath.Base(o.QEMU), o.accel)
	if strings.Contains(out, probeMarker) && code == probeExitStatus {
		return true, fmt.Sprintf("a test guest ran under %s (64-bit mode, 32 MiB touched, marker seen) in %s", what, took)
	}
	if ctx.Err() != nil {
		return false, fmt.Sprintf("probe cancelled: %v", ctx.Err())
	}
	prefix := "KVM_CREATE_VM works, but "
	if o.accel != "kvm" {
		prefix = ""
	}
	if rctx.Err() != nil {
		return false, fmt.Sprintf("%sa test guest under %s did not finish within %s (%s): KVM guests do not run properly on this host",
			prefix, what, o.Timeout, probeStage(out))
	}
	status := "did not start"
	if cmd.ProcessState != nil {
		status = cmd.ProcessState.String()
	}
	detail := qemuError(stderr.String())
	if detail == "" && err != nil {
		detail = err.Error()
	}
	return false, fmt.Sprintf("%s%s could not run a test guest (%s, %s): %s", prefix, what, status, probeStage(out), detail)
}

// qemuError picks the line of QEMU's stderr that says what went wrong: the
// first that is not a warning (an abort prints the cause first and the
// assertion after it).
func qemuError(stderr string) string {
	var first string
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if first == "" {
			first = l
		}
		if !strings.Contains(l, ": warning: ") {
			return l
		}
	}
	return first
}

// checkDevKVM does the cheap checks and returns "" when they pass.
func checkDevKVM(dev string) string {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Sprintf("%s does not exist (hint: enable virtualization in the firmware and load kvm_intel or kvm_amd)", dev)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Sprintf("cannot open %s: permission denied (hint: add the user to the kvm group)", dev)
	case err != nil:
		return fmt.Sprintf("cannot open %s: %v", dev, err)
	}
	defer f.Close()
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil {
		return fmt.Sprintf("%s is not a KVM device: KVM_GET_API_VERSION: %v", dev, err)
	}
	if v != kvmAPIVersion {
		return fmt.Sprintf("%s reports KVM API version %d, want %d", dev, v, kvmAPIVersion)
	}
	vm, err := unix.IoctlRetInt(int(f.Fd()), kvmCreateVM)
	if err != nil {
		return fmt.Sprintf("%s opens but KVM_CREATE_VM fails: %v (hint: another hypervisor may hold VT-x/AMD-V)", dev, err)
	}
	_ = unix.Close(vm)
	return ""
}

// probeStage says how far the test guest got, from the progress digits it
// writes to the serial port.
func probeStage(out string) string {
	switch {
	case strings.Contains(out, "3"):
		return "it finished its work but its marker was incomplete"
	case strings.Contains(out, "2"):
		return "it touched 32 MiB, then stalled in a short loop"
	case strings.Contains(out, "1"):
		return "it reached 64-bit mode, then stalled touching 32 MiB"
	default:
		return "it never reached 64-bit mode"
	}
}

func loadProbe(path string) (ProbeResult, error) {
	var r ProbeResult
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("decode %s: %w", path, err)
	}
	return r, nil
}

func saveProbe(path string, r ProbeResult) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".kvm-probe-*")
	if err != nil {
		return fmt.Errorf("create temp file: %w", err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	// Rename so a concurrent reader sees the old result or the new one.
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}

// The test guest's contract with runProbe.
const (
	probeMarker     = "BANGER-KVM-PROBE-OK"
	probeExitPort   = 0xf4
	probeExitValue  = 0x2a
	probeExitStatus = probeExitValue<<1 | 1 // isa-debug-exit exits with (value << 1) | 1
	probeLoopCount  = 20_000_000
	probeTouchBytes = 32 << 20
)

// probeGuest returns a 64 KiB firmware image for `qemu -bios`. QEMU maps it
// below 4 GiB and, aliased, at 0xF0000; the CPU starts in real mode at the
// reset vector 0xFFFF0 (blob offset 0xFFF0). The code:
//
//	real mode:  lgdt; CR0.PE=1; far jump to 32-bit code
//	32-bit:     flat data segments; page tables at 0x1000 (PML4), 0x2000
//	            (PDPT), 0x3000 (PD: 512 × 2 MiB identity pages = 1 GiB);
//	            CR4.PAE, EFER.LME, CR0.PG; far jump to 64-bit code
//	64-bit:     '1' → serial; one write per 4 KiB page over 32 MiB from
//	            4 MiB, then rep stosq over the same range; '2' → serial;
//	            a 20M iteration loop; '3' → serial; the marker; write 0x2a
//	            to isa-debug-exit (QEMU exits with status 85); hlt loop.
//
// Nothing here writes to the ROM: descriptors carry their accessed bit, and
// page tables live in RAM. The listing was checked against GNU as; a test
// runs it under TCG.
func probeGuest() []byte {
	const (
		size     = 64 << 10
		low      = 0xF0000 // where the image's bytes are aliased below 1 MiB
		codeAt   = 0xFE00  // offset of the code within the image
		resetAt  = 0xFFF0  // the reset vector's offset
		serial   = 0x3f8
		pml4     = 0x1000
		touchAt  = 4 << 20
		pageSize = 4096
	)
	a := &asm{base: codeAt, labels: map[string]int{}}

	// 16-bit real mode, CS base 0xF0000 after the reset vector's far jump.
	a.label("entry16")
	a.emit(0xFA)                         // cli
	a.emit(0x2E, 0x66, 0x0F, 0x01, 0x16) // lgdtl %cs:gdtr (32-bit base)
	a.abs16("gdtr")
	a.emit(0x0F, 0x20, 0xC0) // mov %cr0,%eax
	a.emit(0x0C, 0x01)       // or $1,%al (PE)
	a.emit(0x0F, 0x22, 0xC0) // mov %eax,%cr0
	a.emit(0x66, 0xEA)       // ljmpl $0x08,$prot32
	a.abs32("prot32", low)
	a.emit(0x08, 0x00)

	// 32-bit protected mode.
	a.label("prot32")
	a.emit(0x66, 0xB8, 0x10, 0x00) // mov $0x10,%ax
	a.emit(0x8E, 0xD8)             // mov %ax,%ds
	a.emit(0x8E, 0xC0)             // mov %ax,%es
	a.emit(0x8E, 0xD0)             // mov %ax,%ss
	a.emit(0xC7, 0x05)             // movl $0x2003,0x1000 (PML4[0] → PDPT, present|rw)
	a.imm32(pml4)
	a.imm32(0x2003)
	a.emit(0xC7, 0x05) // movl $0x3003,0x2000 (PDPT[0] → PD)
	a.imm32(0x2000)
	a.imm32(0x3003)
	a.emit(0xBF) // mov $0x3000,%edi
	a.imm32(0x3000)
	a.emit(0xB8) // mov $0x83,%eax (present|rw|2 MiB page)
	a.imm32(0x83)
	a.emit(0xB9) // mov $512,%ecx
	a.imm32(512)
	a.label("pd")
	a.emit(0x89, 0x07)                   // mov %eax,(%edi)
	a.emit(0xC7, 0x47, 0x04, 0, 0, 0, 0) // movl $0,4(%edi)
	a.emit(0x05)                         // add $0x200000,%eax
	a.imm32(2 << 20)
	a.emit(0x83, 0xC7, 0x08) // add $8,%edi
	a.emit(0xE2)             // loop pd
	a.rel8("pd")
	a.emit(0xB8) // mov $0x1000,%eax
	a.imm32(pml4)
	a.emit(0x0F, 0x22, 0xD8) // mov %eax,%cr3
	a.emit(0x0F, 0x20, 0xE0) // mov %cr4,%eax
	a.emit(0x83, 0xC8, 0x20) // or $0x20,%eax (PAE)
	a.emit(0x0F, 0x22, 0xE0) // mov %eax,%cr4
	a.emit(0xB9)             // mov $0xC0000080,%ecx (EFER)
	a.imm32(0xC0000080)
	a.emit(0x0F, 0x32) // rdmsr
	a.emit(0x0D)       // or $0x100,%eax (LME)
	a.imm32(0x100)
	a.emit(0x0F, 0x30)       // wrmsr
	a.emit(0x0F, 0x20, 0xC0) // mov %cr0,%eax
	a.emit(0x0D)             // or $0x80000000,%eax (PG)
	a.imm32(0x80000000)
	a.emit(0x0F, 0x22, 0xC0) // mov %eax,%cr0
	a.emit(0xEA)             // ljmp $0x18,$long64
	a.abs32("long64", low)
	a.emit(0x18, 0x00)
	a.label("long64")                          // 64-bit long mode
	a.emit(0x66, 0xBA, serial&0xff, serial>>8) // mov $0x3f8,%dx
	a.emit(0xB0, '1', 0xEE)                    // mov $'1',%al; out %al,(%dx)
	a.emit(0xBF)                               // mov $touchAt,%edi
	a.imm32(touchAt)
	a.emit(0xB9) // mov $pages,%ecx
	a.imm32(probeTouchBytes / pageSize)
	a.label("touch")
	a.emit(0x48, 0x89, 0x3F) // mov %rdi,(%rdi)
	a.emit(0x48, 0x81, 0xC7) // add $4096,%rdi
	a.imm32(pageSize)
	a.emit(0xE2) // loop touch
	a.rel8("touch")
	a.emit(0xBF) // mov $touchAt,%edi
	a.imm32(touchAt)
	a.emit(0xB9) // mov $qwords,%ecx
	a.imm32(probeTouchBytes / 8)
	a.emit(0x31, 0xC0)       // xor %eax,%eax
	a.emit(0xF3, 0x48, 0xAB) // rep stos %rax,(%rdi)
	a.emit(0xB0, '2', 0xEE)  // mov $'2',%al; out %al,(%dx)
	a.emit(0xB9)             // mov $count,%ecx
	a.imm32(probeLoopCount)
	a.label("spin")
	a.emit(0xFF, 0xC9) // dec %ecx
	a.emit(0x75)       // jnz spin
	a.rel8("spin")
	a.emit(0xB0, '3', 0xEE) // mov $'3',%al; out %al,(%dx)
	a.emit(0xBE)            // mov $msg,%esi
	a.abs32("msg", low)
	a.label("print")
	a.emit(0xAC)       // lods %ds:(%rsi),%al
	a.emit(0x84, 0xC0) // test %al,%al
	a.emit(0x74)       // jz exit
	a.rel8("exit")
	a.emit(0xEE) // out %al,(%dx)
	a.emit(0xEB) // jmp print
	a.rel8("print")
	a.label("exit")
	a.emit(0xB0, probeExitValue) // mov $0x2a,%al
	a.emit(0xE6, probeExitPort)  // out %al,$0xf4
	a.label("halt")
	a.emit(0xF4) // hlt
	a.emit(0xEB) // jmp halt
	a.rel8("halt")

	// Data: the GDT (8-byte aligned), its descriptor and the marker.
	for (a.base+len(a.buf))%8 != 0 {
		a.emit(0x90)
	}
	a.label("gdt")
	for _, d := range []uint64{
		0,                  // null
		0x00CF9B000000FFFF, // 0x08: 32-bit code, flat, accessed
		0x00CF93000000FFFF, // 0x10: data, flat, accessed
		0x00AF9B000000FFFF, // 0x18: 64-bit code (L=1), accessed
	} {
		a.buf = binary.LittleEndian.AppendUint64(a.buf, d)
	}
	a.label("gdtr")
	a.emit(31, 0) // limit: 4 descriptors
	a.abs32("gdt", low)
	a.label("msg")
	a.emit([]byte(probeMarker + "\n\x00")...)

	img := make([]byte, size)
	code := a.link()
	if codeAt+len(code) > resetAt {
		panic("probe guest code overlaps the reset vector")
	}
	copy(img[codeAt:], code)
	// Reset vector: ljmp $0xF000,$entry16 (CS base becomes 0xF0000).
	entry := a.labels["entry16"]
	copy(img[resetAt:], []byte{0xEA, byte(entry), byte(entry >> 8), 0x00, 0xF0})
	return img
}

// asm is just enough of an assembler for probeGuest: bytes, labels and
// three kinds of fixups. Label values are offsets in the image.
type asm struct {
	base   int // image offset of buf[0]
	buf    []byte
	labels map[string]int
	fixups []asmFixup
}

type asmFixup struct {
	at    int // index in buf
	label string
	kind  byte // '8': rel8, 'w': abs16 image offset, 'd': abs32 (add)
	add   int
}

func (a *asm) emit(b ...byte)     { a.buf = append(a.buf, b...) }
func (a *asm) imm32(v uint32)     { a.buf = binary.LittleEndian.AppendUint32(a.buf, v) }
func (a *asm) label(name string)  { a.labels[name] = a.base + len(a.buf) }
func (a *asm) rel8(label string)  { a.fix(label, '8', 0, 1) }
func (a *asm) abs16(label string) { a.fix(label, 'w', 0, 2) }
func (a *asm) abs32(label string, add int) {
	a.fix(label, 'd', add, 4)
}

func (a *asm) fix(label string, kind byte, add, n int) {
	a.fixups = append(a.fixups, asmFixup{at: len(a.buf), label: label, kind: kind, add: add})
	a.buf = append(a.buf, make([]byte, n)...)
}

func (a *asm) link() []byte {
	for _, f := range a.fixups {
		v, ok := a.labels[f.label]
		if !ok {
			panic("probe guest: undefined label " + f.label)
		}
		switch f.kind {
		case '8':
			d := v - (a.base + f.at + 1)
			if d < -128 || d > 127 {
				panic("probe guest: jump out of rel8 range to " + f.label)
			}
			a.buf[f.at] = byte(int8(d))
		case 'w':
			binary.LittleEndian.PutUint16(a.buf[f.at:], uint16(v))
		case 'd':
			binary.LittleEndian.PutUint32(a.buf[f.at:], uint32(v+f.add))
		}
	}
	return a.buf
}
