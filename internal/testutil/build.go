package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BuildOptions stamp the binaries like `make build` does.
type BuildOptions struct {
	Version string
	Commit  string
	BuiltAt string
}

// BuildBinaries builds the named commands (e.g. "banger", "bangerd") into
// dir with version stamps and returns dir. It uses the module the test runs
// in, so it always builds the code under test.
func BuildBinaries(t testing.TB, dir string, opts BuildOptions, cmds ...string) string {
	t.Helper()
	root := ModuleRoot(t)
	const pkg = "github.com/bangerhq/banger/internal/version"
	ldflags := strings.Join([]string{
		"-X", pkg + ".Version=" + opts.Version,
		"-X", pkg + ".Commit=" + opts.Commit,
		"-X", pkg + ".BuiltAt=" + opts.BuiltAt,
	}, " ")
	args := []string{"build", "-ldflags", ldflags, "-o", dir + string(os.PathSeparator)}
	for _, c := range cmds {
		args = append(args, "./cmd/"+c)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %v: %v\n%s", cmds, err, out)
	}
	return dir
}

// ModuleRoot is the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		t.Fatal("not inside a Go module")
	}
	return filepath.Dir(mod)
}

// UserEnv returns an environment whose XDG directories all live under dir,
// so a banger started with it uses a private state, config and socket.
func UserEnv(dir string) []string {
	env := []string{
		"HOME=" + dir,
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "config"),
		"XDG_STATE_HOME=" + filepath.Join(dir, "state"),
		"XDG_DATA_HOME=" + filepath.Join(dir, "data"),
		"XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"),
	}
	for _, kv := range os.Environ() {
		switch strings.SplitN(kv, "=", 2)[0] {
		case "PATH", "GOCACHE", "GOPATH", "GOMODCACHE", "BANGER_TEST_CACHE", "TMPDIR":
			env = append(env, kv)
		}
	}
	return env
}
