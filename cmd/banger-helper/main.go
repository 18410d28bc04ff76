// Command banger-helper is banger's narrow root helper: it creates the
// bridge, taps, nftables rules, loop devices and dm-snapshots, and runs
// Firecracker under its jailer, as bangerd, running as its owner, asks
// over a unix socket.
package main

import (
	"os"

	"github.com/bangerhq/banger/internal/helper"
)

func main() { os.Exit(helper.Main(os.Args[1:])) }
