package image

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/store"
	"golang.org/x/sys/unix"
)

// Build makes an image from a recipe: Debian through mmdebstrap, banger's
// base customization and the request's scripts, kernel and initrd from the
// new /boot, an ELF vmlinux extracted for Firecracker, and the tree made
// into an ext4 rootfs without mounting anything. Everything happens in a
// staging directory; the image appears under its name by one rename and is
// then registered. On any failure, cancellation included, nothing is
// registered and nothing is left in staging; every process the build
// started is gone when Build returns.
//
// As root, mmdebstrap runs in unshare mode without a user namespace (its
// own mount and PID namespaces: the chroot's /proc, /sys and /dev mounts
// die with it, wherever it is killed), and writes a directory with the
// right owners. Without root it needs subordinate ids (/etc/subuid,
// /etc/subgid) for its user namespace and writes a tarball, which is
// unpacked and whose owners are set in the image afterwards.
//
// Errors are *api.Error: invalid_argument for a bad request or a failing
// customize script (its output included), already_exists or conflict for
// a taken name, failed_precondition for what the host lacks (with the
// fix), unavailable for an unreachable mirror, canceled.
func (s *Service) Build(ctx context.Context, req api.ImageBuildRequest, progress ProgressFunc) (im api.Image, err error) {
	if err := ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	recipe, err := NewRecipe(req, s.Defaults)
	if err != nil {
		return api.Image{}, err
	}
	name := req.Name
	o := s.newOp(EventBuild, name, progress)
	defer func() {
		if err != nil {
			o.fail(err)
		}
	}()
	o.step(StepResolve, 0, 1, "")
	release, err := s.claim(name, "built")
	if err != nil {
		return api.Image{}, err
	}
	defer release()
	if err := s.checkNew(ctx, name); err != nil {
		return api.Image{}, err
	}
	host, err := s.buildHost()
	if err != nil {
		return api.Image{}, err
	}
	o.step(StepResolve, 1, 1, "")
	log := s.log().With("image", name)
	log.Info("building image", "suite", recipe.Suite, "mirror", recipe.Mirror, "recipe", recipe.Hash(), "unprivileged", host.unprivileged)
	start := time.Now()
	im, err = s.build(ctx, name, recipe, host, o, log)
	if err != nil {
		log.Warn("image build failed", "err", err, "after", time.Since(start).Round(time.Millisecond))
		return api.Image{}, buildError(ctx, name, err)
	}
	log.Info("built image", "took", time.Since(start).Round(time.Millisecond), "size", im.SizeBytes)
	return im, nil
}

// CheckBuildHost reports what this host lacks to build images (mmdebstrap;
// without root also user namespaces, newuidmap and subordinate ids), with
// the fix as the error's hint; nil when Build can run.
func (s *Service) CheckBuildHost() error {
	_, err := s.buildHost()
	return err
}

// buildHost is how this process runs mmdebstrap.
type buildHost struct {
	mmdebstrap   string
	unprivileged bool
}

// buildHost checks that the host can build and says how.
func (s *Service) buildHost() (buildHost, error) {
	bin := s.Mmdebstrap
	if bin == "" {
		bin = "mmdebstrap"
	}
	p, err := exec.LookPath(bin)
	if err != nil {
		return buildHost{}, api.Errorf(api.CodeFailedPrecondition, "building images needs mmdebstrap, which is not installed").
			WithHint("sudo apt-get install mmdebstrap, or banger image import an image made elsewhere")
	}
	h := buildHost{mmdebstrap: p, unprivileged: os.Geteuid() != 0}
	if h.unprivileged {
		if err := checkUnprivilegedBuild(); err != nil {
			return buildHost{}, err
		}
	}
	return h, nil
}

