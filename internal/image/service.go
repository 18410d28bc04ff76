package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/events"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
)

// DefaultImageName is the image VMs use unless told otherwise; Ensure
// builds it with the default recipe on first use.
const DefaultImageName = "default"

// Service is the image store: build, import, list, delete, and the paths
// the VM service boots from. The exported fields are set once before use;
// the zero values of the optional ones are fine.
type Service struct {
	Store    *store.Store
	Layout   paths.Layout
	Defaults config.Image
	// Events, if set, receives image.build and image.import progress.
	Events *events.Bus
	Log    *slog.Logger

	// StagingDir overrides Layout.ImageStagingDir(). It must be on the
	// file system of Layout.ImagesDir(): images move into place by rename.
	StagingDir string
	// PackageCache overrides where downloaded .deb files are kept between
	// builds (Layout.CacheDir()/debs); "off" disables the cache.
	PackageCache string
	// Mmdebstrap overrides the mmdebstrap binary (default: from PATH).
	Mmdebstrap string

	mu sync.Mutex // guards busy and staging
	// busy holds the names being built, imported or deleted.
	busy map[string]busyOp
	// staging holds the staging directories of operations in flight, which
	// Reconcile must leave alone.
	staging map[string]bool
	// background counts staging directories being deleted after their
	// operation returned.
	background sync.WaitGroup
}

// Wait blocks until the clean-up that finished builds leave running in the
// background is done. bangerd calls it before exiting; a clean-up cut
// short is finished by the next start's Reconcile.
func (s *Service) Wait() {
	s.background.Wait()
}

// ProgressFunc receives an operation's progress events as they happen (an
// alias, so that other packages can declare the same func type). It
// is called from the operation's goroutine and must not block for long.
type ProgressFunc = func(api.Event)

// Event types published for long operations.
const (
	EventBuild  = "image.build"
	EventImport = "image.import"
)

// Build and import steps, in order, as Progress.Step.
const (
	StepResolve    = "resolve"
	StepMmdebstrap = "mmdebstrap"
	StepCustomize  = "customize"
	StepUnpack     = "unpack"
	StepCopy       = "copy"
	StepKernel     = "kernel"
	StepMkfs       = "mkfs"
	StepFsck       = "fsck"
	StepRegister   = "register"
)

var nameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidateName checks an image name: a DNS label (lowercase letters,
// digits and '-', 1 to 63 characters, not starting or ending with '-'),
// so that it is a safe directory name and reads well in commands.
func ValidateName(name string) error {
	if !nameRe.MatchString(name) {
		return api.Errorf(api.CodeInvalidArgument, "image name %q is not valid", name).
			WithHint("use 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'")
	}
	return nil
}

func (s *Service) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

func (s *Service) stagingRoot() string {
	if s.StagingDir != "" {
		return s.StagingDir
	}
	return s.Layout.ImageStagingDir()
}

// busyOp is an operation in flight on an image name.
type busyOp struct {
	what string        // "built", "imported", "deleted"
	done chan struct{} // closed when it ends
}

// claim marks name busy for the caller's operation (what: "built",
// "imported", "deleted"), or fails at once with conflict when another
// operation holds it. release must be called.
func (s *Service) claim(name, what string) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy == nil {
		s.busy = map[string]busyOp{}
	}
	if b, ok := s.busy[name]; ok {
		return nil, api.Errorf(api.CodeConflict, "image %q is being %s by another request", name, b.what).
			WithHint("wait for it to finish")
	}
	b := busyOp{what: what, done: make(chan struct{})}
	s.busy[name] = b
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.busy, name)
		close(b.done)
	}, nil
}

// busyChan returns the done channel of an operation on name in flight, or
// nil.
func (s *Service) busyChan(name string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.busy[name]; ok {
		return b.done
	}
	return nil
}

// checkNew refuses a name that is registered or whose directory exists.
// The caller holds the name's claim.
func (s *Service) checkNew(ctx context.Context, name string) error {
	_, err := s.Store.GetImage(ctx, name)
	switch {
	case err == nil:
		return api.Errorf(api.CodeAlreadyExists, "image %q already exists", name).
			WithHint("banger image delete " + name + ", or choose another name")
	case !errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("look up image %q: %w", name, err)
	}
	if _, err := os.Lstat(s.Layout.ImageDir(name)); err == nil {
		return api.Errorf(api.CodeConflict, "image directory %s exists but no image %q is registered", s.Layout.ImageDir(name), name).
			WithHint("restart bangerd, which removes such leftovers, or remove the directory")
	}
	return nil
}

