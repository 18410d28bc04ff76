package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/bangerhq/banger/internal/api"
)

// ExecConn is a running command's connection to the daemon (see
// api.ExecRequest for the protocol). Send methods are safe to call from
// several goroutines; Next is for one reader.
type ExecConn struct {
	rwc io.ReadWriteCloser
	fr  *api.FrameReader
	wmu sync.Mutex // one frame at a time
}

// Exec starts a command in a VM. Errors before the command runs (no such
// VM, not running, host key mismatch) are returned as *api.Error.
func (c *Client) Exec(ctx context.Context, name string, req api.ExecRequest) (*ExecConn, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode exec request: %w", err)
	}
	path := vmPath(name, "exec")
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://bangerd"+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Connection", "Upgrade")
	hreq.Header.Set("Upgrade", api.ExecProtocol)
	resp, err := c.http().Do(hreq)
	if err != nil {
		if isNoDaemon(err) {
			return nil, fmt.Errorf("%w (socket %s)", ErrNoDaemon, c.Socket)
		}
		return nil, fmt.Errorf("POST %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		if resp.StatusCode >= 400 {
			return nil, readError(resp)
		}
		return nil, fmt.Errorf("POST %s: the daemon answered %s instead of switching protocols", path, resp.Status)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, fmt.Errorf("POST %s: the switched connection is not writable", path)
	}
	return &ExecConn{rwc: rwc, fr: api.NewFrameReader(rwc)}, nil
}

// Next returns the next frame from the daemon; its payload is valid until
// the next call.
func (e *ExecConn) Next() (api.FrameType, []byte, error) { return e.fr.Next() }

func (e *ExecConn) send(t api.FrameType, p []byte) error {
	e.wmu.Lock()
	defer e.wmu.Unlock()
	return api.WriteFrame(e.rwc, t, p)
}

// Stdin sends input for the command, split into frames as needed.
func (e *ExecConn) Stdin(p []byte) error {
	for len(p) > 0 {
		n := min(len(p), api.MaxFramePayload)
		if err := e.send(api.FrameStdin, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// CloseStdin ends the command's input.
func (e *ExecConn) CloseStdin() error { return e.send(api.FrameStdinEOF, nil) }

// Resize tells the command's terminal its new size.
func (e *ExecConn) Resize(rows, cols int) error {
	return e.send(api.FrameResize, api.EncodeResize(rows, cols))
}

// Signal sends a signal ("INT", "TERM"…) to the command.
func (e *ExecConn) Signal(name string) error { return e.send(api.FrameSignal, []byte(name)) }

// Close drops the connection; a command still running gets a hangup.
func (e *ExecConn) Close() error { return e.rwc.Close() }

// Run copies stdin to the command (closing its input at EOF) and its
// output to stdout and stderr until it ends, and returns how it ended.
// stdin may be nil for no input. A reader that never reaches EOF (a
// terminal) is left being read when Run returns.
func (e *ExecConn) Run(stdin io.Reader, stdout, stderr io.Writer) (api.ExecExit, error) {
	if stdin == nil {
		_ = e.CloseStdin()
	} else {
		go func() {
			buf := make([]byte, 32<<10)
			for {
				n, err := stdin.Read(buf)
				if n > 0 {
					if e.Stdin(buf[:n]) != nil {
						return // the command ended
					}
				}
				if err != nil {
					_ = e.CloseStdin()
					return
				}
			}
		}()
	}
	for {
		t, p, err := e.Next()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return api.ExecExit{Code: -1}, errors.New("exec: the daemon closed the connection before the command ended (it may have stopped)")
			}
			return api.ExecExit{Code: -1}, fmt.Errorf("exec: %w", err)
		}
		switch t {
		case api.FrameStdout:
			if _, err := stdout.Write(p); err != nil {
				return api.ExecExit{Code: -1}, fmt.Errorf("exec: write output: %w", err)
			}
		case api.FrameStderr:
			if _, err := stderr.Write(p); err != nil {
				return api.ExecExit{Code: -1}, fmt.Errorf("exec: write output: %w", err)
			}
		case api.FrameExit:
			var x api.ExecExit
			if err := json.Unmarshal(p, &x); err != nil {
				return api.ExecExit{Code: -1}, fmt.Errorf("exec: decode exit frame: %w", err)
			}
			return x, nil
		case api.FrameError:
			var ae api.Error
			if err := json.Unmarshal(p, &ae); err != nil || ae.Message == "" {
				return api.ExecExit{Code: -1}, fmt.Errorf("exec: undecodable error frame %q", p)
			}
			return api.ExecExit{Code: -1}, &ae
		default:
			return api.ExecExit{Code: -1}, fmt.Errorf("exec: unexpected %s frame from the daemon", t)
		}
	}
}

// SyncVM applies the configured file_sync entries to a VM, reporting
// progress.
func (c *Client) SyncVM(ctx context.Context, name string, req api.SyncRequest, progress func(api.Event)) (api.SyncReport, error) {
	var rep api.SyncReport
	return rep, c.streamOp(ctx, http.MethodPost, vmPath(name, "sync"), req, progress, &rep)
}
