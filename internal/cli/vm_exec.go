package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
)

// execFailed is banger's exit code when the command could not be run or
// its end is unknown, as ssh's 255.
const execFailed = 255

type vmExecFlags struct {
	tty     bool
	noStdin bool
}

func (a *app) newVMExecCmd() *cobra.Command {
	var f vmExecFlags
	cmd := &cobra.Command{
		Use:   "exec NAME [-t] -- COMMAND [ARGS...]",
		Short: "Run a command in a VM; its exit status becomes banger's",
		Long: `Run a command in a running VM through the daemon, which keeps one SSH
connection per VM open, so a command costs no new handshake.

The arguments reach the command exactly as given: nothing is interpreted by a
shell (spaces, quotes, $ and ; stay as they are). For shell syntax, run a shell:
  banger vm exec dev -- sh -c 'cd /srv && make'

Standard input is passed through and its end closes the command's input;
standard output and standard error stay apart; the command's exit status is
banger's (255 when the command could not be run or the connection was lost,
128+N when signal N ended it). Without -t, SIGINT, SIGTERM and SIGHUP are
sent on to the command; a third ^C gives up on it.

-t gives the command a terminal: the local one goes raw, keys (^C included) go
to the VM, and window size changes follow. Output then all arrives on standard
output, as on any terminal.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return api.Errorf(api.CodeInvalidArgument, "exec needs a VM name and a command").WithHint("banger vm exec NAME -- COMMAND [ARGS...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.vmExec(cmd.Context(), args[0], args[1:], f)
		},
	}
	cmd.Flags().BoolVarP(&f.tty, "tty", "t", false, "give the command a terminal (for interactive programs)")
	cmd.Flags().BoolVarP(&f.noStdin, "no-stdin", "n", false, "do not read standard input (the command's input is empty)")
	return cmd
}

func (a *app) vmExec(ctx context.Context, name string, argv []string, f vmExecFlags) error {
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	req := api.ExecRequest{Argv: argv, TTY: f.tty}
	inFd, inTTY := terminalFd(a.stdin)
	sizeFd := -1
	if f.tty {
		req.Term = os.Getenv("TERM")
		for _, s := range []any{a.stdin, a.stdout, a.stderr} {
			if fd, ok := terminalFd(s); ok {
				sizeFd = fd
				req.Rows, req.Cols, _ = terminalSize(fd)
				break
			}
		}
	}
	// ^C while connecting abandons the request; once the command runs,
	// signals are the command's (below), so the connection must not hang
	// on ctx.
	setupCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	ec, err := c.Exec(setupCtx, name, req)
	stop()
	cancel()
	if err != nil {
		return a.execFailure(err)
	}
	defer func() { _ = ec.Close() }()

	if f.tty && inTTY {
		restore, err := makeRaw(inFd)
		if err != nil {
			return a.execFailure(fmt.Errorf("make the terminal raw: %w", err))
		}
		defer restore()
	}
	if f.tty && sizeFd >= 0 {
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if rows, cols, ok := terminalSize(sizeFd); ok {
					_ = ec.Resize(rows, cols)
				}
			}
		}()
	}
	gaveUp := make(chan int, 1)
	if !f.tty {
		sigs := make(chan os.Signal, 4)
		signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
		defer signal.Stop(sigs)
		go func() {
			interrupts := 0
			for s := range sigs {
				sig := s.(syscall.Signal)
				if sig == syscall.SIGINT {
					if interrupts++; interrupts == 3 {
						gaveUp <- 128 + int(sig)
						_ = ec.Close()
						return
					}
				}
				_ = ec.Signal(unix.SignalName(sig)[3:])
			}
		}()
	}

	var stdin = a.stdin
	if f.noStdin {
		stdin = nil
	}
	x, err := ec.Run(stdin, a.stdout, a.stderr)
	select {
	case code := <-gaveUp:
		_, _ = fmt.Fprintln(a.stderr, "banger: gave up on the command; it is hung up in the VM")
		return &exitError{code}
	default:
	}
	if err != nil {
		return a.execFailure(err)
	}
	switch {
	case x.Code == 0:
		return nil
	case x.Code < 0 || x.Code > 255:
		_, _ = fmt.Fprintln(a.stderr, "banger: the command ended without an exit status")
		return &exitError{execFailed}
	default:
		return &exitError{x.Code}
	}
}

// execFailure reports an error of exec itself (not of the command) and
// turns it into exit status 255, or 2 for a bad request.
func (a *app) execFailure(err error) error {
	var ae *api.Error
	if errors.As(err, &ae) && ae.Code == api.CodeInvalidArgument {
		return err
	}
	_, _ = fmt.Fprintln(a.stderr, "banger:", err)
	return &exitError{execFailed}
}