// List returns every image.
func (s *Service) List(ctx context.Context) ([]api.Image, error) {
	rows, err := s.Store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(rows))
	for _, r := range rows {
		im, err := s.toAPI(r)
		if err != nil {
			return nil, err
		}
		out = append(out, im)
	}
	return out, nil
}

// Get returns the image called name.
func (s *Service) Get(ctx context.Context, name string) (api.Image, error) {
	if err := ValidateName(name); err != nil {
		return api.Image{}, err
	}
	r, err := s.Store.GetImage(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return api.Image{}, notFound(name)
	}
	if err != nil {
		return api.Image{}, fmt.Errorf("get image %q: %w", name, err)
	}
	return s.toAPI(r)
}

func notFound(name string) *api.Error {
	hint := "banger image list shows the images; banger image build " + name + " makes one"
	return api.Errorf(api.CodeNotFound, "image %q not found", name).WithHint(hint)
}

// toAPI turns a row into the API's image, with absolute file paths.
func (s *Service) toAPI(r store.Image) (api.Image, error) {
	md, err := decodeMetadata(r)
	if err != nil {
		return api.Image{}, err
	}
	files := make([]api.ImageFile, len(md.Files))
	for i, f := range md.Files {
		f.Path = filepath.Join(s.Layout.ImageDir(r.Name), f.Path)
		files[i] = f
	}
	return api.Image{
		ID: r.ID, Name: r.Name, Source: r.Source, CreatedAt: r.CreatedAt,
		SizeBytes: r.SizeBytes, Files: files, Recipe: md.Recipe,
	}, nil
}

// Files returns the absolute paths the VM service boots name from, after
// checking they are there.
func (s *Service) Files(ctx context.Context, name string) (ImageFiles, error) {
	if err := ValidateName(name); err != nil {
		return ImageFiles{}, err
	}
	r, err := s.Store.GetImage(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return ImageFiles{}, notFound(name)
	}
	if err != nil {
		return ImageFiles{}, fmt.Errorf("get image %q: %w", name, err)
	}
	md, err := decodeMetadata(r)
	if err != nil {
		return ImageFiles{}, err
	}
	dir := s.Layout.ImageDir(name)
	out := ImageFiles{Dir: dir}
	for _, f := range md.Files {
		p := filepath.Join(dir, f.Path)
		switch f.Role {
		case RoleKernel:
			out.Kernel, out.KernelFormat = p, FormatBzImage
		case RoleVmlinux:
			out.Vmlinux = p
		case RoleInitrd:
			out.Initrd = p
		case RoleRootfs:
			out.Rootfs = p
		}
	}
	if out.Kernel == "" {
		out.Kernel, out.KernelFormat = out.Vmlinux, FormatELF
	}
	broken := func(why string) error {
		return api.Errorf(api.CodeFailedPrecondition, "image %q is broken: %s", name, why).
			WithHint("banger image delete " + name + " and build or import it again")
	}
	if out.Vmlinux == "" || out.Rootfs == "" {
		return ImageFiles{}, broken("its metadata lacks a kernel or a rootfs")
	}
	for _, p := range []string{out.Kernel, out.Vmlinux, out.Initrd, out.Rootfs} {
		if p == "" {
			continue
		}
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return ImageFiles{}, broken(fmt.Sprintf("%s is missing", p))
		}
	}
	return out, nil
}

// Ensure returns the image called name. The default image is built with
// the default recipe on first use (progress goes to progress); another
// missing name is not_found. If the image is being built right now, Ensure
// waits for that build rather than failing.
func (s *Service) Ensure(ctx context.Context, name string, progress ProgressFunc) (api.Image, error) {
	for {
		im, err := s.Get(ctx, name)
		var ae *api.Error
		if err == nil || !errors.As(err, &ae) || ae.Code != api.CodeNotFound {
			return im, err
		}
		if done := s.busyChan(name); done != nil {
			select {
			case <-done:
				continue
			case <-ctx.Done():
				return api.Image{}, canceled("wait for image "+name, ctx.Err())
			}
		}
		if name != DefaultImageName {
			return api.Image{}, ae
		}
		im, err = s.Build(ctx, api.ImageBuildRequest{Name: name}, progress)
		if errors.As(err, &ae) && ae.Code == api.CodeConflict && s.busyChan(name) != nil {
			continue // another request started the same build first
		}
		return im, err
	}
}

