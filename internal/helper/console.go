package helper

import (
	"fmt"
	"os"
	"strconv"

	"github.com/bangerhq/banger/internal/vmm"
)

// The console logger of a jailed VM is the helper's own binary, started
// as the owner with this environment: it copies its stdin, the jailed
// Firecracker's stdout and stderr, into a size-capped file in the VM's
// directory. Running as the owner, it writes nothing the owner could not,
// whatever the owner puts at that path; it lives in the VM's cgroup, so it
// outlives a helper restart and dies with the VM.
const (
	envConsoleLog    = "BANGER_HELPER_CONSOLE_LOG"
	envConsoleLogMax = "BANGER_HELPER_CONSOLE_LOG_MAX"
	consoleLogName   = "console.log"
)

// consoleLoggerMain runs the console logger when the environment asks for
// it, and then exits the process; otherwise it returns false.
func consoleLoggerMain() bool {
	path := os.Getenv(envConsoleLog)
	if path == "" {
		return false
	}
	if os.Geteuid() == 0 {
		// The helper never starts it as root; refusing keeps a path the
		// owner controls from being written with root's rights.
		fmt.Fprintln(os.Stderr, "banger-helper console logger: refusing to run as root")
		os.Exit(1)
	}
	max, err := strconv.ParseInt(os.Getenv(envConsoleLogMax), 10, 64)
	if err != nil || max <= 0 {
		max = vmm.DefaultConsoleLogMax
	}
	if err := vmm.CopyCapped(os.Stdin, path, max); err != nil {
		fmt.Fprintln(os.Stderr, "banger-helper console logger:", err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}
