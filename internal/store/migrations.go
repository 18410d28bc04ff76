package store

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Migration is one schema change.
type Migration struct {
	ID   int
	Name string
	// Up runs inside the migration's own transaction.
	Up func(ctx context.Context, tx *sql.Tx) error
}

// migrations is the schema history of banger's database.
//
// Rules — they are what makes InspectSchemaState and `bangerd
// --check-migrations` trustworthy:
//   - Append only. Never edit, reorder or delete an entry once it has been
//     released: databases in the field have recorded its id.
//   - IDs are 1, 2, 3, … with no gaps (TestMigrationIDs checks it).
//   - Fix a mistake with a new migration.
//   - A migration that transforms data gets its own test through
//     ExerciseMigration.
var migrations = []Migration{
	{ID: 1, Name: "images", Up: execSQL(`
CREATE TABLE images (
	id         TEXT PRIMARY KEY,
	name       TEXT NOT NULL UNIQUE,
	source     TEXT NOT NULL CHECK (source IN ('build', 'import')),
	size_bytes INTEGER NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
	metadata   TEXT NOT NULL DEFAULT '{}', -- JSON owned by the image package
	created_at TEXT NOT NULL
) STRICT;
`)},
	{ID: 2, Name: "vms", Up: execSQL(`
CREATE TABLE vms (
	id           TEXT PRIMARY KEY,
	name         TEXT NOT NULL UNIQUE,
	image_id     TEXT NOT NULL REFERENCES images(id) ON DELETE RESTRICT,
	-- desired spec
	vmm          TEXT NOT NULL,
	cpus         INTEGER NOT NULL CHECK (cpus > 0),
	memory_bytes INTEGER NOT NULL CHECK (memory_bytes > 0),
	disk_bytes   INTEGER NOT NULL CHECK (disk_bytes > 0),
	net_mode     TEXT NOT NULL DEFAULT 'user',
	-- observed state
	state        TEXT NOT NULL CHECK (state IN ('creating', 'starting', 'running', 'stopping', 'stopped', 'error', 'deleting')),
	state_reason TEXT NOT NULL DEFAULT '',
	runtime      TEXT NOT NULL DEFAULT '{}', -- JSON owned by the vm package
	created_at   TEXT NOT NULL,
	updated_at   TEXT NOT NULL
) STRICT;
CREATE INDEX vms_image_id ON vms(image_id);
`)},
	{ID: 3, Name: "vm_resources", Up: execSQL(`
-- Every kernel or host resource a VM holds is recorded here before it is
-- created (state 'intent') and marked 'created' after. A daemon killed at
-- any step finds the intents on restart and finishes or undoes them.
-- UNIQUE(kind, ref) makes the table the allocator of shared things too:
-- two VMs cannot record the same forwarded port or address.
CREATE TABLE vm_resources (
	vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
	kind       TEXT NOT NULL,
	ref        TEXT NOT NULL,
	state      TEXT NOT NULL CHECK (state IN ('intent', 'created')),
	data       TEXT NOT NULL DEFAULT '{}',
	created_at TEXT NOT NULL,
	PRIMARY KEY (vm_id, kind, ref),
	UNIQUE (kind, ref)
) STRICT;
`)},
}

func execSQL(stmts string) func(context.Context, *sql.Tx) error {
	return func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, stmts)
		return err
	}
}

const createMigrationsTable = `CREATE TABLE IF NOT EXISTS schema_migrations (
	id         INTEGER PRIMARY KEY,
	name       TEXT NOT NULL,
	applied_at TEXT NOT NULL
)`

// KnownMigrations lists the ids this binary knows, in order.
func KnownMigrations() []int {
	ids := make([]int, len(migrations))
	for i, m := range migrations {
		ids[i] = m.ID
	}
	return ids
}

