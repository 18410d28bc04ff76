package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Image is a row of the images table.
type Image struct {
	ID        string
	Name      string
	Source    string // "build" or "import"
	SizeBytes int64
	Metadata  []byte // JSON owned by the image package
	CreatedAt time.Time
}

// ErrNotFound is returned when a row does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned when a UNIQUE constraint refuses a row.
var ErrExists = errors.New("already exists")

const imageCols = `id, name, source, size_bytes, metadata, created_at`

func scanImage(sc interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var created string
	if err := sc.Scan(&im.ID, &im.Name, &im.Source, &im.SizeBytes, &im.Metadata, &created); err != nil {
		return Image{}, err
	}
	var err error
	im.CreatedAt, err = parseTime(created)
	return im, err
}

// InsertImage records a new image.
func (s *Store) InsertImage(ctx context.Context, im Image) error {
	if im.CreatedAt.IsZero() {
		im.CreatedAt = now()
	}
	return s.Tx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO images (`+imageCols+`) VALUES (?, ?, ?, ?, ?, ?)`,
			im.ID, im.Name, im.Source, im.SizeBytes, string(im.Metadata), formatTime(im.CreatedAt))
		if isUniqueViolation(err) {
			return fmt.Errorf("image %q: %w", im.Name, ErrExists)
		}
		return err
	})
}

// ListImages returns all images ordered by name.
func (s *Store) ListImages(ctx context.Context) ([]Image, error) {
	rows, err := s.reader().QueryContext(ctx, `SELECT `+imageCols+` FROM images ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	defer func() { _ = rows.Close() }()
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, fmt.Errorf("list images: %w", err)
		}
		out = append(out, im)
	}
	return out, rows.Err()
}

// GetImage returns the image with this name.
func (s *Store) GetImage(ctx context.Context, name string) (Image, error) {
	im, err := scanImage(s.reader().QueryRowContext(ctx, `SELECT `+imageCols+` FROM images WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	return im, err
}

// GetImageByID returns the image with this id.
func (s *Store) GetImageByID(ctx context.Context, id string) (Image, error) {
	im, err := scanImage(s.reader().QueryRowContext(ctx, `SELECT `+imageCols+` FROM images WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, fmt.Errorf("image id %q: %w", id, ErrNotFound)
	}
	return im, err
}

// ErrInUse is returned when a row is still referenced.
var ErrInUse = errors.New("in use")

// DeleteImage removes an image row. It fails with ErrInUse while a VM
// references the image (the foreign key forbids it) and names the VMs.
func (s *Store) DeleteImage(ctx context.Context, name string) error {
	return s.Tx(ctx, func(tx *sql.Tx) error {
		var id string
		if err := tx.QueryRowContext(ctx, `SELECT id FROM images WHERE name = ?`, name).Scan(&id); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("image %q: %w", name, ErrNotFound)
			}
			return err
		}
		users, err := namesOf(ctx, tx, `SELECT name FROM vms WHERE image_id = ? ORDER BY name`, id)
		if err != nil {
			return err
		}
		if len(users) > 0 {
			return &InUseError{What: fmt.Sprintf("image %q", name), By: users}
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM images WHERE id = ?`, id)
		return err
	})
}

// InUseError names what still uses a row.
type InUseError struct {
	What string
	By   []string
}

func (e *InUseError) Error() string { return fmt.Sprintf("%s is used by VMs %v", e.What, e.By) }
func (e *InUseError) Unwrap() error { return ErrInUse }

func namesOf(ctx context.Context, tx *sql.Tx, q string, args ...any) ([]string, error) {
	rows, err := tx.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer func() { _ = rows.Close() }()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}
