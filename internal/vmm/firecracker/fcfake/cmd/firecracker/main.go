// Command firecracker is fcfake as a program of its own, linked statically
// as the real (musl) Firecracker is, for tests that run it where a test
// binary cannot go: in a jailer's chroot, which holds no shared libraries
// and where the jailer has cleared the environment. fcfake.BuildStatic
// builds it.
package main

import (
	"os"

	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// version is the Firecracker version impersonated; BuildStatic sets it
// with -ldflags -X. fcfake.EnvVersion overrides it where an environment
// reaches the process.
var version = "1.14.2"

func main() {
	v := version
	if env := os.Getenv(fcfake.EnvVersion); env != "" {
		v = env
	}
	os.Exit(fcfake.Run(v, os.Args[1:], os.Getenv(fcfake.EnvNoKVM) == "1", os.Stdout, os.Stderr))
}
