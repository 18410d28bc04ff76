package cli_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
)

const commitA = "1c1ca7d6aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

// bin runs a built banger binary with env and returns stdout, stderr and the
// exit code.
func bin(t *testing.T, env []string, exe string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %v: %v", exe, args, err)
	}
	return out.String(), errb.String(), code
}

// stopDaemon stops whatever daemon serves home's socket.
func stopDaemon(t *testing.T, home string) {
	c := client.New(filepath.Join(home, "run", "banger", "bangerd.sock"))
	v, err := c.Version(context.Background())
	if err != nil {
		return
	}
	_, _ = c.Shutdown(context.Background(), api.ShutdownRequest{Reason: "test cleanup"})
	testutil.WaitFor(t, 20*time.Second, "daemon to exit", func() bool {
		return syscall.Kill(v.PID, 0) != nil
	})
}

// `make build` stamps both binaries, and --version prints exactly one line
// in the documented format.
func TestVersionLine(t *testing.T) {
	dir := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "v0.1.0", Commit: "abcd1234ef567890abcd1234ef567890abcd1234", BuiltAt: "2026-04-28T20:45:50Z"}, "banger", "bangerd")
	env := testutil.UserEnv(t.TempDir())
	for _, name := range []string{"banger", "bangerd"} {
		out, errOut, code := bin(t, env, filepath.Join(dir, name), "--version")
		want := name + " v0.1.0 (commit abcd1234, built 2026-04-28T20:45:50Z)\n"
		if code != 0 || out != want || errOut != "" {
			t.Errorf("%s --version = %q (stderr %q, exit %d), want %q", name, out, errOut, code, want)
		}
	}
	dev := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "", Commit: commitA, BuiltAt: "2026-04-28T20:45:50Z"}, "banger")
	out, _, _ := bin(t, env, filepath.Join(dev, "banger"), "--version")
	if out != "banger dev (commit 1c1ca7d6, built 2026-04-28T20:45:50Z)\n" {
		t.Errorf("dev build --version = %q", out)
	}
}

// `banger version` reports this build in full and the daemon's, once one runs.
func TestVersionCommand(t *testing.T) {
	dir := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "v0.1.0", Commit: commitA, BuiltAt: "2026-04-28T20:45:50Z"}, "banger", "bangerd")
	home := t.TempDir()
	env := testutil.UserEnv(home)
	t.Cleanup(func() { stopDaemon(t, home) })
	out, _, code := bin(t, env, filepath.Join(dir, "banger"), "version")
	for _, want := range []string{"version:  v0.1.0", "commit:   " + commitA, "built_at: 2026-04-28T20:45:50Z", "go:       go1.", "platform: linux/", "daemon:   not running"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("banger version lacks %q:\n%s", want, out)
		}
	}
	bin(t, env, filepath.Join(dir, "banger"), "vm", "list")
	out, _, _ = bin(t, env, filepath.Join(dir, "banger"), "version")
	if !regexp.MustCompile(`daemon:\s+bangerd v0.1.0 \(commit 1c1ca7d6, built 2026-04-28T20:45:50Z\), pid \d+, user mode`).MatchString(out) {
		t.Errorf("banger version does not show the daemon:\n%s", out)
	}
}

// The CLI starts a daemon when none runs; after a rebuild it restarts the
// stale daemon, says so in one line, and prints the list.
func TestStaleDaemonRestart(t *testing.T) {
	dir := t.TempDir()
	home := t.TempDir()
	env := testutil.UserEnv(home)
	t.Cleanup(func() { stopDaemon(t, home) })
	testutil.BuildBinaries(t, dir, testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "banger", "bangerd")
	banger := filepath.Join(dir, "banger")

	out, errOut, code := bin(t, env, banger, "vm", "list", "--json")
	if code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("first vm list: exit %d, %q, %q", code, out, errOut)
	}
	c := client.New(filepath.Join(home, "run", "banger", "bangerd.sock"))
	before, err := c.Version(context.Background())
	if err != nil || before.BuiltAt != "2026-01-01T00:00:00Z" {
		t.Fatalf("daemon after first run: %+v, %v", before, err)
	}

	// Rebuild both binaries in place, as `make build` does.
	testutil.BuildBinaries(t, dir, testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-02-02T00:00:00Z"}, "banger", "bangerd")
	out, errOut, code = bin(t, env, banger, "vm", "list", "--json")
	if code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("vm list after rebuild: exit %d, %q, %q", code, out, errOut)
	}
	if lines := strings.Split(strings.TrimSpace(errOut), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "restarted bangerd") {
		t.Fatalf("restart not reported in one line: %q", errOut)
	}
	after, err := c.Version(context.Background())
	if err != nil || after.BuiltAt != "2026-02-02T00:00:00Z" || after.PID == before.PID {
		t.Fatalf("daemon after rebuild: %+v (before pid %d), %v", after, before.PID, err)
	}
	// Same build again: no restart.
	_, errOut, _ = bin(t, env, banger, "vm", "list")
	if strings.Contains(errOut, "restarted") {
		t.Fatalf("restarted an up-to-date daemon: %q", errOut)
	}
}

// bangerd --check-migrations from the shell: one line, exit 0/1/2.
func TestCheckMigrationsBinary(t *testing.T) {
	dir := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "bangerd")
	bangerd := filepath.Join(dir, "bangerd")
	known := store.KnownMigrations()
	ids := func(xs []int) string { return strings.ReplaceAll(fmt.Sprint(xs), ",", "") }
	ctx := context.Background()
	cases := []struct {
		name    string
		prepare func(db string) error
		code    int
		line    string
	}{
		{"fresh", func(string) error { return nil }, 1, "migrations needed: pending " + ids(known) + " (binary will apply on first Open)"},
		{"first only", func(db string) error { return store.MigrateTo(ctx, db, 1) }, 1, "migrations needed: pending " + ids(known[1:]) + " (binary will apply on first Open)"},
		{"current", func(db string) error { return store.MigrateTo(ctx, db, len(known)) }, 0, fmt.Sprintf("compatible: schema at migration %d", len(known))},
		{"unknown 99", func(db string) error {
			if err := store.MigrateTo(ctx, db, len(known)); err != nil {
				return err
			}
			raw, err := sql.Open("sqlite", db)
			if err != nil {
				return err
			}
			defer func() { _ = raw.Close() }()
			_, err = raw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', 'x')`)
			return err
		}, 2, "incompatible: database has migrations [99] unknown to this binary"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			home := t.TempDir()
			if err := tc.prepare(filepath.Join(home, "state", "banger", "banger.db")); err != nil {
				t.Fatal(err)
			}
			out, errOut, code := bin(t, testutil.UserEnv(home), bangerd, "--check-migrations")
			if code != tc.code || out != tc.line+"\n" {
				t.Fatalf("exit %d, %q (stderr %q); want %d %q", code, out, errOut, tc.code, tc.line)
			}
		})
	}
}

// With --system the CLI never spawns a daemon; it says how to start one.
func TestSystemModeDoesNotSpawn(t *testing.T) {
	if _, err := os.Stat("/run/banger/bangerd.sock"); err == nil {
		t.Skip("a system daemon is installed here")
	}
	dir := testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "banger", "bangerd")
	_, errOut, code := bin(t, testutil.UserEnv(t.TempDir()), filepath.Join(dir, "banger"), "--system", "vm", "list")
	if code == 0 || !strings.Contains(errOut, "systemctl start bangerd") {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	if _, err := os.Stat("/run/banger/bangerd.sock"); err == nil {
		t.Fatal("a system daemon was spawned")
	}
}
