package firecracker

import (
	"encoding/binary"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// The test binary doubles as the console logger and as the fake
// firecracker executable (fcfake.Main, selected by its environment).
func TestMain(m *testing.M) {
	vmm.ConsoleLoggerMain()
	fcfake.Main()
	os.Exit(m.Run())
}

// shortDir returns a fresh directory with a short path: unix socket paths
// are limited to 107 bytes and t.TempDir's names can exceed that.
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// writeVmlinux writes the 64-byte header of an x86_64 ELF executable:
// enough for the driver's format check and for Firecracker's PUT
// /boot-source, which only opens the file (the kernel is parsed at
// InstanceStart, after KVM is set up).
func writeVmlinux(t testing.TB, dir string) string {
	t.Helper()
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = 2, 1, 1                // 64-bit, little endian, version 1
	binary.LittleEndian.PutUint16(h[16:], 2)  // ET_EXEC
	binary.LittleEndian.PutUint16(h[18:], 62) // EM_X86_64
	p := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(p, h, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeDisk creates a sparse raw disk image.
func writeDisk(t testing.TB, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	return p
}

// testConfig is a minimal bootable config in dir: kernel, root disk,
// vsock, serial console enabled.
func testConfig(t testing.TB, dir string) vmm.Config {
	t.Helper()
	return vmm.Config{
		ID:         "vm-test",
		CPUs:       2,
		MemoryMiB:  256,
		Kernel:     writeVmlinux(t, dir),
		Cmdline:    "console=ttyS0 panic=1",
		Disks:      []vmm.Disk{{ID: "root", Path: writeDisk(t, dir, "root.img"), Format: "raw"}},
		Vsock:      &vmm.Vsock{CID: 3, Path: filepath.Join(dir, "v.sock")},
		RunDir:     dir,
		ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// serveFake runs the fake's API in this process on a unix socket: the same
// server the fake binary runs, without the process around it.
func serveFake(t testing.TB, version string, opts fcfake.Options) (sock string, srv *fcfake.Server) {
	t.Helper()
	sock, srv, stop := startFake(t, version, opts)
	t.Cleanup(stop)
	return sock, srv
}

func startFake(t testing.TB, version string, opts fcfake.Options) (string, *fcfake.Server, func()) {
	t.Helper()
	spec, err := fcfake.LoadSpec(version)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "fc")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := fcfake.NewServer(spec, opts)
	hs := &http.Server{Handler: srv}
	go func() { _ = hs.Serve(ln) }()
	return sock, srv, func() {
		_ = hs.Close()
		srv.Close()
		_ = os.RemoveAll(dir)
	}
}

// fakeDriver returns a Driver whose executable is this test binary, run as
// the fake Firecracker of version.
func fakeDriver(t *testing.T, version string) *Driver {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fcfake.EnvVersion, version)
	return &Driver{Executable: exe}
}
