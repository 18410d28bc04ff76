package cli_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
)

// world is a private banger installation: built binaries, their own XDG
// directories and daemon, and the cached default image imported.
type world struct {
	t      *testing.T
	bin    string
	home   string
	env    []string
	socket string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	testutil.SkipShort(t, "boots real VMs")
	testutil.RequireCommand(t, "qemu-system-x86_64")
	img := imagetest.DefaultImage(t)
	w := &world{t: t, bin: testutil.BuildBinaries(t, t.TempDir(), testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "banger", "bangerd")}
	w.home = t.TempDir()
	w.env = testutil.UserEnv(w.home)
	w.socket = filepath.Join(w.home, "run", "banger", "bangerd.sock")
	t.Cleanup(func() {
		// Delete every VM so no QEMU outlives the test, then stop the daemon.
		if out, _, code := w.try("vm", "list", "--json"); code == 0 {
			var vms []api.VM
			_ = json.Unmarshal([]byte(out), &vms)
			for _, v := range vms {
				w.try("vm", "delete", "--force", v.Name)
			}
		}
		stopDaemon(t, w.home)
	})
	w.ok("image", "import", "default", "--rootfs", filepath.Join(img, imagetest.Rootfs),
		"--kernel", filepath.Join(img, imagetest.Kernel), "--initrd", filepath.Join(img, imagetest.Initrd))
	return w
}

// try runs banger with extra environment and returns stdout, stderr, code.
func (w *world) try(args ...string) (string, string, int) {
	return w.tryEnv(nil, args...)
}