// checkUnprivilegedBuild explains, before any work, what mmdebstrap's
// unshare mode would fail on without root: user namespaces, newuidmap and
// newgidmap, and 65536 subordinate uids and gids for the user (mmdebstrap
// looks the user up by name).
func checkUnprivilegedBuild() error {
	u, err := user.Current()
	if err != nil {
		return fmt.Errorf("look up the current user: %w", err)
	}
	for _, f := range []string{"/proc/sys/kernel/unprivileged_userns_clone", "/proc/sys/user/max_user_namespaces"} {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == "0" {
			return api.Errorf(api.CodeFailedPrecondition, "building images without root needs user namespaces, which %s disables", f).
				WithHint("sudo sysctl -w " + strings.ReplaceAll(strings.TrimPrefix(f, "/proc/sys/"), "/", ".") + "=1 (persist it in /etc/sysctl.d), or build as root")
		}
	}
	for _, tool := range []string{"newuidmap", "newgidmap"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, serr := os.Stat("/usr/bin/" + tool); serr != nil {
				return api.Errorf(api.CodeFailedPrecondition, "building images without root needs %s, which is not installed", tool).
					WithHint("sudo apt-get install uidmap")
			}
		}
	}
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		n, err := subordinateIDs(f, u.Username)
		if err != nil || n < 65536 {
			why := fmt.Sprintf("has %d for %s", n, u.Username)
			if err != nil {
				why = err.Error()
			}
			return api.Errorf(api.CodeFailedPrecondition, "building images without root needs 65536 subordinate ids for user %q in %s (%s)", u.Username, f, why).
				WithHint(fmt.Sprintf("sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 %s (pick a range no other user has)", u.Username))
		}
	}
	return nil
}

// subordinateIDs returns how many ids /etc/subuid or /etc/subgid gives
// user (the first entry, as mmdebstrap reads it).
func subordinateIDs(file, user string) (int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(fields) == 3 && fields[0] == user {
			n, err := strconv.ParseInt(fields[2], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bad count %q", fields[2])
			}
			return n, nil
		}
	}
	return 0, sc.Err()
}

// staging is one operation's private directory under the staging root:
// out/ becomes the image directory; everything else is scratch.
type staging struct {
	s   *Service
	dir string
	out string
}

func (s *Service) newStaging(name string) (*staging, error) {
	root := s.stagingRoot()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create staging directory: %w", err)
	}
	dir, err := os.MkdirTemp(root, name+".")
	if err != nil {
		return nil, fmt.Errorf("create staging directory: %w", err)
	}
	st := &staging{s: s, dir: dir, out: filepath.Join(dir, "image")}
	if err := os.Mkdir(st.out, 0o755); err != nil {
		_ = os.Remove(dir)
		return nil, fmt.Errorf("create staging directory: %w", err)
	}
	s.mu.Lock()
	if s.staging == nil {
		s.staging = map[string]bool{}
	}
	s.staging[dir] = true
	s.mu.Unlock()
	return st, nil
}

// removeInBackground deletes the staging directory after the caller has
// returned. Reconcile leaves it alone meanwhile; Service.Wait waits for it.
func (st *staging) removeInBackground(log *slog.Logger) {
	st.s.background.Add(1)
	go func() {
		defer st.s.background.Done()
		if err := st.remove(); err != nil {
			log.Error("remove image staging directory", "err", err)
		}
	}()
}

// remove deletes the staging directory, whatever is left in it.
func (st *staging) remove() error {
	err := removeTree(st.dir)
	st.s.mu.Lock()
	delete(st.s.staging, st.dir)
	st.s.mu.Unlock()
	return err
}

