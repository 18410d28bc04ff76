// Package testutil holds helpers shared by banger's tests: requirement checks
// that skip with a clear reason, and bounded waits.
package testutil

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"
)

// RequireRoot skips the test unless it runs as root. CI runs as root and so
// runs every such test.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root (CI runs as root)")
	}
}

// RequireCommand skips the test when a host tool is missing. .ci/run
// installs every tool the tests name.
func RequireCommand(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("requires %s on PATH (installed by .ci/run)", n)
		}
	}
}

// SkipShort skips slow tests (real VM boots, image builds) under -short.
func SkipShort(t testing.TB, what string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("skipped under -short: %s", what)
	}
}

// WaitFor polls cond every interval until it returns true or timeout
// elapses, then fails the test with msg. Use it only where no push signal
// exists; waits are bounded and generous because CI machines are slow.
func WaitFor(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %s", timeout, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SHA256File is the hex SHA-256 of a file's content; a file that cannot be
// read fails the test.
func SHA256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
