package vm

import (
	"os"
	"syscall"
)

// crashpointEnv names a step at which the daemon kills itself with SIGKILL.
// Recovery tests set it to prove that a daemon killed at exactly that step
// is reconciled on restart: finished or rolled back, nothing leaked. It is
// read once at start-up and does nothing when unset.
const crashpointEnv = "BANGER_CRASHPOINT"

var crashAt = os.Getenv(crashpointEnv)

// crashpoint dies here if the test asked for it.
func crashpoint(name string) {
	if crashAt != "" && crashAt == name {
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not deliverable late; never continue past it
	}
}