// build does Build's work once the name is claimed.
func (s *Service) build(ctx context.Context, name string, recipe Recipe, host buildHost, o *op, log *slog.Logger) (_ api.Image, err error) {
	st, err := s.newStaging(name)
	if err != nil {
		return api.Image{}, err
	}
	defer func() {
		if err == nil {
			// What is left is the build's tree: deleting 400 MB in
			// thousands of files waits on the disk for seconds, and
			// nobody needs to wait for it.
			st.removeInBackground(log)
			return
		}
		if err := st.remove(); err != nil {
			log.Error("remove image staging directory", "err", err)
		}
	}()

	hooks, err := writeHookScripts(st.dir, recipe.Scripts)
	if err != nil {
		return api.Image{}, err
	}
	d := &debootstrap{bin: host.mmdebstrap, name: name, recipe: recipe, dir: st.dir, target: "rootfs", unprivileged: host.unprivileged}
	if host.unprivileged {
		d.target = "rootfs.tar"
		// The unshared root user must reach mmdebstrap's temporary tree,
		// and the staging root's parents are private: a directory of its
		// own under the system's temporary directory.
		tmp, err := os.MkdirTemp("", buildTmpPrefix)
		if err != nil {
			return api.Image{}, fmt.Errorf("create build directory: %w", err)
		}
		defer func() {
			if err := removeBuildTmp(context.WithoutCancel(ctx), host.mmdebstrap, tmp); err != nil {
				log.Error("remove mmdebstrap's temporary directory", "err", err)
			}
		}()
		if err := os.Chmod(tmp, 0o755); err != nil {
			return api.Image{}, fmt.Errorf("create build directory: %w", err)
		}
		d.tmpDir = tmp
	}
	cache := s.openPackageCache(recipe, filepath.Join(st.dir, "hooks", "cached-debs"), log)
	defer cache.close()
	d.cacheIn, d.cacheOut = cache.in, cache.out

	// mmdebstrap, with the customize hooks.
	o.step(StepMmdebstrap, 0, int64(len(mmdebstrapPhases)), "phases")
	step := StepMmdebstrap
	scriptsTotal := int64(len(hooks) + 2)
	var scriptsDone int64
	err = d.run(ctx, hooks, func(line string) {
		if p := phaseOf(line); p > 0 && step == StepMmdebstrap {
			o.step(StepMmdebstrap, int64(p), int64(len(mmdebstrapPhases)), "phases")
		}
		if strings.HasPrefix(line, markerStart) {
			step = StepCustomize
			o.step(StepCustomize, scriptsDone, scriptsTotal, "scripts")
			scriptsDone++
		}
		if strings.HasPrefix(line, "I: cleaning package lists") {
			step = StepMmdebstrap
		}
		o.line(step, line)
	})
	if err != nil {
		return api.Image{}, err
	}
	o.step(StepCustomize, scriptsTotal, scriptsTotal, "scripts")
	o.step(StepMmdebstrap, int64(len(mmdebstrapPhases)), int64(len(mmdebstrapPhases)), "phases")

	tree := filepath.Join(st.dir, "rootfs")
	var fixes []inodeFix
	if host.unprivileged {
		o.step(StepUnpack, 0, 1, "")
		if err := os.Mkdir(tree, 0o700); err != nil {
			return api.Image{}, fmt.Errorf("unpack root file system: %w", err)
		}
		tarball := filepath.Join(st.dir, d.target)
		if fixes, err = unpackRootfs(ctx, tarball, tree); err != nil {
			return api.Image{}, err
		}
		if err := os.Remove(tarball); err != nil {
			return api.Image{}, fmt.Errorf("unpack root file system: %w", err)
		}
		o.step(StepUnpack, 1, 1, "")
	}
	cache.commit(tree)

	// Kernel and initrd from the new /boot.
	o.step(StepKernel, 0, 2, "")
	kernel, initrd, release, err := findBootFiles(tree)
	if err != nil {
		return api.Image{}, err
	}
	if f, err := KernelFormat(kernel); err != nil {
		return api.Image{}, fmt.Errorf("kernel of the new image: %w", err)
	} else if f != FormatBzImage {
		return api.Image{}, fmt.Errorf("kernel %s of the new image is %s, want a bzImage", kernel, f)
	}
	if err := copyFile(ctx, kernel, filepath.Join(st.out, fileKernel)); err != nil {
		return api.Image{}, err
	}
	if err := copyFile(ctx, initrd, filepath.Join(st.out, fileInitrd)); err != nil {
		return api.Image{}, err
	}
	o.step(StepKernel, 1, 2, "")
	if err := ExtractVmlinux(ctx, filepath.Join(st.out, fileKernel), filepath.Join(st.out, fileVmlinux)); err != nil {
		return api.Image{}, err
	}
	o.step(StepKernel, 2, 2, "")

	// The ext4 rootfs.
	o.step(StepMkfs, 0, 1, "")
	need, err := ext4.SizeFor(ctx, tree)
	if err != nil {
		return api.Image{}, err
	}
	size := need
	if recipe.SizeBytes != 0 {
		if recipe.SizeBytes < need {
			return api.Image{}, api.Errorf(api.CodeInvalidArgument, "image size %s is too small for this image: its content needs %s (a quarter of it free)",
				api.FormatSize(recipe.SizeBytes), api.FormatSize(need)).
				WithHint("leave out --size, or give at least " + api.FormatSize(need))
		}
		size = recipe.SizeBytes
	}
	rootfs := filepath.Join(st.out, fileRootfs)
	if err := ext4.Make(ctx, tree, rootfs, size, ext4.MakeOptions{Label: "banger-root"}); err != nil {
		return api.Image{}, err
	}
	if len(fixes) > 0 {
		if err := applyFixes(ctx, rootfs, st.dir, fixes); err != nil {
			return api.Image{}, err
		}
	}
	// Like every image file; the images directory itself is private.
	if err := os.Chmod(rootfs, 0o644); err != nil {
		return api.Image{}, err
	}
	o.step(StepMkfs, 1, 1, "")
	o.step(StepFsck, 0, 1, "")
	if err := ext4.Fsck(ctx, rootfs); err != nil {
		return api.Image{}, err
	}
	o.step(StepFsck, 1, 1, "")

	return s.publish(ctx, st, Metadata{Name: name, Source: SourceBuild, Recipe: recipe.API(), KernelRelease: release}, o)
}

