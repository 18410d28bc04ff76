package ext4

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// toolDirs are searched after PATH: e2fsprogs installs into /sbin and
// /usr/sbin, which an ordinary user's PATH (bangerd runs as one) lacks on
// Debian.
var toolDirs = []string{"/usr/sbin", "/sbin"}

// tool finds an e2fsprogs binary.
func tool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range toolDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("find %s: not on PATH nor in %v (hint: apt-get install e2fsprogs)", name, toolDirs)
}

// result is a finished tool run. Out interleaves stdout and stderr in the
// order the tool wrote them, which is what debugfs transcripts rely on.
type result struct {
	Out  []byte
	Exit int
}

// run runs an e2fsprogs tool in dir (if not empty) and waits for it. A
// non-zero exit is not an error here: callers interpret exit codes, which
// mean different things per tool. The C locale keeps the messages we match
// untranslated.
func run(ctx context.Context, dir, name string, args ...string) (result, error) {
	path, err := tool(name)
	if err != nil {
		return result{}, err
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBUGFS_PAGER=__none__", "PAGER=__none__")
	var out bytes.Buffer
	// One writer for both: exec then passes the same pipe as fd 1 and 2,
	// so the kernel keeps the tool's write order.
	cmd.Stdout = &out
	cmd.Stderr = &out
	err = cmd.Run()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return result{Out: out.Bytes()}, nil
	case ctx.Err() != nil:
		return result{}, fmt.Errorf("run %s: %w", name, ctx.Err())
	case errors.As(err, &exitErr) && exitErr.Exited():
		return result{Out: out.Bytes(), Exit: exitErr.ExitCode()}, nil
	default:
		return result{}, fmt.Errorf("run %s: %w: %s", name, err, bytes.TrimSpace(out.Bytes()))
	}
}
