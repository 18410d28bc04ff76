package server

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/bangerhq/banger/internal/api"
)

func (s *Server) createVM(w http.ResponseWriter, r *http.Request) error {
	var req api.VMCreateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.stream(w, r, "vm", req.Name, func(ctx context.Context, p Progress) (any, error) {
		return s.VMs.Create(ctx, req, p)
	})
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request) error {
	v, err := s.VMs.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) deleteVM(w http.ResponseWriter, r *http.Request) error {
	force, err := boolQuery(r, "force")
	if err != nil {
		return err
	}
	if err := s.VMs.Delete(r.Context(), r.PathValue("name"), force); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) startVM(w http.ResponseWriter, r *http.Request) error {
	var req api.VMStartRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	name := r.PathValue("name")
	return s.stream(w, r, "vm", name, func(ctx context.Context, p Progress) (any, error) {
		return s.VMs.Start(ctx, name, req.NoWait, p)
	})
}

func (s *Server) restartVM(w http.ResponseWriter, r *http.Request) error {
	var req api.VMStartRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	name := r.PathValue("name")
	return s.stream(w, r, "vm", name, func(ctx context.Context, p Progress) (any, error) {
		return s.VMs.Restart(ctx, name, req.NoWait, p)
	})
}

func (s *Server) stopVM(w http.ResponseWriter, r *http.Request) error {
	var req api.VMStopRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.TimeoutSeconds < 0 || req.TimeoutSeconds > 3600 {
		return api.Errorf(api.CodeInvalidArgument, "timeout_seconds %d is out of range 0..3600", req.TimeoutSeconds)
	}
	v, err := s.VMs.Stop(r.Context(), r.PathValue("name"), req.Force, time.Duration(req.TimeoutSeconds)*time.Second)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) killVM(w http.ResponseWriter, r *http.Request) error {
	v, err := s.VMs.Kill(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) sshVM(w http.ResponseWriter, r *http.Request) error {
	info, err := s.VMs.SSH(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, info)
	return nil
}

// consoleVM streams the console log as text: ?tail=BYTES, ?follow=1.
func (s *Server) consoleVM(w http.ResponseWriter, r *http.Request) error {
	follow, err := boolQuery(r, "follow")
	if err != nil {
		return err
	}
	var tail int64
	if v := r.URL.Query().Get("tail"); v != "" {
		if tail, err = strconv.ParseInt(v, 10, 64); err != nil || tail < 0 {
			return api.Errorf(api.CodeInvalidArgument, "tail %q is not a byte count", v)
		}
	}
	name := r.PathValue("name")
	if _, err := s.VMs.Get(r.Context(), name); err != nil {
		return err
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	// The stream ends when the client leaves or the daemon stops.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	go func() {
		select {
		case <-s.Done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := s.VMs.FollowConsole(ctx, name, tail, follow, w, func() { _ = rc.Flush() }); err != nil {
		s.Log.Warn("console stream ended", "vm", name, "err", err)
	}
	return nil
}

func boolQuery(r *http.Request, key string) (bool, error) {
	v := r.URL.Query().Get(key)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, api.Errorf(api.CodeInvalidArgument, "query %s=%q is not a boolean", key, v)
	}
	return b, nil
}
