// Package daemon wires bangerd together: configuration, the state lock, the
// store, the services, the API listener, and an orderly shutdown.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/server"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/version"
	"github.com/bangerhq/banger/internal/vmm"
)

// exit is os.Exit, replaceable so tests see the exit code of Main.
var exit = os.Exit

// Main is bangerd's entry point.
func Main() {
	if vmm.ConsoleLoggerMain() {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	exit(Run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// Run parses args and runs the daemon (or one of its one-shot modes) until
// ctx ends; it returns the process exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bangerd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	system := fs.Bool("system", false, "use the system install's paths (/etc/banger, /var/lib/banger, /run/banger)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	checkMigrations := fs.Bool("check-migrations", false, "classify the database against this binary and exit 0 (compatible), 1 (migrations needed) or 2 (incompatible)")
	logFormat := fs.String("log-format", "", "log format: text or json (default from config.toml)")
	logLevel := fs.String("log-level", "", "log level: debug, info, warn, error (default from config.toml)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 64
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "bangerd: unexpected argument %q\n", fs.Arg(0))
		return 64
	}
	if *showVersion {
		_, _ = fmt.Fprintln(stdout, version.Get().Line("bangerd"))
		return 0
	}
	layout, err := paths.For(*system)
	if err != nil {
		_, _ = fmt.Fprintln(stderr, "bangerd:", err)
		return 1
	}
	if *checkMigrations {
		return runCheckMigrations(ctx, layout, stdout, stderr)
	}
	ready := readyPipe()
	err = serve(ctx, layout, *logFormat, *logLevel, stderr, ready)
	if err != nil {
		ready.fail(err)
		_, _ = fmt.Fprintln(stderr, "bangerd:", err)
		return 1
	}
	return 0
}

// runCheckMigrations prints one line and returns the contract exit code.
func runCheckMigrations(ctx context.Context, layout paths.Layout, stdout, stderr io.Writer) int {
	st, err := store.InspectSchemaState(ctx, layout.DB())
	if err != nil {
		_, _ = fmt.Fprintln(stderr, "bangerd:", err)
		return 3
	}
	_, _ = fmt.Fprintln(stdout, st.Line())
	return st.ExitCode()
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q is not text or json", format)
	}
}

