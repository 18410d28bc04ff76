package testutil

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"golang.org/x/sys/unix"
)

// Expensive fixtures (a built Debian image takes a minute or more) are made
// once per cache and shared by every test binary of a CI job: CachedDir
// keys them by content (a recipe hash) under the test cache, and a file
// lock per key makes test packages running in parallel wait for the one
// that builds instead of building again. The image package's imagetest
// builds banger's default image this way; testutil itself cannot import
// the image package, whose own tests import testutil.

var cacheKeyRe = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// CachedDir returns <test cache>/<kind>/<key>, calling fill to populate it
// the first time. fill gets an empty directory on the same file system
// that becomes the entry only if fill returns nil, so an interrupted or
// failed fill leaves nothing behind and the next caller tries again. fill
// may skip the test (t.Skip); the lock and the scratch directory are
// released either way.
func CachedDir(t testing.TB, kind, key string, fill func(dir string) error) string {
	t.Helper()
	if !cacheKeyRe.MatchString(kind) || !cacheKeyRe.MatchString(key) {
		t.Fatalf("cache kind %q / key %q: want 1 to 128 of A-Z a-z 0-9 . _ -", kind, key)
	}
	base := filepath.Join(TestCacheDir(t), kind)
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatalf("create %s: %v", base, err)
	}
	dir := filepath.Join(base, key)
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		return dir // complete entries are only ever renamed into place
	}

	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("open cache lock: %v", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatalf("lock %s: %v", dir, err)
	}
	defer func() { _ = unix.Flock(int(lock.Fd()), unix.LOCK_UN) }()
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		return dir // another process filled it while we waited
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stat %s: %v", dir, err)
	}

	// Scratch left by a killed fill is ours to remove now that we hold
	// the lock.
	stale, _ := filepath.Glob(dir + ".tmp-*")
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}
	tmp, err := os.MkdirTemp(base, key+".tmp-")
	if err != nil {
		t.Fatalf("create cache scratch: %v", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	fillDir := filepath.Join(tmp, "entry")
	if err := os.Mkdir(fillDir, 0o755); err != nil {
		t.Fatalf("create cache scratch: %v", err)
	}
	if err := fill(fillDir); err != nil {
		t.Fatalf("fill test cache %s/%s: %v", kind, key, err)
	}
	if err := os.Rename(fillDir, dir); err != nil {
		t.Fatalf("publish test cache entry: %v", err)
	}
	return dir
}
