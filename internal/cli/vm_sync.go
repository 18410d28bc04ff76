package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
)

type vmSyncFlags struct {
	watch bool
	full  bool
	json  bool
}

func (a *app) newVMSyncCmd() *cobra.Command {
	var f vmSyncFlags
	cmd := &cobra.Command{
		Use:   "sync NAME [--watch]",
		Short: "Copy the [[file_sync]] files from config.toml into a VM",
		Long: `Apply the [[file_sync]] entries of config.toml to a running VM:

  [[file_sync]]
  host  = "~/.gitconfig"
  guest = "/root/.gitconfig"

  [[file_sync]]
  host  = "~/src/app"        # a directory: its .gitignore files are honoured
  guest = "/root/app"

The daemon also applies them when it creates a VM. Only files that changed
since the last sync move; files banger sent whose host file is gone (or is now
ignored) are deleted in the VM, and files banger did not write are never
touched. Host paths must stay inside the owner's home directory, symlinks
included, or the sync is refused.

--watch keeps going: it watches the host paths (inotify, recursively) and
syncs what changed a moment after changes settle, until interrupted.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.vmSync(cmd.Context(), args[0], f)
		},
	}
	cmd.Flags().BoolVarP(&f.watch, "watch", "w", false, "keep syncing changes until interrupted")
	cmd.Flags().BoolVar(&f.full, "full", false, "send every file again, whatever earlier syncs recorded")
	cmd.Flags().BoolVar(&f.json, "json", false, "print the report as JSON")
	return cmd
}

func (a *app) vmSync(ctx context.Context, name string, f vmSyncFlags) error {
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	rep, err := a.syncOnce(ctx, c, name, api.SyncRequest{Full: f.full}, !f.json)
	if err != nil {
		return err
	}
	if len(rep.Entries) == 0 {
		l, _ := a.layout()
		return api.Errorf(api.CodeFailedPrecondition, "no [[file_sync]] entries in %s", l.ConfigFile()).
			WithHint(`add entries like: [[file_sync]] host = "~/.gitconfig" guest = "/root/.gitconfig"`)
	}
	if f.json {
		if err := printJSON(a.stdout, rep); err != nil {
			return err
		}
	} else {
		a.printSyncReport(rep, false)
	}
	if !f.watch {
		return nil
	}
	return a.watchSync(ctx, c, name, rep, f.json)
}

func (a *app) syncOnce(ctx context.Context, c *client.Client, name string, req api.SyncRequest, progress bool) (api.SyncReport, error) {
	var pv *progressView
	var onEvent func(api.Event)
	if progress && isTerminal(a.stderr) {
		pv = newProgressView(a.stderr)
		onEvent = pv.event
	}
	rep, err := c.SyncVM(ctx, name, req, onEvent)
	if pv != nil {
		pv.done()
	}
	return rep, err
}

// printSyncReport writes one line for the sync, and one per entry whose
// host path is missing. quietIfIdle skips syncs that moved nothing (the
// watch loop's).
func (a *app) printSyncReport(rep api.SyncReport, quietIfIdle bool) {
	if quietIfIdle && rep.Uploaded == 0 && rep.Deleted == 0 {
		return
	}
	stamp := ""
	if quietIfIdle {
		stamp = time.Now().Format("15:04:05") + " "
	}
	_, _ = fmt.Fprintf(a.stdout, "%ssynced: %d sent (%s), %d deleted, %d unchanged\n", stamp, rep.Uploaded, api.FormatSize(rep.Bytes), rep.Deleted, rep.Unchanged)
	if quietIfIdle {
		return
	}
	for _, e := range rep.Entries {
		if e.Missing {
			_, _ = fmt.Fprintf(a.stdout, "  %s does not exist (nothing sent to %s)\n", e.Host, e.Guest)
		}
	}
}

// watchSync syncs on every batch of changes until ctx ends. A failed sync
// is reported and the watch goes on (the next change retries), except when
// the VM is gone or stopped.
func (a *app) watchSync(ctx context.Context, c *client.Client, name string, first api.SyncReport, asJSON bool) error {
	roots := make([]string, 0, len(first.Entries))
	for _, e := range first.Entries {
		roots = append(roots, e.Host)
	}
	w, err := newWatcher(roots)
	if err != nil {
		return err
	}
	defer func() { _ = w.Close() }()
	_, _ = fmt.Fprintf(a.stderr, "watching %d path(s) for changes; ^C stops\n", len(roots))
	batches := make(chan []string)
	werr := make(chan error, 1)
	go func() { werr <- w.run(ctx, 300*time.Millisecond, 2*time.Second, batches) }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-werr:
			return err
		case paths := <-batches:
			rep, err := a.syncOnce(ctx, c, name, api.SyncRequest{Paths: paths}, false)
			var ae *api.Error
			switch {
			case ctx.Err() != nil:
				return nil
			case errors.As(err, &ae) && (ae.Code == api.CodeNotFound || ae.Code == api.CodeConflict):
				return err
			case err != nil:
				_, _ = fmt.Fprintf(a.stderr, "%s sync failed: %v\n", time.Now().Format("15:04:05"), err)
			case asJSON:
				_ = printJSON(a.stdout, rep)
			default:
				a.printSyncReport(rep, true)
			}
		}
	}
}
