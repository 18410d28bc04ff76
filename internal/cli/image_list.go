package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerhq/banger/internal/api"
)

type imageListFlags struct{ json bool }

func (a *app) newImageListCmd() *cobra.Command {
	var f imageListFlags
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect(cmd.Context())
			if err != nil {
				return err
			}
			ims, err := c.ListImages(cmd.Context())
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(a.stdout, ims)
			}
			return renderImages(a, ims)
		},
	}
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON")
	return cmd
}

func renderImages(a *app, ims []api.Image) error {
	if len(ims) == 0 {
		_, _ = fmt.Fprintln(a.stderr, "no images yet (hint: banger image build default)")
		return nil
	}
	now := time.Now()
	t := newTable(a.stdout, "NAME", "SOURCE", "SIZE", "AGE")
	for _, im := range ims {
		t.row(im.Name, im.Source, api.FormatSize(im.SizeBytes), age(im.CreatedAt, now))
	}
	return t.flush()
}
