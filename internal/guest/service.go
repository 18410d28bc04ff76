package guest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"

	"github.com/pkg/sftp"

	"github.com/bangerhq/banger/internal/api"
)

// Service is what the daemon does inside VMs: commands over pooled SSH
// connections, and file sync.
type Service struct {
	Pool *Pool
	// Home confines file sync's host paths; nil with HomeErr saying why
	// the owner's home could not be opened (then only sync fails).
	Home    *Home
	HomeErr error
	// Entries are the configured [[file_sync]] entries.
	Entries []SyncEntry
	// ManifestPath is where a VM's sync manifest lives (its state dir, so
	// it goes when the VM does).
	ManifestPath func(ctx context.Context, name string) (string, error)
	Log          *slog.Logger

	mu    sync.Mutex // guards locks
	locks map[string]*sync.Mutex
}

// Exec starts a command in a running VM.
func (s *Service) Exec(ctx context.Context, name string, req api.ExecRequest) (*ExecSession, error) {
	sess, err := s.Pool.Exec(ctx, name, req)
	return sess, apiError(name, err)
}

// apiError gives a host key refusal its API code and a hint; other errors
// pass unchanged.
func apiError(name string, err error) error {
	switch {
	case errors.Is(err, ErrHostKeyChanged):
		return api.Errorf(api.CodeFailedPrecondition, "%s", err.Error()).
			WithHint("the VM's SSH host key is not the one banger pinned when it created the VM; if it was changed inside the VM, restore the original /etc/ssh/ssh_host_*_key files or recreate the VM (banger vm delete " + name + ")")
	case errors.Is(err, ErrHostUnknown):
		return api.Errorf(api.CodeFailedPrecondition, "%s", err.Error()).
			WithHint("banger has no pinned host key for this VM, and never trusts one on first use")
	}
	return err
}

// lock serialises syncs of one VM (a watcher, a manual sync and the one at
// create may overlap); the returned func unlocks.
func (s *Service) lock(name string) func() {
	s.mu.Lock()
	if s.locks == nil {
		s.locks = map[string]*sync.Mutex{}
	}
	l := s.locks[name]
	if l == nil {
		l = &sync.Mutex{}
		s.locks[name] = l
	}
	s.mu.Unlock()
	l.Lock()
	return l.Unlock
}

// Sync applies the file_sync entries to a running VM.
func (s *Service) Sync(ctx context.Context, name string, req api.SyncRequest, progress func(api.Event)) (api.SyncReport, error) {
	for _, p := range req.Paths {
		if !filepath.IsAbs(p) {
			return api.SyncReport{}, api.Errorf(api.CodeInvalidArgument, "sync: path %q is not absolute", p)
		}
	}
	if len(s.Entries) == 0 {
		return api.SyncReport{Entries: []api.SyncEntryReport{}}, nil
	}
	if s.Home == nil {
		return api.SyncReport{}, api.Errorf(api.CodeFailedPrecondition, "file sync cannot read the owner's home: %v", s.HomeErr)
	}
	manifest, err := s.ManifestPath(ctx, name)
	if err != nil {
		return api.SyncReport{}, err
	}
	defer s.lock(name)()

	sc, lease, err := s.openSFTP(ctx, name)
	if err != nil {
		return api.SyncReport{}, apiError(name, err)
	}
	defer lease.Release()
	defer func() { _ = sc.Close() }()
	opts := SyncOptions{Paths: req.Paths, Full: req.Full}
	if progress != nil {
		opts.Progress = func(step, msg string) {
			progress(api.Event{Type: "vm.sync", Message: msg, Progress: &api.Progress{Step: step}})
		}
	}
	rep, err := Sync(ctx, sc, s.Home, s.Entries, manifest, opts)
	if err != nil {
		var ce *ConfineError
		if errors.As(err, &ce) {
			return rep, api.Errorf(api.CodeForbidden, "%s", err.Error())
		}
		return rep, err
	}
	s.Log.Info("file sync", "vm", name, "uploaded", rep.Uploaded, "deleted", rep.Deleted, "unchanged", rep.Unchanged, "bytes", rep.Bytes)
	return rep, nil
}

// openSFTP starts an SFTP session on a pooled connection, on a fresh one
// if the pooled one turns out dead.
func (s *Service) openSFTP(ctx context.Context, name string) (*sftp.Client, *Lease, error) {
	for attempt := 0; ; attempt++ {
		lease, err := s.Pool.Get(ctx, name)
		if err != nil {
			return nil, nil, err
		}
		sc, err := NewSFTP(lease.Client)
		if err == nil {
			return sc, lease, nil
		}
		if attempt == 0 && isConnFailure(err) {
			lease.Broken()
			continue
		}
		lease.Release()
		return nil, nil, fmt.Errorf("sync %s: %w", name, err)
	}
}

// OnReady syncs a VM that just came up; it is vm.Service's OnReady hook.
func (s *Service) OnReady(ctx context.Context, name string, progress func(api.Event)) error {
	if len(s.Entries) == 0 {
		return nil
	}
	progress(api.Event{Type: "vm.sync", Message: "syncing files", Progress: &api.Progress{Step: "sync"}})
	rep, err := s.Sync(ctx, name, api.SyncRequest{}, progress)
	if err != nil {
		return fmt.Errorf("file sync: %w", err)
	}
	progress(api.Event{Type: "vm.sync", Message: fmt.Sprintf("synced files: %d sent, %d unchanged", rep.Uploaded, rep.Unchanged), Progress: &api.Progress{Step: "sync"}})
	return nil
}

// Stopped drops a VM's pooled connections; it is vm.Service's OnStopped
// hook.
func (s *Service) Stopped(name string) { s.Pool.Drop(name) }

// Close closes every pooled connection and the home.
func (s *Service) Close() {
	s.Pool.Close()
	if s.Home != nil {
		_ = s.Home.Close()
	}
}
