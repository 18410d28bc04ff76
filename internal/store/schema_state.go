package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
)

// SchemaStatus classifies a database against this binary's migrations.
type SchemaStatus int

const (
	// Compatible: the database has exactly the migrations this binary knows.
	Compatible SchemaStatus = iota
	// MigrationsNeeded: this binary is newer; Open will apply Pending.
	MigrationsNeeded
	// Incompatible: the database has migrations this binary does not know
	// (it was written by a newer banger). Open refuses it.
	Incompatible
)

// SchemaState is the result of InspectSchemaState.
type SchemaState struct {
	Status  SchemaStatus
	Applied []int
	Pending []int // known to this binary, not applied
	Unknown []int // applied, not known to this binary
}

// ExitCode is the contract of `bangerd --check-migrations`: 0 compatible,
// 1 migrations needed, 2 incompatible.
func (s SchemaState) ExitCode() int { return int(s.Status) }

// Line is the one line `bangerd --check-migrations` prints.
func (s SchemaState) Line() string {
	switch s.Status {
	case Compatible:
		return fmt.Sprintf("compatible: schema at migration %d", lastOr0(s.Applied))
	case MigrationsNeeded:
		return fmt.Sprintf("migrations needed: pending %s (binary will apply on first Open)", fmtIDs(s.Pending))
	default:
		return fmt.Sprintf("incompatible: database has migrations %s unknown to this binary", fmtIDs(s.Unknown))
	}
}

func lastOr0(ids []int) int {
	if len(ids) == 0 {
		return 0
	}
	return ids[len(ids)-1]
}

func fmtIDs(ids []int) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return "[" + strings.Join(s, " ") + "]"
}

func classify(applied []int) SchemaState {
	known := KnownMigrations()
	st := SchemaState{Applied: applied}
	for _, id := range applied {
		if !slices.Contains(known, id) {
			st.Unknown = append(st.Unknown, id)
		}
	}
	for _, id := range known {
		if !slices.Contains(applied, id) {
			st.Pending = append(st.Pending, id)
		}
	}
	switch {
	case len(st.Unknown) > 0:
		st.Status = Incompatible
	case len(st.Pending) > 0:
		st.Status = MigrationsNeeded
	default:
		st.Status = Compatible
	}
	return st
}

// InspectSchemaState opens the database read-only (mode=ro, nothing is
// created or changed) and classifies it. A missing file or a database
// without schema_migrations is a fresh install: every migration is pending.
func InspectSchemaState(ctx context.Context, path string) (SchemaState, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return classify(nil), nil
	} else if err != nil {
		return SchemaState{}, fmt.Errorf("inspect schema of %s: %w", path, err)
	}
	d := dsn(path, true)
	if _, err := os.Stat(path + "-wal"); errors.Is(err, os.ErrNotExist) {
		// No -wal file: no connection has the database open in WAL mode, so
		// it is safe to read it as immutable. That keeps a read-only open
		// from creating -wal/-shm files, which, made by root in a system
		// install, the owner's daemon could not open afterwards.
		d += "&immutable=1"
	}
	db, err := sql.Open("sqlite", d)
	if err != nil {
		return SchemaState{}, fmt.Errorf("inspect schema of %s: %w", path, err)
	}
	defer func() { _ = db.Close() }()
	var n int
	err = db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'schema_migrations'`).Scan(&n)
	if err != nil {
		return SchemaState{}, fmt.Errorf("inspect schema of %s: %w", path, err)
	}
	if n == 0 {
		return classify(nil), nil
	}
	applied, err := appliedIDs(ctx, db)
	if err != nil {
		return SchemaState{}, fmt.Errorf("inspect schema of %s: %w", path, err)
	}
	return classify(applied), nil
}
