package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerhq/banger/internal/api"
)

// ShellQuote renders argv as a POSIX shell command line that runs exactly
// argv: sshd hands the command to the user's shell as `$SHELL -c LINE`, so
// every argument that is not plainly safe is single-quoted, an embedded
// single quote closing the quotes, escaped, and reopening them. An empty
// argument stays an argument: a pair of single quotes.
func ShellQuote(argv []string) string {
	var b strings.Builder
	for i, a := range argv {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(quoteArg(a))
	}
	return b.String()
}

// shellSafe are arguments no POSIX shell changes: no globbing, expansion,
// quoting, separators or '=' (which would make a first word an assignment),
// and no leading '~' or '#'.
var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_@%+,./:-]+$`)

func quoteArg(a string) string {
	if shellSafe.MatchString(a) {
		return a
	}
	return "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
}

// ExecSession is a command running in a VM over a pooled connection.
type ExecSession struct {
	Stdin  io.WriteCloser
	Stdout io.Reader
	Stderr io.Reader

	sess  *ssh.Session
	lease *Lease
	tty   bool
	// mark is the value of markEnv in the command's environment, which
	// finds its processes for signals; empty with a terminal.
	mark     string
	ended    atomic.Bool   // Wait returned: the command is gone
	waited   chan struct{} // closed when Wait returns
	waitOnce sync.Once
	once     sync.Once
}

// Signals. sshd refuses the SSH "signal" request for root sessions (they
// run in its privileged monitor, and OpenSSH only signals from the
// privilege-separated child), and banger logs in as root. So a command
// without a terminal is marked: an "env" request (sent without waiting
// for a reply, so it costs no round trip) puts markEnv=<random> in its
// environment, which its children inherit. A signal is then sent from a
// second session to every process whose initial environment carries the
// mark, found in /proc in one grep. sshd passes LC_* variables by default
// (Debian's AcceptEnv LANG LC_*); a guest that drops them has no signals.
// A command with a terminal gets its signals from the terminal: ^C is a
// byte on stdin, and closing the session hangs the terminal up.
//
// (A first version printed the shell's pid on stderr before the command;
// the extra write cost a TCG guest 9% of a short command's time.)

// markEnv is the environment variable that marks a command's processes.
const markEnv = "LC_BANGER_EXEC"

var termRe = regexp.MustCompile(`^[A-Za-z0-9._+-]{1,64}$`)

// validateExec checks a request before anything reaches the guest.
func validateExec(req api.ExecRequest) (string, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return "", api.Errorf(api.CodeInvalidArgument, "exec: no command").WithHint("banger vm exec NAME -- COMMAND [ARGS...]")
	}
	if len(req.Argv) > api.MaxExecArgs {
		return "", api.Errorf(api.CodeInvalidArgument, "exec: %d arguments is over the limit of %d", len(req.Argv), api.MaxExecArgs)
	}
	for i, a := range req.Argv {
		if strings.IndexByte(a, 0) >= 0 {
			return "", api.Errorf(api.CodeInvalidArgument, "exec: argument %d holds a NUL byte, which no command can receive", i)
		}
	}
	line := ShellQuote(req.Argv)
	if len(line) > api.MaxExecCommand {
		return "", api.Errorf(api.CodeInvalidArgument, "exec: the command line is %d bytes, over the limit of %d", len(line), api.MaxExecCommand).
			WithHint("pass large data on stdin or copy it with banger vm cp")
	}
	if req.TTY {
		if req.Term != "" && !termRe.MatchString(req.Term) {
			return "", api.Errorf(api.CodeInvalidArgument, "exec: TERM %q is not a terminal type name", req.Term)
		}
		if req.Rows < 0 || req.Cols < 0 || req.Rows > 0xffff || req.Cols > 0xffff {
			return "", api.Errorf(api.CodeInvalidArgument, "exec: terminal size %dx%d is out of range", req.Rows, req.Cols)
		}
	}
	return line, nil
}

// Exec starts a command in the VM. Errors before the command starts (the
// VM is not running, its host key does not match the pin) come back here;
// what happens after is Wait's.
func (p *Pool) Exec(ctx context.Context, name string, req api.ExecRequest) (*ExecSession, error) {
	line, err := validateExec(req)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		lease, err := p.Get(ctx, name)
		if err != nil {
			return nil, err
		}
		s, err := startSession(lease, line, req)
		if err == nil {
			return s, nil
		}
		if attempt == 0 && isConnFailure(err) {
			// The pooled connection died since its last keepalive
			// (the guest rebooted, sshd restarted): once more on a new
			// one.
			p.Log.Debug("pooled ssh connection failed, reconnecting", "vm", name, "err", err)
			lease.Broken()
			continue
		}
		lease.Release()
		return nil, fmt.Errorf("exec in %s: %w", name, err)
	}
}

func startSession(lease *Lease, line string, req api.ExecRequest) (*ExecSession, error) {
	sess, err := lease.Client.NewSession()
	if err != nil {
		return nil, err
	}
	s := &ExecSession{sess: sess, lease: lease, tty: req.TTY, waited: make(chan struct{})}
	if s.Stdin, err = sess.StdinPipe(); err == nil {
		if s.Stdout, err = sess.StdoutPipe(); err == nil {
			s.Stderr, err = sess.StderrPipe()
		}
	}
	if err == nil && !req.TTY {
		var b [8]byte
		_, _ = rand.Read(b[:])
		s.mark = hex.EncodeToString(b[:])
		_, err = sess.SendRequest("env", false, ssh.Marshal(struct{ Name, Value string }{markEnv, s.mark}))
	}
	if err == nil && req.TTY {
		term := req.Term
		if term == "" {
			term = "xterm-256color"
		}
		rows, cols := req.Rows, req.Cols
		if rows == 0 || cols == 0 {
			rows, cols = 24, 80
		}
		err = sess.RequestPty(term, rows, cols, ssh.TerminalModes{
			ssh.ECHO:          1,
			ssh.TTY_OP_ISPEED: 38400,
			ssh.TTY_OP_OSPEED: 38400,
		})
	}
	if err == nil {
		err = sess.Start(line)
	}
	if err != nil {
		_ = sess.Close()
		return nil, err
	}
	return s, nil
}

// Resize tells the command's terminal its new size.
func (s *ExecSession) Resize(rows, cols int) error {
	return s.sess.WindowChange(rows, cols)
}

// Signal sends a signal ("INT", "TERM", …) to the command's process
// group. With a terminal it goes as an SSH signal request, which sshd
// honours for non-root users only; send ^C as input instead.
func (s *ExecSession) Signal(name string) error {
	if !sigNameRe.MatchString(name) {
		return fmt.Errorf("signal %q: not a signal name", name)
	}
	if s.tty {
		return s.sess.Signal(ssh.Signal(name))
	}
	ks, err := s.lease.Client.NewSession()
	if err != nil {
		return fmt.Errorf("signal %s: %w", name, err)
	}
	defer func() { _ = ks.Close() }()
	var out bytes.Buffer
	ks.Stderr = &out
	err = ks.Run(ShellQuote([]string{"sh", "-c", signalScript, "sh", name, markEnv + "=" + s.mark}))
	var ee *ssh.ExitError
	if errors.As(err, &ee) && ee.ExitStatus() == 3 {
		return fmt.Errorf("signal %s: no process of the command found (it ended, or the guest's sshd drops %s: AcceptEnv LC_*)", name, markEnv)
	}
	if err != nil {
		return fmt.Errorf("signal %s: %w: %s", name, err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}

// signalScript signals ($1) every process whose environment holds the
// entry $2; it exits 3 when there is none. One grep reads every
// /proc/PID/environ (NUL-separated entries).
const signalScript = `set -- "$1" $(grep -lxzF -e "$2" /proc/[0-9]*/environ 2>/dev/null)
sig=$1; shift
[ $# -gt 0 ] || exit 3
for f; do p=${f#/proc/}; kill -s "$sig" "${p%/environ}" 2>/dev/null; done
exit 0`

// hangupGrace is how long Hangup lets a command handle SIGHUP before it
// closes the session.
const hangupGrace = 5 * time.Second

// Hangup ends the session as a lost terminal would: the command gets
// SIGHUP (from the terminal's hangup with one, from kill without), then
// the session closes, once the command ended or after hangupGrace.
func (s *ExecSession) Hangup() {
	if !s.tty && !s.ended.Load() {
		if s.Signal("HUP") == nil {
			// Let the command handle it before its output pipes go:
			// a shell reporting its child's death on a closed stderr
			// would die of SIGPIPE instead. The caller keeps reading
			// the output meanwhile.
			select {
			case <-s.waited:
			case <-time.After(hangupGrace):
			}
		}
	}
	_ = s.Close()
}

var sigNameRe = regexp.MustCompile(`^[A-Z][A-Z0-9]{0,15}$`)

// Wait waits for the command to end and returns its exit. Read Stdout and
// Stderr to their ends first: the guest stops when nobody reads them.
func (s *ExecSession) Wait() (api.ExecExit, error) {
	err := s.sess.Wait()
	s.ended.Store(true)
	s.waitOnce.Do(func() { close(s.waited) })
	var ee *ssh.ExitError
	var missing *ssh.ExitMissingError
	switch {
	case err == nil:
		return api.ExecExit{Code: 0}, nil
	case errors.As(err, &ee):
		// x/crypto reports a signal as status 128+n already.
		return api.ExecExit{Code: ee.ExitStatus(), Signal: ee.Signal()}, nil
	case errors.As(err, &missing):
		return api.ExecExit{Code: -1}, errors.New("the command ended without an exit status: the connection to the guest was lost")
	default:
		return api.ExecExit{Code: -1}, err
	}
}

// Close ends the session (the command gets a hangup if it still runs) and
// returns its connection to the pool.
func (s *ExecSession) Close() error {
	var err error
	s.once.Do(func() {
		err = s.sess.Close()
		if errors.Is(err, io.EOF) {
			err = nil
		}
		s.lease.Release()
	})
	return err
}
