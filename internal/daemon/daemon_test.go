package daemon

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
)

// userLayout points the XDG variables at a fresh directory.
func userLayout(t *testing.T) paths.Layout {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("HOME", dir)
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	t.Setenv("XDG_STATE_HOME", filepath.Join(dir, "state"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	t.Setenv("XDG_RUNTIME_DIR", filepath.Join(dir, "run"))
	l, err := paths.User()
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func run(ctx context.Context, args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := Run(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

// --check-migrations prints one line and exits 0, 1 or 2 for the four
// cases of the contract.
func TestCheckMigrations(t *testing.T) {
	ctx := t.Context()
	known := store.KnownMigrations()
	ids := func(xs []int) string { return strings.ReplaceAll(fmt.Sprint(xs), ",", "") }
	tests := []struct {
		name     string
		prepare  func(t *testing.T, db string)
		code     int
		wantLine string
	}{
		{"fully migrated", func(t *testing.T, db string) {
			if err := store.MigrateTo(ctx, db, len(known)); err != nil {
				t.Fatal(err)
			}
		}, 0, fmt.Sprintf("compatible: schema at migration %d", known[len(known)-1])},
		{"only the first migration", func(t *testing.T, db string) {
			if err := store.MigrateTo(ctx, db, 1); err != nil {
				t.Fatal(err)
			}
		}, 1, "migrations needed: pending " + ids(known[1:]) + " (binary will apply on first Open)"},
		{"synthetic id 99", func(t *testing.T, db string) {
			if err := store.MigrateTo(ctx, db, len(known)); err != nil {
				t.Fatal(err)
			}
			raw, _ := sql.Open("sqlite", db)
			defer func() { _ = raw.Close() }()
			if _, err := raw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', 'x')`); err != nil {
				t.Fatal(err)
			}
		}, 2, "incompatible: database has migrations [99] unknown to this binary"},
		{"fresh db without the table", func(t *testing.T, db string) {}, 1,
			"migrations needed: pending " + ids(known) + " (binary will apply on first Open)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := userLayout(t)
			tt.prepare(t, l.DB())
			code, out, errOut := run(ctx, "--check-migrations")
			if code != tt.code || out != tt.wantLine+"\n" {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d %q", code, out, errOut, tt.code, tt.wantLine)
			}
		})
	}
}

// startDaemon runs the daemon in-process until the test ends. stop cancels
// it and returns its exit code; it may be called more than once.
func startDaemon(t *testing.T, l paths.Layout) (stop func() int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	exited := make(chan struct{})
	var code int
	var errb syncBuf
	go func() {
		code = Run(ctx, nil, &errb, &errb)
		close(exited)
	}()
	c := client.New(l.DaemonSocket())
	testutil.WaitFor(t, 20*time.Second, "daemon to answer", func() bool {
		_, err := c.Health(context.Background())
		return err == nil
	})
	stop = func() int {
		cancel()
		select {
		case <-exited:
			return code
		case <-time.After(20 * time.Second):
			t.Fatal("daemon did not stop within 20s")
			return -1
		}
	}
	t.Cleanup(func() { stop() })
	return stop
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// A second daemon on the same state refuses to start and says why; the
// first keeps serving.
func TestSecondDaemonRefused(t *testing.T) {
	l := userLayout(t)
	startDaemon(t, l)
	code, _, errOut := run(t.Context())
	if code != 1 || !strings.Contains(errOut, "another bangerd is running on this state") {
		t.Fatalf("second daemon: exit %d, %q", code, errOut)
	}
	if _, err := client.New(l.DaemonSocket()).Health(t.Context()); err != nil {
		t.Fatalf("first daemon stopped serving: %v", err)
	}
}

// A daemon refuses a database written by a newer banger, with a hint.
func TestIncompatibleDatabaseRefused(t *testing.T) {
	l := userLayout(t)
	s, err := store.Open(t.Context(), l.DB(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := sql.Open("sqlite", l.DB())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', 'x')`); err != nil {
		t.Fatal(err)
	}
	if err := raw.Close(); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := run(t.Context())
	if code != 1 || !strings.Contains(errOut, "incompatible") || !strings.Contains(errOut, "hint: ") {
		t.Fatalf("exit %d, %q", code, errOut)
	}
}

// SIGTERM (here: the context) stops the daemon cleanly: exit 0, socket gone,
// lock released so another daemon can start.
func TestGracefulStop(t *testing.T) {
	l := userLayout(t)
	stop := startDaemon(t, l)
	if code := stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if _, err := client.New(l.DaemonSocket()).Health(t.Context()); err == nil {
		t.Fatal("daemon still answers after stop")
	}
	startDaemon(t, l) // the lock is free again
}

// Draining refuses new work and returns once the last operation ends.
func TestActivityDrain(t *testing.T) {
	var a activity
	end, ok := a.Begin()
	if !ok {
		t.Fatal("Begin refused before draining")
	}
	drained := make(chan error, 1)
	go func() { drained <- a.drain(context.Background()) }()
	testutil.WaitFor(t, 5*time.Second, "draining to start", func() bool {
		probeEnd, ok := a.Begin()
		if ok {
			probeEnd()
		}
		return !ok
	})
	select {
	case err := <-drained:
		t.Fatalf("drain returned (%v) with an operation in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	end()
	end() // idempotent
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if a.InFlight() != 0 {
		t.Fatalf("in flight %d", a.InFlight())
	}
}
