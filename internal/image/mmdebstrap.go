package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"golang.org/x/sys/unix"
)

// Customize scripts: what they see.
//
// Each --customize script runs inside the new root file system (chroot), as
// root, after banger's base customization and before its finalization,
// in the order given, with / as working directory, stdin from /dev/null
// and stdout and stderr shown as build progress. A script starting with
// "#!" runs with that interpreter; any other runs with /bin/sh. A script
// exiting non-zero aborts the build, and its last output lines are in the
// error. The environment is exactly:
//
//	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
//	HOME=/root  LANG=C.UTF-8  LC_ALL=C.UTF-8  TERM=dumb
//	DEBIAN_FRONTEND=noninteractive
//	BANGER_IMAGE_NAME   the image's name
//	BANGER_SUITE        the Debian suite, e.g. bookworm
//	BANGER_MIRROR       the mirror URL
//	BANGER_PACKAGES     every package asked for, space-separated, sorted
//	BANGER_SCRIPT       this script's name
//	BANGER_ROOTFS=/     the image's root as the script sees it
//
// /proc, /sys and /dev are mounted; the network is the host's, apt's
// sources point at the mirror, and /etc/resolv.conf holds the host's
// resolvers for the duration of the scripts (the image keeps its
// systemd-resolved link). Daemons are not started (policy-rc.d).
// Everything scripts leave in /tmp and /run is removed. SSH host keys and
// the machine id are removed after the last script, whatever it did.

const scriptPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Marker lines the hooks print, so that a failure can be pinned to a script
// and its output cut out of mmdebstrap's.
const (
	markerStart = "banger: running "
	markerFail  = "banger: failed: "
)

// mmdebstrapPhases are mmdebstrap's "I:" progress lines, in order.
var mmdebstrapPhases = []string{
	"I: running apt-get update",
	"I: downloading packages",
	"I: extracting archives",
	"I: installing essential packages",
	"I: installing remaining packages",
	"I: running --customize-hook",
	"I: cleaning package lists",
}

// debootstrap is one mmdebstrap run.
type debootstrap struct {
	bin    string
	name   string
	recipe Recipe
	// dir is the working directory: special hooks name host paths
	// relative to it (hooks/…).
	dir string
	// target is the output, relative to dir: a directory, or a tarball
	// when unprivileged.
	target       string
	unprivileged bool
	// tmpDir is mmdebstrap's TMPDIR when unprivileged (it builds the tree
	// there before packing the tarball); empty otherwise.
	tmpDir string
	// cacheIn is the package cache to seed apt's archive directory from;
	// cacheOut receives the packages the run downloaded that cacheIn
	// lacks (hooks/cached-debs lists cacheIn's). Empty for no cache.
	cacheIn, cacheOut string
}

// hookScript is a script uploaded into the chroot.
type hookScript struct {
	file    string // under dir/hooks/
	display string // for markers and errors
	shebang bool
}

