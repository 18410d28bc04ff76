package store

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func openTest(t *testing.T) *Store {
	t.Helper()
	s, err := Open(t.Context(), filepath.Join(t.TempDir(), "banger.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// Migration ids are 1..N in order with no gaps or duplicates.
func TestMigrationIDs(t *testing.T) {
	for i, m := range migrations {
		if m.ID != i+1 {
			t.Fatalf("migration %d (%s) has id %d: ids must be 1..N in order", i, m.Name, m.ID)
		}
		if m.Name == "" || m.Up == nil {
			t.Fatalf("migration %d lacks a name or Up", m.ID)
		}
	}
}

// Open sets the pragmas the design relies on, on every connection.
func TestOpenPragmas(t *testing.T) {
	s := openTest(t)
	for _, db := range []*sql.DB{s.rw, s.ro} {
		var mode string
		var sync, fk, busy int
		ctx := t.Context()
		if err := db.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&sync); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRowContext(ctx, `PRAGMA foreign_keys`).Scan(&fk); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRowContext(ctx, `PRAGMA busy_timeout`).Scan(&busy); err != nil {
			t.Fatal(err)
		}
		if mode != "wal" || sync != 2 || fk != 1 || busy < 1000 {
			t.Errorf("journal_mode=%s synchronous=%d foreign_keys=%d busy_timeout=%d", mode, sync, fk, busy)
		}
	}
	st, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("db mode %v, want 0600", st.Mode().Perm())
	}
}

// The four cases of the --check-migrations contract.
func TestInspectSchemaState(t *testing.T) {
	ctx := t.Context()
	last := len(migrations)
	tests := []struct {
		name     string
		prepare  func(t *testing.T, path string)
		want     SchemaStatus
		wantLine string
	}{
		{"fully migrated", func(t *testing.T, path string) {
			s, err := Open(ctx, path, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
		}, Compatible, "compatible: schema at migration " + itoa(last)},
		{"only first applied", func(t *testing.T, path string) {
			s, err := openAt(ctx, path, 1)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
		}, MigrationsNeeded, "migrations needed: pending " + fmtIDs(KnownMigrations()[1:]) + " (binary will apply on first Open)"},
		{"unknown id 99", func(t *testing.T, path string) {
			s, err := Open(ctx, path, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.rw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', '2030-01-01T00:00:00Z')`); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
		}, Incompatible, "incompatible: database has migrations [99] unknown to this binary"},
		{"fresh db without table", func(t *testing.T, path string) {
			db, err := sql.Open("sqlite", path)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(`CREATE TABLE unrelated (x)`); err != nil {
				t.Fatal(err)
			}
			_ = db.Close()
		}, MigrationsNeeded, "migrations needed: pending " + fmtIDs(KnownMigrations()) + " (binary will apply on first Open)"},
		{"no file", func(t *testing.T, path string) {}, MigrationsNeeded,
			"migrations needed: pending " + fmtIDs(KnownMigrations()) + " (binary will apply on first Open)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "banger.db")
			tt.prepare(t, path)
			before := snapshotDir(t, filepath.Dir(path))
			st, err := InspectSchemaState(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			if st.Status != tt.want || st.ExitCode() != int(tt.want) || st.Line() != tt.wantLine {
				t.Errorf("got status %d exit %d line %q; want %d %q", st.Status, st.ExitCode(), st.Line(), tt.want, tt.wantLine)
			}
			if d := cmp.Diff(before, snapshotDir(t, filepath.Dir(path))); d != "" {
				t.Errorf("InspectSchemaState changed the directory (-before +after):\n%s", d)
			}
		})
	}
}

func itoa(i int) string { return fmtIDs([]int{i})[1 : len(fmtIDs([]int{i}))-1] }

// snapshotDir lists file names and sizes, to prove a read-only inspection
// created or changed nothing.
func snapshotDir(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	m := map[string]int64{}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		info, _ := e.Info()
		m[e.Name()] = info.Size()
	}
	return m
}

// Open refuses a database written by a newer binary and leaves it untouched.
func TestOpenRefusesIncompatible(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "banger.db")
	s, err := Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.rw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', 'x')`); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctx, path, Options{})
	if !errors.Is(err, ErrIncompatible) {
		t.Fatalf("Open = %v, want ErrIncompatible", err)
	}
}

// Pending migrations on a database with data are preceded by a VACUUM INTO
// backup that holds the pre-migration schema; a fresh install takes none.
func TestBackupBeforeMigrating(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	path := filepath.Join(dir, "banger.db")
	backups := filepath.Join(dir, "backups")
	s, err := openAt(ctx, path, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(ctx, path, Options{BackupDir: backups})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(backups)
	if len(entries) != 1 {
		t.Fatalf("%d backups, want 1", len(entries))
	}
	st, err := InspectSchemaState(ctx, filepath.Join(backups, entries[0].Name()))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]int{1}, st.Applied); d != "" {
		t.Errorf("backup schema (-want +got):\n%s", d)
	}
	// Fresh install: nothing to back up.
	fresh := filepath.Join(t.TempDir(), "fresh.db")
	fb := filepath.Join(t.TempDir(), "b")
	s, err = Open(ctx, fresh, Options{BackupDir: fb})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fb); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("fresh install made a backup dir: %v", err)
	}
}