// publish hashes the files in st.out, writes metadata.json, moves the
// directory into place and registers the image. If registering fails the
// directory moves back into staging, which the caller removes.
func (s *Service) publish(ctx context.Context, st *staging, md Metadata, o *op) (api.Image, error) {
	o.step(StepRegister, 0, 1, "")
	files, err := describeFiles(ctx, st.out)
	if err != nil {
		return api.Image{}, err
	}
	md.Schema, md.ID, md.CreatedAt, md.Files = metadataSchema, newID(), time.Now().UTC().Truncate(time.Second), files
	var total int64
	for _, f := range files {
		total += f.Size
	}
	b, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return api.Image{}, fmt.Errorf("encode metadata: %w", err)
	}
	if err := writeFileSync(filepath.Join(st.out, fileMetadata), append(b, '\n'), 0o644); err != nil {
		return api.Image{}, fmt.Errorf("write metadata: %w", err)
	}
	if err := syncDir(st.out); err != nil {
		return api.Image{}, err
	}
	if err := ctx.Err(); err != nil {
		return api.Image{}, err
	}
	if err := os.MkdirAll(s.Layout.ImagesDir(), 0o700); err != nil {
		return api.Image{}, fmt.Errorf("create images directory: %w", err)
	}
	dst := s.Layout.ImageDir(md.Name)
	if err := renameNoReplaceDir(st.out, dst); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return api.Image{}, api.Errorf(api.CodeConflict, "image directory %s appeared during the build", dst)
		}
		if errors.Is(err, unix.EXDEV) {
			return api.Image{}, fmt.Errorf("move image into place: %w (the staging directory must be on the images' file system)", err)
		}
		return api.Image{}, fmt.Errorf("move image into place: %w", err)
	}
	if err := syncDir(s.Layout.ImagesDir()); err != nil {
		return api.Image{}, errors.Join(err, undoPublish(dst, st.out))
	}
	row := store.Image{ID: md.ID, Name: md.Name, Source: md.Source, SizeBytes: total, Metadata: b, CreatedAt: md.CreatedAt}
	if err := s.Store.InsertImage(ctx, row); err != nil {
		if uerr := undoPublish(dst, st.out); uerr != nil {
			err = errors.Join(err, uerr)
		}
		if errors.Is(err, store.ErrExists) {
			return api.Image{}, api.Errorf(api.CodeAlreadyExists, "image %q already exists", md.Name).
				WithHint("banger image delete " + md.Name + ", or choose another name")
		}
		return api.Image{}, fmt.Errorf("register image %q: %w", md.Name, err)
	}
	o.step(StepRegister, 1, 1, "")
	return s.toAPI(row)
}

