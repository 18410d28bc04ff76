package image_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/google/go-cmp/cmp"
)

// wantCode fails unless err is an *api.Error with code.
func wantCode(t *testing.T, err error, code api.Code) *api.Error {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != code {
		t.Fatalf("error %v (%T), want code %s", err, err, code)
	}
	return ae
}

// assertNothingLeft fails if svc has a registered image, an image
// directory or anything in staging.
func assertNothingLeft(t *testing.T, svc *image.Service) {
	t.Helper()
	ims, err := svc.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ims) > 0 {
		t.Errorf("images registered: %v", ims)
	}
	for _, dir := range []string{svc.Layout.ImagesDir(), stagingOf(svc)} {
		ents, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range ents {
			t.Errorf("left behind: %s", filepath.Join(dir, e.Name()))
		}
	}
}

func stagingOf(svc *image.Service) string {
	if svc.StagingDir != "" {
		return svc.StagingDir
	}
	return svc.Layout.ImageStagingDir()
}

// importFixture is a small but real image to import: an ext4 rootfs, the
// Debian cloud kernel (a bzImage) and a gzip initrd.
type importFixture struct{ rootfs, kernel, initrd string }

func newImportFixture(t *testing.T) importFixture {
	t.Helper()
	testutil.RequireCommand(t, "mkfs.ext4", "e2fsck", "debugfs")
	kernel, _ := testutil.DebianKernel(t)
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "etc/hostname"), []byte("imported\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f := importFixture{rootfs: filepath.Join(dir, "rootfs.ext4"), kernel: kernel, initrd: filepath.Join(dir, "initrd.img")}
	if err := ext4.Make(t.Context(), tree, f.rootfs, 32<<20, ext4.MakeOptions{}); err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	if _, err := w.Write([]byte("070701 not really a cpio archive, but gzip says initrd")); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.initrd, gz.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f importFixture) request(name string) api.ImageImportRequest {
	return api.ImageImportRequest{Name: name, Rootfs: f.rootfs, Kernel: f.kernel, Initrd: f.initrd}
}

