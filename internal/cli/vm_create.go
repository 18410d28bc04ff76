package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type vmCreateFlags struct {
	name    string
	image   string
	cpus    int
	memory  string
	disk    string
	vmm     string
	noStart bool
	noWait  bool
	json    bool
}

func (a *app) newVMCreateCmd() *cobra.Command {
	var f vmCreateFlags
	cmd := &cobra.Command{
		Use:   "create --name NAME",
		Short: "Create a VM and boot it",
		Long: `Create a VM from an image and boot it. banger returns once the guest answers
SSH with the host key banger generated and pinned for it: no trust on first use.
Without --image it uses the "default" image, building it on first use.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := api.VMCreateRequest{Name: f.name, Image: f.image, CPUs: f.cpus, VMM: f.vmm, NoStart: f.noStart, NoWait: f.noWait}
			if cmd.Flags().Changed("cpus") && f.cpus < 1 {
				return api.Errorf(api.CodeInvalidArgument, "--cpus %d: a VM needs at least 1 CPU", f.cpus)
			}
			var err error
			if req.MemoryBytes, err = optionalSize("--memory", f.memory); err != nil {
				return err
			}
			if req.DiskBytes, err = optionalSize("--disk", f.disk); err != nil {
				return err
			}
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			pv := newProgressView(a.stderr)
			v, err := c.CreateVM(cmd.Context(), req, pv.event)
			pv.done()
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, v)
			}
			printVMReady(a, v, !f.noStart && !f.noWait)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.name, "name", "", "VM name: a DNS label (lowercase letters, digits, '-')")
	fl.StringVar(&f.image, "image", "", "image to boot (default from config: \"default\")")
	fl.IntVar(&f.cpus, "cpus", 0, "virtual CPUs (default from config: 2)")
	fl.StringVar(&f.memory, "memory", "", "memory, e.g. 1GiB (default from config)")
	fl.StringVar(&f.disk, "disk", "", "root disk size, e.g. 8GiB (default from config)")
	fl.StringVar(&f.vmm, "vmm", "", "auto, qemu or firecracker (default from config: auto)")
	fl.BoolVar(&f.noStart, "no-start", false, "create the VM stopped")
	fl.BoolVar(&f.noWait, "no-wait", false, "return once the VMM runs, without waiting for SSH")
	fl.BoolVar(&f.json, "json", false, "print the VM as JSON")
	_ = cmd.MarkFlagRequired("name")
	return cmd
}

func optionalSize(flag, v string) (int64, error) {
	if v == "" {
		return 0, nil
	}
	n, err := api.ParseSize(v)
	if err != nil {
		return 0, api.Errorf(api.CodeInvalidArgument, "%s: %v", flag, err)
	}
	return n, nil
}

// printVMReady tells the user what they got and how to connect.
func printVMReady(a *app, v api.VM, ready bool) {
	state := string(v.State)
	if ready {
		state = "running, SSH ready"
	}
	_, _ = fmt.Fprintf(a.stdout, "VM %s is %s (%s, %d CPUs, %s memory, %s disk)\n", v.Name, state, v.VMM, v.CPUs,
		api.FormatSize(v.MemoryBytes), api.FormatSize(v.DiskBytes))
	if v.Network.IP != "" {
		_, _ = fmt.Fprintf(a.stdout, "  address: %s (%s.banger)\n", v.Network.IP, v.Name)
	}
	if v.Network.SSHPort != 0 {
		_, _ = fmt.Fprintf(a.stdout, "  ssh:     %s:%d\n", v.Network.SSHHost, v.Network.SSHPort)
	}
	if v.State == api.VMRunning {
		_, _ = fmt.Fprintf(a.stdout, "  connect: banger vm ssh %s\n", v.Name)
	} else {
		_, _ = fmt.Fprintf(a.stdout, "  start:   banger vm start %s\n", v.Name)
	}
}
