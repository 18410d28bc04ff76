package cli

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type vmListFlags struct{ json bool }

func (a *app) newVMListCmd() *cobra.Command {
	var f vmListFlags
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List VMs",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			vms, err := c.ListVMs(cmd.Context())
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, vms)
			}
			return renderVMs(a, vms)
		},
	}
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON")
	return cmd
}

func renderVMs(a *app, vms []api.VM) error {
	if len(vms) == 0 {
		_, _ = fmt.Fprintln(a.stderr, "no VMs yet (hint: banger vm create --name dev)")
		return nil
	}
	now := time.Now()
	t := newTable(a.stdout, "NAME", "STATE", "IMAGE", "VMM", "CPUS", "MEMORY", "DISK", "NET", "ADDRESS", "AGE")
	for _, v := range vms {
		// A bridge VM is reached at its own address; a user-mode one
		// through its forwarded SSH port while it runs.
		addr := v.Network.IP
		if addr == "" && v.Network.SSHPort != 0 {
			addr = fmt.Sprintf("%s:%d", v.Network.SSHHost, v.Network.SSHPort)
		}
		state := string(v.State)
		if v.State == api.VMError && v.StateReason != "" {
			state += " (" + v.StateReason + ")"
		}
		t.row(v.Name, state, v.Image, v.VMM, strconv.Itoa(v.CPUs), api.FormatSize(v.MemoryBytes),
			api.FormatSize(v.DiskBytes), orDash(v.Network.Mode), orDash(addr), age(v.CreatedAt, now))
	}
	return t.flush()
}
