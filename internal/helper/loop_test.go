package helper

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/testutil"
)

func loopRO(t *testing.T, dev string) bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "ro"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b)) == "1"
}

// AttachLoop binds a real file under the state dir and hands back the
// device itself; the loop detaches on DetachLoop plus last close, or on
// last close alone (autoclear).
func TestLoopAttachDetach(t *testing.T) {
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	ctx := t.Context()
	disk := h.vmFile(testID, "disk.img", 1<<20)

	res, f, err := h.client.AttachLoop(ctx, helperapi.AttachLoop{VMID: testID, File: "disk.img"})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{res.Device + " " + disk}, loopsUnder(t, h.stateDir)); diff != "" {
		t.Errorf("losetup (-want +got):\n%s", diff)
	}
	if loopRO(t, res.Device) {
		t.Error("read-write attach is read-only")
	}
	// The descriptor is the loop device over this very file.
	if _, err := f.WriteAt([]byte("written through the loop"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(disk)
	if err != nil || !bytes.HasPrefix(b[4096:], []byte("written through the loop")) {
		t.Fatalf("backing file does not hold what was written through %s (%v)", res.Device, err)
	}
	owned, err := h.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]helperapi.OwnedLoop{{Device: res.Device, VMID: testID, File: testID + "/disk.img"}}, owned.Loops); diff != "" {
		t.Errorf("ListOwned loops (-want +got):\n%s", diff)
	}

	if err := h.client.DetachLoop(ctx, helperapi.DetachLoop(res)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	testutil.WaitFor(t, 10*time.Second, "loop detached after DetachLoop and close", func() bool { return len(loopsUnder(t, h.stateDir)) == 0 })
	if err := h.client.DetachLoop(ctx, helperapi.DetachLoop(res)); err != nil {
		t.Errorf("DetachLoop of a detached device: %v", err)
	}

	res, f, err = h.client.AttachLoop(ctx, helperapi.AttachLoop{VMID: testID, File: "disk.img", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if !loopRO(t, res.Device) {
		t.Error("read-only attach is writable")
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Error("write through a read-only loop succeeded")
	}
	f.Close() // no DetachLoop: autoclear alone must detach it
	testutil.WaitFor(t, 10*time.Second, "autoclear loop detached after close", func() bool { return len(loopsUnder(t, h.stateDir)) == 0 })
	h.wantOpLogged(helperapi.OpAttachLoop, "ok")
	h.wantOpLogged(helperapi.OpDetachLoop, "ok")
}

// AttachLoop refuses every way out of <state dir>/vms/<id>/ and every
// file that is not the owner's regular file, and attaches nothing when it
// refuses; each case names the attack.
func TestLoopRefusesEscapes(t *testing.T) {
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret")
	if err := os.WriteFile(secret, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(secret, testOwner, testOwner); err != nil {
		t.Fatal(err)
	}
	vmDir := filepath.Join(h.stateDir, "vms", testID)
	h.vmFile(testID, "real.img", 1<<20)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink(secret, filepath.Join(vmDir, "escape.img")))
	must(os.Symlink("real.img", filepath.Join(vmDir, "inner-link.img")))
	must(os.Symlink(outside, filepath.Join(h.stateDir, "vms", "0badd1ec70")))
	must(unix.Mkfifo(filepath.Join(vmDir, "fifo.img"), 0o600))
	must(os.Mkdir(filepath.Join(vmDir, "dir.img"), 0o755))
	must(os.WriteFile(filepath.Join(vmDir, "roots.img"), make([]byte, 4096), 0o600)) // owned by root
	rootFile := filepath.Join(outside, "root-owned")
	must(os.WriteFile(rootFile, make([]byte, 4096), 0o600))
	must(os.Link(rootFile, filepath.Join(vmDir, "hardlink.img")))

	tests := []struct {
		name string
		op   helperapi.AttachLoop
		code helperapi.Code
	}{
		{"symlink in the VM dir pointing outside", helperapi.AttachLoop{VMID: testID, File: "escape.img"}, helperapi.CodeForbidden},
		{"symlink even to a file inside", helperapi.AttachLoop{VMID: testID, File: "inner-link.img"}, helperapi.CodeForbidden},
		{"VM directory itself a symlink to outside", helperapi.AttachLoop{VMID: "0badd1ec70", File: "secret"}, helperapi.CodeForbidden},
		{"a FIFO that would hang an open for reading", helperapi.AttachLoop{VMID: testID, File: "fifo.img", ReadOnly: true}, helperapi.CodeForbidden},
		{"a directory", helperapi.AttachLoop{VMID: testID, File: "dir.img"}, helperapi.CodeForbidden},
		{"a file root owns", helperapi.AttachLoop{VMID: testID, File: "roots.img"}, helperapi.CodeForbidden},
		{"a hard link to root's file outside", helperapi.AttachLoop{VMID: testID, File: "hardlink.img"}, helperapi.CodeForbidden},
		{"a missing file", helperapi.AttachLoop{VMID: testID, File: "missing.img"}, helperapi.CodeNotFound},
		{"a missing VM", helperapi.AttachLoop{VMID: "ffffffffff", File: "real.img"}, helperapi.CodeNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, f, err := h.client.AttachLoop(t.Context(), tt.op)
			if f != nil {
				f.Close()
			}
			if !isCode(err, tt.code) {
				t.Fatalf("AttachLoop: %v, want code %s", err, tt.code)
			}
		})
	}
	if got := append(loopsUnder(t, h.stateDir), loopsUnder(t, outside)...); len(got) != 0 {
		t.Errorf("refused requests left loops behind: %v", got)
	}
	h.wantOpLogged(helperapi.OpAttachLoop, "error")
}

// DetachLoop refuses a loop device whose backing file is not banger's.
func TestDetachLoopRefusesForeign(t *testing.T) {
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	foreign := filepath.Join(t.TempDir(), "foreign.img")
	if err := os.WriteFile(foreign, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(run(t, "losetup", "--find", "--show", foreign))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	err := h.client.DetachLoop(t.Context(), helperapi.DetachLoop{Device: dev})
	if !errors.Is(err, helperapi.ErrForbidden) {
		t.Fatalf("DetachLoop(%s): %v, want ErrForbidden", dev, err)
	}
	if got := loopsUnder(t, filepath.Dir(foreign)); len(got) != 1 {
		t.Errorf("foreign loop detached: %v", got)
	}
}

// Twenty full create/delete cycles of the bridge, NAT, DNS redirect, a tap
// and a loop leave the namespace's links, its ruleset and the loop devices
// exactly as they were.
func TestCreateDeleteCycles(t *testing.T) {
	h := startHelper(t)
	testutil.RequireCommand(t, "losetup")
	ctx := t.Context()
	h.vmFile(testID, "disk.img", 1<<20)
	baseLinks := run(t, "ip", "-n", h.ns, "link")
	baseRules := nsRun(t, h.ns, "nft", "list", "ruleset")
	baseLoops := loopsUnder(t, h.stateDir)

	for i := range 20 {
		if _, err := h.client.EnsureBridge(ctx, subnet.EnsureBridge("banger0")); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := h.client.EnsureNAT(ctx, subnet.EnsureNAT("banger0")); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if _, err := h.client.EnsureDNSRedirect(ctx, subnet.EnsureDNSRedirect("banger0", 5353)); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := h.client.CreateTap(ctx, helperapi.CreateTap{Name: testTap, Bridge: "banger0", OwnerUID: testOwner}); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		res, f, err := h.client.AttachLoop(ctx, helperapi.AttachLoop{VMID: testID, File: "disk.img"})
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if i == 0 {
			// The cycle really creates what the end state must not hold.
			if n := len(loopsUnder(t, h.stateDir)); n != 1 {
				t.Fatalf("%d loops attached, want 1", n)
			}
			if _, ok := links(t, h.ns)[testTap]; !ok {
				t.Fatal("tap missing")
			}
		}
		if err := h.client.DeleteTap(ctx, helperapi.DeleteTap{Name: testTap}); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := h.client.DetachLoop(ctx, helperapi.DetachLoop(res)); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		f.Close()
		if err := h.client.RemoveNAT(ctx); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := h.client.DeleteBridge(ctx, helperapi.DeleteBridge{Name: "banger0"}); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
	}
	testutil.WaitFor(t, 10*time.Second, "loops back to baseline", func() bool {
		return cmp.Equal(baseLoops, loopsUnder(t, h.stateDir))
	})
	if got := run(t, "ip", "-n", h.ns, "link"); got != baseLinks {
		t.Errorf("ip link after the cycles:\n%s\nwant:\n%s", got, baseLinks)
	}
	if got := nsRun(t, h.ns, "nft", "list", "ruleset"); got != baseRules {
		t.Errorf("nft ruleset after the cycles:\n%s\nwant:\n%s", got, baseRules)
	}
}
