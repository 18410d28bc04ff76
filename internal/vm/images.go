package vm

import (
	"context"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/image"
)

// ImageStore adapts the image service to what the VM service needs.
func ImageStore(s *image.Service) Images { return imageStore{s} }

type imageStore struct{ s *image.Service }

func (a imageStore) Ensure(ctx context.Context, name string, progress func(api.Event)) (api.Image, error) {
	return a.s.Ensure(ctx, name, progress)
}

func (a imageStore) BootFiles(ctx context.Context, name string) (BootFiles, error) {
	f, err := a.s.Files(ctx, name)
	if err != nil {
		return BootFiles{}, err
	}
	return BootFiles{Kernel: f.Kernel, Vmlinux: f.Vmlinux, Initrd: f.Initrd, Rootfs: f.Rootfs}, nil
}
