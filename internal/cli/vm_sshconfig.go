package cli

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/guest"
)

func (a *app) newVMSSHConfigCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ssh-config [NAME]",
		Short: "Print ssh_config entries so plain ssh, scp, rsync and editors reach VMs",
		Long: `Print ssh_config(5) entries that let the system's ssh and everything built on
it (scp, rsync, sftp, git, editors' remote plugins) reach VMs as NAME.banger,
with banger's key and banger's pinned host keys, strictly: an unknown or
changed host key is refused, nothing is learned on first use.

The entries reach a VM through "banger vm proxy", which connects to wherever
the VM's SSH is now. In user mode its forwarded port changes on every boot, so
the entries stay right across restarts without editing. Without NAME, one
entry covers every VM (Host *.banger); with NAME, the entry also answers to
the bare name.

  banger vm ssh-config >> ~/.ssh/config
  ssh dev.banger
  rsync -a ./src/ dev.banger:/srv/src/

Or save it apart and add "Include ~/.ssh/banger.conf" at the top of
~/.ssh/config.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := ""
			if len(args) == 1 {
				name = strings.TrimSuffix(args[0], "."+guest.DefaultDomain)
				c, err := a.connect(cmd.Context())
				if err != nil {
					return err
				}
				if _, err := c.GetVM(cmd.Context(), name); err != nil {
					return err
				}
			}
			return a.printSSHConfig(a.stdout, name)
		},
	}
}

func (a *app) printSSHConfig(w io.Writer, name string) error {
	l, err := a.layout()
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find the banger executable: %w", err)
	}
	proxy := []string{exe}
	if a.system {
		proxy = append(proxy, "--system")
	}
	proxy = append(proxy, "vm", "proxy")
	domain := "." + guest.DefaultDomain
	var b strings.Builder
	b.WriteString("# Written by banger vm ssh-config: VMs as NAME" + domain + ", with banger's key and\n")
	b.WriteString("# its pinned host keys, refusing any other.\n")
	if name == "" {
		b.WriteString("Host *" + domain + "\n")
		// %n is the name as typed: dev.banger. known_hosts holds the
		// pins under exactly that name.
		fmt.Fprintf(&b, "  ProxyCommand %s %%n\n", guest.ShellQuote(proxy))
	} else {
		fmt.Fprintf(&b, "Host %s %s%s\n", name, name, domain)
		fmt.Fprintf(&b, "  HostName %s%s\n", name, domain)
		fmt.Fprintf(&b, "  HostKeyAlias %s%s\n", name, domain)
		fmt.Fprintf(&b, "  ProxyCommand %s\n", guest.ShellQuote(append(proxy, name)))
	}
	for _, kv := range [][2]string{
		{"User", "root"},
		{"IdentityFile", sshConfigQuote(l.SSHKey())},
		{"IdentitiesOnly", "yes"},
		{"UserKnownHostsFile", sshConfigQuote(l.KnownHosts())},
		{"GlobalKnownHostsFile", "/dev/null"},
		{"StrictHostKeyChecking", "yes"},
		{"UpdateHostKeys", "no"},
		{"CheckHostIP", "no"},
	} {
		fmt.Fprintf(&b, "  %s %s\n", kv[0], kv[1])
	}
	_, err = io.WriteString(w, b.String())
	return err
}

// sshConfigQuote double-quotes a path with spaces, as ssh_config reads it.
func sshConfigQuote(p string) string {
	if strings.ContainsAny(p, " \t\"") {
		return `"` + strings.ReplaceAll(p, `"`, `\"`) + `"`
	}
	return p
}
