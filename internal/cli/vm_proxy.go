package cli

import (
	"context"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
)

func (a *app) newVMProxyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "proxy NAME",
		Short: "Connect standard input and output to a VM's SSH port (for ProxyCommand)",
		Long: `Connect standard input and output to the SSH server of the VM named NAME (or
NAME.banger), wherever it listens now. It is the ProxyCommand of the entries
"banger vm ssh-config" prints; ssh itself checks the host key at the other end.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.vmProxy(cmd.Context(), strings.TrimSuffix(args[0], "."+guest.DefaultDomain))
		},
	}
}

func (a *app) vmProxy(ctx context.Context, name string) error {
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	info, err := c.VMSSH(ctx, name)
	if err != nil {
		return err
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	conn, err := d.DialContext(dctx, "tcp", net.JoinHostPort(info.Host, strconv.Itoa(info.Port)))
	cancel()
	if err != nil {
		return api.Errorf(api.CodeUnavailable, "connect to %s's SSH at %s:%d: %v", name, info.Host, info.Port, err)
	}
	defer func() { _ = conn.Close() }()
	go func() {
		_, _ = io.Copy(conn, a.stdin)
		// ssh closed its end: let the server see EOF, keep reading.
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	_, err = io.Copy(a.stdout, conn)
	return err
}
