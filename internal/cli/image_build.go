package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type imageBuildFlags struct {
	suite     string
	mirror    string
	packages  []string
	customize []string
	size      string
	json      bool
}

func (a *app) newImageBuildCmd() *cobra.Command {
	var f imageBuildFlags
	cmd := &cobra.Command{
		Use:   "build NAME",
		Short: "Build a Debian image with mmdebstrap (no Docker, no mounts)",
		Long: `Build a bootable Debian image: a root filesystem from mmdebstrap with the
Debian cloud kernel, systemd and OpenSSH, made into ext4 without mounting
anything. --customize scripts run inside the new root filesystem, in order.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.ImageBuildRequest{Name: args[0], Suite: f.suite, Mirror: f.mirror, Packages: f.packages}
			var err error
			if req.SizeBytes, err = optionalSize("--size", f.size); err != nil {
				return err
			}
			for _, path := range f.customize {
				b, err := os.ReadFile(path)
				if err != nil {
					return fmt.Errorf("--customize: %w", err)
				}
				req.Customize = append(req.Customize, api.Script{Name: filepath.Base(path), Content: string(b)})
			}
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			pv := newProgressView(a.stderr)
			im, err := c.BuildImage(cmd.Context(), req, pv.event)
			pv.done()
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, im)
			}
			_, _ = fmt.Fprintf(a.stdout, "image %s built (%s)\n", im.Name, api.FormatSize(im.SizeBytes))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.suite, "suite", "", "Debian suite (default from config: bookworm)")
	fl.StringVar(&f.mirror, "mirror", "", "Debian mirror URL (default from config)")
	fl.StringArrayVar(&f.packages, "package", nil, "extra package to install (repeatable)")
	fl.StringArrayVar(&f.customize, "customize", nil, "shell script to run inside the new rootfs (repeatable, in order)")
	fl.StringVar(&f.size, "size", "", "rootfs size, e.g. 4GiB (default: content plus headroom)")
	fl.BoolVar(&f.json, "json", false, "print the image as JSON")
	return cmd
}

type imageImportFlags struct {
	rootfs, kernel, initrd string
	json                   bool
}

func (a *app) newImageImportCmd() *cobra.Command {
	var f imageImportFlags
	cmd := &cobra.Command{
		Use:   "import NAME --rootfs ROOTFS.ext4 --kernel KERNEL [--initrd INITRD]",
		Short: "Import an image from an ext4 rootfs and a kernel",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			abs := func(p string) (string, error) {
				if p == "" {
					return "", nil
				}
				return filepath.Abs(p)
			}
			req := api.ImageImportRequest{Name: args[0]}
			var err error
			if req.Rootfs, err = abs(f.rootfs); err != nil {
				return err
			}
			if req.Kernel, err = abs(f.kernel); err != nil {
				return err
			}
			if req.Initrd, err = abs(f.initrd); err != nil {
				return err
			}
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			pv := newProgressView(a.stderr)
			im, err := c.ImportImage(cmd.Context(), req, pv.event)
			pv.done()
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, im)
			}
			_, _ = fmt.Fprintf(a.stdout, "image %s imported (%s)\n", im.Name, api.FormatSize(im.SizeBytes))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.rootfs, "rootfs", "", "ext4 root filesystem image")
	fl.StringVar(&f.kernel, "kernel", "", "kernel: bzImage or ELF vmlinux")
	fl.StringVar(&f.initrd, "initrd", "", "initrd (optional)")
	fl.BoolVar(&f.json, "json", false, "print the image as JSON")
	_ = cmd.MarkFlagRequired("rootfs")
	_ = cmd.MarkFlagRequired("kernel")
	return cmd
}

type imageShowFlags struct{ json bool }

func (a *app) newImageShowCmd() *cobra.Command {
	var f imageShowFlags
	cmd := &cobra.Command{
		Use:   "show NAME",
		Short: "Show one image and its files",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			im, err := c.GetImage(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, im)
			}
			_, _ = fmt.Fprintf(a.stdout, "name:    %s\nid:      %s\nsource:  %s\nsize:    %s\ncreated: %s\n", im.Name, im.ID, im.Source,
				api.FormatSize(im.SizeBytes), im.CreatedAt.Local().Format("2006-01-02 15:04:05"))
			if im.Recipe != nil {
				_, _ = fmt.Fprintf(a.stdout, "recipe:  %s from %s, %d packages, hash %s\n", im.Recipe.Suite, im.Recipe.Mirror, len(im.Recipe.Packages), short(im.Recipe.RecipeHash))
			}
			t := newTable(a.stdout, "ROLE", "FILE", "SIZE", "SHA256")
			for _, file := range im.Files {
				t.row(file.Role, file.Path, api.FormatSize(file.Size), file.SHA256)
			}
			return t.flush()
		},
	}
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON")
	return cmd
}

func (a *app) newImageDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "delete NAME...",
		Aliases: []string{"rm"},
		Short:   "Delete images no VM uses",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			var errs []error
			for _, n := range names {
				if err := c.DeleteImage(cmd.Context(), n); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", n, err))
					continue
				}
				_, _ = fmt.Fprintf(a.stdout, "%s: deleted\n", n)
			}
			return errors.Join(errs...)
		},
	}
}
