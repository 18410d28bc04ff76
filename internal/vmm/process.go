package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Process is a VMM process spawned or found by the daemon.
type Process struct {
	PID       int
	StartTime uint64
	// child is set when this daemon spawned the process and can reap it.
	child *os.Process
}

// SpawnOptions describe a detached VMM process.
type SpawnOptions struct {
	Argv []string
	Env  []string // nil: inherit
	Dir  string
	// ConsoleLog, when set, receives the process's stdout and stderr through
	// a console-logger process capped at ConsoleLogMax bytes per file.
	ConsoleLog    string
	ConsoleLogMax int64
	// Stdin, when set, is given to the process (the daemon keeps no copy).
	Stdin *os.File
}

// Spawn starts a process in a new session, stdin from /dev/null, stdout and
// stderr into a console logger (a second process in the same session). Neither
// holds a descriptor of the daemon's, so both outlive a daemon restart.
func Spawn(o SpawnOptions) (*Process, error) {
	if len(o.Argv) == 0 {
		return nil, errors.New("spawn: empty argv")
	}
	stdin := o.Stdin
	if stdin == nil {
		devnull, err := os.Open(os.DevNull)
		if err != nil {
			return nil, err
		}
		defer devnull.Close()
		stdin = devnull
	}
	var out *os.File
	var logger *exec.Cmd
	if o.ConsoleLog != "" {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("console pipe: %w", err)
		}
		defer w.Close()
		logger, err = startConsoleLogger(r, o.ConsoleLog, o.ConsoleLogMax)
		r.Close()
		if err != nil {
			return nil, err
		}
		out = w
	} else {
		f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		out = f
	}
	cmd := exec.Command(o.Argv[0], o.Argv[1:]...)
	cmd.Env = o.Env
	cmd.Dir = o.Dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		if logger != nil {
			// The logger sees EOF once the pipe's last writer is gone.
			go func() { _ = logger.Wait() }()
		}
		return nil, fmt.Errorf("start %s: %w", o.Argv[0], err)
	}
	if logger != nil {
		go func() { _ = logger.Wait() }() // reap it when it exits, if we are still its parent
	}
	// The child is ours and unreaped, so its pid cannot be recycled; a child
	// that already exited is a zombie whose start time is still valid.
	st, err := procStartTime(cmd.Process.Pid, true)
	if err != nil {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		return nil, err
	}
	return &Process{PID: cmd.Process.Pid, StartTime: st, child: cmd.Process}, nil
}

// Find returns the process with this pid if its start time still matches,
// else ErrGone. It is how a restarted daemon re-attaches.
func Find(pid int, startTime uint64) (*Process, error) {
	if pid <= 0 {
		return nil, ErrGone
	}
	st, err := ProcStartTime(pid)
	if err != nil || st != startTime {
		return nil, ErrGone
	}
	return &Process{PID: pid, StartTime: startTime}, nil
}

// Alive reports whether the process still exists with the same start time.
func (p *Process) Alive() bool {
	st, err := ProcStartTime(p.PID)
	return err == nil && st == p.StartTime
}

// Signal sends sig if the process is still the one we started.
func (p *Process) Signal(sig syscall.Signal) error {
	fd, err := p.pidfd()
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("signal pid %d: %w", p.PID, err)
	}
	return nil
}

// pidfd opens a pidfd and then re-checks the start time, so the descriptor
// cannot refer to a recycled pid.
func (p *Process) pidfd() (int, error) {
	fd, err := unix.PidfdOpen(p.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return -1, ErrGone
		}
		return -1, fmt.Errorf("pidfd_open %d: %w", p.PID, err)
	}
	if !p.Alive() {
		_ = unix.Close(fd)
		return -1, ErrGone
	}
	return fd, nil
}

// Wait blocks until the process exits and returns its exit code, or -1 when
// this daemon is not its parent and cannot know it. It is pushed by the
// kernel (pidfd readiness or wait), not polled.
func (p *Process) Wait() int {
	if p.child != nil {
		st, err := p.child.Wait()
		if err != nil {
			return -1
		}
		if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return st.ExitCode()
	}
	fd, err := p.pidfd()
	if err != nil {
		return -1
	}
	defer func() { _ = unix.Close(fd) }()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if err == nil || !errors.Is(err, unix.EINTR) {
			return -1
		}
	}
}

// ProcStartTime reads field 22 (starttime, in clock ticks since boot) of
// /proc/<pid>/stat.
func ProcStartTime(pid int) (uint64, error) {
	return procStartTime(pid, false)
}

func procStartTime(pid int, zombieOK bool) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, ErrGone
	}
	return parseStartTime(b, zombieOK)
}

// parseStartTime reads starttime from a /proc/<pid>/stat line. A zombie is
// ErrGone unless zombieOK.
func parseStartTime(stat []byte, zombieOK bool) (uint64, error) {
	// comm (field 2) may hold spaces and parentheses; fields resume after the
	// last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	fields := bytes.Fields(stat[i+1:])
	// fields[0] is field 3 (state); starttime is field 22.
	const idx = 22 - 3
	if len(fields) <= idx {
		return 0, errors.New("short /proc stat")
	}
	// A zombie still has a stat entry; it is not running any more.
	if string(fields[0]) == "Z" && !zombieOK {
		return 0, ErrGone
	}
	return strconv.ParseUint(string(fields[idx]), 10, 64)
}
