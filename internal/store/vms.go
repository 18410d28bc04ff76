package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"
)

// VM is a row of the vms table: the desired spec and the observed state.
type VM struct {
	ID          string
	Name        string
	ImageID     string
	ImageName   string // joined from images on reads
	VMM         string // requested: auto, qemu or firecracker
	CPUs        int
	MemoryBytes int64
	DiskBytes   int64
	NetMode     string
	State       string
	StateReason string
	Runtime     []byte // JSON owned by the vm package
	CreatedAt   time.Time
	UpdatedAt   time.Time
}

// ErrStateConflict is returned when a state transition's precondition fails.
var ErrStateConflict = errors.New("state changed concurrently")

const vmCols = `v.id, v.name, v.image_id, i.name, v.vmm, v.cpus, v.memory_bytes, v.disk_bytes, v.net_mode,
	v.state, v.state_reason, v.runtime, v.created_at, v.updated_at`

const vmFrom = ` FROM vms v JOIN images i ON i.id = v.image_id`

func scanVM(sc interface{ Scan(...any) error }) (VM, error) {
	var v VM
	var created, updated string
	err := sc.Scan(&v.ID, &v.Name, &v.ImageID, &v.ImageName, &v.VMM, &v.CPUs, &v.MemoryBytes, &v.DiskBytes, &v.NetMode,
		&v.State, &v.StateReason, &v.Runtime, &created, &updated)
	if err != nil {
		return VM{}, err
	}
	if v.CreatedAt, err = parseTime(created); err != nil {
		return VM{}, err
	}
	v.UpdatedAt, err = parseTime(updated)
	return v, err
}

// InsertVM records a new VM, and the intents of the resources it is about
// to create, in one transaction. A duplicate name gives ErrExists.
func (s *Store) InsertVM(ctx context.Context, v VM, intents ...Resource) error {
	t := now()
	if v.CreatedAt.IsZero() {
		v.CreatedAt = t
	}
	if v.Runtime == nil {
		v.Runtime = []byte("{}")
	}
	return s.Tx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO vms (id, name, image_id, vmm, cpus, memory_bytes, disk_bytes, net_mode,
			state, state_reason, runtime, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			v.ID, v.Name, v.ImageID, v.VMM, v.CPUs, v.MemoryBytes, v.DiskBytes, v.NetMode,
			v.State, v.StateReason, string(v.Runtime), formatTime(v.CreatedAt), formatTime(t))
		if isUniqueViolation(err) {
			return fmt.Errorf("vm %q: %w", v.Name, ErrExists)
		}
		if err != nil {
			return err
		}
		return addIntents(ctx, tx, v.ID, intents)
	})
}

// VMChange is one atomic update of a VM: a compare-and-set state change,
// its runtime, and the intents of resources about to be created. Batching
// them keeps a lifecycle step to one durable commit.
type VMChange struct {
	From    []string // the current state must be one of these (if any)
	State   string   // new state; "" keeps it
	Reason  string   // new state reason, with State
	Runtime []byte   // new runtime JSON; nil keeps it
	Intents []Resource
	// MarkCreated marks every resource of the VM created.
	MarkCreated bool
}

// ChangeVM applies c in one transaction.
func (s *Store) ChangeVM(ctx context.Context, id string, c VMChange) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		var cur string
		if err := tx.QueryRowContext(ctx, `SELECT state FROM vms WHERE id = ?`, id).Scan(&cur); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("vm id %q: %w", id, ErrNotFound)
			}
			return err
		}
		if len(c.From) > 0 && !slices.Contains(c.From, cur) {
			return fmt.Errorf("vm %s is %s, not %v: %w", id, cur, c.From, ErrStateConflict)
		}
		t := formatTime(now())
		if c.State != "" {
			if _, err := tx.ExecContext(ctx, `UPDATE vms SET state = ?, state_reason = ?, updated_at = ? WHERE id = ?`, c.State, c.Reason, t, id); err != nil {
				return err
			}
		}
		if c.Runtime != nil {
			if _, err := tx.ExecContext(ctx, `UPDATE vms SET runtime = ?, updated_at = ? WHERE id = ?`, string(c.Runtime), t, id); err != nil {
				return err
			}
		}
		if err := addIntents(ctx, tx, id, c.Intents); err != nil {
			return err
		}
		if c.MarkCreated {
			if _, err := tx.ExecContext(ctx, `UPDATE vm_resources SET state = 'created' WHERE vm_id = ?`, id); err != nil {
				return err
			}
		}
		return nil
	})
}

// ListVMs returns all VMs ordered by name.
func (s *Store) ListVMs(ctx context.Context) ([]VM, error) {
	rows, err := s.reader().QueryContext(ctx, `SELECT `+vmCols+vmFrom+` ORDER BY v.name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	defer func() { _ = rows.Close() }()
	var out []VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, fmt.Errorf("list vms: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// GetVM returns the VM with this name.
func (s *Store) GetVM(ctx context.Context, name string) (VM, error) {
	v, err := scanVM(s.reader().QueryRowContext(ctx, `SELECT `+vmCols+vmFrom+` WHERE v.name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm %q: %w", name, ErrNotFound)
	}
	return v, err
}

// GetVMByID returns the VM with this id.
func (s *Store) GetVMByID(ctx context.Context, id string) (VM, error) {
	v, err := scanVM(s.reader().QueryRowContext(ctx, `SELECT `+vmCols+vmFrom+` WHERE v.id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm id %q: %w", id, ErrNotFound)
	}
	return v, err
}

// SetVMState moves a VM to state with reason. When from is not empty the
// current state must be one of them, else ErrStateConflict: transitions are
// compare-and-set, so two requests cannot both start the same VM.
func (s *Store) SetVMState(ctx context.Context, id, state, reason string, from ...string) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		var cur string
		if err := tx.QueryRowContext(ctx, `SELECT state FROM vms WHERE id = ?`, id).Scan(&cur); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("vm id %q: %w", id, ErrNotFound)
			}
			return err
		}
		if len(from) > 0 && !slices.Contains(from, cur) {
			return fmt.Errorf("vm %s is %s, not %v: %w", id, cur, from, ErrStateConflict)
		}
		_, err := tx.ExecContext(ctx, `UPDATE vms SET state = ?, state_reason = ?, updated_at = ? WHERE id = ?`,
			state, reason, formatTime(now()), id)
		return err
	})
}

// SetVMRuntime replaces a VM's runtime JSON.
func (s *Store) SetVMRuntime(ctx context.Context, id string, runtime []byte) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE vms SET runtime = ?, updated_at = ? WHERE id = ?`, string(runtime), formatTime(now()), id)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("vm id %q: %w", id, ErrNotFound)
		}
		return nil
	})
}

// UpdateVM writes a VM's spec, state and runtime in one transaction.
func (s *Store) UpdateVM(ctx context.Context, v VM) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE vms SET vmm = ?, cpus = ?, memory_bytes = ?, disk_bytes = ?, net_mode = ?,
			state = ?, state_reason = ?, runtime = ?, updated_at = ? WHERE id = ?`,
			v.VMM, v.CPUs, v.MemoryBytes, v.DiskBytes, v.NetMode, v.State, v.StateReason, string(v.Runtime), formatTime(now()), v.ID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("vm id %q: %w", v.ID, ErrNotFound)
		}
		return nil
	})
}

// DeleteVM removes a VM row (and, by cascade, its resource rows: callers
// release resources first).
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id)
		return err
	})
}
