package cli

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

func (a *app) newVMSSHCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ssh NAME [-- COMMAND...]",
		Short: "Open a shell (or run a command) in a VM with the system ssh",
		Long: `Open an interactive shell in a VM, or run a command, through the system ssh
client with banger's key, banger's known_hosts and strict host key checking.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			info, err := c.VMSSH(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			ssh, err := exec.LookPath("ssh")
			if err != nil {
				return fmt.Errorf("ssh not found (hint: apt install openssh-client)")
			}
			argv := append([]string{"ssh"}, sshArgs(info)...)
			argv = append(argv, info.User+"@"+info.Host)
			if len(args) > 1 {
				argv = append(argv, "--")
				argv = append(argv, args[1:]...)
			}
			// Replace this process: the terminal, signals and the exit
			// code belong to ssh.
			return syscall.Exec(ssh, argv, os.Environ())
		},
	}
	return cmd
}

// sshArgs are the options that make the system ssh use banger's identity
// and pinned host keys, and nothing of the user's own known_hosts.
func sshArgs(info api.SSHInfo) []string {
	return []string{
		"-i", info.IdentityFile,
		"-p", strconv.Itoa(info.Port),
		"-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + info.KnownHostsFile,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "HostKeyAlias=" + info.HostKeyAlias,
		"-o", "UpdateHostKeys=no",
		"-o", "LogLevel=ERROR",
	}
}
