package cli

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/pkg/sftp"
	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/guest"
)

type vmCpFlags struct {
	recursive bool
	quiet     bool
}

func (a *app) newVMCpCmd() *cobra.Command {
	var f vmCpFlags
	cmd := &cobra.Command{
		Use:   "cp [-r] SRC DST",
		Short: "Copy files and directories between the host and a VM",
		Long: `Copy a file or directory between the host and a VM over SFTP. One side is
NAME:PATH, a path in the VM named NAME (relative paths and ~/ are in root's
home there); the other is a local path. As with cp, a destination that is an
existing directory receives the source by its name; otherwise the source is
copied as the destination. A local path with a colon in its first component
needs a ./ in front.

Modes are kept, mtimes to the second (SFTP's resolution); symlinks are copied
as symlinks. The copy runs as you, with banger's key and the VM's pinned host
key: a VM whose host key changed is refused. On a terminal, a progress bar
shows on standard error.

  banger vm cp ./build.tar dev:/tmp/
  banger vm cp -r dev:/var/log/app ./logs`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.vmCp(cmd.Context(), args[0], args[1], f)
		},
	}
	cmd.Flags().BoolVarP(&f.recursive, "recursive", "r", false, "copy directories")
	cmd.Flags().BoolVarP(&f.quiet, "quiet", "q", false, "no progress bar")
	return cmd
}

// remoteRe is NAME:PATH with NAME a VM name (the .banger suffix allowed).
var remoteRe = regexp.MustCompile(`^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.banger)?:(.*)$`)

// splitRemote tells NAME:PATH from a local path.
func splitRemote(arg string) (name, path string, remote bool) {
	m := remoteRe.FindStringSubmatch(arg)
	if m == nil {
		return "", arg, false
	}
	return m[1], m[4], true
}

func (a *app) vmCp(ctx context.Context, src, dst string, f vmCpFlags) error {
	srcVM, srcPath, srcRemote := splitRemote(src)
	dstVM, dstPath, dstRemote := splitRemote(dst)
	switch {
	case srcRemote && dstRemote:
		return api.Errorf(api.CodeInvalidArgument, "cp copies between the host and a VM, not between two VMs (%s, %s)", src, dst).
			WithHint("copy to the host first")
	case !srcRemote && !dstRemote:
		return api.Errorf(api.CodeInvalidArgument, "neither %s nor %s is in a VM", src, dst).WithHint("write the VM side as NAME:PATH")
	}
	if (!srcRemote && srcPath == "") || (!dstRemote && dstPath == "") {
		return api.Errorf(api.CodeInvalidArgument, "empty local path")
	}
	vm := srcVM
	if dstRemote {
		vm = dstVM
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	sc, closeConn, err := dialSFTP(ctx, c, vm)
	if err != nil {
		return err
	}
	defer closeConn()

	opts := guest.CopyOptions{Recursive: f.recursive}
	var pv *progressView
	if !f.quiet && isTerminal(a.stderr) {
		pv = newProgressView(a.stderr)
		var mu sync.Mutex
		var last time.Time
		opts.Progress = func(done, total int64) {
			mu.Lock()
			defer mu.Unlock()
			if now := time.Now(); now.Sub(last) >= 100*time.Millisecond || done == total {
				last = now
				pv.event(api.Event{Progress: &api.Progress{Step: "copy", Done: done, Total: total, Unit: "bytes"}})
			}
		}
	}
	// ^C ends the copy by closing the connection under it.
	stop := context.AfterFunc(ctx, closeConn)
	defer stop()
	if srcRemote {
		_, err = guest.Download(ctx, sc, vm, srcPath, dstPath, opts)
	} else {
		_, err = guest.Upload(ctx, sc, vm, srcPath, dstPath, opts)
	}
	if pv != nil {
		pv.done()
	}
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// dialSFTP connects to a VM as the CLI's user with banger's key, checking
// the VM's pinned host key, and starts SFTP. The returned func closes both.
func dialSFTP(ctx context.Context, c *client.Client, vm string) (*sftp.Client, func(), error) {
	info, err := c.VMSSH(ctx, vm)
	if err != nil {
		return nil, nil, err
	}
	signer, err := guest.LoadClientKey(info.IdentityFile)
	if err != nil {
		return nil, nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := guest.Dial(dctx, guest.Target{
		Addr:       net.JoinHostPort(info.Host, strconv.Itoa(info.Port)),
		Alias:      info.HostKeyAlias,
		User:       info.User,
		Signer:     signer,
		KnownHosts: info.KnownHostsFile,
	})
	if err != nil {
		return nil, nil, err
	}
	s, err := guest.NewSFTP(conn)
	if err != nil {
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%s: %w", vm, err)
	}
	var once sync.Once
	return s, func() {
		once.Do(func() {
			_ = s.Close()
			_ = conn.Close()
		})
	}, nil
}