// args builds mmdebstrap's command line. Hooks that are shell commands are
// fixed templates; the only values spliced in are hook file names banger
// chose and script names and paths already validated to a safe charset,
// and even those are quoted. Everything else reaches the hooks through
// the environment.
func (d *debootstrap) args(scripts []hookScript) []string {
	format := "directory"
	if d.unprivileged {
		format = "tar"
	}
	a := []string{
		"--mode=unshare",
		"--variant=minbase",
		"--format=" + format,
		"--include=" + strings.Join(d.recipe.Packages, ","),
	}
	if d.cacheIn != "" {
		a = append(a,
			// Keep the downloaded packages in apt's archive directory
			// so that sync-out can save them.
			"--skip=essential/unlink",
			`--setup-hook=mkdir -p "$1/var/cache/apt/archives/"`,
			"--setup-hook=sync-in "+shellQuote(d.cacheIn)+" /var/cache/apt/archives/",
		)
	}
	a = append(a,
		`--customize-hook=mkdir -m 0700 "$1/tmp/banger"`,
		"--customize-hook=upload hooks/base.sh /tmp/banger/base.sh",
	)
	for _, s := range scripts {
		a = append(a, "--customize-hook=upload "+shellQuote("hooks/"+s.file)+" "+shellQuote("/tmp/banger/"+s.file))
	}
	a = append(a, "--customize-hook="+runInChroot("base customization (setup)", "/bin/sh /tmp/banger/base.sh setup", ""))
	if len(scripts) > 0 {
		// The image's resolv.conf is systemd-resolved's link, dangling
		// until the guest runs; scripts get the host's resolvers.
		a = append(a, `--customize-hook=if [ -L "$1/etc/resolv.conf" ]; then mv -T "$1/etc/resolv.conf" "$1/etc/resolv.conf.banger-saved" && cat /etc/resolv.conf >"$1/etc/resolv.conf"; fi`)
		for i, s := range scripts {
			run := "/tmp/banger/" + s.file
			if !s.shebang {
				run = "/bin/sh " + run
			}
			display := fmt.Sprintf("customize script %q (%d/%d)", s.display, i+1, len(scripts))
			a = append(a, "--customize-hook=chmod 0755 "+shellQuote(`$1/tmp/banger/`+s.file)+"; "+runInChroot(display, run, s.display))
		}
		a = append(a, `--customize-hook=if [ -L "$1/etc/resolv.conf.banger-saved" ]; then rm -f "$1/etc/resolv.conf" && mv -T "$1/etc/resolv.conf.banger-saved" "$1/etc/resolv.conf"; fi`)
	}
	a = append(a, "--customize-hook="+runInChroot("base customization (finalize)", "/bin/sh /tmp/banger/base.sh finalize", ""))
	if d.cacheOut != "" {
		// Copy out only what the cache lacks: with a warm cache, nothing.
		a = append(a,
			"--customize-hook=upload hooks/cached-debs /tmp/banger/cached-debs",
			`--customize-hook=mkdir "$1/tmp/banger/new-debs" && for f in "$1"/var/cache/apt/archives/*.deb; do [ -e "$f" ] || continue; grep -qxF "${f##*/}" "$1/tmp/banger/cached-debs" || mv "$f" "$1/tmp/banger/new-debs/" || exit 1; done`,
			"--customize-hook=sync-out /tmp/banger/new-debs "+shellQuote(d.cacheOut),
		)
	}
	return append(a, d.recipe.Suite, d.target, d.recipe.Mirror)
}

// runInChroot is a customize hook that runs cmd in the chroot with the
// documented environment, between marker lines.
func runInChroot(display, cmd, script string) string {
	env := []string{
		"PATH=" + scriptPath, "HOME=/root", "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "TERM=dumb",
		"DEBIAN_FRONTEND=noninteractive",
		`BANGER_IMAGE_NAME="$BANGER_IMAGE_NAME"`, `BANGER_SUITE="$BANGER_SUITE"`,
		`BANGER_MIRROR="$BANGER_MIRROR"`, `BANGER_PACKAGES="$BANGER_PACKAGES"`,
		"BANGER_SCRIPT=" + shellQuote(script), "BANGER_ROOTFS=/",
	}
	return fmt.Sprintf(`echo %s; chroot "$1" /usr/bin/env -i %s %s </dev/null; rc=$?; if [ $rc -ne 0 ]; then echo %s"with exit status $rc"; exit $rc; fi`,
		shellQuote(markerStart+display), strings.Join(env, " "), cmd, shellQuote(markerFail+display+" "))
}

