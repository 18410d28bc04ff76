// Package helper is banger-helper, the narrow root process that does the
// few privileged things the owner's daemon cannot: the bridge and taps, the
// nftables table "inet banger", loop devices and dm-snapshots over files in
// the state dir, and Firecracker under its jailer.
//
// It serves the closed set of operations in package helperapi on a unix
// socket. Every connection's SO_PEERCRED is checked (root or the configured
// owner uid, nobody else), every request is decoded strictly and validated,
// and every operation is logged with the peer's uid and pid. Targets are
// re-checked against the helper's own configuration: the one bridge it was
// started with, the one owner uid, files under <state dir>/vms/ opened
// without following symlinks.
package helper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// Timeouts for one connection.
const (
	readTimeout  = 10 * time.Second // for the client to send its request
	opTimeout    = 2 * time.Minute  // for the operation itself
	writeTimeout = 10 * time.Second // for the client to take the response
	// maxConns bounds concurrent connections; operations run one at a time
	// anyway.
	maxConns = 16
)

// Config is the helper's configuration, set at install time.
type Config struct {
	// OwnerUID is the one unprivileged user allowed to connect (root always
	// may), and the owner of every tap the helper makes. Never 0.
	OwnerUID uint32
	// StateDir is banger's state dir; the helper only ever opens files
	// under StateDir/vms/<vm id>/.
	StateDir string
	// Socket is the unix socket path.
	Socket string
	// Bridge is the one bridge the helper manages.
	Bridge string
	// NetNS, when set, is a network namespace file (/run/netns/NAME) in
	// which every network operation runs. Tests use it to keep off the
	// host's network; the binary has no flag for it. Host-wide side
	// effects (systemd-resolved) are skipped in that case.
	NetNS string
	// Logger receives one line per operation; nil discards.
	Logger *slog.Logger

	// Firecracker and Jailer are the binaries LaunchJailed runs: absolute
	// paths that, symlinks resolved, name root-owned executables that
	// nobody but root can change, nor any directory above them (the
	// jailer trusts its inputs: docs/jailer.md). Both empty turn jailed
	// launches off.
	Firecracker string
	Jailer      string
	// JailDir is the jailer's --chroot-base-dir. It must lie on the state
	// dir's file system (disks are hard-linked into jails) and, with every
	// directory above it, be writable by root alone, which rules out the
	// state dir itself: the owner writes there and could swap a directory
	// for a symlink under the jailer. "" means the state dir's sibling
	// "<state dir>-jail"; the helper creates it (0711).
	JailDir string
	// JailUIDBase and JailUIDCount are the uids jailed Firecrackers run
	// as: each jail takes the lowest uid of the range that no jail and no
	// process uses, and the gid of the same number. The range must hold no
	// user or group of /etc/passwd or /etc/group, and neither root, the
	// owner nor 65534 (nobody). A zero count means 1024.
	JailUIDBase  uint32
	JailUIDCount uint32
	// JailCgroup is the cgroup, relative to the cgroup v2 mount, under
	// which each jail gets a cgroup named by its VM id; "" means
	// "banger-jail".
	JailCgroup string
	// Executable is the helper's own binary, which each jail's console
	// logger runs as the owner: the owner must be allowed to execute it.
	// "" means os.Executable().
	Executable string
}

// jailEnabled says whether jailed launches are configured: any jail
// setting turns them on, and validateJail then wants all it needs.
func (c Config) jailEnabled() bool {
	return c.Firecracker != "" || c.Jailer != "" || c.JailDir != "" ||
		c.JailUIDBase != 0 || c.JailUIDCount != 0 || c.JailCgroup != ""
}

func (c Config) validate() error {
	var errs []error
	if err := helperapi.ValidateOwnerUID(c.OwnerUID); err != nil {
		errs = append(errs, err)
	}
	if !filepath.IsAbs(c.StateDir) || filepath.Clean(c.StateDir) != c.StateDir || c.StateDir == "/" {
		errs = append(errs, fmt.Errorf("state dir %q: want an absolute, clean path other than /", c.StateDir))
	}
	if !filepath.IsAbs(c.Socket) {
		errs = append(errs, fmt.Errorf("socket %q: want an absolute path", c.Socket))
	}
	if err := helperapi.ValidateBridgeName(c.Bridge); err != nil {
		errs = append(errs, err)
	}
	if c.jailEnabled() {
		errs = append(errs, c.validateJail())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("helper config: %w", err)
	}
	return nil
}

// Server serves helper operations.
type Server struct {
	cfg  Config
	jail *jailConfig // nil when jailed launches are off
	log  *slog.Logger
	mu   sync.Mutex // held for each operation: the kernel objects banger manages change one operation at a time
	sema chan struct{}
}

// New checks cfg and returns a server. With jailed launches on it also
// checks the binaries and the uid range against the host.
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log, sema: make(chan struct{}, maxConns)}
	if cfg.jailEnabled() {
		jc, err := newJailConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("helper config: %w", err)
		}
		s.jail = jc
	}
	return s, nil
}

var umaskMu sync.Mutex // umask is process-wide; Listen changes it briefly

