package server

import (
	"context"
	"net/http"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/guest"
)

// GuestService is what the handlers need to work inside VMs.
type GuestService interface {
	// Exec starts a command; errors before it runs (no such VM, not
	// running, host key mismatch) come back here, as API errors.
	Exec(ctx context.Context, name string, req api.ExecRequest) (*guest.ExecSession, error)
	Sync(ctx context.Context, name string, req api.SyncRequest, progress Progress) (api.SyncReport, error)
}

func (s *Server) guest() (GuestService, error) {
	if s.Guest == nil {
		return nil, api.Errorf(api.CodeUnavailable, "this daemon does not run commands in VMs")
	}
	return s.Guest, nil
}

// syncVM applies the file_sync entries to a VM, streaming progress.
func (s *Server) syncVM(w http.ResponseWriter, r *http.Request) error {
	g, err := s.guest()
	if err != nil {
		return err
	}
	var req api.SyncRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	name := r.PathValue("name")
	return s.stream(w, r, "vm", name, func(ctx context.Context, p Progress) (any, error) {
		return g.Sync(ctx, name, req, p)
	})
}
