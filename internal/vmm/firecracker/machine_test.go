package firecracker

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/vmm"
)

// Exit statuses map to what happened: 0 is the guest resetting the
// machine, a kill is a kill, Firecracker's own codes are named, and a
// status this daemon could not see is taken from Firecracker's log.
func TestClassifyExit(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		code                  int
		killed, shutdownAsked bool
		logged                int
		want                  vmm.Exit
	}{
		{"guest reset", 0, false, false, -1, vmm.Exit{GuestPoweroff: true, Code: 0, Reason: "guest reset the machine (poweroff or reboot)"}},
		{"after ctrl-alt-del", 0, false, true, -1, vmm.Exit{GuestPoweroff: true, Code: 0, Reason: "guest reset the machine (poweroff or reboot)"}},
		{"kill", 137, true, false, -1, vmm.Exit{Code: 137, Reason: "killed"}},
		{"sigkill from elsewhere", 137, false, false, -1, vmm.Exit{Code: 137, Reason: "killed by SIGKILL"}},
		{"sigterm", 143, false, false, -1, vmm.Exit{Code: 143, Reason: "terminated by SIGTERM"}},
		{"seccomp", 148, false, false, -1, vmm.Exit{Code: 148, Reason: "firecracker was stopped by seccomp (bad syscall)"}},
		{"generic error", 1, false, true, -1, vmm.Exit{Code: 1, Reason: "firecracker failed (generic error; see its log)"}},
		{"sigsegv by signal", 128 + 11, false, false, -1, vmm.Exit{Code: 139, Reason: "killed by segmentation fault"}},
		{"odd status", 42, false, false, -1, vmm.Exit{Code: 42, Reason: "exited with status 42"}},
		{"not our child, logged 0", -1, false, false, 0, vmm.Exit{GuestPoweroff: true, Code: 0, Reason: "guest reset the machine (poweroff or reboot)"}},
		{"not our child, logged error", -1, false, false, 1, vmm.Exit{Code: 1, Reason: "firecracker failed (generic error; see its log)"}},
		{"not our child, killed", -1, true, false, -1, vmm.Exit{Code: -1, Reason: "killed"}},
		{"not our child, after ctrl-alt-del", -1, false, true, -1, vmm.Exit{GuestPoweroff: true, Code: -1, Reason: "exited after ctrl-alt-del (status unknown)"}},
		{"not our child, unknown", -1, false, false, -1, vmm.Exit{Code: -1, Reason: "exited (status unknown: not started by this daemon)"}},
	} {
		got := classifyExit(tc.code, tc.killed, tc.shutdownAsked, tc.logged)
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.name, diff)
		}
	}
}

// The exit code is read from Firecracker's last exit line, whichever of
// its two forms, and -1 without one.
func TestLastExitCode(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		log  string
		want int
	}{
		{"2026-11-25T17:56:21.871393598 [vm:main:INFO] Running Firecracker v1.14.2\n" +
			"2026-11-25T17:58:00.000000000 [vm:main:INFO] Firecracker exiting successfully. exit_code=0\n", 0},
		{"[anonymous-instance:main] RunWithApiError error: Failed to open the API socket at: fc.sock. Check that it is not already used.\n" +
			"[anonymous-instance:main] Firecracker exiting with error. exit_code=1\n", 1},
		{"[vm:main] Firecracker exiting with error. exit_code=1\n[vm:main] Firecracker exiting successfully. exit_code=0\n", 0},
		{"[vm:main:INFO] Running Firecracker v1.14.2\n", -1},
		{"", -1},
	} {
		p := filepath.Join(dir, "firecracker.log")
		if err := os.WriteFile(p, []byte(tc.log), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := lastExitCode(p); got != tc.want {
			t.Errorf("lastExitCode(%q) = %d, want %d", tc.log, got, tc.want)
		}
	}
	if got := lastExitCode(filepath.Join(dir, "missing.log")); got != -1 {
		t.Errorf("missing log: %d", got)
	}
}
