// Command bangerd is banger's daemon: it owns the state database, images and
// VMs, and serves the API the banger CLI uses.
package main

import "github.com/bangerhq/banger/internal/daemon"

func main() { daemon.Main() }
