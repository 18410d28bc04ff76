package cli

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// The watcher reports edits, creations (in new directories too),
// deletions and rename-over saves under the roots, and nothing outside
// them, in debounced batches.
func TestWatcher(t *testing.T) {
	home := t.TempDir()
	proj := filepath.Join(home, "proj")
	if err := os.MkdirAll(filepath.Join(proj, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proj, "sub", "a"), []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".gitconfig"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, "unrelated"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := newWatcher([]string{proj, filepath.Join(home, ".gitconfig"), filepath.Join(home, "later")})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Close() }()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	out := make(chan []string, 16)
	go func() { _ = w.run(ctx, 100*time.Millisecond, time.Second, out) }()

	next := func(what string, want ...string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		var got []string
		for {
			select {
			case b := <-out:
				got = append(got, b...)
				ok := true
				for _, p := range want {
					if !slices.Contains(got, p) {
						ok = false
					}
				}
				if ok {
					for _, p := range got {
						if p == filepath.Join(home, "unrelated") {
							t.Fatalf("%s: reported a path outside the roots: %v", what, got)
						}
					}
					return
				}
			case <-deadline:
				t.Fatalf("%s: got %v, want %v", what, got, want)
			}
		}
	}

	if err := os.WriteFile(filepath.Join(proj, "sub", "a"), []byte("edited"), 0o644); err != nil {
		t.Fatal(err)
	}
	next("edit", filepath.Join(proj, "sub", "a"))

	if err := os.WriteFile(filepath.Join(home, "unrelated"), []byte("y"), 0o644); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(home, ".gitconfig.swp")
	if err := os.WriteFile(tmp, []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(home, ".gitconfig")); err != nil {
		t.Fatal(err)
	}
	next("rename-over save", filepath.Join(home, ".gitconfig"))

	if err := os.MkdirAll(filepath.Join(proj, "new", "deeper"), 0o755); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // let the new directories be watched
	if err := os.WriteFile(filepath.Join(proj, "new", "deeper", "f"), []byte("f"), 0o644); err != nil {
		t.Fatal(err)
	}
	next("file in a new directory", filepath.Join(proj, "new", "deeper", "f"))

	_ = os.Remove(filepath.Join(proj, "sub", "a"))
	next("delete", filepath.Join(proj, "sub", "a"))

	if err := os.MkdirAll(filepath.Join(home, "later"), 0o755); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := os.WriteFile(filepath.Join(home, "later", "x"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	next("a root that appears later", filepath.Join(home, "later", "x"))
}
