// Package server is the daemon's HTTP API: a route table, strict request
// decoding, one error mapper, NDJSON streaming, and the peer-credential
// check every connection passes.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/store"
)

// Progress receives the events of a long operation.
type Progress = func(api.Event)

// VMService is what the handlers need of the VM lifecycle.
type VMService interface {
	// ListJSON is the VM list already encoded as a JSON array.
	ListJSON(ctx context.Context) ([]byte, error)
	Get(ctx context.Context, name string) (api.VM, error)
	Create(ctx context.Context, req api.VMCreateRequest, progress Progress) (api.VM, error)
	Start(ctx context.Context, name string, noWait bool, progress Progress) (api.VM, error)
	Restart(ctx context.Context, name string, noWait bool, progress Progress) (api.VM, error)
	Stop(ctx context.Context, name string, force bool, timeout time.Duration) (api.VM, error)
	Kill(ctx context.Context, name string) (api.VM, error)
	Delete(ctx context.Context, name string, force bool) error
	SSH(ctx context.Context, name string) (api.SSHInfo, error)
	FollowConsole(ctx context.Context, name string, tail int64, follow bool, w io.Writer, flush func()) error
}

// ImageService is what the handlers need of the image store.
type ImageService interface {
	List(ctx context.Context) ([]api.Image, error)
	Get(ctx context.Context, name string) (api.Image, error)
	Build(ctx context.Context, req api.ImageBuildRequest, progress Progress) (api.Image, error)
	Import(ctx context.Context, req api.ImageImportRequest, progress Progress) (api.Image, error)
	Delete(ctx context.Context, name string) error
}

// Tracker counts operations in flight so the daemon can stop once idle.
type Tracker interface {
	// Begin registers an operation; ok is false while the daemon drains,
	// and then the request is refused.
	Begin() (end func(), ok bool)
	InFlight() int
}

// Server serves the /v1 API.
type Server struct {
	VMs      VMService
	Images   ImageService
	Events   *events.Bus
	Info     func() api.VersionInfo
	Activity Tracker
	// Owner is the uid allowed in besides root.
	Owner uint32
	// Shutdown is called by POST /v1/shutdown after the response is sent.
	Shutdown func(api.ShutdownRequest)
	// Done is closed when the daemon stops; streams end then.
	Done <-chan struct{}
	Log  *slog.Logger
	// Guest runs commands and file sync inside VMs; nil answers those
	// endpoints with "unavailable".
	Guest GuestService
	// Ports manages VMs' port forwards; nil answers those endpoints with
	// "unavailable".
	Ports PortService
}

// Handler returns the API handler with authentication and routing.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	route := func(pattern string, h func(http.ResponseWriter, *http.Request) error, tracked bool) {
		mux.Handle(pattern, s.wrap(h, tracked))
	}
	// Cheap reads and the control endpoints are not tracked as in-flight
	// work: a CLI checking the daemon's version must not hold up a restart.
	route("GET /v1/health", s.health, false)
	route("GET /v1/version", s.version, false)
	route("POST /v1/shutdown", s.shutdown, false)
	route("GET /v1/events", s.events, false)
	route("GET /v1/vms", s.listVMs, true)
	route("POST /v1/vms", s.createVM, true)
	route("GET /v1/vms/{name}", s.getVM, true)
	route("DELETE /v1/vms/{name}", s.deleteVM, true)
	route("POST /v1/vms/{name}/start", s.startVM, true)
	route("POST /v1/vms/{name}/restart", s.restartVM, true)
	route("POST /v1/vms/{name}/stop", s.stopVM, true)
	route("POST /v1/vms/{name}/kill", s.killVM, true)
	route("GET /v1/vms/{name}/ssh", s.sshVM, true)
	// An exec lasts as long as its command; it is in flight all along, so
	// a daemon restart waits for it (up to its drain limit).
	route("POST /v1/vms/{name}/exec", s.execVM, true)
	route("POST /v1/vms/{name}/sync", s.syncVM, true)
	route("GET /v1/vms/{name}/ports", s.listPorts, true)
	route("POST /v1/vms/{name}/ports", s.addPort, true)
	route("DELETE /v1/vms/{name}/ports/{proto}/{port}", s.removePort, true)
	// Following a console can last forever: not counted as in flight.
	route("GET /v1/vms/{name}/console", s.consoleVM, false)
	route("GET /v1/images", s.listImages, true)
	route("POST /v1/images/build", s.buildImage, true)
	route("POST /v1/images/import", s.importImage, true)
	route("GET /v1/images/{name}", s.getImage, true)
	route("DELETE /v1/images/{name}", s.deleteImage, true)
	return s.authenticate(routeOr405(mux))
}

