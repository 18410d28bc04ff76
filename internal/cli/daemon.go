package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/version"
)

// startTimeout bounds how long the CLI waits for a daemon it started to
// report ready (migrations on a large database take a while).
const startTimeout = 60 * time.Second

func isNoDaemon(err error) bool { return errors.Is(err, client.ErrNoDaemon) }

// isDying reports a connection the daemon reset or closed without an
// answer: it is going away.
func isDying(err error) bool {
	return err != nil && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF))
}

// connect returns a client for a daemon that answers. In user mode it
// starts bangerd when none runs, and restarts one built from a binary that
// has since been rebuilt. In system mode it never spawns anything.
func (a *app) connect(ctx context.Context) (*client.Client, error) {
	l, err := a.layout()
	if err != nil {
		return nil, err
	}
	c := client.New(l.DaemonSocket())
	dv, err := c.Version(ctx)
	// A daemon that is dying (crashed, or stopping) may still hold its
	// socket for a moment and reset the connection: give it that moment.
	for i := 0; i < 25 && isDying(err); i++ {
		time.Sleep(200 * time.Millisecond)
		dv, err = c.Version(ctx)
	}
	switch {
	case isNoDaemon(err):
		if l.Mode == paths.SystemMode {
			return nil, fmt.Errorf("the system daemon is not running (hint: sudo systemctl start bangerd)")
		}
		if err := a.startDaemon(ctx, l); err != nil {
			return nil, err
		}
		return c, nil
	case err != nil:
		return nil, err
	}
	if l.Mode == paths.SystemMode {
		return c, nil
	}
	exe, err := bangerdPath()
	if err != nil {
		return c, nil // nothing to restart with; keep using the running one
	}
	if why := staleReason(dv, exe); why != "" {
		if err := a.restartDaemon(ctx, c, l, dv, why); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// staleReason says why the running daemon should be replaced by the binary
// at exe, or "" when it should not: the daemon's executable was rebuilt or
// is another file, unless the running daemon is a newer build than this CLI
// (never downgrade a daemon behind the user's back).
func staleReason(dv api.VersionInfo, exe string) string {
	cli := version.Get()
	if newerBuild(dv.BuiltAt, cli.BuiltAt) {
		return ""
	}
	var st syscall.Stat_t
	if err := syscall.Stat(exe, &st); err != nil {
		return ""
	}
	onDisk := api.Binary{Path: exe, Inode: st.Ino, Size: st.Size, ModTime: st.Mtim.Nano()}
	if dv.Executable.Path == "" {
		return ""
	}
	if onDisk != dv.Executable {
		if filepath.Clean(dv.Executable.Path) != filepath.Clean(exe) {
			return "it runs " + dv.Executable.Path + ", this banger uses " + exe
		}
		return "its binary was rebuilt"
	}
	return ""
}

// newerBuild reports whether build time a is strictly after b (RFC 3339).
func newerBuild(a, b string) bool {
	ta, err1 := time.Parse(time.RFC3339, a)
	tb, err2 := time.Parse(time.RFC3339, b)
	return err1 == nil && err2 == nil && ta.After(tb)
}

// bangerdPath finds the daemon binary: $BANGERD, then next to this
// executable, then $PATH.
func bangerdPath() (string, error) {
	if p := os.Getenv("BANGERD"); p != "" {
		return p, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "bangerd")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("bangerd")
	if err != nil {
		return "", fmt.Errorf("bangerd not found next to banger or on PATH (hint: make build, or install banger)")
	}
	return p, nil
}

// startDaemon spawns bangerd detached (own session, log in the state dir)
// and waits for it to report on the ready pipe: no polling of the socket.
func (a *app) startDaemon(ctx context.Context, l paths.Layout) error {
	exe, err := bangerdPath()
	if err != nil {
		return err
	}
	if err := l.EnsureDirs(); err != nil {
		return err
	}
	logPath := l.DaemonLog()
	rotateLog(logPath, 10<<20)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), api.EnvReadyFD+"=3")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start %s: %w", exe, err)
	}
	w.Close()
	pid := cmd.Process.Pid
	// Reap it if it dies while we wait; once it serves it outlives us.
	go func() { _ = cmd.Wait() }()
	msg, err := readReady(ctx, r, startTimeout)
	switch {
	case err != nil:
		return fmt.Errorf("bangerd (pid %d) did not become ready: %w (hint: see %s)", pid, err, logPath)
	case msg == "ok":
		return nil
	default:
		return fmt.Errorf("bangerd failed to start: %s", strings.TrimPrefix(msg, "error: "))
	}
}

func readReady(ctx context.Context, r *os.File, timeout time.Duration) (string, error) {
	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		if errors.Is(err, io.EOF) && line == "" {
			err = errors.New("it exited without reporting")
		} else if errors.Is(err, io.EOF) {
			err = nil
		}
		ch <- result{strings.TrimSpace(line), err}
	}()
	select {
	case res := <-ch:
		return res.line, res.err
	case <-time.After(timeout):
		return "", fmt.Errorf("no answer within %s", timeout)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// restartDaemon asks the running daemon to stop once idle, waits for its
// process to exit, and starts the new binary.
func (a *app) restartDaemon(ctx context.Context, c *client.Client, l paths.Layout, dv api.VersionInfo, why string) error {
	if _, err := c.Shutdown(ctx, api.ShutdownRequest{Reason: "restart by banger: " + why, WhenIdle: true}); err != nil && !isNoDaemon(err) {
		return fmt.Errorf("stop stale daemon: %w", err)
	}
	if err := waitExit(ctx, dv.PID, 5*time.Minute); err != nil {
		return fmt.Errorf("stop stale daemon (pid %d): %w", dv.PID, err)
	}
	if err := a.startDaemon(ctx, l); err != nil {
		return err
	}
	_, _ = fmt.Fprintf(a.stderr, "banger: restarted bangerd (%s; was %s, built %s)\n", why, short(dv.Commit), dv.BuiltAt)
	return nil
}

// waitExit waits for pid to exit, pushed by a pidfd rather than polled.
func waitExit(ctx context.Context, pid int, timeout time.Duration) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	deadline := time.Now().Add(timeout)
	for {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			return fmt.Errorf("still running after %s", timeout)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// Wake at least every 200 ms to notice ctx cancellation.
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, min(ms, 200))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if n > 0 {
			return nil
		}
	}
}

// rotateLog keeps the daemon log under max bytes by moving it aside.
func rotateLog(path string, max int64) {
	if st, err := os.Stat(path); err == nil && st.Size() > max {
		_ = os.Rename(path, path+".1")
	}
}
