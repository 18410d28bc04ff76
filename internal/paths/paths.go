// Package paths is the only place that builds banger's file-system paths.
//
// User mode follows the XDG base directory spec; system mode (--system) uses
// /etc/banger, /var/lib/banger and /run/banger. Everything else asks a Layout.
package paths

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// Mode is how banger was installed.
type Mode string

const (
	UserMode   Mode = "user"
	SystemMode Mode = "system"
)

// Layout holds banger's four base directories.
type Layout struct {
	Mode       Mode
	ConfigDir  string // config.toml, install.toml, the owner's SSH key
	StateDir   string // SQLite DB, daemon lock and log, VM disks, known_hosts
	DataDir    string // images
	RuntimeDir string // sockets and per-VM runtime files; 0700
}

// System returns the fixed layout of a system install.
func System() Layout {
	return Layout{
		Mode:       SystemMode,
		ConfigDir:  "/etc/banger",
		StateDir:   "/var/lib/banger",
		DataDir:    "/var/lib/banger",
		RuntimeDir: "/run/banger",
	}
}

// User returns the XDG layout for the current user.
func User() (Layout, error) {
	return userFrom(os.Getenv, os.Getuid())
}

// For returns System() when system is true, else User().
func For(system bool) (Layout, error) {
	if system {
		return System(), nil
	}
	return User()
}

func userFrom(getenv func(string) string, uid int) (Layout, error) {
	home := getenv("HOME")
	xdg := func(key, fallback string) (string, error) {
		if v := getenv(key); v != "" {
			if !filepath.IsAbs(v) {
				return "", fmt.Errorf("%s=%q is not an absolute path", key, v)
			}
			return filepath.Join(v, "banger"), nil
		}
		if home == "" || !filepath.IsAbs(home) {
			return "", fmt.Errorf("neither %s nor an absolute HOME is set", key)
		}
		return filepath.Join(home, fallback, "banger"), nil
	}
	var l Layout
	var err, e error
	l.Mode = UserMode
	l.ConfigDir, e = xdg("XDG_CONFIG_HOME", ".config")
	err = errors.Join(err, e)
	l.StateDir, e = xdg("XDG_STATE_HOME", ".local/state")
	err = errors.Join(err, e)
	l.DataDir, e = xdg("XDG_DATA_HOME", ".local/share")
	err = errors.Join(err, e)
	if v := getenv("XDG_RUNTIME_DIR"); v != "" {
		if !filepath.IsAbs(v) {
			err = errors.Join(err, fmt.Errorf("XDG_RUNTIME_DIR=%q is not an absolute path", v))
		}
		l.RuntimeDir = filepath.Join(v, "banger")
	} else if l.StateDir != "" {
		// No per-user runtime dir (a root shell, a container): keep sockets under
		// the state dir, never under a guessable /tmp name another user could
		// create first.
		l.RuntimeDir = filepath.Join(l.StateDir, "run")
	}
	if err != nil {
		return Layout{}, fmt.Errorf("user paths (uid %s): %w", strconv.Itoa(uid), err)
	}
	return l, nil
}

// ConfigFile is config.toml.
func (l Layout) ConfigFile() string { return filepath.Join(l.ConfigDir, "config.toml") }

// InstallFile records a system install: the owner user and what was installed.
func (l Layout) InstallFile() string { return filepath.Join(l.ConfigDir, "install.toml") }

// DB is the SQLite state database.
func (l Layout) DB() string { return filepath.Join(l.StateDir, "banger.db") }

// DBBackupDir holds VACUUM INTO copies taken before migrations.
func (l Layout) DBBackupDir() string { return filepath.Join(l.StateDir, "backups") }

// DaemonLock is flock(2)ed by the running bangerd: one daemon per state dir.
func (l Layout) DaemonLock() string { return filepath.Join(l.StateDir, "bangerd.lock") }

// DaemonLog is where a CLI-started daemon writes its log.
func (l Layout) DaemonLog() string { return filepath.Join(l.StateDir, "bangerd.log") }

// DaemonSocket is the daemon's API socket.
func (l Layout) DaemonSocket() string { return filepath.Join(l.RuntimeDir, "bangerd.sock") }

// HelperSocket is the root helper's socket.
func (l Layout) HelperSocket() string {
	if l.Mode == SystemMode {
		return filepath.Join(l.RuntimeDir, "helper.sock")
	}
	// A user-mode daemon may still use a system helper when one is installed.
	return filepath.Join(System().RuntimeDir, "helper.sock")
}

// ImagesDir holds one directory per image.
func (l Layout) ImagesDir() string { return filepath.Join(l.DataDir, "images") }

// ImageDir is one image's directory.
func (l Layout) ImageDir(name string) string { return filepath.Join(l.ImagesDir(), name) }

// ImageStagingDir holds images being built or imported; they move into
// ImagesDir by rename, so it must be on the same file system.
func (l Layout) ImageStagingDir() string { return filepath.Join(l.DataDir, "staging") }

// CacheDir holds re-creatable data: build caches, the KVM probe result.
func (l Layout) CacheDir() string { return filepath.Join(l.StateDir, "cache") }

// VMsDir holds one directory per VM: its disk and persistent files.
func (l Layout) VMsDir() string { return filepath.Join(l.StateDir, "vms") }

// VMDir is one VM's persistent directory.
func (l Layout) VMDir(id string) string { return filepath.Join(l.VMsDir(), id) }

// VMRunDir is one VM's runtime directory: control sockets, pid files.
// Kept short: unix socket paths are limited to 107 bytes.
func (l Layout) VMRunDir(id string) string { return filepath.Join(l.RuntimeDir, "vm", id) }

// KnownHosts is banger's own known_hosts, holding each VM's pinned host keys.
func (l Layout) KnownHosts() string { return filepath.Join(l.StateDir, "known_hosts") }

// SSHKey is the owner's private key for reaching VMs; the public half is SSHKey()+".pub".
func (l Layout) SSHKey() string { return filepath.Join(l.ConfigDir, "ssh", "id_ed25519") }

// EnsureDirs creates the base directories with banger's modes: the runtime
// dir 0700 (it holds the API socket), the others 0700 as well since they
// hold keys and disks.
func (l Layout) EnsureDirs() error {
	for _, d := range []string{l.ConfigDir, l.StateDir, l.DataDir, l.RuntimeDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	// MkdirAll leaves an existing directory's mode alone; the socket's
	// directory must not be reachable by others whatever made it.
	if err := os.Chmod(l.RuntimeDir, 0o700); err != nil {
		return fmt.Errorf("chmod %s: %w", l.RuntimeDir, err)
	}
	return nil
}
