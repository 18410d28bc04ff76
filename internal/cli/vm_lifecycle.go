package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
)

// eachVM runs fn for every named VM and joins the errors, so one failure
// does not hide the others.
func (a *app) eachVM(ctx context.Context, names []string, fn func(c *client.Client, name string) error) error {
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := fn(c, n); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

type vmStartFlags struct{ noWait bool }

func (a *app) newVMStartCmd() *cobra.Command {
	return a.newVMBootCmd("start NAME...", "Boot stopped VMs and wait for SSH", (*client.Client).StartVM)
}

func (a *app) newVMRestartCmd() *cobra.Command {
	return a.newVMBootCmd("restart NAME...", "Stop VMs gracefully and boot them again", (*client.Client).RestartVM)
}

// newVMBootCmd is start and restart: they differ only in the call.
func (a *app) newVMBootCmd(use, short string, boot func(*client.Client, context.Context, string, bool, func(api.Event)) (api.VM, error)) *cobra.Command {
	var f vmStartFlags
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			return a.eachVM(cmd.Context(), names, func(c *client.Client, n string) error {
				pv := newProgressView(a.stderr)
				v, err := boot(c, cmd.Context(), n, f.noWait, pv.event)
				pv.done()
				if err == nil {
					printVMReady(a, v, !f.noWait)
				}
				return err
			})
		},
	}
	cmd.Flags().BoolVar(&f.noWait, "no-wait", false, "return once the VMM runs, without waiting for SSH")
	return cmd
}

type vmStopFlags struct {
	force   bool
	timeout int
}

func (a *app) newVMStopCmd() *cobra.Command {
	var f vmStopFlags
	cmd := &cobra.Command{
		Use:   "stop NAME...",
		Short: "Power VMs off gracefully (kill after --timeout)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			return a.eachVM(cmd.Context(), names, func(c *client.Client, n string) error {
				v, err := c.StopVM(cmd.Context(), n, api.VMStopRequest{Force: f.force, TimeoutSeconds: f.timeout})
				if err == nil {
					_, _ = fmt.Fprintf(a.stdout, "%s: %s\n", v.Name, v.State)
				}
				return err
			})
		},
	}
	cmd.Flags().BoolVar(&f.force, "force", false, "kill the VMM instead of asking the guest to power off")
	cmd.Flags().IntVar(&f.timeout, "timeout", 0, "seconds to wait for the guest before killing it (default from config)")
	return cmd
}

func (a *app) newVMKillCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "kill NAME...",
		Short: "Kill VMs' VMMs at once",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			return a.eachVM(cmd.Context(), names, func(c *client.Client, n string) error {
				v, err := c.KillVM(cmd.Context(), n)
				if err == nil {
					_, _ = fmt.Fprintf(a.stdout, "%s: %s\n", v.Name, v.State)
				}
				return err
			})
		},
	}
}

type vmDeleteFlags struct{ force bool }

func (a *app) newVMDeleteCmd() *cobra.Command {
	var f vmDeleteFlags
	cmd := &cobra.Command{
		Use:     "delete NAME...",
		Aliases: []string{"rm"},
		Short:   "Delete VMs and their disks",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			return a.eachVM(cmd.Context(), names, func(c *client.Client, n string) error {
				err := c.DeleteVM(cmd.Context(), n, f.force)
				if err == nil {
					_, _ = fmt.Fprintf(a.stdout, "%s: deleted\n", n)
				}
				return err
			})
		},
	}
	cmd.Flags().BoolVar(&f.force, "force", false, "kill a running VM first")
	return cmd
}