// wrap adapts a handler that returns an error and counts it in flight.
func (s *Server) wrap(h func(http.ResponseWriter, *http.Request) error, tracked bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if tracked && s.Activity != nil {
			end, ok := s.Activity.Begin()
			if !ok {
				s.writeError(w, r, api.Errorf(api.CodeUnavailable, "the daemon is restarting").WithHint("retry in a moment"))
				return
			}
			defer end()
		}
		if err := h(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

// authenticate admits only the owner uid and root, checked on the
// credentials of the connection (SO_PEERCRED), never on anything the client
// says.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cred := Peer(r.Context())
		if cred == nil {
			s.Log.Warn("refused connection without peer credentials", "path", r.URL.Path)
			s.writeError(w, r, api.Errorf(api.CodeForbidden, "peer credentials unavailable"))
			return
		}
		if cred.Uid != s.Owner && cred.Uid != 0 {
			s.Log.Warn("refused connection from another user", "uid", cred.Uid, "pid", cred.Pid, "owner", s.Owner, "path", r.URL.Path)
			s.writeError(w, r, api.Errorf(api.CodeForbidden, "uid %d may not use this daemon (owner is uid %d)", cred.Uid, s.Owner).
				WithHint("each user runs their own banger daemon; use your own account"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// routeOr405 answers unknown paths and wrong methods with JSON errors
// instead of ServeMux's plain text.
func routeOr405(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
			probe := r.Clone(r.Context())
			probe.Method = m
			if _, p := mux.Handler(probe); p != "" {
				writeJSON(w, http.StatusMethodNotAllowed, api.ErrorResponse{Error: api.Errorf(api.CodeMethodNotAllowed, "%s is not allowed on %s", r.Method, r.URL.Path)})
				return
			}
		}
		writeJSON(w, http.StatusNotFound, api.ErrorResponse{Error: api.Errorf(api.CodeNotFound, "no endpoint %s %s", r.Method, r.URL.Path)})
	})
}

// writeError is the one place errors become responses.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	e := s.toAPIError(r, err)
	writeJSON(w, e.Code.HTTPStatus(), api.ErrorResponse{Error: e})
}

func (s *Server) toAPIError(r *http.Request, err error) *api.Error {
	var ae *api.Error
	var inUse *store.InUseError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &inUse):
		return api.Errorf(api.CodeConflict, "%s", inUse.Error())
	case errors.Is(err, store.ErrNotFound):
		return api.Errorf(api.CodeNotFound, "%s", err.Error())
	case errors.Is(err, store.ErrExists):
		return api.Errorf(api.CodeAlreadyExists, "%s", err.Error())
	case errors.Is(err, context.Canceled):
		return api.Errorf(api.CodeCanceled, "request canceled")
	case errors.Is(err, context.DeadlineExceeded):
		return api.Errorf(api.CodeTimeout, "%s", err.Error())
	default:
		s.Log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		return api.Errorf(api.CodeInternal, "%s", err.Error())
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) error {
	n := 0
	if s.Activity != nil {
		n = s.Activity.InFlight()
	}
	writeJSON(w, http.StatusOK, api.Health{Status: "ok", InFlight: n})
	return nil
}

func (s *Server) version(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, s.Info())
	return nil
}

func (s *Server) shutdown(w http.ResponseWriter, r *http.Request) error {
	var req api.ShutdownRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	s.Log.Info("shutdown requested", "reason", req.Reason, "when_idle", req.WhenIdle, "uid", Peer(r.Context()).Uid)
	writeJSON(w, http.StatusAccepted, api.ShutdownResponse{PID: s.Info().PID})
	if s.Shutdown != nil {
		go s.Shutdown(req)
	}
	return nil
}

func (s *Server) listVMs(w http.ResponseWriter, r *http.Request) error {
	b, err := s.VMs.ListJSON(r.Context())
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	_, err = w.Write(b)
	return err
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) error {
	ims, err := s.Images.List(r.Context())
	if err != nil {
		return err
	}
	if ims == nil {
		ims = []api.Image{}
	}
	writeJSON(w, http.StatusOK, ims)
	return nil
}

// events streams the event bus as NDJSON until the client goes away or the
// daemon stops. A heartbeat line every 15 s keeps idle proxies honest and
// lets a client notice a dead daemon.
func (s *Server) events(w http.ResponseWriter, r *http.Request) error {
	sub := s.Events.Subscribe(nil)
	defer sub.Close()
	nd := newNDJSON(w)
	nd.start()
	tick := time.NewTicker(15 * time.Second)
	defer tick.Stop()
	for {
		select {
		case e, ok := <-sub.C:
			if !ok {
				return nil
			}
			if n := sub.Dropped(); n > 0 {
				if err := nd.send(api.Event{Type: "stream.lagged", Message: "events were dropped because the client read too slowly", Progress: &api.Progress{Done: int64(n)}}); err != nil {
					return nil
				}
			}
			if err := nd.send(e); err != nil {
				return nil
			}
		case <-tick.C:
			if err := nd.send(api.Event{Type: "heartbeat", Time: time.Now().UTC()}); err != nil {
				return nil
			}
		case <-r.Context().Done():
			return nil
		case <-s.Done:
			return nil
		}
	}
}
