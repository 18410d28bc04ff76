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
	os.MkdirAll(filepath.Join(proj, "sub"), 0o755)
	os.WriteFile(filepath.Join(proj, "sub", "a"), []byte("a"), 0o644)
	os.WriteFile(filepath.Join(home, ".gitconfig"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(home, "unrelated"), []byte("x"), 0o644)
	w, err := newWatcher([]string{proj, filepath.Join(home, ".gitconfig"), filepath.Join(home, "later")})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	out := make(chan []string, 16)
	go w.run(ctx, 100*time.Millisecond, time.Second, out)

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

	os.WriteFile(filepath.Join(proj, "sub", "a"), []byte("edited"), 0o644)
	next("edit", filepath.Join(proj, "sub", "a"))

	os.WriteFile(filepath.Join(home, "unrelated"), []byte("y"), 0o644)
	tmp := filepath.Join(home, ".gitconfig.swp")
	os.WriteFile(tmp, []byte("new"), 0o644)
	os.Rename(tmp, filepath.Join(home, ".gitconfig"))
	next("rename-over save", filepath.Join(home, ".gitconfig"))

	os.MkdirAll(filepath.Join(proj, "new", "deeper"), 0o755)
	time.Sleep(200 * time.Millisecond) // let the new directories be watched
	os.WriteFile(filepath.Join(proj, "new", "deeper", "f"), []byte("f"), 0o644)
	next("file in a new directory", filepath.Join(proj, "new", "deeper", "f"))

	os.Remove(filepath.Join(proj, "sub", "a"))
	next("delete", filepath.Join(proj, "sub", "a"))

	os.MkdirAll(filepath.Join(home, "later"), 0o755)
	time.Sleep(200 * time.Millisecond)
	os.WriteFile(filepath.Join(home, "later", "x"), []byte("x"), 0o644)
	next("a root that appears later", filepath.Join(home, "later", "x"))
}