// shellQuote quotes s for sh (and for mmdebstrap's shellwords, which
// follows the same rules), except that a leading $1/ stays expandable.
func shellQuote(s string) string {
	if rest, ok := strings.CutPrefix(s, "$1/"); ok {
		return `"$1"/` + shellQuote(rest)
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// env is mmdebstrap's environment: the daemon's own minus anything that
// would steer apt or mmdebstrap unexpectedly, plus what hooks pass on.
func (d *debootstrap) env() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "TMPDIR", k == "APT_CONFIG", k == "SOURCE_DATE_EPOCH", strings.HasPrefix(k, "BANGER_"), strings.HasPrefix(k, "MMDEBSTRAP_"):
			continue
		}
		env = append(env, kv)
	}
	if path := os.Getenv("PATH"); !strings.Contains(path, "/usr/sbin") {
		// Debian puts chroot and other tools mmdebstrap runs in sbin,
		// which an ordinary user's PATH lacks. (exec keeps the last
		// of duplicate keys.)
		env = append(env, "PATH="+strings.TrimPrefix(path+":/usr/sbin:/sbin", ":"))
	}
	if d.tmpDir != "" {
		env = append(env, "TMPDIR="+d.tmpDir)
	}
	return append(env,
		"BANGER_IMAGE_NAME="+d.name,
		"BANGER_SUITE="+d.recipe.Suite,
		"BANGER_MIRROR="+d.recipe.Mirror,
		"BANGER_PACKAGES="+strings.Join(d.recipe.Packages, " "),
	)
}

// runResult is what a failed run left to explain itself.
type runError struct {
	exit   int
	script string   // the customize step that failed, if one did
	lines  []string // its output, or mmdebstrap's last lines
}

func (e *runError) Error() string {
	what := "mmdebstrap"
	if e.script != "" {
		what = e.script
	}
	msg := fmt.Sprintf("%s failed (exit status %d)", what, e.exit)
	if len(e.lines) > 0 {
		msg += ":\n" + strings.Join(e.lines, "\n")
	}
	return msg
}

// errorLines is how many output lines an error carries.
const errorLines = 25

// run runs mmdebstrap in its own process group and reports each output
// line to onLine. Canceling ctx kills the whole group (mmdebstrap ignores
// SIGTERM while it waits for its children, and everything it starts,
// chrooted maintainer scripts included, stays in the group), then waits
// until no process of the group is left.
func (d *debootstrap) run(ctx context.Context, scripts []hookScript, onLine func(string)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	cmd := exec.Command(d.bin, d.args(scripts)...)
	cmd.Dir = d.dir
	cmd.Env = d.env()
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If bangerd dies, mmdebstrap dies with it; what it had started
		// then fails on the staging directory the next start removes.
		Pdeathsig: syscall.SIGKILL,
	}
	tail := &tailLines{max: 400}
	both := &lineWriter{onLine: func(l string) { tail.add(l); onLine(l) }}
	cmd.Stdout = both
	cmd.Stderr = both
	// A descendant that escaped the kill could hold the output pipe open.
	cmd.WaitDelay = 10 * time.Second

	// Pdeathsig follows the thread that forks: keep the goroutine on it
	// until the child exists. Go never retires an unlocked thread, so the
	// thread outlives the child.
	runtime.LockOSThread()
	err := cmd.Start()
	runtime.UnlockOSThread()
	if err != nil {
		return fmt.Errorf("start mmdebstrap: %w", err)
	}
	pgid := cmd.Process.Pid

	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = unix.Kill(-pgid, unix.SIGKILL)
		err = <-done
	}
	both.flush()
	// Whatever ended the run, no process of it may outlive it: kill and
	// wait for stragglers of the group (maintainer scripts, apt).
	if gerr := killGroup(pgid, 30*time.Second); gerr != nil {
		return gerr
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err == nil {
		return nil
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return fmt.Errorf("run mmdebstrap: %w", err)
	}
	return explain(ee.ExitCode(), tail.lines())
}

