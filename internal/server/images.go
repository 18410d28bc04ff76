package server

import (
	"context"
	"net/http"

	"github.com/bangerhq/banger/internal/api"
)

func (s *Server) buildImage(w http.ResponseWriter, r *http.Request) error {
	var req api.ImageBuildRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.stream(w, r, "image", req.Name, func(ctx context.Context, p Progress) (any, error) {
		return s.Images.Build(ctx, req, p)
	})
}

func (s *Server) importImage(w http.ResponseWriter, r *http.Request) error {
	var req api.ImageImportRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.stream(w, r, "image", req.Name, func(ctx context.Context, p Progress) (any, error) {
		return s.Images.Import(ctx, req, p)
	})
}

func (s *Server) getImage(w http.ResponseWriter, r *http.Request) error {
	im, err := s.Images.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, im)
	return nil
}

func (s *Server) deleteImage(w http.ResponseWriter, r *http.Request) error {
	if err := s.Images.Delete(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