// Rows written before a migration survive it (ExerciseMigration pattern).
func TestMigrationKeepsImages(t *testing.T) {
	ctx := t.Context()
	s, err := ExerciseMigration(ctx, filepath.Join(t.TempDir(), "banger.db"), 2, func(tx *sql.Tx) error {
		_, err := tx.Exec(`INSERT INTO images (id, name, source, created_at) VALUES ('abc', 'default', 'build', '2026-01-01T00:00:00Z')`)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	im, err := s.GetImage(ctx, "default")
	if err != nil || im.ID != "abc" {
		t.Fatalf("GetImage after migration = %+v, %v", im, err)
	}
}

func seedImage(t *testing.T, s *Store, name string) Image {
	t.Helper()
	im := Image{ID: "img-" + name, Name: name, Source: "build", SizeBytes: 42, Metadata: []byte(`{"k":1}`)}
	if err := s.InsertImage(t.Context(), im); err != nil {
		t.Fatal(err)
	}
	return im
}

func seedVM(t *testing.T, s *Store, id, name, imageID string) VM {
	t.Helper()
	v := VM{ID: id, Name: name, ImageID: imageID, VMM: "qemu", CPUs: 2, MemoryBytes: 1 << 30, DiskBytes: 8 << 30, NetMode: "user", State: "creating"}
	if err := s.InsertVM(t.Context(), v); err != nil {
		t.Fatal(err)
	}
	return v
}

// Images and VMs round-trip; names are unique; an image in use cannot go.
func TestImagesAndVMs(t *testing.T) {
	ctx := t.Context()
	s := openTest(t)
	im := seedImage(t, s, "default")
	if err := s.InsertImage(ctx, im); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate image: %v, want ErrExists", err)
	}
	seedVM(t, s, "0123456789ab", "dev", im.ID)
	if err := s.InsertVM(ctx, VM{ID: "ffffffffffff", Name: "dev", ImageID: im.ID, VMM: "qemu", CPUs: 1, MemoryBytes: 1, DiskBytes: 1, State: "creating"}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate vm name: %v, want ErrExists", err)
	}
	if err := s.InsertVM(ctx, VM{ID: "eeeeeeeeeeee", Name: "x", ImageID: "nope", VMM: "qemu", CPUs: 1, MemoryBytes: 1, DiskBytes: 1, State: "creating"}); err == nil {
		t.Fatal("vm with unknown image accepted (foreign keys off?)")
	}
	got, err := s.GetVM(ctx, "dev")
	if err != nil {
		t.Fatal(err)
	}
	if got.ImageName != "default" || got.CPUs != 2 || string(got.Runtime) != "{}" {
		t.Errorf("GetVM = %+v", got)
	}
	var inUse *InUseError
	if err := s.DeleteImage(ctx, "default"); !errors.As(err, &inUse) || !errors.Is(err, ErrInUse) || inUse.By[0] != "dev" {
		t.Fatalf("DeleteImage in use = %v", err)
	}
	if err := s.DeleteVM(ctx, "0123456789ab"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteImage(ctx, "default"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetImage(ctx, "default"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetImage after delete = %v", err)
	}
	if err := s.InsertVM(ctx, VM{ID: "a", Name: "bad", ImageID: im.ID, VMM: "qemu", CPUs: 0, MemoryBytes: 1, DiskBytes: 1, State: "creating"}); err == nil {
		t.Fatal("cpus=0 accepted: CHECK constraints missing")
	}
}

// State transitions are compare-and-set: of many concurrent starters of the
// same stopped VM, exactly one wins.
func TestSetVMStateCAS(t *testing.T) {
	ctx := t.Context()
	s := openTest(t)
	im := seedImage(t, s, "default")
	seedVM(t, s, "0123456789ab", "dev", im.ID)
	if err := s.SetVMState(ctx, "0123456789ab", "stopped", "", "creating"); err != nil {
		t.Fatal(err)
	}
	var wins, conflicts int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.SetVMState(context.Background(), "0123456789ab", "starting", "", "stopped")
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case errors.Is(err, ErrStateConflict):
				conflicts++
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if wins != 1 || conflicts != 7 {
		t.Fatalf("wins=%d conflicts=%d, want 1 and 7", wins, conflicts)
	}
}

// Resources are unique per (kind, ref) across VMs and follow intent → created.
func TestResources(t *testing.T) {
	ctx := t.Context()
	s := openTest(t)
	im := seedImage(t, s, "default")
	seedVM(t, s, "aaaaaaaaaaaa", "a", im.ID)
	seedVM(t, s, "bbbbbbbbbbbb", "b", im.ID)
	if err := s.AddResourceIntent(ctx, "aaaaaaaaaaaa", "port", "tcp:127.0.0.1:2222", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.AddResourceIntent(ctx, "bbbbbbbbbbbb", "port", "tcp:127.0.0.1:2222", nil); !errors.Is(err, ErrExists) {
		t.Fatalf("second holder of a port: %v, want ErrExists", err)
	}
	if err := s.MarkResourceCreated(ctx, "aaaaaaaaaaaa", "port", "tcp:127.0.0.1:2222", []byte(`{"x":1}`)); err != nil {
		t.Fatal(err)
	}
	rs, err := s.ListResources(ctx, "aaaaaaaaaaaa")
	if err != nil || len(rs) != 1 || rs[0].State != ResourceCreated || string(rs[0].Data) != `{"x":1}` {
		t.Fatalf("ListResources = %+v, %v", rs, err)
	}
	if err := s.MarkResourceCreated(ctx, "bbbbbbbbbbbb", "port", "nope", nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("mark unknown: %v", err)
	}
	if err := s.DeleteResource(ctx, "aaaaaaaaaaaa", "port", "tcp:127.0.0.1:2222"); err != nil {
		t.Fatal(err)
	}
	if held, _ := s.ResourceHeld(ctx, "port", "tcp:127.0.0.1:2222"); held {
		t.Fatal("released port still held")
	}
}

// Inspection works while a daemon holds the database open in WAL mode and
// sees rows the daemon committed.
func TestInspectWhileOpen(t *testing.T) {
	ctx := t.Context()
	s := openTest(t)
	st, err := InspectSchemaState(ctx, s.Path())
	if err != nil || st.Status != Compatible {
		t.Fatalf("InspectSchemaState on a live db = %+v, %v", st, err)
	}
	if _, err := s.rw.Exec(`INSERT INTO schema_migrations (id, name, applied_at) VALUES (99, 'future', 'x')`); err != nil {
		t.Fatal(err)
	}
	st, err = InspectSchemaState(ctx, s.Path())
	if err != nil || st.Status != Incompatible {
		t.Fatalf("after a committed change: %+v, %v", st, err)
	}
}

// ChangeVM is one atomic step: a refused intent (a port another VM holds)
// leaves the state and runtime as they were.
func TestChangeVMAtomic(t *testing.T) {
	ctx := t.Context()
	s := openTest(t)
	im := seedImage(t, s, "default")
	seedVM(t, s, "aaaaaaaaaa", "a", im.ID)
	seedVM(t, s, "bbbbbbbbbb", "b", im.ID)
	if err := s.ChangeVM(ctx, "aaaaaaaaaa", VMChange{From: []string{"creating"}, State: "starting",
		Intents: []Resource{{Kind: "port", Ref: "tcp:127.0.0.1:2222"}}}); err != nil {
		t.Fatal(err)
	}
	err := s.ChangeVM(ctx, "bbbbbbbbbb", VMChange{From: []string{"creating"}, State: "starting", Runtime: []byte(`{"x":1}`),
		Intents: []Resource{{Kind: "rundir", Ref: "/run/b"}, {Kind: "port", Ref: "tcp:127.0.0.1:2222"}}})
	if !errors.Is(err, ErrExists) {
		t.Fatalf("second holder of a port: %v, want ErrExists", err)
	}
	b, _ := s.GetVM(ctx, "b")
	rs, _ := s.ListResources(ctx, "bbbbbbbbbb")
	if b.State != "creating" || string(b.Runtime) != "{}" || len(rs) != 0 {
		t.Fatalf("refused change applied in part: state %s runtime %s resources %v", b.State, b.Runtime, rs)
	}
	if err := s.ChangeVM(ctx, "aaaaaaaaaa", VMChange{From: []string{"creating"}, State: "running"}); !errors.Is(err, ErrStateConflict) {
		t.Fatalf("CAS from a wrong state: %v", err)
	}
	if err := s.ChangeVM(ctx, "aaaaaaaaaa", VMChange{From: []string{"starting"}, State: "running", MarkCreated: true}); err != nil {
		t.Fatal(err)
	}
	rs, _ = s.ListResources(ctx, "aaaaaaaaaa")
	if len(rs) != 1 || rs[0].State != ResourceCreated {
		t.Fatalf("resources after MarkCreated: %+v", rs)
	}
}