func (w *world) tryEnv(extra []string, args ...string) (string, string, int) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(w.bin, "banger"), args...)
	cmd.Env = append(append([]string{}, w.env...), extra...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		w.t.Fatalf("banger %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

func (w *world) ok(args ...string) string {
	w.t.Helper()
	out, errOut, code := w.try(args...)
	if code != 0 {
		w.t.Fatalf("banger %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func (w *world) vm(name string) (api.VM, bool) {
	w.t.Helper()
	v, err := client.New(w.socket).GetVM(context.Background(), name)
	if err != nil {
		return api.VM{}, false
	}
	return v, true
}

// db opens the state database read-only, to check rows directly.
func (w *world) db() *sql.DB {
	w.t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(w.home, "state", "banger", "banger.db")+"?mode=ro")
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { _ = db.Close() })
	return db
}

// leaks lists what remains of the VM with this id: processes whose command
// line names it, its directories, its rows.
func (w *world) leaks(id string) []string {
	w.t.Helper()
	var left []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && bytes.Contains(cmd, []byte(id)) {
			if st, _ := os.ReadFile("/proc/" + e.Name() + "/stat"); !bytes.Contains(st, []byte(") Z ")) {
				left = append(left, "process "+e.Name()+": "+strings.ReplaceAll(string(cmd[:min(len(cmd), 80)]), "\x00", " "))
			}
		}
	}
	for _, dir := range []string{
		filepath.Join(w.home, "state", "banger", "vms", id),
		filepath.Join(w.home, "run", "banger", "vm", id),
	} {
		if _, err := os.Stat(dir); err == nil {
			left = append(left, "directory "+dir)
		}
	}
	db := w.db()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM vms WHERE id = ?`, id).Scan(&n); err != nil {
		w.t.Fatal(err)
	}
	if n > 0 {
		left = append(left, "vm row")
	}
	if err := db.QueryRow(`SELECT count(*) FROM vm_resources WHERE vm_id = ?`, id).Scan(&n); err != nil {
		w.t.Fatal(err)
	}
	if n > 0 {
		left = append(left, fmt.Sprintf("%d resource rows", n))
	}
	return left
}

// vmIDs returns the ids of every VM row.
func (w *world) vmIDs() map[string]string {
	rows, err := w.db().Query(`SELECT id, name FROM vms`)
	if err != nil {
		w.t.Fatal(err)
	}
	defer func() { _ = rows.Close() }()
	ids := map[string]string{}
	for rows.Next() {
		var id, name string
		if err := rows.Scan(&id, &name); err != nil {
			w.t.Fatal(err)
		}
		ids[name] = id
	}
	return ids
}

// The main job through the CLI: create, run a command, write a file, stop,
// start, the file is still there, delete, and nothing of the VM remains.
func TestVMLifecycleCLI(t *testing.T) {
	w := newWorld(t)
	out := w.ok("vm", "create", "--name", "dev", "--cpus", "1", "--memory", "512M")
	if !strings.Contains(out, "VM dev is running, SSH ready") || !strings.Contains(out, "banger vm ssh dev") {
		t.Fatalf("create said:\n%s", out)
	}
	id := w.vmIDs()["dev"]
	if got := w.ok("vm", "ssh", "dev", "--", "uname", "-s"); got != "Linux\n" {
		t.Fatalf("uname over ssh = %q", got)
	}
	w.ok("vm", "ssh", "dev", "--", "sh", "-c", "'echo kept > /root/file && sync'")
	w.ok("vm", "stop", "dev")
	if v, _ := w.vm("dev"); v.State != api.VMStopped {
		t.Fatalf("after stop: %s", v.State)
	}
	w.ok("vm", "start", "dev")
	if got := w.ok("vm", "ssh", "dev", "--", "cat", "/root/file"); got != "kept\n" {
		t.Fatalf("file after restart = %q", got)
	}
	if logs := w.ok("vm", "logs", "dev", "--tail", "64K"); !strings.Contains(logs, "BANGER-READY") {
		t.Fatalf("console log lacks the ready marker:\n%s", logs)
	}
	w.ok("vm", "delete", "--force", "dev")
	if left := w.leaks(id); len(left) > 0 {
		t.Fatalf("after delete: %v", left)
	}
}

// A daemon killed (SIGKILL) at any step of create is reconciled on restart:
// the half-made VM is rolled back and nothing leaks.
func TestCrashDuringCreate(t *testing.T) {
	w := newWorld(t)
	for _, point := range []string{"create:row", "create:disk", "create:identity", "start:spawn", "start:spawned"} {
		t.Run(point, func(t *testing.T) {
			name := "crash-" + strings.ReplaceAll(point, ":", "-")
			stopDaemon(t, w.home) // the next command starts one with the crash point
			_, errOut, code := w.tryEnv([]string{"BANGER_CRASHPOINT=" + point}, "vm", "create", "--name", name, "--cpus", "1", "--memory", "512M")
			if code == 0 {
				t.Fatalf("create survived crash point %s", point)
			}
			t.Logf("create at %s failed as expected: %s", point, strings.TrimSpace(errOut))
			id := w.vmIDs()[name]
			if id == "" {
				t.Fatalf("no row recorded before crash point %s", point)
			}
			// The next command starts a fresh daemon, which reconciles.
			w.ok("vm", "list")
			if left := w.leaks(id); len(left) > 0 {
				t.Fatalf("after restart, %s left: %v", point, left)
			}
		})
	}
}

// VMs keep running while the daemon is killed; the restarted daemon
// re-attaches to them, and a VMM killed afterwards is noticed at once.
// A delete interrupted by a crash is finished on restart.
func TestCrashWhileRunning(t *testing.T) {
	w := newWorld(t)
	w.ok("vm", "create", "--name", "keep", "--cpus", "1", "--memory", "512M")
	id := w.vmIDs()["keep"]
	v, _ := client.New(w.socket).Version(context.Background())
	var qemuPID int
	if err := w.db().QueryRow(`SELECT json_extract(runtime, '$.handle.pid') FROM vms WHERE id = ?`, id).Scan(&qemuPID); err != nil {
		t.Fatal(err)
	}
	if err := syscallKill(v.PID); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 20*time.Second, "the daemon to die", func() bool { return !alive(v.PID) })
	if !alive(qemuPID) {
		t.Fatal("the VM died with the daemon")
	}
	if got := w.ok("vm", "ssh", "keep", "--", "echo", "still-here"); got != "still-here\n" {
		t.Fatalf("after daemon restart: %q", got)
	}
	if vm, _ := w.vm("keep"); vm.State != api.VMRunning {
		t.Fatalf("after re-attach: %s (%s)", vm.State, vm.StateReason)
	}
	// Kill the VMM behind the daemon's back: the VM goes to error.
	syscallKillPID(qemuPID)
	testutil.WaitFor(t, 5*time.Second, "the daemon to notice the VMM died", func() bool {
		vm, _ := w.vm("keep")
		return vm.State == api.VMError
	})
	// A delete killed after it released everything but the row.
	stopDaemon(t, w.home)
	_, _, code := w.tryEnv([]string{"BANGER_CRASHPOINT=delete:released"}, "vm", "delete", "keep")
	if code == 0 {
		t.Fatal("delete survived its crash point")
	}
	w.ok("vm", "list")
	if left := w.leaks(id); len(left) > 0 {
		t.Fatalf("after interrupted delete and restart: %v", left)
	}
}

func alive(pid int) bool {
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	return err == nil && !bytes.Contains(st, []byte(") Z "))
}
