package api

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// ExecRequest is the body of POST /v1/vms/{name}/exec.
//
// The request must carry "Connection: Upgrade" and "Upgrade: ExecProtocol".
// Errors found before the command starts (no such VM, VM not running, a
// host key that does not match the pinned one) are ordinary JSON error
// responses. Otherwise the daemon answers 101 Switching Protocols and the
// connection carries frames in both directions until the command ends:
//
//	client → daemon: FrameStdin*, FrameStdinEOF, FrameResize, FrameSignal
//	daemon → client: FrameStdout*, FrameStderr*, then exactly one of
//	                 FrameExit or FrameError, after which the daemon closes
//
// Stdout and stderr frames carry the command's output as it comes; every
// byte of both is sent before FrameExit.
type ExecRequest struct {
	// Argv is the command and its arguments. The daemon quotes each for
	// the guest's shell, so they reach the command exactly as given:
	// spaces, quotes, '$' and ';' are not interpreted. Run "sh", "-c",
	// "…" for shell syntax.
	Argv []string `json:"argv"`
	// TTY allocates a pseudo-terminal; stdout and stderr then arrive
	// merged as stdout, as on any terminal.
	TTY bool `json:"tty,omitempty"`
	// Term is the TERM of the terminal (TTY only); "xterm-256color" when
	// empty.
	Term string `json:"term,omitempty"`
	// Rows and Cols are the terminal's size (TTY only); 24×80 when zero.
	Rows int `json:"rows,omitempty"`
	Cols int `json:"cols,omitempty"`
}

// ExecProtocol is the Upgrade token of the exec protocol, versioned so a
// later, incompatible framing gets a new name.
const ExecProtocol = "banger-exec/1"

// Exec limits.
const (
	// MaxExecArgs caps len(ExecRequest.Argv).
	MaxExecArgs = 4096
	// MaxExecCommand caps the quoted command line; sshd and the guest's
	// ARG_MAX refuse longer ones anyway.
	MaxExecCommand = 256 << 10
	// MaxFramePayload caps one frame's payload. Senders split data into
	// frames of at most this size; a larger length is a protocol error.
	MaxFramePayload = 64 << 10
)

// FrameType says what a frame of the exec protocol carries.
type FrameType byte

// Frame types. Never renumber one: they are the wire format.
const (
	// FrameStdin: bytes for the command's standard input (client → daemon).
	FrameStdin FrameType = 1
	// FrameStdinEOF: the client's input ended; the command's standard
	// input is closed (client → daemon, empty payload).
	FrameStdinEOF FrameType = 2
	// FrameResize: the terminal's new size, as 4 bytes: rows then
	// columns, each a big-endian uint16 (client → daemon, TTY only).
	FrameResize FrameType = 3
	// FrameSignal: a signal for the command, by name without "SIG"
	// ("INT", "TERM", "HUP"…) (client → daemon).
	FrameSignal FrameType = 4
	// FrameStdout: bytes of the command's standard output (daemon → client).
	FrameStdout FrameType = 5
	// FrameStderr: bytes of the command's standard error (daemon → client).
	FrameStderr FrameType = 6
	// FrameExit: the command ended; the payload is ExecExit as JSON
	// (daemon → client, last frame).
	FrameExit FrameType = 7
	// FrameError: the session failed; the payload is Error as JSON
	// (daemon → client, last frame).
	FrameError FrameType = 8
)

func (t FrameType) String() string {
	switch t {
	case FrameStdin:
		return "stdin"
	case FrameStdinEOF:
		return "stdin-eof"
	case FrameResize:
		return "resize"
	case FrameSignal:
		return "signal"
	case FrameStdout:
		return "stdout"
	case FrameStderr:
		return "stderr"
	case FrameExit:
		return "exit"
	case FrameError:
		return "error"
	default:
		return fmt.Sprintf("frame(%d)", byte(t))
	}
}

// ExecExit is how the command ended.
type ExecExit struct {
	// Code is the exit status; 128+n when a signal n ended the command
	// (the shell's convention), -1 when the guest reported none.
	Code int `json:"code"`
	// Signal names the signal that ended the command ("TERM"), if any.
	Signal string `json:"signal,omitempty"`
}

