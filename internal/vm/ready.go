package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// ReadyMarker is the line banger's images write to the console once sshd
// accepts connections (banger-ready.service).
const ReadyMarker = "BANGER-READY"

// markerGrace is how long the console's ready marker is awaited before SSH
// is also polled (for imported images that lack banger-ready.service). An
// SSH attempt through QEMU's user networking blocks until the guest's sshd
// answers, so polling early would only delay noticing the marker.
const markerGrace = 90 * time.Second

// waitReady waits until the guest answers SSH with its pinned host key. The
// console's ready marker is the push signal, followed by one handshake;
// after markerGrace without it, SSH is also tried every few seconds. It
// fails at once if the VMM exits, and after ReadyTimeout.
func (s *Service) waitReady(ctx context.Context, row store.VM, rt Runtime, m vmm.Machine, console string, offset int64) error {
	ctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
	defer cancel()
	w, err := newConsoleWatch(console, offset)
	if err != nil {
		return err
	}
	defer w.close()
	target, err := s.sshTarget(row, rt)
	if err != nil {
		return err
	}
	marked := false
	nextTry := time.Now().Add(markerGrace)
	for {
		if !marked {
			found, err := w.wait(ctx, ReadyMarker, time.Until(nextTry), m.Done())
			if err != nil {
				return s.bootFailure(ctx, row, m, console, err)
			}
			marked = found
		}
		if marked || time.Now().After(nextTry) {
			timeout := 5 * time.Second
			if marked {
				timeout = 20 * time.Second
			}
			hctx, hcancel := context.WithTimeout(ctx, timeout)
			c, err := guest.Dial(hctx, target)
			hcancel()
			if err == nil {
				_ = c.Close()
				return nil
			}
			if errors.Is(err, guest.ErrHostKeyChanged) || errors.Is(err, guest.ErrHostUnknown) {
				return err // never retry past a key that does not match the pin
			}
			if ctx.Err() != nil {
				return s.bootFailure(ctx, row, m, console, err)
			}
			s.Log.Debug("ssh not ready yet", "vm", row.Name, "err", err)
			nextTry = time.Now().Add(3 * time.Second)
			if marked {
				select {
				case <-time.After(500 * time.Millisecond):
				case <-m.Done():
				case <-ctx.Done():
				}
			}
		}
	}
}

// bootFailure explains why a guest did not become ready.
func (s *Service) bootFailure(ctx context.Context, row store.VM, m vmm.Machine, console string, cause error) error {
	tail := consoleTail(console, 600)
	select {
	case <-m.Done():
		return fmt.Errorf("the VMM exited while the guest booted (%s); console ends with: %q", m.Exit().Reason, tail)
	default:
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("the guest did not answer SSH within %s (%w); console ends with: %q", ReadyTimeout, cause, tail)
	}
	return cause
}

// sshTarget is how the daemon reaches a VM.
func (s *Service) sshTarget(row store.VM, rt Runtime) (guest.Target, error) {
	signer, _, err := guest.LoadOrCreateClientKey(s.Layout.SSHKey())
	if err != nil {
		return guest.Target{}, err
	}
	return guest.Target{
		Addr:       net.JoinHostPort(rt.Network.SSHHost, strconv.Itoa(rt.Network.SSHPort)),
		Alias:      alias(row.Name),
		User:       "root",
		Signer:     signer,
		KnownHosts: s.Layout.KnownHosts(),
	}, nil
}

// consoleTail returns the last n bytes of the console log.
func consoleTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	_, _ = f.ReadAt(b, off)
	return string(bytes.TrimSpace(b))
}

// consoleWatch follows a console log with inotify and looks for a marker.
type consoleWatch struct {
	path   string
	fd     int
	offset int64
	carry  []byte // the end of what was read, so a marker split across reads is found
}

func newConsoleWatch(path string, offset int64) (*consoleWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	// Watch the directory: the log is created by the console logger and
	// rotated by rename.
	if _, err := unix.InotifyAddWatch(fd, filepath.Dir(path), unix.IN_MODIFY|unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_CLOSE_WRITE); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("inotify watch %s: %w", filepath.Dir(path), err)
	}
	return &consoleWatch{path: path, fd: fd, offset: offset}, nil
}

func (w *consoleWatch) close() { _ = unix.Close(w.fd) }

// wait returns true once the marker appears, false when d elapses first,
// and an error when ctx ends or done closes.
func (w *consoleWatch) wait(ctx context.Context, marker string, d time.Duration, done <-chan struct{}) (bool, error) {
	deadline := time.Now().Add(d)
	buf := make([]byte, 4096)
	for {
		if w.scan(marker) {
			return true, nil
		}
		select {
		case <-done:
			if w.scan(marker) {
				return true, nil
			}
			return false, errors.New("the VMM exited")
		case <-ctx.Done():
			return false, ctx.Err()
		default:
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		// Wake on a console write, or at least every 250 ms to notice the
		// context and the VMM's exit.
		_, _ = unix.Poll([]unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}, int(min(left, 250*time.Millisecond)/time.Millisecond)+1)
		for {
			if _, err := unix.Read(w.fd, buf); err != nil {
				break
			}
		}
	}
}

// scan reads what was appended since the last call.
func (w *consoleWatch) scan(marker string) bool {
	f, err := os.Open(w.path)
	if err != nil {
		return false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false
	}
	if st.Size() < w.offset {
		w.offset = 0 // rotated: the logger started a new file
	}
	if _, err := f.Seek(w.offset, io.SeekStart); err != nil {
		return false
	}
	data, _ := io.ReadAll(f)
	w.offset += int64(len(data))
	hay := append(w.carry, data...)
	if bytes.Contains(hay, []byte(marker)) {
		return true
	}
	if len(hay) > len(marker) {
		hay = hay[len(hay)-len(marker):]
	}
	w.carry = append([]byte(nil), hay...)
	return false
}
