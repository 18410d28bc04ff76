// Package cli is banger's command line: a Cobra tree with one file per verb.
// Commands parse flags, call the daemon through internal/client and render
// the result: results to stdout, diagnostics to stderr.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/version"
)

// app is what every command shares: global flags, output streams and the
// way to reach the daemon.
type app struct {
	system bool
	stdout io.Writer
	stderr io.Writer
	stdin  io.Reader
}

// Main runs the CLI and returns the process exit code.
func Main() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
}

// exitError carries a specific exit code (e.g. the remote command's in
// `banger vm exec`) through Cobra.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// Run executes one banger command line.
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr, stdin: stdin}
	root := a.newRoot()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	_, _ = fmt.Fprintln(stderr, "banger:", err)
	var ae *api.Error
	if errors.As(err, &ae) && ae.Code == api.CodeInvalidArgument {
		return 2
	}
	return 1
}

func (a *app) newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "banger",
		Short: "microVMs on your own Linux machine",
		Long: `banger gives you microVMs on your own Linux machine: a booted VM with a real
network and a pinned SSH identity in seconds, without sudo in daily use.`,
		Version:           version.Get().Line("banger"),
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{HiddenDefaultCmd: true},
	}
	// Exactly the one-line form, without Cobra's "banger version " prefix.
	root.SetVersionTemplate("{{.Version}}\n")
	root.PersistentFlags().BoolVar(&a.system, "system", false, "talk to the system daemon (/run/banger) instead of your user daemon")
	root.AddCommand(
		a.newVersionCmd(),
		a.newVMCmd(),
		a.newImageCmd(),
	)
	return root
}

func (a *app) layout() (paths.Layout, error) { return paths.For(a.system) }
