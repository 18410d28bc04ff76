package cli

import "github.com/spf13/cobra"

func (a *app) newImageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "image",
		Aliases: []string{"images"},
		Short:   "Build, import and manage images",
	}
	cmd.AddCommand(
		a.newImageBuildCmd(),
		a.newImageImportCmd(),
		a.newImageListCmd(),
		a.newImageShowCmd(),
		a.newImageDeleteCmd(),
	)
	return cmd
}
