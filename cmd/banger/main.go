// Command banger is banger's command line.
package main

import (
	"os"

	"github.com/bangerhq/banger/internal/cli"
)

func main() { os.Exit(cli.Main()) }