// Bad build requests are refused before any work, with invalid_argument
// and nothing left behind.
func TestBuildRefusesBadRequests(t *testing.T) {
	svc := imagetest.NewService(t)
	for _, tc := range []struct {
		what string
		req  api.ImageBuildRequest
	}{
		{"uppercase name", api.ImageBuildRequest{Name: "Default"}},
		{"dot-dot name", api.ImageBuildRequest{Name: ".."}},
		{"slash in name", api.ImageBuildRequest{Name: "a/b"}},
		{"newline in name", api.ImageBuildRequest{Name: "a\nb"}},
		{"64-character name", api.ImageBuildRequest{Name: strings.Repeat("a", 64)}},
		{"bad package name", api.ImageBuildRequest{Name: "x", Packages: []string{"curl;reboot"}}},
		{"package option", api.ImageBuildRequest{Name: "x", Packages: []string{"--allow-unauthenticated"}}},
		{"bad suite", api.ImageBuildRequest{Name: "x", Suite: "bookworm main"}},
		{"tiny size", api.ImageBuildRequest{Name: "x", SizeBytes: 4096}},
		{"script without content", api.ImageBuildRequest{Name: "x", Customize: []api.Script{{Name: "a.sh"}}}},
	} {
		start := time.Now()
		_, err := svc.Build(t.Context(), tc.req, nil)
		ae := wantCode(t, err, api.CodeInvalidArgument)
		if ae.Hint == "" && !strings.Contains(ae.Message, "size") && !strings.Contains(ae.Message, "script") {
			t.Errorf("%s: %v has no hint", tc.what, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: refused after %s, want at once", tc.what, d)
		}
	}
	assertNothingLeft(t, svc)
}

// A name that exists is refused before any work, with already_exists and
// a hint, and the existing image is untouched.
func TestBuildRefusesExistingName(t *testing.T) {
	svc := imagetest.NewService(t)
	f := newImportFixture(t)
	im, err := svc.Import(t.Context(), f.request("taken"), nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = svc.Build(t.Context(), api.ImageBuildRequest{Name: "taken"}, nil)
	ae := wantCode(t, err, api.CodeAlreadyExists)
	if !strings.Contains(ae.Hint, "banger image delete taken") || time.Since(start) > 2*time.Second {
		t.Errorf("%v after %s: want a delete hint at once", err, time.Since(start))
	}
	if _, err := svc.Import(t.Context(), f.request("taken"), nil); err == nil {
		t.Error("import over an existing name succeeded")
	} else {
		_ = wantCode(t, err, api.CodeAlreadyExists)
	}
	got, err := svc.Get(t.Context(), "taken")
	if err != nil || got.ID != im.ID {
		t.Errorf("existing image after refused build: %+v, %v", got, err)
	}
}

// Import copies the files in, extracts a vmlinux from a bzImage, records
// sizes and hashes, publishes progress on the bus, and Files gives the
// paths the VM service boots from.
func TestImport(t *testing.T) {
	svc := imagetest.NewService(t)
	bus := &events.Bus{}
	svc.Events = bus
	sub := bus.Subscribe(nil)
	defer sub.Close()
	f := newImportFixture(t)
	var steps []string
	im, err := svc.Import(t.Context(), f.request("imp"), func(e api.Event) {
		if e.Progress != nil && (len(steps) == 0 || steps[len(steps)-1] != e.Progress.Step) {
			steps = append(steps, e.Progress.Step)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"resolve", "copy", "fsck", "kernel", "register"}, steps); diff != "" {
		t.Errorf("progress steps (-want +got):\n%s", diff)
	}
	select {
	case e := <-sub.C:
		if e.Type != image.EventImport || e.Kind != "image" || e.Name != "imp" || e.Seq == 0 {
			t.Errorf("bus event %+v", e)
		}
	default:
		t.Error("no event on the bus")
	}
	if im.Source != image.SourceImport || im.Name != "imp" || len(im.Files) != 4 {
		t.Fatalf("image %+v", im)
	}
	for _, file := range im.Files {
		sum, size := sha256File(t, file.Path)
		if sum != file.SHA256 || size != file.Size || !strings.HasPrefix(file.Path, svc.Layout.ImageDir("imp")) {
			t.Errorf("file %+v: on disk %d bytes sha256 %s", file, size, sum)
		}
	}
	files, err := svc.Files(t.Context(), "imp")
	if err != nil {
		t.Fatal(err)
	}
	if files.KernelFormat != image.FormatBzImage || filepath.Base(files.Kernel) != "vmlinuz" || files.Initrd == "" {
		t.Errorf("files %+v", files)
	}
	if f, err := image.KernelFormat(files.Vmlinux); err != nil || f != image.FormatELF {
		t.Errorf("vmlinux: %q, %v", f, err)
	}
	if b, err := ext4.ReadFile(t.Context(), files.Rootfs, "/etc/hostname"); err != nil || string(b) != "imported\n" {
		t.Errorf("imported rootfs: %q, %v", b, err)
	}
	md, err := os.ReadFile(filepath.Join(svc.Layout.ImageDir("imp"), "metadata.json"))
	if err != nil || !bytes.Contains(md, []byte(`"source": "import"`)) {
		t.Errorf("metadata.json: %v\n%s", err, md)
	}
	ents, _ := os.ReadDir(stagingOf(svc))
	if len(ents) > 0 {
		t.Errorf("staging not empty after import: %v", ents)
	}

	// An ELF vmlinux imports as the kernel of both VMMs.
	elfKernel := filepath.Join(t.TempDir(), "vmlinux")
	if err := image.ExtractVmlinux(t.Context(), f.kernel, elfKernel); err != nil {
		t.Fatal(err)
	}
	req := f.request("imp-elf")
	req.Kernel, req.Initrd = elfKernel, ""
	if _, err := svc.Import(t.Context(), req, nil); err != nil {
		t.Fatal(err)
	}
	files, err = svc.Files(t.Context(), "imp-elf")
	if err != nil {
		t.Fatal(err)
	}
	if files.KernelFormat != image.FormatELF || files.Kernel != files.Vmlinux || files.Initrd != "" {
		t.Errorf("ELF import files %+v", files)
	}
}

// Bad imports are refused with invalid_argument and leave nothing behind.
func TestImportRefusesBadInput(t *testing.T) {
	svc := imagetest.NewService(t)
	f := newImportFixture(t)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel, err := os.ReadFile(f.kernel)
	if err != nil {
		t.Fatal(err)
	}
	rootfs, err := os.ReadFile(f.rootfs)
	if err != nil {
		t.Fatal(err)
	}
	notExt4 := write("zeros.img", make([]byte, 4<<20))
	truncatedKernel := write("vmlinuz-cut", kernel[:len(kernel)/2])
	truncatedRootfs := write("rootfs-cut.ext4", rootfs[:len(rootfs)/2])
	empty := write("empty", nil)
	notInitrd := write("initrd-text", []byte("hello, not an initramfs\n"))
	for _, tc := range []struct {
		what   string
		change func(*api.ImageImportRequest)
	}{
		{"invalid name", func(r *api.ImageImportRequest) { r.Name = "../x" }},
		{"missing rootfs", func(r *api.ImageImportRequest) { r.Rootfs = filepath.Join(dir, "nope") }},
		{"missing kernel", func(r *api.ImageImportRequest) { r.Kernel = filepath.Join(dir, "nope") }},
		{"missing initrd", func(r *api.ImageImportRequest) { r.Initrd = filepath.Join(dir, "nope") }},
		{"no rootfs", func(r *api.ImageImportRequest) { r.Rootfs = "" }},
		{"relative rootfs", func(r *api.ImageImportRequest) { r.Rootfs = "rootfs.ext4" }},
		{"unclean path", func(r *api.ImageImportRequest) { r.Rootfs = dir + "/../" + filepath.Base(dir) + "/zeros.img" }},
		{"directory as rootfs", func(r *api.ImageImportRequest) { r.Rootfs = dir }},
		{"non-ext4 rootfs", func(r *api.ImageImportRequest) { r.Rootfs = notExt4 }},
		{"truncated rootfs", func(r *api.ImageImportRequest) { r.Rootfs = truncatedRootfs }},
		{"truncated kernel", func(r *api.ImageImportRequest) { r.Kernel = truncatedKernel }},
		{"rootfs as kernel", func(r *api.ImageImportRequest) { r.Kernel = f.rootfs }},
		{"empty initrd", func(r *api.ImageImportRequest) { r.Initrd = empty }},
		{"text initrd", func(r *api.ImageImportRequest) { r.Initrd = notInitrd }},
	} {
		req := f.request("bad")
		tc.change(&req)
		_, err := svc.Import(t.Context(), req, nil)
		t.Logf("%s: %v", tc.what, err)
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeInvalidArgument {
			t.Errorf("%s: %v, want invalid_argument", tc.what, err)
		}
	}
	assertNothingLeft(t, svc)
}

// Delete refuses an image a VM uses, naming the VMs in a hint, and leaves
// it whole; once unused it goes completely.
func TestDeleteRefusedWhileUsed(t *testing.T) {
	svc := imagetest.NewService(t)
	f := newImportFixture(t)
	im, err := svc.Import(t.Context(), f.request("used"), nil)
	if err != nil {
		t.Fatal(err)
	}
	vm := store.VM{ID: "0123456789ab", Name: "dev", ImageID: im.ID, VMM: "qemu", CPUs: 1, MemoryBytes: 1 << 30, DiskBytes: 1 << 30, NetMode: "user", State: "stopped"}
	if err := svc.Store.InsertVM(t.Context(), vm); err != nil {
		t.Fatal(err)
	}
	err = svc.Delete(t.Context(), "used")
	ae := wantCode(t, err, api.CodeConflict)
	if want := `image "used" is used by VMs [dev] (hint: banger vm delete dev)`; ae.Error() != want {
		t.Errorf("error %q, want %q", ae.Error(), want)
	}
	if _, err := svc.Files(t.Context(), "used"); err != nil {
		t.Errorf("image damaged by a refused delete: %v", err)
	}
	if err := svc.Store.DeleteVM(t.Context(), vm.ID); err != nil {
		t.Fatal(err)
	}
	if err := svc.Delete(t.Context(), "used"); err != nil {
		t.Fatal(err)
	}
	_ = wantCode(t, svc.Delete(t.Context(), "used"), api.CodeNotFound)
	_, err = svc.Get(t.Context(), "used")
	_ = wantCode(t, err, api.CodeNotFound)
	assertNothingLeft(t, svc)
}

// Ensure returns an existing image and refuses a missing one other than
// the default with not_found and a hint.
func TestEnsure(t *testing.T) {
	svc := imagetest.NewService(t)
	f := newImportFixture(t)
	if _, err := svc.Import(t.Context(), f.request("mine"), nil); err != nil {
		t.Fatal(err)
	}
	if im, err := svc.Ensure(t.Context(), "mine", nil); err != nil || im.Name != "mine" {
		t.Errorf("Ensure(mine) = %+v, %v", im, err)
	}
	_, err := svc.Ensure(t.Context(), "other", nil)
	ae := wantCode(t, err, api.CodeNotFound)
	if !strings.Contains(ae.Hint, "banger image build other") {
		t.Errorf("hint %q", ae.Hint)
	}
}

// Reconcile removes leftover staging and orphan image directories, puts
// back an image a crashed delete had set aside, and reports images whose
// files are missing.
func TestReconcile(t *testing.T) {
	svc := imagetest.NewService(t)
	f := newImportFixture(t)
	for _, n := range []string{"keep", "aside", "broken"} {
		if _, err := svc.Import(t.Context(), f.request(n), nil); err != nil {
			t.Fatal(err)
		}
	}
	leftover := filepath.Join(stagingOf(svc), "dead.123")
	if err := os.MkdirAll(filepath.Join(leftover, "rootfs/etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "rootfs/etc/x"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	orphan := svc.Layout.ImageDir("orphan")
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(orphan, "rootfs.ext4"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A delete that crashed after setting the directory aside.
	if err := os.Rename(svc.Layout.ImageDir("aside"), filepath.Join(svc.Layout.ImagesDir(), ".deleting-aside.abcd")); err != nil {
		t.Fatal(err)
	}
	// A delete that crashed after removing the row.
	finished := filepath.Join(svc.Layout.ImagesDir(), ".deleting-gone.abcd")
	if err := os.MkdirAll(finished, 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.RemoveAll(svc.Layout.ImageDir("broken"))

	rep, err := svc.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := image.ReconcileReport{
		RemovedStaging: []string{leftover},
		RemovedOrphans: []string{finished, orphan},
		Restored:       []string{"aside"},
		Broken:         []string{"broken"},
	}
	slices.Sort(rep.RemovedOrphans)
	if diff := cmp.Diff(want, rep); diff != "" {
		t.Errorf("report (-want +got):\n%s", diff)
	}
	for _, p := range []string{leftover, orphan, finished} {
		if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there", p)
		}
	}
	for _, n := range []string{"keep", "aside"} {
		if _, err := svc.Files(t.Context(), n); err != nil {
			t.Errorf("%s after reconcile: %v", n, err)
		}
	}
	if _, err := svc.Files(t.Context(), "broken"); err == nil {
		t.Error("broken image reported whole")
	} else {
		_ = wantCode(t, err, api.CodeFailedPrecondition)
	}
}
