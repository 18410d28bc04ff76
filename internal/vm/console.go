package vm

import (
	"context"
	"errors"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// FollowConsole writes the VM's console log to w: the last tail bytes (all
// when tail <= 0), then, with follow, whatever is appended until ctx ends.
// flush is called after each write so a client sees output live.
func (s *Service) FollowConsole(ctx context.Context, name string, tail int64, follow bool, w io.Writer, flush func()) error {
	path, err := s.ConsolePath(ctx, name)
	if err != nil {
		return err
	}
	var offset int64
	if st, err := os.Stat(path); err == nil && tail > 0 && st.Size() > tail {
		offset = st.Size() - tail
	}
	var cw *consoleWatch
	if follow {
		if cw, err = newConsoleWatch(path, offset); err != nil {
			return err
		}
		defer cw.close()
	}
	copyFrom := func() error {
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		defer f.Close()
		if st, err := f.Stat(); err == nil && st.Size() < offset {
			offset = 0 // rotated
		}
		if _, err := f.Seek(offset, io.SeekStart); err != nil {
			return err
		}
		n, err := io.Copy(w, f)
		offset += n
		if n > 0 && flush != nil {
			flush()
		}
		return err
	}
	if err := copyFrom(); err != nil || !follow {
		return err
	}
	buf := make([]byte, 4096)
	for {
		_, _ = unix.Poll([]unix.PollFd{{Fd: int32(cw.fd), Events: unix.POLLIN}}, int((250*time.Millisecond)/time.Millisecond))
		for {
			if _, err := unix.Read(cw.fd, buf); err != nil {
				break
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if err := copyFrom(); err != nil {
			return err
		}
	}
}