// frameHeader is one byte of type and a big-endian uint32 payload length.
const frameHeader = 5

// ErrFrameTooLarge is a frame whose declared length exceeds MaxFramePayload.
var ErrFrameTooLarge = errors.New("exec frame larger than the maximum")

// AppendFrame appends one encoded frame to b.
func AppendFrame(b []byte, t FrameType, payload []byte) []byte {
	b = append(b, byte(t))
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// WriteFrame writes one frame in a single Write, so that writers sharing
// w under a lock never interleave. payload must not exceed
// MaxFramePayload.
func WriteFrame(w io.Writer, t FrameType, payload []byte) error {
	if len(payload) > MaxFramePayload {
		return fmt.Errorf("write %s frame: %w (%d bytes)", t, ErrFrameTooLarge, len(payload))
	}
	_, err := w.Write(AppendFrame(make([]byte, 0, frameHeader+len(payload)), t, payload))
	return err
}

// FrameReader reads frames. A payload stays valid until the next call of
// Next.
type FrameReader struct {
	r   *bufio.Reader
	buf []byte
}

// NewFrameReader reads frames from r.
func NewFrameReader(r io.Reader) *FrameReader {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	return &FrameReader{r: br}
}

// Next returns the next frame. io.EOF means the stream ended cleanly
// between frames; io.ErrUnexpectedEOF that it ended inside one.
func (fr *FrameReader) Next() (FrameType, []byte, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(fr.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > MaxFramePayload {
		return 0, nil, fmt.Errorf("read %s frame: %w (%d bytes)", FrameType(h[0]), ErrFrameTooLarge, n)
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n, max(int(n), 4<<10))
	}
	p := fr.buf[:n]
	if _, err := io.ReadFull(fr.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return FrameType(h[0]), p, nil
}

// EncodeResize is the payload of FrameResize.
func EncodeResize(rows, cols int) []byte {
	var b [4]byte
	binary.BigEndian.PutUint16(b[:2], uint16(min(max(rows, 0), 0xffff)))
	binary.BigEndian.PutUint16(b[2:], uint16(min(max(cols, 0), 0xffff)))
	return b[:]
}

// DecodeResize parses a FrameResize payload.
func DecodeResize(p []byte) (rows, cols int, err error) {
	if len(p) != 4 {
		return 0, 0, fmt.Errorf("resize frame: want 4 bytes, got %d", len(p))
	}
	return int(binary.BigEndian.Uint16(p[:2])), int(binary.BigEndian.Uint16(p[2:])), nil
}

// SyncRequest is the body of POST /v1/vms/{name}/sync. The response is an
// NDJSON stream of StreamMessage ending with a SyncReport.
type SyncRequest struct {
	// Paths, when set, are absolute host paths known to have changed
	// (`banger vm sync --watch` sends them): only the file_sync entries
	// holding one of them are synced. Empty means every entry.
	Paths []string `json:"paths,omitempty"`
	// Full ignores what earlier syncs recorded and compares nothing:
	// every file is sent again.
	Full bool `json:"full,omitempty"`
}

// SyncReport says what a sync did.
type SyncReport struct {
	// Uploaded, Deleted and Unchanged count files over all entries.
	Uploaded  int               `json:"uploaded"`
	Deleted   int               `json:"deleted"`
	Unchanged int               `json:"unchanged"`
	Bytes     int64             `json:"bytes"` // bytes uploaded
	Entries   []SyncEntryReport `json:"entries"`
}

// SyncEntryReport is one file_sync entry's part of a SyncReport.
type SyncEntryReport struct {
	// Host is the entry's host path, absolute, as configured with ~
	// expanded (not following symlinks).
	Host  string `json:"host"`
	Guest string `json:"guest"`
	// Dir is true when the host path is a directory.
	Dir bool `json:"dir,omitempty"`
	// Missing is true when the host path does not exist; files synced
	// from it before are deleted from the guest.
	Missing   bool `json:"missing,omitempty"`
	Uploaded  int  `json:"uploaded"`
	Deleted   int  `json:"deleted"`
	Unchanged int  `json:"unchanged"`
	// Ignored counts files skipped by .gitignore rules.
	Ignored int `json:"ignored,omitempty"`
}
