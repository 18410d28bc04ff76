package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/version"
)

func (a *app) newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Show banger's build and the running daemon's",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.version(cmd.Context())
		},
	}
}

// version prints this build and, when one answers, the daemon's. It never
// starts a daemon.
func (a *app) version(ctx context.Context) error {
	v := version.Get()
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 1, ' ', 0)
	_, _ = fmt.Fprintf(tw, "version:\t%s\n", v.Version)
	_, _ = fmt.Fprintf(tw, "commit:\t%s\n", v.Commit)
	_, _ = fmt.Fprintf(tw, "built_at:\t%s\n", v.BuiltAt)
	_, _ = fmt.Fprintf(tw, "go:\t%s\n", v.GoVersion)
	_, _ = fmt.Fprintf(tw, "platform:\t%s\n", v.Platform)
	daemon := "not running"
	if l, err := a.layout(); err == nil {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if dv, err := client.New(l.DaemonSocket()).Version(ctx); err == nil {
			daemon = fmt.Sprintf("bangerd %s (commit %s, built %s), pid %d, %s mode", dv.Version, short(dv.Commit), dv.BuiltAt, dv.PID, dv.Mode)
		} else if !isNoDaemon(err) {
			daemon = "not answering: " + err.Error()
		}
	}
	_, _ = fmt.Fprintf(tw, "daemon:\t%s\n", daemon)
	return tw.Flush()
}

func short(sha string) string {
	if len(sha) > 8 {
		return sha[:8]
	}
	return sha
}
