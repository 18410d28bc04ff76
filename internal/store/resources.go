package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Resource is a row of vm_resources: something a VM holds on the host (a
// disk clone, a forwarded port, a process, a tap), recorded before it is
// created.
type Resource struct {
	VMID      string
	Kind      string
	Ref       string
	State     string // "intent" or "created"
	Data      []byte // JSON, kind-specific
	CreatedAt time.Time
}

// Resource states.
const (
	ResourceIntent  = "intent"
	ResourceCreated = "created"
)

// AddResourceIntent records that a resource is about to be created. Another
// VM holding the same (kind, ref) gives ErrExists: that is how ports and
// addresses are allocated without races.
func (s *Store) AddResourceIntent(ctx context.Context, vmID, kind, ref string, data []byte) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		return addIntents(ctx, tx, vmID, []Resource{{Kind: kind, Ref: ref, Data: data}})
	})
}

func addIntents(ctx context.Context, tx *sql.Tx, vmID string, rs []Resource) error {
	for _, r := range rs {
		data := r.Data
		if data == nil {
			data = []byte("{}")
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO vm_resources (vm_id, kind, ref, state, data, created_at) VALUES (?, ?, ?, 'intent', ?, ?)`,
			vmID, r.Kind, r.Ref, string(data), formatTime(now()))
		if isUniqueViolation(err) {
			return fmt.Errorf("%s %s: %w", r.Kind, r.Ref, ErrExists)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// MarkResourceCreated records that the resource now exists.
func (s *Store) MarkResourceCreated(ctx context.Context, vmID, kind, ref string, data []byte) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		q := `UPDATE vm_resources SET state = 'created' WHERE vm_id = ? AND kind = ? AND ref = ?`
		args := []any{vmID, kind, ref}
		if data != nil {
			q = `UPDATE vm_resources SET state = 'created', data = ? WHERE vm_id = ? AND kind = ? AND ref = ?`
			args = []any{string(data), vmID, kind, ref}
		}
		res, err := tx.ExecContext(ctx, q, args...)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("resource %s %s of vm %s: %w", kind, ref, vmID, ErrNotFound)
		}
		return nil
	})
}

// DeleteResource forgets a resource once it has been released.
func (s *Store) DeleteResource(ctx context.Context, vmID, kind, ref string) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM vm_resources WHERE vm_id = ? AND kind = ? AND ref = ?`, vmID, kind, ref)
		return err
	})
}

// ListResources returns a VM's resources in the order they were recorded;
// with vmID "" it returns every VM's.
func (s *Store) ListResources(ctx context.Context, vmID string) ([]Resource, error) {
	q := `SELECT vm_id, kind, ref, state, data, created_at FROM vm_resources`
	var args []any
	if vmID != "" {
		q += ` WHERE vm_id = ?`
		args = append(args, vmID)
	}
	q += ` ORDER BY created_at, rowid`
	rows, err := s.reader().QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list resources: %w", err)
	}
	defer func() { _ = rows.Close() }()
	var out []Resource
	for rows.Next() {
		var r Resource
		var created string
		if err := rows.Scan(&r.VMID, &r.Kind, &r.Ref, &r.State, &r.Data, &created); err != nil {
			return nil, fmt.Errorf("list resources: %w", err)
		}
		if r.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// ResourceHeld reports whether any VM holds (kind, ref).
func (s *Store) ResourceHeld(ctx context.Context, kind, ref string) (bool, error) {
	var n int
	err := s.reader().QueryRowContext(ctx, `SELECT count(*) FROM vm_resources WHERE kind = ? AND ref = ?`, kind, ref).Scan(&n)
	return n > 0, err
}
