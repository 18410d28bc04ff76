package image_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
	"golang.org/x/sys/unix"
)

// recorder collects an operation's progress events.
type recorder struct {
	mu     sync.Mutex
	events []api.Event
	// onEvent, if set, sees each event as it arrives.
	onEvent func(api.Event)
}

func (r *recorder) progress(e api.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	f := r.onEvent
	r.mu.Unlock()
	if f != nil {
		f(e)
	}
}

func (r *recorder) messages() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, e := range r.events {
		if e.Message != "" {
			b.WriteString(e.Message + "\n")
		}
	}
	return b.String()
}

// buildProcesses lists the processes working under dir: their working
// directory or root is there (mmdebstrap, apt, chrooted dpkg and
// maintainer scripts), or their command line names it or the temporary
// directory of an unprivileged build (whose processes, running as
// subordinate ids, do not let the user read their cwd or root).
func buildProcesses(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		p := filepath.Join("/proc", e.Name())
		cmdline, _ := os.ReadFile(filepath.Join(p, "cmdline"))
		cwd, _ := os.Readlink(filepath.Join(p, "cwd"))
		root, _ := os.Readlink(filepath.Join(p, "root"))
		if strings.HasPrefix(cwd, dir) || strings.HasPrefix(root, dir) || strings.Contains(string(cmdline), dir) ||
			strings.Contains(string(cmdline), filepath.Join(os.TempDir(), "banger-mmdebstrap-")) {
			out = append(out, e.Name()+" "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return out
}

// A failing customize script aborts the build with its own output in the
// error and the progress stream; scripts before it ran with the documented
// environment and working DNS; nothing is registered, no staging and no
// process is left.
func TestBuildCustomizeScriptFails(t *testing.T) {
	testutil.SkipShort(t, "runs mmdebstrap")
	imagetest.RequireBuild(t)
	svc := imagetest.NewService(t)
	rec := &recorder{}
	_, err := svc.Build(t.Context(), api.ImageBuildRequest{
		Name: "failing",
		Customize: []api.Script{
			{Name: "ok.sh", Content: "#!/bin/sh\nset -e\necho \"env: $BANGER_IMAGE_NAME $BANGER_SUITE $BANGER_SCRIPT $BANGER_ROOTFS $(id -u) $PWD\"\n" +
				"case \" $BANGER_PACKAGES \" in *' openssh-server '*) echo packages-ok ;; esac\n" +
				"getent hosts deb.debian.org >/dev/null && echo dns-ok\n"},
			{Name: "fail.sh", Content: "echo about-to-fail\nls /no-such-banger-path\nexit 3\n"},
		},
	}, rec.progress)
	ae := wantCode(t, err, api.CodeInvalidArgument)
	t.Logf("failed as expected: %v", ae)
	for _, want := range []string{`customize script "fail.sh" (2/2) failed (exit status 3)`, "about-to-fail", "/no-such-banger-path"} {
		if !strings.Contains(ae.Message, want) {
			t.Errorf("error lacks %q:\n%s", want, ae.Message)
		}
	}
	if strings.Contains(ae.Message, "dns-ok") {
		t.Errorf("error carries the output of the script before the failing one:\n%s", ae.Message)
	}
	msgs := rec.messages()
	for _, want := range []string{"env: failing bookworm ok.sh / 0 /", "packages-ok", "dns-ok", "about-to-fail"} {
		if !strings.Contains(msgs, want) {
			t.Errorf("progress lacks %q:\n%s", want, msgs)
		}
	}
	last := rec.events[len(rec.events)-1]
	if last.Error == nil || last.Error.Code != api.CodeInvalidArgument || last.Type != image.EventBuild || last.Name != "failing" {
		t.Errorf("last event %+v, want the build's error", last)
	}
	assertNothingLeft(t, svc)
	if ps := buildProcesses(t, stagingOf(svc)); len(ps) > 0 {
		t.Errorf("processes left: %v", ps)
	}
}

// A package the suite does not have fails the build with invalid_argument
// naming it.
func TestBuildUnknownPackage(t *testing.T) {
	testutil.SkipShort(t, "runs mmdebstrap")
	imagetest.RequireBuild(t)
	svc := imagetest.NewService(t)
	_, err := svc.Build(t.Context(), api.ImageBuildRequest{Name: "nopkg", Packages: []string{"banger-no-such-package"}}, nil)
	ae := wantCode(t, err, api.CodeInvalidArgument)
	t.Logf("failed as expected: %v", ae)
	if !strings.Contains(ae.Message, "banger-no-such-package") {
		t.Errorf("error does not name the package:\n%s", ae.Message)
	}
	assertNothingLeft(t, svc)
}

// Canceling a build while mmdebstrap installs packages kills every process
// of the build (apt, dpkg, maintainer scripts), removes staging and
// registers nothing.
func TestBuildCanceled(t *testing.T) {
	testutil.SkipShort(t, "runs mmdebstrap")
	imagetest.RequireBuild(t)
	svc := imagetest.NewService(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	deep := make(chan struct{})
	var once sync.Once
	rec := &recorder{onEvent: func(e api.Event) {
		// Phase 4: dpkg installs the essential packages in the chroot.
		if e.Progress != nil && e.Progress.Step == image.StepMmdebstrap && e.Progress.Done >= 4 {
			once.Do(func() { close(deep) })
		}
	}}
	done := make(chan error, 1)
	go func() {
		_, err := svc.Build(ctx, api.ImageBuildRequest{Name: "canceled"}, rec.progress)
		done <- err
	}()
	select {
	case <-deep:
	case err := <-done:
		t.Fatalf("build ended before it was canceled: %v", err)
	case <-time.After(10 * time.Minute):
		t.Fatal("mmdebstrap did not reach the install phase in 10 minutes")
	}
	time.Sleep(2 * time.Second) // let dpkg get going
	if ps := buildProcesses(t, stagingOf(svc)); len(ps) == 0 {
		t.Fatal("no build process found while the build runs: the leak check below would prove nothing")
	}
	canceledAt := time.Now()
	cancel()
	var err error
	select {
	case err = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("build still running 2 minutes after cancel")
	}
	t.Logf("build returned %s after cancel", time.Since(canceledAt).Round(time.Millisecond))
	_ = wantCode(t, err, api.CodeCanceled)
	if ps := buildProcesses(t, stagingOf(svc)); len(ps) > 0 {
		t.Errorf("processes left after cancel: %v", ps)
	}
	assertNothingLeft(t, svc)
	// An unprivileged build's temporary tree belongs to subordinate ids;
	// it must be gone too.
	tmps, _ := filepath.Glob(filepath.Join(os.TempDir(), "banger-mmdebstrap-*"))
	for _, d := range tmps {
		if st, err := os.Stat(d); err == nil && st.Sys().(*syscall.Stat_t).Uid == uint32(os.Geteuid()) {
			t.Errorf("left behind: %s", d)
		}
	}
}

// Two builds of one name at once: one proceeds, the other is refused at
// once with conflict.
func TestBuildSameNameConcurrently(t *testing.T) {
	testutil.SkipShort(t, "runs mmdebstrap")
	imagetest.RequireBuild(t)
	svc := imagetest.NewService(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start := make(chan struct{})
	type result struct {
		err error
		at  time.Time
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			<-start
			_, err := svc.Build(ctx, api.ImageBuildRequest{Name: "same"}, nil)
			results <- result{err, time.Now()}
		}()
	}
	began := time.Now()
	close(start)
	first := <-results
	if d := first.at.Sub(began); d > 5*time.Second {
		t.Errorf("the refused build took %s", d)
	}
	_ = wantCode(t, first.err, api.CodeConflict)
	select {
	case r := <-results:
		t.Fatalf("the other build ended too: %v", r.err)
	case <-time.After(3 * time.Second):
	}
	cancel()
	second := <-results
	_ = wantCode(t, second.err, api.CodeCanceled)
	assertNothingLeft(t, svc)
}

// A build whose staging file system fills up fails with
// failed_precondition and leaves the file system as empty as it was.
func TestBuildDiskFull(t *testing.T) {
	testutil.SkipShort(t, "runs mmdebstrap")
	testutil.RequireRoot(t)
	imagetest.RequireBuild(t)
	svc := imagetest.NewService(t)
	// Enough for the tree and the downloaded packages, not for the tree
	// and the ext4 image together.
	small := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(small, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=700m,mode=0700", "banger-test", small).CombinedOutput(); err != nil {
		t.Skipf("mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", small).Run() })
	svc.StagingDir = small
	rec := &recorder{}
	_, err := svc.Build(t.Context(), api.ImageBuildRequest{Name: "full"}, rec.progress)
	ae := wantCode(t, err, api.CodeFailedPrecondition)
	if !strings.Contains(ae.Message, "no space left on device") {
		t.Errorf("error %q does not say the disk is full", ae.Message)
	}
	t.Logf("failed as expected: %.300s", ae.Message)
	assertNothingLeft(t, svc)
	var st unix.Statfs_t
	if err := unix.Statfs(small, &st); err != nil {
		t.Fatal(err)
	}
	if used := (st.Blocks - st.Bfree) * uint64(st.Bsize); used > 1<<20 {
		t.Errorf("staging file system holds %d bytes after the failed build", used)
	}
}