// explain turns mmdebstrap's output into a runError: the output of the
// customize step that failed, if a marker says one did, else the last
// lines.
func explain(exit int, lines []string) *runError {
	for i := len(lines) - 1; i >= 0; i-- {
		failed, ok := strings.CutPrefix(lines[i], markerFail)
		if !ok {
			continue
		}
		step := strings.TrimSuffix(failed, " with exit status "+lastField(failed))
		if code, err := strconv.Atoi(lastField(failed)); err == nil {
			exit = code
		}
		start := 0
		for j := i - 1; j >= 0; j-- {
			if lines[j] == markerStart+step {
				start = j + 1
				break
			}
		}
		out := lines[start:i]
		if len(out) > errorLines {
			out = out[len(out)-errorLines:]
		}
		return &runError{exit: exit, script: step, lines: out}
	}
	if len(lines) > errorLines {
		lines = lines[len(lines)-errorLines:]
	}
	return &runError{exit: exit, lines: lines}
}

func lastField(s string) string {
	f := strings.Fields(s)
	if len(f) == 0 {
		return ""
	}
	return f[len(f)-1]
}

// killGroup SIGKILLs process group pgid until it is gone, or gives up
// after timeout (a process stuck in uninterruptible I/O).
func killGroup(pgid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Kill(-pgid, unix.SIGKILL)
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("kill mmdebstrap process group %d: %w", pgid, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kill mmdebstrap process group %d: processes still alive after %s", pgid, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lineWriter splits what is written to it into lines for onLine. It is
// safe for concurrent writers (stdout and stderr share it).
type lineWriter struct {
	mu     sync.Mutex
	buf    []byte
	onLine func(string)
}

// maxLine bounds a line; longer ones are cut.
const maxLine = 4096

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexAny(w.buf, "\r\n")
		if i < 0 {
			if len(w.buf) > maxLine {
				w.emitLocked(w.buf[:maxLine])
				w.buf = w.buf[maxLine:]
			}
			return len(p), nil
		}
		w.emitLocked(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
}

func (w *lineWriter) emitLocked(b []byte) {
	s := strings.TrimRight(string(bytes.ToValidUTF8(b, []byte("?"))), " \t")
	if s != "" {
		w.onLine(s)
	}
}

func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.emitLocked(w.buf)
		w.buf = nil
	}
}

var _ io.Writer = (*lineWriter)(nil)

// tailLines keeps the last max lines.
type tailLines struct {
	mu  sync.Mutex
	max int
	buf []string
}

func (t *tailLines) add(l string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, l)
	if len(t.buf) > 2*t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
}

func (t *tailLines) lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.buf) > t.max {
		return append([]string(nil), t.buf[len(t.buf)-t.max:]...)
	}
	return append([]string(nil), t.buf...)
}

// phaseOf maps an mmdebstrap line to its phase number (1-based), or 0.
func phaseOf(line string) int {
	for i, p := range mmdebstrapPhases {
		if strings.HasPrefix(line, p) {
			return i + 1
		}
	}
	return 0
}

// writeHookScripts writes the base script and the user's scripts into
// dir/hooks for the upload hooks.
func writeHookScripts(dir string, scripts []api.Script) ([]hookScript, error) {
	hooks := filepath.Join(dir, "hooks")
	if err := os.Mkdir(hooks, 0o700); err != nil {
		return nil, fmt.Errorf("write customize scripts: %w", err)
	}
	if err := os.WriteFile(filepath.Join(hooks, "base.sh"), []byte(baseScript), 0o600); err != nil {
		return nil, fmt.Errorf("write customize scripts: %w", err)
	}
	var out []hookScript
	for i, s := range scripts {
		h := hookScript{file: fmt.Sprintf("%02d.script", i+1), display: s.Name, shebang: strings.HasPrefix(s.Content, "#!")}
		if err := os.WriteFile(filepath.Join(hooks, h.file), []byte(s.Content), 0o600); err != nil {
			return nil, fmt.Errorf("write customize script %q: %w", s.Name, err)
		}
		out = append(out, h)
	}
	return out, nil
}
