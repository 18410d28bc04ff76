package image

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
)

// Service is the image store: build, import, list, delete.
type Service struct {
	Store *store.Store
	Log   *slog.Logger
}

// Metadata is the JSON kept with every image (images.metadata and
// metadata.json in the image's directory).
type Metadata struct {
	Files  []api.ImageFile `json:"files"`
	Recipe *api.Recipe     `json:"recipe,omitempty"`
}

// List returns every image.
func (s *Service) List(ctx context.Context) ([]api.Image, error) {
	rows, err := s.Store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(rows))
	for _, r := range rows {
		im, err := toAPI(r)
		if err != nil {
			return nil, err
		}
		out = append(out, im)
	}
	return out, nil
}

func toAPI(r store.Image) (api.Image, error) {
	var md Metadata
	if err := json.Unmarshal(r.Metadata, &md); err != nil {
		return api.Image{}, fmt.Errorf("image %s: decode metadata: %w", r.Name, err)
	}
	return api.Image{
		ID: r.ID, Name: r.Name, Source: r.Source, CreatedAt: r.CreatedAt,
		SizeBytes: r.SizeBytes, Files: md.Files, Recipe: md.Recipe,
	}, nil
}
