// Package store keeps banger's state in SQLite (modernc.org/sqlite, no cgo).
//
// The database runs in WAL mode with synchronous=FULL, foreign keys on and a
// busy timeout; every write transaction is BEGIN IMMEDIATE, so two writers
// never deadlock upgrading read locks. Writes go through one connection;
// reads use a small pool. Schema changes are the append-only migrations in
// migrations.go; Open refuses a database that has migrations this binary
// does not know.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Store is an open state database.
type Store struct {
	path string
	rw   *sql.DB // one connection, BEGIN IMMEDIATE
	ro   *sql.DB // readers
	// gen counts committed write transactions, so readers can cache what
	// they derived from the database until it changes.
	gen atomic.Uint64
}

// Options tune Open.
type Options struct {
	// BackupDir receives a VACUUM INTO copy before the first pending
	// migration is applied to a database that already has data.
	BackupDir string
	Logger    *slog.Logger
}

// ErrIncompatible means the database was written by a newer banger.
var ErrIncompatible = errors.New("database is incompatible with this binary")

func dsn(path string, readOnly bool) string {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "synchronous(FULL)")
	if readOnly {
		q.Set("mode", "ro")
	} else {
		q.Add("_pragma", "journal_mode(WAL)")
		q.Set("_txlock", "immediate")
	}
	q.Set("_time_format", "sqlite")
	return "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
}

// Open opens (creating if needed) the database at path and applies pending
// migrations. It refuses a database with migrations unknown to this binary.
func Open(ctx context.Context, path string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	rw, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	rw.SetMaxOpenConns(1)
	rw.SetConnMaxIdleTime(0)
	if err := rw.PingContext(ctx); err != nil {
		_ = rw.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = rw.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	s := &Store{path: path, rw: rw}
	if err := s.migrate(ctx, opts.BackupDir, log); err != nil {
		_ = rw.Close()
		return nil, err
	}
	// Readers open after the schema is in place. They are not mode=ro: a WAL
	// reader may need to create the -shm file.
	ro, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		_ = rw.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	ro.SetMaxOpenConns(4)
	ro.SetMaxIdleConns(4)
	s.ro = ro
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error {
	var errs []error
	if s.ro != nil {
		errs = append(errs, s.ro.Close())
	}
	errs = append(errs, s.rw.Close())
	return errors.Join(errs...)
}

// reader is the pool for queries outside write transactions.
func (s *Store) reader() *sql.DB {
	if s.ro != nil {
		return s.ro
	}
	return s.rw
}

// Path is the database file.
func (s *Store) Path() string { return s.path }

// Tx runs fn in a write transaction (BEGIN IMMEDIATE) and commits it when fn
// returns nil.
func (s *Store) Tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.rw.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	s.gen.Add(1)
	return nil
}

// Generation changes after every committed write. A cache built after
// reading Generation() == g is valid while Generation() still returns g.
func (s *Store) Generation() uint64 { return s.gen.Load() }

// now is the time stamp written into rows. Tests may replace it.
var now = func() time.Time { return time.Now().UTC() }

const timeLayout = time.RFC3339Nano

func formatTime(t time.Time) string { return t.UTC().Format(timeLayout) }

func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(timeLayout, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("parse time %q: %w", s, err)
	}
	return t, nil
}
