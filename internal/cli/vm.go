package cli

import "github.com/spf13/cobra"

func (a *app) newVMCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "vm",
		Aliases: []string{"vms"},
		Short:   "Create, run and manage VMs",
	}
	cmd.AddCommand(
		a.newVMCreateCmd(),
		a.newVMListCmd(),
		a.newVMShowCmd(),
		a.newVMStartCmd(),
		a.newVMStopCmd(),
		a.newVMRestartCmd(),
		a.newVMKillCmd(),
		a.newVMDeleteCmd(),
		a.newVMLogsCmd(),
		a.newVMSSHCmd(),
		a.newVMPortCmd(),
		a.newVMExecCmd(),
		a.newVMCpCmd(),
		a.newVMSyncCmd(),
		a.newVMSSHConfigCmd(),
		a.newVMProxyCmd(),
	)
	return cmd
}