// undoPublish moves a published directory back into staging.
func undoPublish(dst, out string) error {
	if err := os.Rename(dst, out); err != nil {
		return fmt.Errorf("move %s back to staging: %w", dst, err)
	}
	return nil
}

// findBootFiles picks the newest kernel in tree/boot and its initrd.
func findBootFiles(tree string) (kernel, initrd, release string, err error) {
	boot := filepath.Join(tree, "boot")
	ents, err := os.ReadDir(boot)
	if err != nil {
		return "", "", "", fmt.Errorf("find the kernel in the new image: %w", err)
	}
	for _, e := range ents {
		rel, ok := strings.CutPrefix(e.Name(), "vmlinuz-")
		if !ok || rel == "" || !e.Type().IsRegular() {
			continue
		}
		if release == "" || compareRelease(rel, release) > 0 {
			release = rel
		}
	}
	if release == "" {
		return "", "", "", errors.New("find the kernel in the new image: no /boot/vmlinuz-* (is linux-image-cloud-amd64 installed?)")
	}
	kernel = filepath.Join(boot, "vmlinuz-"+release)
	initrd = filepath.Join(boot, "initrd.img-"+release)
	if st, err := os.Stat(initrd); err != nil || st.Size() == 0 {
		return "", "", "", fmt.Errorf("find the initrd of kernel %s in the new image: /boot/initrd.img-%s is missing or empty (is initramfs-tools installed?)", release, release)
	}
	return kernel, initrd, release, nil
}