func appliedIDs(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) ([]int, error) {
	rows, err := q.QueryContext(ctx, `SELECT id FROM schema_migrations ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer func() { _ = rows.Close() }()
	var ids []int
	for rows.Next() {
		var id int
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// migrate applies pending migrations, each in its own transaction, after
// backing up a database that already holds applied migrations.
func (s *Store) migrate(ctx context.Context, backupDir string, log *slog.Logger) error {
	return s.migrateTo(ctx, len(migrations), backupDir, log)
}

func (s *Store) migrateTo(ctx context.Context, upTo int, backupDir string, log *slog.Logger) error {
	if _, err := s.rw.ExecContext(ctx, createMigrationsTable); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	applied, err := appliedIDs(ctx, s.rw)
	if err != nil {
		return fmt.Errorf("read schema_migrations: %w", err)
	}
	state := classify(applied)
	if state.Status == Incompatible {
		return fmt.Errorf("%w: %s", ErrIncompatible, state.Line())
	}
	var pending []Migration
	for _, m := range migrations[:upTo] {
		if !slices.Contains(applied, m.ID) {
			pending = append(pending, m)
		}
	}
	if len(pending) == 0 {
		return nil
	}
	if len(applied) > 0 && backupDir != "" {
		dst, err := s.backup(ctx, backupDir, applied[len(applied)-1])
		if err != nil {
			return fmt.Errorf("back up before migrating: %w", err)
		}
		log.Info("backed up database before migrating", "backup", dst, "pending", ids(pending))
	}
	for _, m := range pending {
		err := s.Tx(ctx, func(tx *sql.Tx) error {
			if err := m.Up(ctx, tx); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (id, name, applied_at) VALUES (?, ?, ?)`,
				m.ID, m.Name, formatTime(now()))
			return err
		})
		if err != nil {
			return fmt.Errorf("apply migration %d (%s): %w", m.ID, m.Name, err)
		}
		log.Info("applied migration", "id", m.ID, "name", m.Name)
	}
	return nil
}

func ids(ms []Migration) []int {
	out := make([]int, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// backup writes a consistent copy of the database with VACUUM INTO.
func (s *Store) backup(ctx context.Context, dir string, version int) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	name := fmt.Sprintf("banger-v%d-%s.db", version, now().Format("20060102T150405.000000000Z"))
	dst := filepath.Join(dir, name)
	// VACUUM INTO takes a string literal, not a bound parameter.
	if _, err := s.rw.ExecContext(ctx, `VACUUM INTO '`+strings.ReplaceAll(dst, "'", "''")+`'`); err != nil {
		return "", err
	}
	return dst, nil
}

// openAt opens a database migrated only up to migration upTo (tests).
func openAt(ctx context.Context, path string, upTo int) (*Store, error) {
	rw, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		return nil, err
	}
	rw.SetMaxOpenConns(1)
	s := &Store{path: path, rw: rw}
	if err := s.migrateTo(ctx, upTo, "", slog.New(slog.DiscardHandler)); err != nil {
		_ = rw.Close()
		return nil, err
	}
	return s, nil
}

// ExerciseMigration opens a database at path migrated up to id-1, runs seed
// on it (to plant rows the migration must carry over), then applies the
// remaining migrations, and returns the store. It is how a data migration is
// tested on its own.
func ExerciseMigration(ctx context.Context, path string, id int, seed func(*sql.Tx) error) (*Store, error) {
	if id < 1 || id > len(migrations) {
		return nil, fmt.Errorf("no migration %d", id)
	}
	s, err := openAt(ctx, path, id-1)
	if err != nil {
		return nil, err
	}
	if seed != nil {
		if err := s.Tx(ctx, seed); err != nil {
			_ = s.Close()
			return nil, fmt.Errorf("seed: %w", err)
		}
	}
	if err := s.Close(); err != nil {
		return nil, fmt.Errorf("close store at migration %d: %w", id-1, err)
	}
	return Open(ctx, path, Options{})
}

// MigrateTo creates or migrates the database at path up to migration upTo
// and closes it. It exists for tests that need a database of an older
// schema (e.g. `bangerd --check-migrations` with pending migrations).
func MigrateTo(ctx context.Context, path string, upTo int) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	s, err := openAt(ctx, path, upTo)
	if err != nil {
		return err
	}
	return s.Close()
}