// Listen creates the socket at path: mode 0600, owned by ownerUID (root
// connects regardless of the mode). The mode is set through the umask at
// bind time and the owner with lchown, so nothing is ever done to the path
// through a symlink someone swapped in. A stale socket from a dead helper
// is replaced; a live one, or anything that is not a socket, is not.
func Listen(path string, ownerUID uint32) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	umaskMu.Lock()
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := unix.Fchownat(unix.AT_FDCWD, path, int(ownerUID), 0, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("chown socket %s: %w", path, err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect socket %s: %w", path, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket; refusing to replace it", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		_ = c.Close()
		return fmt.Errorf("socket %s: another helper is listening", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// ListenAndServe listens on the configured socket and serves until ctx ends.
func (s *Server) ListenAndServe(ctx context.Context) error {
	ln, err := Listen(s.cfg.Socket, s.cfg.OwnerUID)
	if err != nil {
		return err
	}
	s.log.Info("helper listening", "socket", s.cfg.Socket, "owner_uid", s.cfg.OwnerUID,
		"state_dir", s.cfg.StateDir, "bridge", s.cfg.Bridge)
	return s.Serve(ctx, ln)
}

// Serve accepts connections on ln until ctx ends, then closes ln and waits
// for operations in flight.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				s.log.Warn("accept", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		s.sema <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-s.sema; wg.Done() }()
			defer func() { _ = conn.Close() }()
			s.handle(ctx, conn)
		}()
	}
}

// peer is the caller of one connection: SO_PEERCRED as the kernel filled
// it in at connect time, kept as the typed struct. Identity is never
// derived from anything the client sends.
type peer struct{ cred *unix.Ucred }

type peerKey struct{}

// logFor is the server's logger specialised with the caller of ctx, for
// what an operation logs besides its own outcome line.
func (s *Server) logFor(ctx context.Context) *slog.Logger {
	p, ok := ctx.Value(peerKey{}).(peer)
	if !ok {
		return s.log
	}
	return s.log.With("peer_uid", p.cred.Uid, "peer_pid", p.cred.Pid)
}

func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	if cerr != nil {
		return nil, fmt.Errorf("peer credentials: %w", cerr)
	}
	return cred, nil
}

func (s *Server) allowed(cred *unix.Ucred) bool {
	return cred.Uid == 0 || cred.Uid == s.cfg.OwnerUID
}

// handle serves one connection: check the peer, read one request, run it,
// answer, log.
func (s *Server) handle(ctx context.Context, conn *net.UnixConn) {
	cred, err := peerCred(conn)
	if err != nil {
		s.log.Error("refused connection", "err", err)
		return
	}
	log := s.log.With("peer_uid", cred.Uid, "peer_pid", cred.Pid)
	if !s.allowed(cred) {
		log.Warn("refused peer", "peer_gid", cred.Gid, "reason", "uid is neither root nor the owner")
		_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_ = helperapi.WriteResponse(conn, nil, nil,
			helperapi.Errorf(helperapi.CodeForbidden, "uid %d may not use banger-helper", cred.Uid))
		return
	}
	ctx = context.WithValue(ctx, peerKey{}, peer{cred: cred})

	_ = conn.SetReadDeadline(time.Now().Add(readTimeout))
	data, err := helperapi.ReadRequest(conn)
	var op helperapi.Op
	if err == nil {
		op, err = helperapi.DecodeRequest(data)
	}
	if err != nil {
		log.Warn("refused request", "err", err)
		_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_ = helperapi.WriteResponse(conn, nil, nil, err)
		return
	}

	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	res, files, err := s.do(ctx, op)
	cancel()
	defer closeAll(files)
	attrs := []any{"op", op.OpName(), "args", op, "duration", time.Since(start).Round(time.Microsecond)}
	if err != nil {
		code := helperapi.CodeInternal
		var he *helperapi.Error
		if errors.As(err, &he) {
			code = he.Code
		}
		log.Warn("operation failed", append(attrs, "outcome", "error", "code", code, "err", err)...)
	} else {
		log.Info("operation done", append(attrs, "outcome", "ok", "result", res)...)
	}
	_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if werr := helperapi.WriteResponse(conn, res, files, err); werr != nil {
		// A descriptor that never reached the client is closed below;
		// autoclear and deferred removal then undo the operation.
		log.Warn("answer peer", "op", op.OpName(), "err", werr)
	}
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// do runs one validated operation, one at a time. The result and files go
// back to the client; the caller closes the files after sending them.
func (s *Server) do(ctx context.Context, op helperapi.Op) (result any, files []*os.File, err error) {
	if err := op.Validate(); err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	one := func(f *os.File) []*os.File {
		if f == nil {
			return nil
		}
		return []*os.File{f}
	}
	switch op := op.(type) {
	case helperapi.EnsureBridge:
		r, err := s.ensureBridge(op)
		return r, nil, err
	case helperapi.DeleteBridge:
		return nil, nil, s.deleteBridge(op)
	case helperapi.CreateTap:
		return nil, nil, s.createTap(op)
	case helperapi.DeleteTap:
		return nil, nil, s.deleteTap(op)
	case helperapi.EnsureNAT:
		return nil, nil, s.ensureNAT(ctx, op)
	case helperapi.RemoveNAT:
		return nil, nil, s.removeNAT(ctx)
	case helperapi.EnsureDNSRedirect:
		r, err := s.ensureDNSRedirect(ctx, op)
		return r, nil, err
	case helperapi.AttachLoop:
		r, f, err := s.attachLoop(op)
		return r, one(f), err
	case helperapi.DetachLoop:
		return nil, nil, s.detachLoop(op)
	case helperapi.CreateSnapshot:
		r, f, err := s.createSnapshot(op)
		return r, one(f), err
	case helperapi.RemoveSnapshot:
		return nil, nil, s.removeSnapshot(op)
	case helperapi.LaunchJailed:
		r, err := s.launchJailed(ctx, op)
		return r, nil, err
	case helperapi.KillJailed:
		return nil, nil, s.killJailed(ctx, op)
	case helperapi.ListOwned:
		r, err := s.listOwned(ctx)
		return r, nil, err
	}
	return nil, nil, helperapi.Errorf(helperapi.CodeUnknownOp, "op %q is not served", op.OpName())
}