// compareRelease orders kernel releases ("6.1.0-9-cloud-amd64" before
// "6.1.0-28-cloud-amd64") by comparing runs of digits as numbers and the
// rest as text.
func compareRelease(a, b string) int {
	for a != "" && b != "" {
		da, db := isDigit(a[0]), isDigit(b[0])
		if da != db {
			if da {
				return 1
			}
			return -1
		}
		ra, rb := leadingRun(a, da), leadingRun(b, db)
		if da {
			na, nb := strings.TrimLeft(ra, "0"), strings.TrimLeft(rb, "0")
			if len(na) != len(nb) {
				return cmpInt(len(na), len(nb))
			}
			if na != nb {
				return strings.Compare(na, nb)
			}
		} else if ra != rb {
			return strings.Compare(ra, rb)
		}
		a, b = a[len(ra):], b[len(rb):]
	}
	return cmpInt(len(a), len(b))
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func leadingRun(s string, digits bool) string {
	i := 0
	for i < len(s) && isDigit(s[i]) == digits {
		i++
	}
	return s[:i]
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// copyFile copies a regular file (the kernel sources are in the same
// staging file system, so copy_file_range does the work).
func copyFile(ctx context.Context, src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("copy %s: %w", src, cerr)
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	if _, err := io.Copy(out, ctxReader{ctx: ctx, r: in}); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}

// buildError turns a build failure into the user-facing error.
func buildError(ctx context.Context, name string, err error) error {
	what := fmt.Sprintf("build image %q", name)
	var ae *api.Error
	switch {
	case ctx.Err() != nil:
		return canceled(what, ctx.Err())
	case errors.As(err, &ae):
		return ae
	}
	msg := err.Error()
	// A full disk explains any failure it causes, a script's included.
	if strings.Contains(strings.ToLower(msg), "no space left on device") || errors.Is(err, unix.ENOSPC) {
		return api.Errorf(api.CodeFailedPrecondition, "%s: no space left on device: %s", what, msg).
			WithHint("free space on the file system holding banger's images, or build with a smaller --size")
	}
	var re *runError
	if errors.As(err, &re) {
		out := strings.Join(re.lines, "\n")
		switch {
		case strings.HasPrefix(re.script, "customize script"):
			return api.Errorf(api.CodeInvalidArgument, "%s: %s", what, msg).
				WithHint("fix the script; the lines above are the end of its output")
		case strings.Contains(out, "Unable to locate package") || strings.Contains(out, "has no installation candidate"):
			return api.Errorf(api.CodeInvalidArgument, "%s: a package is not in the suite: %s", what, msg).
				WithHint("check the package names and --suite (apt-cache policy NAME)")
		case strings.Contains(out, "Temporary failure resolving") || strings.Contains(out, "Could not resolve") ||
			strings.Contains(out, "Failed to fetch") || strings.Contains(out, "Could not connect"):
			return api.Errorf(api.CodeUnavailable, "%s: the mirror is unreachable: %s", what, msg).
				WithHint("check the network and --mirror")
		case strings.Contains(out, "does not have a Release file") || strings.Contains(out, "no Release file"):
			return api.Errorf(api.CodeInvalidArgument, "%s: the mirror has no suite of that name: %s", what, msg).
				WithHint("check --suite and --mirror")
		}
	}
	return api.Errorf(api.CodeInternal, "%s: %s", what, msg)
}

// buildTmpPrefix names the temporary directories unprivileged builds give
// mmdebstrap.
const buildTmpPrefix = "banger-mmdebstrap-"

// removeBuildTmp removes an unprivileged build's temporary directory.
// What mmdebstrap left there after being killed belongs to subordinate
// ids: it is deleted from inside a user namespace of the same mapping.
func removeBuildTmp(ctx context.Context, mmdebstrap, dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if err := os.RemoveAll(p); err == nil {
			continue
		}
		mounts, err := mountsUnder(p)
		if err != nil || len(mounts) > 0 {
			return fmt.Errorf("remove %s: refusing, file systems are mounted below it: %v", p, mounts)
		}
		cmd := exec.CommandContext(ctx, mmdebstrap, "--unshare-helper", "find", p, "-mount", "-mindepth", "1", "-delete")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("remove %s in a user namespace: %w: %s", p, err, strings.TrimSpace(string(out)))
		}
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	return os.Remove(dir)
}

// cleanStaleBuildTmp removes temporary directories of unprivileged builds
// that a crash left behind.
func cleanStaleBuildTmp(ctx context.Context, log *slog.Logger) {
	if os.Geteuid() == 0 {
		return // root builds make none
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), buildTmpPrefix+"*"))
	bin, err := exec.LookPath("mmdebstrap")
	if err != nil {
		return
	}
	for _, d := range dirs {
		var st unix.Stat_t
		if unix.Lstat(d, &st) != nil || int(st.Uid) != os.Geteuid() || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		if err := removeBuildTmp(ctx, bin, d); err != nil {
			log.Warn("remove leftover mmdebstrap directory", "path", d, "err", err)
		} else {
			log.Info("removed leftover mmdebstrap directory", "path", d)
		}
	}
}

// packageCache is the .deb cache of one suite and mirror, held for one
// build: mmdebstrap seeds apt's archive directory from in, and copies the
// packages it had to download to out, which commit merges into in.
type packageCache struct {
	in, out string
	lock    *os.File
	log     *slog.Logger
}

