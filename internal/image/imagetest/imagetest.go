// Package imagetest gives tests a real banger image without paying for a
// build each time: the default image is built once with the real Build
// code, cached by recipe hash under the test cache ($BANGER_TEST_CACHE,
// /var/cache/banger-test by default) and imported into each test's own
// service by reflink or sparse copy.
//
// It lives beside the image package rather than in testutil because it
// calls image.Service, and the image package's own tests import testutil.
package imagetest

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
)

// Files of a cached default image, in the directory DefaultImage returns.
const (
	Kernel   = "vmlinuz"     // bzImage
	Vmlinux  = "vmlinux"     // ELF
	Initrd   = "initrd.img"  // gzip cpio with the virtio modules
	Rootfs   = "rootfs.ext4" // never write to it: copy it (image.Cloner)
	Metadata = "metadata.json"
)

// buildTimeout bounds the one real build; mmdebstrap takes one to three
// minutes on a shared two-core machine.
const buildTimeout = 15 * time.Minute

// NewService returns an image service over a fresh store and layout under
// t.TempDir(), with the package cache shared across tests.
func NewService(t testing.TB) *image.Service {
	t.Helper()
	return newServiceIn(t, t.TempDir())
}

func newServiceIn(t testing.TB, root string) *image.Service {
	t.Helper()
	layout := paths.Layout{
		Mode:       paths.UserMode,
		ConfigDir:  filepath.Join(root, "config"),
		StateDir:   filepath.Join(root, "state"),
		DataDir:    filepath.Join(root, "data"),
		RuntimeDir: filepath.Join(root, "run"),
	}
	if err := layout.EnsureDirs(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), layout.DB(), store.Options{})
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	svc := &image.Service{
		Store:        st,
		Layout:       layout,
		Defaults:     config.Default().Image,
		PackageCache: filepath.Join(testutil.TestCacheDir(t), "debs"),
	}
	// Cleanups run last-registered first: background deletions end
	// before the store closes and the temporary directory goes.
	t.Cleanup(func() { _ = st.Close() })
	t.Cleanup(svc.Wait)
	return svc
}

// RequireBuild skips the test unless this host can build images: mmdebstrap
// installed, root or subordinate ids for unshare mode, and the default
// mirror answering.
func RequireBuild(t testing.TB) {
	t.Helper()
	testutil.RequireCommand(t, "mmdebstrap")
	if os.Geteuid() != 0 {
		if err := (&image.Service{}).CheckBuildHost(); err != nil {
			t.Skipf("cannot build images here: %v", err)
		}
	}
	mirror := config.Default().Image
	url := mirror.Mirror + "/dists/" + mirror.Suite + "/Release"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Skipf("Debian mirror unreachable (%v): image builds need it", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Skipf("Debian mirror answered %s for %s: image builds need it", resp.Status, url)
	}
}

// DefaultImage returns the directory of a default image (the files named
// above), building it with image.Service.Build the first time any test
// asks for this recipe. The build is slow: the test is skipped under -short
// and where RequireBuild skips.
func DefaultImage(t testing.TB) string {
	t.Helper()
	recipe, err := image.DefaultRecipe(config.Default().Image)
	if err != nil {
		t.Fatal(err)
	}
	key := recipe.Hash()
	if dir := cachedIfPresent(t, key); dir != "" {
		return dir
	}
	testutil.SkipShort(t, "builds the default image (a minute or more)")
	RequireBuild(t)
	defer pruneStale(t, key)
	return testutil.CachedDir(t, "images", key, func(dir string) error {
		// The service works inside the entry's scratch, so that the
		// finished image moves into the entry by rename.
		work, err := os.MkdirTemp(filepath.Dir(dir), "build-")
		if err != nil {
			return err
		}
		defer func() { _ = os.RemoveAll(work) }()
		svc := newServiceIn(t, work)
		ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
		defer cancel()
		start := time.Now()
		im, err := svc.Build(ctx, api.ImageBuildRequest{Name: image.DefaultImageName}, func(e api.Event) {
			if e.Message != "" {
				t.Logf("build: %s", e.Message)
			}
		})
		svc.Wait() // the staging clean-up, before work goes
		if err != nil {
			return fmt.Errorf("build the default image: %w", err)
		}
		t.Logf("built the default image in %s (recipe %s, %s)", time.Since(start).Round(time.Second), key, api.FormatSize(im.SizeBytes))
		src := svc.Layout.ImageDir(image.DefaultImageName)
		for _, f := range []string{Kernel, Vmlinux, Initrd, Rootfs, Metadata} {
			if err := os.Rename(filepath.Join(src, f), filepath.Join(dir, f)); err != nil {
				return err
			}
		}
		return nil
	})
}

// staleAfter is how long an image of another recipe (an older base script)
// stays in the cache: long enough for test binaries of other revisions
// running at the same time, short enough not to fill the disk.
const staleAfter = 24 * time.Hour

// pruneStale removes cached images of other recipes not built recently.
func pruneStale(t testing.TB, keep string) {
	base := filepath.Join(testutil.TestCacheDir(t), "images")
	ents, err := os.ReadDir(base)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || name == keep || strings.Contains(name, ".tmp-") {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > staleAfter {
			_ = os.RemoveAll(filepath.Join(base, name))
			_ = os.Remove(filepath.Join(base, name+".lock"))
		}
	}
}

// cachedIfPresent returns the cache entry when it exists already, without
// the requirements a build has.
func cachedIfPresent(t testing.TB, key string) string {
	dir := filepath.Join(testutil.TestCacheDir(t), "images", key)
	if st, err := os.Stat(filepath.Join(dir, Rootfs)); err == nil && st.Mode().IsRegular() {
		return dir
	}
	return ""
}

// ImportDefault imports the cached default image into svc as name, by
// reflink where the file systems allow it, else a sparse copy.
func ImportDefault(t testing.TB, svc *image.Service, name string) api.Image {
	t.Helper()
	dir := DefaultImage(t)
	im, err := svc.Import(context.Background(), api.ImageImportRequest{
		Name:   name,
		Rootfs: filepath.Join(dir, Rootfs),
		Kernel: filepath.Join(dir, Kernel),
		Initrd: filepath.Join(dir, Initrd),
	}, nil)
	if err != nil {
		t.Fatalf("import the default image as %q: %v", name, err)
	}
	return im
}
