package cli_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/testutil"
)

// BenchmarkVMListProcess runs `banger vm list` as a whole process against a
// running daemon and reports its median wall time, the ratio against
// starting a Go binary that does nothing (`bangerd --version`) in the same
// run, and the daemon's resident memory once idle.
func BenchmarkVMListProcess(b *testing.B) {
	dir := testutil.BuildBinaries(b, b.TempDir(), testutil.BuildOptions{Version: "dev", Commit: commitA, BuiltAt: "2026-01-01T00:00:00Z"}, "banger", "bangerd")
	home := b.TempDir()
	env := testutil.UserEnv(home)
	banger, bangerd := filepath.Join(dir, "banger"), filepath.Join(dir, "bangerd")
	run := func(exe string, args ...string) {
		cmd := exec.Command(exe, args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%s %v: %v\n%s", exe, args, err, out)
		}
	}
	run(banger, "vm", "list") // starts the daemon
	c := client.New(filepath.Join(home, "run", "banger", "bangerd.sock"))
	v, err := c.Version(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = syscall.Kill(v.PID, syscall.SIGTERM) }()
	median := func(f func()) time.Duration {
		ds := make([]time.Duration, 0, b.N)
		for range b.N {
			t0 := time.Now()
			f()
			ds = append(ds, time.Since(t0))
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	b.ResetTimer()
	list := median(func() { run(banger, "vm", "list") })
	peer := median(func() { run(bangerd, "--version") })
	b.StopTimer()
	time.Sleep(500 * time.Millisecond)
	b.ReportMetric(float64(list.Microseconds())/1000, "median-ms/vm-list")
	b.ReportMetric(float64(peer.Microseconds())/1000, "median-ms/noop-go-process")
	b.ReportMetric(float64(list)/float64(peer), "vm-list/noop")
	b.ReportMetric(float64(rssKiB(b, v.PID))/1024, "daemon-idle-RSS-MiB")
}

func rssKiB(b *testing.B, pid int) int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// syscallKill kills pid with SIGKILL, as a crash would.
func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }

func syscallKillPID(pid int) { _ = syscall.Kill(pid, syscall.SIGKILL) }
