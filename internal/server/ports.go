package server

import (
	"context"
	"net/http"
	"strconv"

	"github.com/bangerhq/banger/internal/api"
)

// PortService is what the handlers need to manage port forwards.
type PortService interface {
	Ports(ctx context.Context, name string) ([]api.PortForward, error)
	AddPort(ctx context.Context, name string, req api.PortForwardRequest) (api.PortForward, error)
	// RemovePort removes the forward of req's protocol and host port; a
	// non-zero GuestPort must match the recorded one.
	RemovePort(ctx context.Context, name string, req api.PortForwardRequest) error
}

func (s *Server) ports() (PortService, error) {
	if s.Ports == nil {
		return nil, api.Errorf(api.CodeUnavailable, "this daemon does not manage port forwards")
	}
	return s.Ports, nil
}

// listPorts answers GET /v1/vms/{name}/ports.
func (s *Server) listPorts(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.ports()
	if err != nil {
		return err
	}
	fs, err := ps.Ports(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	if fs == nil {
		fs = []api.PortForward{}
	}
	writeJSON(w, http.StatusOK, fs)
	return nil
}

// addPort answers POST /v1/vms/{name}/ports with the forward made.
func (s *Server) addPort(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.ports()
	if err != nil {
		return err
	}
	var req api.PortForwardRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if err := req.Validate(); err != nil {
		return err
	}
	f, err := ps.AddPort(r.Context(), r.PathValue("name"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, f)
	return nil
}

// removePort answers DELETE /v1/vms/{name}/ports/{proto}/{port}[?guest_port=N].
func (s *Server) removePort(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.ports()
	if err != nil {
		return err
	}
	req := api.PortForwardRequest{Proto: r.PathValue("proto")}
	if req.HostPort, err = intValue("port", r.PathValue("port")); err != nil {
		return err
	}
	if g := r.URL.Query().Get("guest_port"); g != "" {
		if req.GuestPort, err = intValue("guest_port", g); err != nil {
			return err
		}
	}
	check := req
	if check.GuestPort == 0 {
		check.GuestPort = 1 // the host side alone names a forward
	}
	if err := check.Validate(); err != nil {
		return err
	}
	if err := ps.RemovePort(r.Context(), r.PathValue("name"), req); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func intValue(key, v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, api.Errorf(api.CodeInvalidArgument, "%s %q is not a number", key, v)
	}
	return n, nil
}
