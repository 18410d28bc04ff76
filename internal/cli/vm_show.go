package cli

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type vmShowFlags struct{ json bool }

func (a *app) newVMShowCmd() *cobra.Command {
	var f vmShowFlags
	cmd := &cobra.Command{
		Use:   "show NAME",
		Short: "Show one VM",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			v, err := c.GetVM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, v)
			}
			return renderVM(a.stdout, v)
		},
	}
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON")
	return cmd
}

func renderVM(w io.Writer, v api.VM) error {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	_, _ = fmt.Fprintf(tw, "name:\t%s\n", v.Name)
	_, _ = fmt.Fprintf(tw, "id:\t%s\n", v.ID)
	state := string(v.State)
	if v.StateReason != "" {
		state += " (" + v.StateReason + ")"
	}
	_, _ = fmt.Fprintf(tw, "state:\t%s\n", state)
	_, _ = fmt.Fprintf(tw, "image:\t%s\n", v.Image)
	_, _ = fmt.Fprintf(tw, "vmm:\t%s\n", v.VMM)
	_, _ = fmt.Fprintf(tw, "cpus:\t%d\n", v.CPUs)
	_, _ = fmt.Fprintf(tw, "memory:\t%s\n", api.FormatSize(v.MemoryBytes))
	_, _ = fmt.Fprintf(tw, "disk:\t%s\n", api.FormatSize(v.DiskBytes))
	_, _ = fmt.Fprintf(tw, "network:\t%s\n", orDash(v.Network.Mode))
	if v.Network.IP != "" {
		_, _ = fmt.Fprintf(tw, "address:\t%s\n", v.Network.IP)
	}
	if v.Network.SSHPort != 0 {
		_, _ = fmt.Fprintf(tw, "ssh:\t%s:%d\n", v.Network.SSHHost, v.Network.SSHPort)
	}
	_, _ = fmt.Fprintf(tw, "created:\t%s\n", v.CreatedAt.Local().Format("2006-01-02 15:04:05"))
	return tw.Flush()
}
