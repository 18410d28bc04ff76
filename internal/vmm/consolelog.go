package vmm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
)

// The console logger is a tiny process that copies a VMM's serial output
// into a size-capped file. It runs in the VMM's session rather than in the
// daemon so that the console keeps being recorded while the daemon restarts.
// Any binary that calls ConsoleLoggerMain first thing in main (bangerd, and
// tests' TestMain) can serve as the logger; the environment selects the mode.
const (
	envConsoleLog    = "BANGER_CONSOLE_LOG"
	envConsoleLogMax = "BANGER_CONSOLE_LOG_MAX"
)

// DefaultConsoleLogMax caps each console log file at 1 MiB.
const DefaultConsoleLogMax = 1 << 20

// ConsoleLoggerMain runs the console logger and returns true when this
// process was started as one; main should then exit.
func ConsoleLoggerMain() bool {
	path := os.Getenv(envConsoleLog)
	if path == "" {
		return false
	}
	max, err := strconv.ParseInt(os.Getenv(envConsoleLogMax), 10, 64)
	if err != nil || max <= 0 {
		max = DefaultConsoleLogMax
	}
	if err := CopyCapped(os.Stdin, path, max); err != nil {
		fmt.Fprintln(os.Stderr, "console logger:", err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

// LoggerExecutable is the binary started as the console logger; the daemon
// leaves it as its own executable.
var LoggerExecutable = func() (string, error) { return os.Executable() }

func startConsoleLogger(r *os.File, path string, max int64) (*exec.Cmd, error) {
	exe, err := LoggerExecutable()
	if err != nil {
		return nil, fmt.Errorf("console logger: %w", err)
	}
	if max <= 0 {
		max = DefaultConsoleLogMax
	}
	cmd := exec.Command(exe)
	cmd.Env = []string{envConsoleLog + "=" + path, envConsoleLogMax + "=" + strconv.FormatInt(max, 10)}
	cmd.Stdin = r
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start console logger: %w", err)
	}
	return cmd, nil
}

// CopyCapped appends r to path until EOF. When the file would exceed max
// bytes it is renamed to path+".1" (replacing the older one) and a new file
// is started, so the console never takes more than 2×max on disk.
func CopyCapped(r io.Reader, path string, max int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer func() { f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	buf := make([]byte, 32<<10)
	for {
		n, rerr := r.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			if size >= max {
				f.Close()
				if err := os.Rename(path, path+".1"); err != nil {
					return err
				}
				if f, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600); err != nil {
					return err
				}
				size = 0
			}
			chunk := data
			if room := max - size; int64(len(chunk)) > room {
				chunk = chunk[:room]
			}
			w, err := f.Write(chunk)
			size += int64(w)
			data = data[w:]
			if err != nil {
				return err
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			return rerr
		}
	}
}
