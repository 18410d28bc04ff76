package helper

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/version"
)

// Main is banger-helper's entry point; it returns the exit code.
//
//	banger-helper --owner-uid N --state-dir DIR [--socket PATH] [--bridge banger0] [--log-format text|json]
//	              [--firecracker PATH --jailer PATH --jail-uid-base N [--jail-uid-count N] [--jail-dir DIR] [--jail-cgroup NAME]]
//	banger-helper --version
//
// The helper also runs, as the owner, the console logger of each jailed
// VM; its environment selects that mode (consoleLoggerMain).
func Main(args []string) int {
	if consoleLoggerMain() {
		return 0
	}
	if len(args) == 1 && args[0] == "--version" {
		fmt.Println(version.Get().Line("banger-helper"))
		return 0
	}
	cfg, logFormat, err := parseFlags(args, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "banger-helper:", err)
		return 2
	}
	cfg.Logger = newLogger(os.Stderr, logFormat)
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "banger-helper: must run as root (hint: it is started by banger-helper.service)")
		return 1
	}
	srv, err := New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "banger-helper:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	info := version.Get()
	cfg.Logger.Info("starting banger-helper", "version", info.Version, "commit", info.ShortCommit())
	if err := srv.ListenAndServe(ctx); err != nil {
		cfg.Logger.Error("banger-helper stopped", "err", err)
		return 1
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (Config, string, error) {
	fs := flag.NewFlagSet("banger-helper", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg                   Config
		ownerUID              uint64
		jailUIDBase, jailUIDs uint64
		logFormat             string
	)
	fs.Uint64Var(&ownerUID, "owner-uid", 0, "uid of the user whose bangerd may use the helper (required, not 0)")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "banger's state dir; only files under DIR/vms/<vm id>/ are ever opened (required)")
	fs.StringVar(&cfg.Socket, "socket", paths.System().HelperSocket(), "unix socket to listen on")
	fs.StringVar(&cfg.Bridge, "bridge", "banger0", "the bridge the helper manages")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&cfg.Firecracker, "firecracker", "", "the firecracker binary jailed VMs run (absolute; root-owned, writable by root alone, as every directory above it); with --jailer, turns jailed launches on")
	fs.StringVar(&cfg.Jailer, "jailer", "", "the jailer binary (same requirements as --firecracker)")
	fs.StringVar(&cfg.JailDir, "jail-dir", "", "the jailer's chroot base: root-only, on the state dir's file system (default <state-dir>-jail)")
	fs.Uint64Var(&jailUIDBase, "jail-uid-base", 0, "first uid (and gid) of the range jailed firecrackers run as, one per VM (required for jailed launches)")
	fs.Uint64Var(&jailUIDs, "jail-uid-count", 0, "size of the jail uid range (default 1024)")
	fs.StringVar(&cfg.JailCgroup, "jail-cgroup", "", "cgroup v2 parent, relative to the mount, of the jails' cgroups (default banger-jail)")
	if err := fs.Parse(args); err != nil {
		return Config{}, "", err
	}
	if jailUIDBase >= 1<<32 || jailUIDs >= 1<<32 {
		return Config{}, "", errors.New("--jail-uid-base and --jail-uid-count must fit in 32 bits")
	}
	cfg.JailUIDBase, cfg.JailUIDCount = uint32(jailUIDBase), uint32(jailUIDs)
	switch {
	case fs.NArg() > 0:
		return Config{}, "", fmt.Errorf("unexpected arguments %q", fs.Args())
	case ownerUID == 0 || ownerUID >= 1<<32-1:
		return Config{}, "", errors.New("--owner-uid is required: the uid of banger's owner, not 0")
	case cfg.StateDir == "":
		return Config{}, "", errors.New("--state-dir is required")
	case logFormat != "text" && logFormat != "json":
		return Config{}, "", fmt.Errorf("--log-format %q: want text or json", logFormat)
	}
	cfg.OwnerUID = uint32(ownerUID)
	return cfg, logFormat, cfg.validate()
}

func newLogger(w io.Writer, format string) *slog.Logger {
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}