// openPackageCache locks the recipe's package cache and writes the names
// of the .deb files it holds to list, for the hook that picks the new
// ones. A cache another build holds, or one that cannot be opened, is
// simply not used.
func (s *Service) openPackageCache(r Recipe, list string, log *slog.Logger) *packageCache {
	base := s.PackageCache
	if base == "off" {
		return &packageCache{}
	}
	if base == "" {
		base = filepath.Join(s.Layout.CacheDir(), "debs")
	}
	dir := PackageCacheDir(base, r)
	unusable := func(err error) *packageCache {
		log.Warn("package cache unusable", "dir", dir, "err", err)
		return &packageCache{}
	}
	in := filepath.Join(dir, "debs")
	if err := os.MkdirAll(in, 0o700); err != nil {
		return unusable(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return unusable(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		log.Info("package cache busy with another build; downloading everything", "dir", dir)
		return &packageCache{}
	}
	out := filepath.Join(dir, "debs.new")
	ents, err := os.ReadDir(in)
	if err == nil {
		err = os.RemoveAll(out)
	}
	if err == nil {
		var names strings.Builder
		for _, e := range ents {
			names.WriteString(e.Name() + "\n")
		}
		err = os.WriteFile(list, []byte(names.String()), 0o600)
	}
	if err != nil {
		f.Close()
		return unusable(err)
	}
	return &packageCache{in: in, out: out, lock: f, log: log}
}

// PackageCacheDir is the directory under root holding the package cache of
// r's suite and mirror; its debs/ subdirectory holds the .deb files.
func PackageCacheDir(root string, r Recipe) string {
	sum := sha256.Sum256([]byte(r.Mirror))
	return filepath.Join(root, r.Suite+"-"+hex.EncodeToString(sum[:6]))
}

// commit adds the build's new packages to the cache and drops every file
// that is not a package installed in tree, as apt names their files
// (superseded versions), so the cache never outgrows one image's packages.
func (c *packageCache) commit(tree string) {
	if c.lock == nil {
		return
	}
	keep, err := installedDebs(filepath.Join(tree, "var/lib/dpkg/status"))
	if err != nil {
		c.log.Warn("package cache not updated", "err", err)
		return
	}
	if err := mergeCache(c.in, c.out, keep); err != nil {
		c.log.Warn("package cache not updated", "err", err)
	}
}

// mergeCache moves out's files into in and removes the files of in that
// keep does not name.
func mergeCache(in, out string, keep map[string]bool) error {
	ents, err := os.ReadDir(out)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, e := range ents {
		if keep[e.Name()] {
			if err := os.Rename(filepath.Join(out, e.Name()), filepath.Join(in, e.Name())); err != nil {
				return err
			}
		}
	}
	ents, err = os.ReadDir(in)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !keep[e.Name()] {
			if err := os.RemoveAll(filepath.Join(in, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

func (c *packageCache) close() {
	if c.lock == nil {
		return
	}
	_ = os.RemoveAll(c.out)
	c.lock.Close()
}

// installedDebs reads a dpkg status file and returns the file names apt
// gives the installed packages' .deb files (name_version_arch.deb, the
// epoch's colon written %3a).
func installedDebs(status string) (map[string]bool, error) {
	b, err := os.ReadFile(status)
	if err != nil {
		return nil, err
	}
	keep := map[string]bool{}
	for _, stanza := range strings.Split(string(b), "\n\n") {
		var pkg, ver, arch, state string
		for _, l := range strings.Split(stanza, "\n") {
			k, v, ok := strings.Cut(l, ": ")
			if !ok {
				continue
			}
			switch k {
			case "Package":
				pkg = v
			case "Version":
				ver = v
			case "Architecture":
				arch = v
			case "Status":
				state = v
			}
		}
		if pkg != "" && ver != "" && arch != "" && strings.HasSuffix(state, " installed") {
			keep[pkg+"_"+strings.ReplaceAll(ver, ":", "%3a")+"_"+arch+".deb"] = true
		}
	}
	return keep, nil
}
