package helperapi

import (
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
)

// ReadRequest is the helper's side of the framing: it reads the request up
// to the client's half-close, never more than MaxRequestSize bytes. The
// caller sets a read deadline first.
func ReadRequest(conn net.Conn) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(conn, MaxRequestSize+1))
	if err != nil {
		return nil, Errorf(CodeInvalid, "read request: %v", err)
	}
	if len(b) > MaxRequestSize {
		return nil, Errorf(CodeInvalid, "request exceeds the %d-byte limit", MaxRequestSize)
	}
	return b, nil
}

// WriteResponse is the helper's side of the response: one write carrying
// the JSON and, when err is nil, files as SCM_RIGHTS. The caller keeps
// ownership of files and closes them afterwards; the client holds its own
// copies by then.
func WriteResponse(conn *net.UnixConn, result any, files []*os.File, err error) error {
	if err != nil {
		files = nil
	}
	if len(files) > MaxFDs {
		return fmt.Errorf("write response: %d descriptors exceed the limit of %d", len(files), MaxFDs)
	}
	body := EncodeResponse(result, len(files), err)
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = syscall.UnixRights(fds...)
	}
	n, _, werr := conn.WriteMsgUnix(body, oob, nil)
	if werr != nil {
		return fmt.Errorf("write response: %w", werr)
	}
	if n < len(body) {
		// The descriptors went with the first bytes; the rest is plain data.
		if _, werr := conn.Write(body[n:]); werr != nil {
			return fmt.Errorf("write response: %w", werr)
		}
	}
	return nil
}