func executableIdentity() api.Binary {
	exe, err := os.Executable()
	if err != nil {
		return api.Binary{}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(exe, &st); err != nil {
		return api.Binary{Path: exe}
	}
	return api.Binary{Path: exe, Inode: st.Ino, Size: st.Size, ModTime: st.Mtim.Nano()}
}

// serve runs the daemon until ctx ends or a shutdown is requested.
func serve(ctx context.Context, layout paths.Layout, logFormat, logLevel string, logw io.Writer, ready *readyNotifier) error {
	cfg, err := config.Load(layout.ConfigFile())
	if err != nil {
		return err
	}
	if logFormat == "" {
		logFormat = cfg.Daemon.LogFormat
	}
	if logLevel == "" {
		logLevel = cfg.Daemon.LogLevel
	}
	log, err := newLogger(logw, logFormat, logLevel)
	if err != nil {
		return err
	}
	if err := layout.EnsureDirs(); err != nil {
		return err
	}
	lock, err := acquireLock(layout.DaemonLock())
	if err != nil {
		return fmt.Errorf("%w (hint: stop it first, or use `banger version` to see which daemon answers)", err)
	}
	defer lock.release()

	st, err := store.Open(ctx, layout.DB(), store.Options{BackupDir: layout.DBBackupDir(), Logger: log})
	if errors.Is(err, store.ErrIncompatible) {
		return fmt.Errorf("%w (hint: this bangerd is older than the database; update banger with `banger update`)", err)
	}
	if err != nil {
		return err
	}
	defer func() { _ = st.Close() }()

	// The lock is held, so a socket left on disk belongs to a dead daemon.
	sock := layout.DaemonSocket()
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	defer func() { _ = os.Remove(sock) }()
	if err := os.Chmod(sock, 0o600); err != nil {
		_ = ln.Close()
		return fmt.Errorf("chmod %s: %w", sock, err)
	}

	started := time.Now().UTC()
	info := version.Get()
	vinfo := api.VersionInfo{
		Version: info.Version, Commit: info.Commit, BuiltAt: info.BuiltAt,
		GoVersion: info.GoVersion, Platform: info.Platform,
		PID: os.Getpid(), StartedAt: started, Mode: string(layout.Mode), Executable: executableIdentity(),
	}
	if os.Geteuid() == 0 && layout.Mode == paths.SystemMode {
		log.Warn("bangerd is running as root; a system install runs it as the owner user")
	}

	act := &activity{}
	bus := &events.Bus{}
	svc := newServices(st, layout, cfg, bus, log)
	// Clean-up that finished builds left running ends before the store
	// closes (deferred earlier, so it runs later).
	defer svc.images.Wait()
	if rep, err := svc.images.Reconcile(ctx); err != nil {
		log.Error("reconcile images", "err", err)
	} else {
		log.Debug("images reconciled", "report", rep)
	}
	// Bridge networking when banger-helper answers; the reconcile below
	// then also removes what the helper holds for VMs that are gone.
	if err := svc.vms.EnableBridge(ctx); err != nil {
		log.Info("new VMs get user-mode networking", "reason", err)
	}
	if err := svc.vms.Reconcile(ctx); err != nil {
		log.Error("reconcile vms", "err", err)
	}
	// VMs keep running after the daemon stops; it only lets go of them.
	defer svc.vms.Close()
	defer svc.guest.Close()
	done := make(chan struct{})
	shutdownReq := make(chan api.ShutdownRequest, 1)
	srv := &server.Server{
		VMs:      svc.vms,
		Images:   svc.images,
		Guest:    svc.guest,
		Ports:    svc.vms,
		Events:   bus,
		Info:     func() api.VersionInfo { return vinfo },
		Activity: act,
		Owner:    uint32(os.Getuid()),
		Done:     done,
		Log:      log,
		Shutdown: func(r api.ShutdownRequest) {
			select {
			case shutdownReq <- r:
			default:
			}
		},
	}
	hs := &http.Server{
		Handler:           srv.Handler(),
		ConnContext:       server.ConnContext,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- hs.Serve(ln) }()
	log.Info("bangerd serving", "version", info.Version, "commit", info.ShortCommit(), "socket", sock, "mode", layout.Mode, "pid", os.Getpid())
	ready.ok()

	var whenIdle bool
	select {
	case <-ctx.Done():
		log.Info("signal received, shutting down")
	case r := <-shutdownReq:
		whenIdle = r.WhenIdle
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	}
	drainCtx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if whenIdle {
		if err := act.drain(drainCtx); err != nil {
			log.Warn("operations still in flight at shutdown", "in_flight", act.InFlight())
		}
	}
	close(done)
	if err := hs.Shutdown(drainCtx); err != nil {
		log.Warn("shutdown did not finish cleanly", "err", err)
	}
	log.Info("bangerd stopped")
	return nil
}

// readyNotifier reports start-up success or failure on the pipe the CLI
// passed in EnvReadyFD, once.
type readyNotifier struct {
	once sync.Once
	f    *os.File
}

func readyPipe() *readyNotifier {
	fd, err := strconv.Atoi(os.Getenv(api.EnvReadyFD))
	_ = os.Unsetenv(api.EnvReadyFD)
	if err != nil || fd < 3 {
		return &readyNotifier{}
	}
	return &readyNotifier{f: os.NewFile(uintptr(fd), "ready")}
}

func (r *readyNotifier) send(msg string) {
	r.once.Do(func() {
		if r.f == nil {
			return
		}
		_, _ = r.f.WriteString(msg + "\n")
		r.f.Close()
	})
}

func (r *readyNotifier) ok()            { r.send("ok") }
func (r *readyNotifier) fail(err error) { r.send("error: " + err.Error()) }
