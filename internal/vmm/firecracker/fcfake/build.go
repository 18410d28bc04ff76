package fcfake

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// staticPackage is the fake as a program (cmd/firecracker).
const staticPackage = "github.com/bangerhq/banger/internal/vmm/firecracker/fcfake/cmd/firecracker"

// BuildStatic builds the fake Firecracker of version as a static binary at
// path, with cgo off, so that it runs in a jailer's chroot as the musl
// Firecracker does. It runs the go command from the current directory,
// which must lie inside this module (a test's does).
func BuildStatic(ctx context.Context, path, version string) error {
	if _, err := LoadSpec(version); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", path, staticPackage)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("build static fake firecracker: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// JailBinaries are what a test needs to run jailed launches with the fakes:
// in Dir, a new directory others may enter (banger-helper requires its
// binaries to be root-owned there), the static fake Firecracker and a copy
// of the running test binary named JailerName, whose TestMain must hand a
// run under that name to the fake jailer.
type JailBinaries struct {
	Dir, Firecracker, Jailer string
}

// BuildJailBinaries lays out JailBinaries with a fake Firecracker of
// version. The caller removes Dir.
func BuildJailBinaries(ctx context.Context, version string) (JailBinaries, error) {
	dir, err := os.MkdirTemp("", "bgr-jailbin-")
	if err != nil {
		return JailBinaries{}, err
	}
	jb := JailBinaries{Dir: dir, Firecracker: filepath.Join(dir, "firecracker"), Jailer: filepath.Join(dir, JailerName)}
	if err := os.Chmod(dir, 0o755); err != nil {
		return jb, err
	}
	if err := BuildStatic(ctx, jb.Firecracker, version); err != nil {
		return jb, err
	}
	self, err := os.Executable()
	if err != nil {
		return jb, err
	}
	b, err := os.ReadFile(self)
	if err != nil {
		return jb, err
	}
	return jb, os.WriteFile(jb.Jailer, b, 0o755)
}
