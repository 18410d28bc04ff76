package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type vmPortFlags struct {
	remove bool
	json   bool
}

func (a *app) newVMPortCmd() *cobra.Command {
	var f vmPortFlags
	cmd := &cobra.Command{
		Use:   "port NAME [HOST:GUEST[/udp]...]",
		Short: "List, add or remove a VM's port forwards (127.0.0.1:HOST to the guest's GUEST)",
		Long: `Without a forward, list the VM's port forwards. With HOST:GUEST, forward
127.0.0.1:HOST on this machine to port GUEST of the VM (TCP, or UDP with
"/udp"). With --remove, remove the forwards of the given host ports (HOST or
HOST/udp is enough). Forwards last as long as the VM, across restarts.`,
		Example: `  banger vm port dev 8080:80
  banger vm port dev 5353:53/udp
  banger vm port dev
  banger vm port dev --remove 8080`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, specs := args[0], args[1:]
			if f.remove && len(specs) == 0 {
				return errors.New("--remove needs the forwards to remove (hint: banger vm port " + name + " --remove 8080)")
			}
			// Every spec is checked before anything changes.
			reqs := make([]api.PortForwardRequest, 0, len(specs))
			for _, s := range specs {
				req, err := api.ParsePortSpec(s, f.remove)
				if err != nil {
					return err
				}
				reqs = append(reqs, req)
			}
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			if len(reqs) == 0 {
				fs, err := c.Ports(cmd.Context(), name)
				if err != nil {
					return err
				}
				if f.json {
					return printJSON(a.stdout, fs)
				}
				return renderPorts(a.stdout, a.stderr, name, fs)
			}
			var errs []error
			for i, req := range reqs {
				if f.remove {
					err = c.RemovePort(cmd.Context(), name, req)
					if err == nil {
						_, _ = fmt.Fprintf(a.stdout, "%s: removed %s\n", name, specs[i])
					}
				} else {
					var fw api.PortForward
					if fw, err = c.AddPort(cmd.Context(), name, req); err == nil {
						_, _ = fmt.Fprintf(a.stdout, "%s: %s:%d -> guest port %d/%s%s\n", name, fw.HostIP, fw.HostPort, fw.GuestPort, fw.Proto, activeNote(fw))
					}
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", specs[i], err))
				}
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().BoolVar(&f.remove, "remove", false, "remove the given forwards")
	cmd.Flags().BoolVar(&f.json, "json", false, "print the list as JSON")
	return cmd
}

func activeNote(f api.PortForward) string {
	if f.Active {
		return ""
	}
	return " (served once the VM runs)"
}

func renderPorts(stdout, stderr io.Writer, name string, fs []api.PortForward) error {
	if len(fs) == 0 {
		_, _ = fmt.Fprintf(stderr, "no port forwards (hint: banger vm port %s 8080:80)\n", name)
		return nil
	}
	t := newTable(stdout, "HOST", "GUEST", "PROTO", "ACTIVE")
	for _, f := range fs {
		active := "yes"
		if !f.Active {
			active = "no"
		}
		t.row(fmt.Sprintf("%s:%d", f.HostIP, f.HostPort), fmt.Sprint(f.GuestPort), f.Proto, active)
	}
	return t.flush()
}
