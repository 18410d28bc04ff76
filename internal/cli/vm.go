package cli

import "github.com/spf13/cobra"

func (a *app) newVMCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "vm",
		Aliases: []string{"vms"},
		Short:   "Create, run and manage VMs",
	}
	cmd.AddCommand(a.newVMListCmd())
	return cmd
}