// Delete removes an image unless a VM uses it. The directory is renamed
// aside first and the row deleted second, so a crash in between leaves
// either the whole image or nothing visible (Reconcile finishes the job).
func (s *Service) Delete(ctx context.Context, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	release, err := s.claim(name, "deleted")
	if err != nil {
		return err
	}
	defer release()
	if _, err := s.Store.GetImage(ctx, name); errors.Is(err, store.ErrNotFound) {
		return notFound(name)
	} else if err != nil {
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	if err := os.MkdirAll(s.Layout.ImagesDir(), 0o700); err != nil {
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	dir := s.Layout.ImageDir(name)
	aside := filepath.Join(s.Layout.ImagesDir(), deletingPrefix+name+"."+randomSuffix())
	moved := true
	if err := os.Rename(dir, aside); errors.Is(err, fs.ErrNotExist) {
		moved = false // a broken image: only its row is left
	} else if err != nil {
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	if err := s.Store.DeleteImage(ctx, name); err != nil {
		if moved {
			if rerr := os.Rename(aside, dir); rerr != nil {
				err = errors.Join(err, fmt.Errorf("put back %s: %w", dir, rerr))
			}
		}
		var inUse *store.InUseError
		if errors.As(err, &inUse) {
			return api.Errorf(api.CodeConflict, "image %q is used by VMs %v", name, inUse.By).
				WithHint("banger vm delete " + strings.Join(inUse.By, " "))
		}
		if errors.Is(err, store.ErrNotFound) {
			return notFound(name)
		}
		return fmt.Errorf("delete image %q: %w", name, err)
	}
	s.log().Info("deleted image", "image", name)
	if moved {
		if err := removeTree(aside); err != nil {
			// The image is gone for every caller; Reconcile retries.
			s.log().Warn("remove deleted image's files", "image", name, "err", err)
		}
	}
	return nil
}

// deletingPrefix names an image directory set aside by Delete.
const deletingPrefix = ".deleting-"

// ReconcileReport says what Reconcile found and did.
type ReconcileReport struct {
	// RemovedStaging are leftover staging directories removed.
	RemovedStaging []string
	// RemovedOrphans are image directories without a registered image,
	// and directories of finished deletes, removed.
	RemovedOrphans []string
	// Restored are images whose directory a crashed delete had set aside
	// while their row survived; they are back in place.
	Restored []string
	// Broken are registered images whose files are missing.
	Broken []string
}

// Reconcile repairs the image store after a crash: it removes staging
// directories of builds and imports that did not finish, image directories
// no row refers to, and directories of interrupted deletes, and reports
// rows whose files are missing. bangerd runs it on start-up; operations in
// flight in this process are left alone.
func (s *Service) Reconcile(ctx context.Context) (ReconcileReport, error) {
	var rep ReconcileReport
	var errs []error
	s.mu.Lock()
	active := map[string]bool{}
	for d := range s.staging {
		active[d] = true
	}
	busy := map[string]bool{}
	for n := range s.busy {
		busy[n] = true
	}
	s.mu.Unlock()

	stagingRoot := s.stagingRoot()
	ents, err := os.ReadDir(stagingRoot)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read %s: %w", stagingRoot, err))
	}
	for _, e := range ents {
		p := filepath.Join(stagingRoot, e.Name())
		if active[p] {
			continue
		}
		if err := removeTree(p); err != nil {
			errs = append(errs, err)
			continue
		}
		rep.RemovedStaging = append(rep.RemovedStaging, p)
	}
	cleanStaleBuildTmp(ctx, s.log())

	rows, err := s.Store.ListImages(ctx)
	if err != nil {
		return rep, fmt.Errorf("reconcile images: %w", err)
	}
	registered := map[string]bool{}
	for _, r := range rows {
		registered[r.Name] = true
	}
	imagesDir := s.Layout.ImagesDir()
	ents, err = os.ReadDir(imagesDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read %s: %w", imagesDir, err))
	}
	for _, e := range ents {
		p := filepath.Join(imagesDir, e.Name())
		if rest, ok := strings.CutPrefix(e.Name(), deletingPrefix); ok {
			name := rest[:max(0, strings.LastIndexByte(rest, '.'))]
			if registered[name] && !busy[name] {
				if _, err := os.Lstat(s.Layout.ImageDir(name)); errors.Is(err, fs.ErrNotExist) {
					if err := os.Rename(p, s.Layout.ImageDir(name)); err != nil {
						errs = append(errs, fmt.Errorf("restore image %q: %w", name, err))
					} else {
						rep.Restored = append(rep.Restored, name)
					}
					continue
				}
			}
			if busy[name] {
				continue
			}
		} else if registered[e.Name()] || busy[e.Name()] {
			continue
		}
		if err := removeTree(p); err != nil {
			errs = append(errs, err)
			continue
		}
		rep.RemovedOrphans = append(rep.RemovedOrphans, p)
	}
	for _, r := range rows {
		if busy[r.Name] {
			continue
		}
		if _, err := s.Files(ctx, r.Name); err != nil {
			rep.Broken = append(rep.Broken, r.Name)
			s.log().Warn("image is broken", "image", r.Name, "err", err)
		}
	}
	for _, p := range rep.RemovedStaging {
		s.log().Info("removed leftover image staging directory", "path", p)
	}
	for _, p := range rep.RemovedOrphans {
		s.log().Info("removed image directory without a registered image", "path", p)
	}
	for _, n := range rep.Restored {
		s.log().Info("restored image set aside by an interrupted delete", "image", n)
	}
	slices.Sort(rep.Broken)
	return rep, errors.Join(errs...)
}

// canceled is the user-facing error of a canceled operation.
func canceled(what string, cause error) error {
	e := api.Errorf(api.CodeCanceled, "%s: canceled", what)
	if errors.Is(cause, context.DeadlineExceeded) {
		e = api.Errorf(api.CodeTimeout, "%s: timed out", what)
	}
	return e
}

// op publishes one long operation's progress.
type op struct {
	s        *Service
	typ      string
	name     string
	progress ProgressFunc

	mu      sync.Mutex // guards the rate limiter
	tokens  float64
	last    time.Time
	dropped int
}

// Message lines are rate limited to lineRate per second with bursts of
// lineBurst: a build prints thousands of lines when apt is verbose.
const (
	lineRate  = 20
	lineBurst = 60
)

func (s *Service) newOp(typ, name string, progress ProgressFunc) *op {
	return &op{s: s, typ: typ, name: name, progress: progress, tokens: lineBurst, last: time.Now()}
}

func (o *op) emit(e api.Event) {
	e.Type, e.Kind, e.Name = o.typ, "image", o.name
	if o.s.Events != nil {
		e = o.s.Events.Publish(e)
	} else if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	if o.progress != nil {
		o.progress(e)
	}
}

// step reports progress of a step; total 0 means unknown.
func (o *op) step(step string, done, total int64, unit string) {
	o.emit(api.Event{Progress: &api.Progress{Step: step, Done: done, Total: total, Unit: unit}})
}

// line reports one output line of a step, subject to the rate limit.
func (o *op) line(step, msg string) {
	o.s.log().Debug("image "+o.typ, "image", o.name, "step", step, "line", msg)
	o.mu.Lock()
	now := time.Now()
	o.tokens = min(lineBurst, o.tokens+now.Sub(o.last).Seconds()*lineRate)
	o.last = now
	if o.tokens < 1 {
		o.dropped++
		o.mu.Unlock()
		return
	}
	o.tokens--
	dropped := o.dropped
	o.dropped = 0
	o.mu.Unlock()
	if dropped > 0 {
		msg = fmt.Sprintf("(%d lines not shown) %s", dropped, msg)
	}
	o.emit(api.Event{Message: msg, Progress: &api.Progress{Step: step}})
}

// fail reports the operation's error as its last event.
func (o *op) fail(err error) {
	o.emit(api.Event{Error: asAPIError(err)})
}

// asAPIError gives err the shape of an API error: itself when it is one,
// else internal.
func asAPIError(err error) *api.Error {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae
	}
	return &api.Error{Code: api.CodeInternal, Message: err.Error()}
}
