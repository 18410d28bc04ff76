package vm

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
)

// The whole life of a VM on a real QEMU guest: create and wait for SSH with
// the pinned key, run a command, write a file, stop, start, the file is
// still there, delete, and then nothing of the VM remains.
func TestLifecycle(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.create(t, "life")
	if v.State != api.VMRunning || v.Network.SSHPort == 0 {
		t.Fatalf("after create: %+v", v)
	}
	if out := e.run(t, "life", "uname -s; hostname"); out != "Linux\nlife\n" {
		t.Fatalf("uname/hostname = %q", out)
	}
	e.run(t, "life", "echo persisted > /root/marker && sync")

	row, _ := e.svc.Store.GetVM(ctx, "life")
	rt, _ := decodeRuntime(row.Runtime)
	pid := rt.Handle.PID

	if v, err := e.svc.Stop(ctx, "life", false, 0); err != nil || v.State != api.VMStopped {
		t.Fatalf("stop: %+v, %v", v, err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		if st, _ := vmm.ProcStartTime(pid); st == rt.Handle.StartTime {
			t.Fatalf("VMM %d still runs after stop", pid)
		}
	}
	if rs, _ := e.svc.Store.ListResources(ctx, v.ID); hasKind(rs, resProcess) || hasKind(rs, resPort) {
		t.Fatalf("runtime resources kept after stop: %+v", rs)
	}
	if _, err := e.svc.Start(ctx, "life", false, nil); err != nil {
		t.Fatalf("start: %v", err)
	}
	if out := e.run(t, "life", "cat /root/marker"); out != "persisted\n" {
		t.Fatalf("marker after restart = %q", out)
	}
	row, _ = e.svc.Store.GetVM(ctx, "life")
	rt, _ = decodeRuntime(row.Runtime)
	if err := e.svc.Delete(ctx, "life", false); err == nil {
		t.Fatal("delete of a running VM without force succeeded")
	}
	if err := e.svc.Delete(ctx, "life", true); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if left := e.leftovers(t, v.ID, rt.Handle.PID); len(left) > 0 {
		t.Fatalf("after delete, left behind: %v", left)
	}
	if kh, _ := os.ReadFile(e.svc.Layout.KnownHosts()); strings.Contains(string(kh), "life.banger") {
		t.Fatal("known_hosts still pins the deleted VM")
	}
}

func hasKind(rs []store.Resource, kind string) bool {
	for _, r := range rs {
		if r.Kind == kind {
			return true
		}
	}
	return false
}

// Two VMs run at once and each reaches only its own disk.
func TestTwoVMsOwnDisks(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	for _, n := range []string{"alpha", "beta"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.create(t, n)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	e.run(t, "alpha", "echo alpha > /root/who && sync")
	e.run(t, "beta", "echo beta > /root/who && sync")
	if got := e.run(t, "alpha", "cat /root/who"); got != "alpha\n" {
		t.Fatalf("alpha sees %q", got)
	}
	if got := e.run(t, "beta", "cat /root/who"); got != "beta\n" {
		t.Fatalf("beta sees %q", got)
	}
	a, _ := e.svc.Store.GetVM(context.Background(), "alpha")
	b, _ := e.svc.Store.GetVM(context.Background(), "beta")
	ra, _ := decodeRuntime(a.Runtime)
	rb, _ := decodeRuntime(b.Runtime)
	if ra.Disk.Path == rb.Disk.Path || ra.Network.SSHPort == rb.Network.SSHPort {
		t.Fatalf("VMs share a disk or port: %+v %+v", ra, rb)
	}
	if e.run(t, "alpha", "cat /etc/machine-id") == e.run(t, "beta", "cat /etc/machine-id") {
		t.Fatal("VMs share a machine-id")
	}
}

// A VMM killed from outside is noticed at once (pushed by a pidfd): the VM
// goes to error with a reason and its runtime resources are released.
func TestVMMKilledMarksError(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.create(t, "victim", func(r *api.VMCreateRequest) { r.NoWait = true })
	row, _ := e.svc.Store.GetVM(ctx, "victim")
	rt, _ := decodeRuntime(row.Runtime)
	sub := e.svc.Events.Subscribe(func(ev api.Event) bool { return ev.Name == "victim" && ev.Type == "vm.state" })
	defer sub.Close()
	t0 := time.Now()
	if err := syscall.Kill(rt.Handle.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-sub.C:
		if !strings.HasPrefix(ev.Message, "error") {
			t.Fatalf("state event %q, want error", ev.Message)
		}
		t.Logf("exit noticed after %s", time.Since(t0).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the VMM's death was not noticed")
	}
	got, _ := e.svc.Get(ctx, "victim")
	if got.State != api.VMError || !strings.Contains(got.StateReason, "exited unexpectedly") {
		t.Fatalf("after kill: %s (%s)", got.State, got.StateReason)
	}
	rs, _ := e.svc.Store.ListResources(ctx, v.ID)
	for _, r := range rs {
		if r.Kind == resProcess || r.Kind == resPort || r.Kind == resRunDir {
			t.Fatalf("runtime resource kept: %+v", r)
		}
	}
	// A VM in error can be started again.
	if _, err := e.svc.Start(ctx, "victim", false, nil); err != nil {
		t.Fatalf("start after error: %v", err)
	}
}

// A restarted daemon re-attaches to VMs that kept running (pid, start time
// and control socket), and controls them as before.
func TestReattach(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.create(t, "keep")
	e.svc.Close() // the daemon goes away; QEMU keeps running
	e.svc = newService(t, e.images)
	if err := e.svc.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	v, _ := e.svc.Get(ctx, "keep")
	if v.State != api.VMRunning {
		t.Fatalf("after reattach: %s (%s)", v.State, v.StateReason)
	}
	if out := e.run(t, "keep", "echo hi"); out != "hi\n" {
		t.Fatalf("exec after reattach: %q", out)
	}
	if v, err := e.svc.Stop(ctx, "keep", false, 0); err != nil || v.State != api.VMStopped {
		t.Fatalf("stop after reattach: %+v %v", v, err)
	}
}

// Bad input is refused before anything is created, with a clear message.
func TestCreateRefusesBadInput(t *testing.T) {
	testutil.SkipShort(t, "needs the default image")
	e := newEnv(t)
	ctx := context.Background()
	e.create(t, "taken", func(r *api.VMCreateRequest) { r.NoStart = true })
	lim := e.svc.Limits
	cases := []struct {
		name string
		req  api.VMCreateRequest
		want string
	}{
		{"uppercase", api.VMCreateRequest{Name: "Dev"}, "not a DNS label"},
		{"leading dash", api.VMCreateRequest{Name: "-dev"}, "not a DNS label"},
		{"dots", api.VMCreateRequest{Name: "a..b"}, "not a DNS label"},
		{"slash", api.VMCreateRequest{Name: "a/b"}, "not a DNS label"},
		{"newline", api.VMCreateRequest{Name: "a\nb"}, "not a DNS label"},
		{"too long", api.VMCreateRequest{Name: strings.Repeat("a", 64)}, "64 characters"},
		{"duplicate", api.VMCreateRequest{Name: "taken"}, "already exists"},
		{"zero cpus", api.VMCreateRequest{Name: "x", CPUs: -1}, "CPUs requested"},
		{"too many cpus", api.VMCreateRequest{Name: "x", CPUs: lim.MaxCPUs + 1}, "CPUs requested"},
		{"memory too small", api.VMCreateRequest{Name: "x", MemoryBytes: 64 * api.MiB}, "below the guest's minimum"},
		{"memory too large", api.VMCreateRequest{Name: "x", MemoryBytes: lim.MaxMemoryBytes + api.GiB}, "more than this host has"},
		{"unknown image", api.VMCreateRequest{Name: "x", Image: "nope"}, "nope"},
		{"disk smaller than image", api.VMCreateRequest{Name: "x", DiskBytes: 16 * api.MiB}, "smaller than image"},
		{"bad vmm", api.VMCreateRequest{Name: "x", VMM: "xen"}, "not one of"},
	}
	before, _ := os.ReadDir(e.svc.Layout.VMsDir())
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.svc.Create(ctx, tc.req, nil)
			var ae *api.Error
			if !errors.As(err, &ae) || !strings.Contains(ae.Message, tc.want) {
				t.Fatalf("Create(%+v) = %v, want an API error mentioning %q", tc.req, err, tc.want)
			}
		})
	}
	vms, _ := e.svc.List(ctx)
	after, _ := os.ReadDir(e.svc.Layout.VMsDir())
	if len(vms) != 1 || len(after) != len(before) {
		t.Fatalf("bad input left VMs %v or directories %d→%d", vms, len(before), len(after))
	}
}
