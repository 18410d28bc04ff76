package server

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
)

// headerHasToken reports whether a comma-separated header holds token.
func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// execVM runs a command in a VM. It answers errors as JSON until the
// command runs, then switches the connection to the frame protocol of
// api.ExecRequest.
func (s *Server) execVM(w http.ResponseWriter, r *http.Request) error {
	g, err := s.guest()
	if err != nil {
		return err
	}
	if !headerHasToken(r.Header, "Connection", "upgrade") || !strings.EqualFold(r.Header.Get("Upgrade"), api.ExecProtocol) {
		return api.Errorf(api.CodeBadRequest, "exec switches protocols: send Connection: Upgrade and Upgrade: %s", api.ExecProtocol)
	}
	var req api.ExecRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	name := r.PathValue("name")
	sess, err := g.Exec(r.Context(), name, req)
	if err != nil {
		return err
	}
	defer func() { _ = sess.Close() }()
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Time{})
	// A failed write sticks in brw; Flush below reports it.
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + api.ExecProtocol + "\r\n\r\n")
	if err := brw.Flush(); err != nil {
		return nil
	}
	s.pumpExec(r, conn, brw.Reader, sess)
	return nil
}

// pumpExec moves frames between the client and the session until the
// command ends, then sends its exit (or what went wrong) as the last frame.
func (s *Server) pumpExec(r *http.Request, conn io.Writer, in io.Reader, sess *guest.ExecSession) {
	var wmu sync.Mutex // one frame at a time on conn
	clientGone := false
	send := func(t api.FrameType, p []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		if clientGone {
			return
		}
		if err := api.WriteFrame(conn, t, p); err != nil {
			clientGone = true
			// Nobody reads the output any more: hang the command up
			// rather than let it block on a full channel.
			go sess.Hangup()
		}
	}
	var protoErr error // set by the input loop, read after it ended
	inputDone := make(chan struct{})
	go func() {
		defer close(inputDone)
		fr := api.NewFrameReader(in)
		for {
			t, p, err := fr.Next()
			if err != nil {
				// The client went away (or broke the framing): hang up
				// the command, as a closed terminal would.
				if !errors.Is(err, io.EOF) {
					protoErr = err
				}
				sess.Hangup()
				return
			}
			switch t {
			case api.FrameStdin:
				// A command that no longer reads its input is not an
				// error of the session: drop the rest.
				_, _ = sess.Stdin.Write(p)
			case api.FrameStdinEOF:
				_ = sess.Stdin.Close()
			case api.FrameResize:
				if rows, cols, err := api.DecodeResize(p); err == nil {
					_ = sess.Resize(rows, cols)
				}
			case api.FrameSignal:
				// In its own goroutine: kill runs in a second session,
				// and input must keep flowing meanwhile.
				go func(name string) {
					if err := sess.Signal(name); err != nil {
						s.Log.Info("exec: signal not delivered", "err", err)
					}
				}(string(p))
			default:
				protoErr = errors.New("exec: unexpected " + t.String() + " frame from the client")
				sess.Hangup()
				return
			}
		}
	}()

	stopping := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		select {
		case <-s.Done:
			close(stopping)
			sess.Hangup()
		case <-finished:
		}
	}()
	defer close(finished)

	var outputs sync.WaitGroup
	for _, o := range []struct {
		r io.Reader
		t api.FrameType
	}{{sess.Stdout, api.FrameStdout}, {sess.Stderr, api.FrameStderr}} {
		outputs.Add(1)
		go func() {
			defer outputs.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := o.r.Read(buf)
				if n > 0 {
					send(o.t, buf[:n])
				}
				if err != nil {
					return
				}
			}
		}()
	}
	outputs.Wait()
	exit, err := sess.Wait()
	select {
	case <-stopping:
		err = api.Errorf(api.CodeUnavailable, "the daemon is stopping: the command was ended")
	default:
	}
	if err == nil {
		b, _ := json.Marshal(exit)
		send(api.FrameExit, b)
		return
	}
	select {
	case <-inputDone:
		if protoErr != nil {
			s.Log.Warn("exec: the client broke the protocol", "err", protoErr)
			err = api.Errorf(api.CodeBadRequest, "%s", protoErr.Error())
		}
	default:
	}
	b, _ := json.Marshal(s.toAPIError(r, err))
	send(api.FrameError, b)
}
