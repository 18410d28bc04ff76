package cli

import (
	"io"

	"github.com/spf13/cobra"
)

type vmLogsFlags struct {
	follow bool
	tail   string
}

func (a *app) newVMLogsCmd() *cobra.Command {
	var f vmLogsFlags
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a VM's serial console (-f to follow)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tail, err := optionalSize("--tail", f.tail)
			if err != nil {
				return err
			}
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			rc, err := c.Console(cmd.Context(), args[0], tail, f.follow)
			if err != nil {
				return err
			}
			defer rc.Close()
			_, err = io.Copy(a.stdout, rc)
			if cmd.Context().Err() != nil {
				return nil // Ctrl-C ends a follow
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&f.follow, "follow", "f", false, "keep printing what the console writes")
	cmd.Flags().StringVar(&f.tail, "tail", "", "print only the last SIZE of the log, e.g. 16K")
	return cmd
}
