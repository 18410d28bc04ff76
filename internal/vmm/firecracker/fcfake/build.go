package fcfake

import (
	"context"
	"fmt"
	"os"
	"os/exec"
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
