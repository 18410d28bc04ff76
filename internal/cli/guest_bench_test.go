package cli_test

import (
	"encoding/json"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
)

// Benchmarks against OpenSSH on the same VM, measured in the same run and
// interleaved (one of ours, one of theirs), so load from elsewhere on the
// machine falls on both. Each reports milliseconds per operation for both
// and their ratio (ours / theirs; the goal is at most 1.0):
//
//	go test ./internal/cli -run XXX -bench 'VMExec' -benchtime 200x
//	go test ./internal/cli -run XXX -bench 'VMCopy' -benchtime 3x

// sshDirect are the system ssh's options for the VM's current endpoint,
// with banger's key and pinned host keys, as `banger vm ssh` uses them.
func (e *vmEnv) sshDirect(tb testing.TB) (opts []string, port string) {
	tb.Helper()
	var v api.VM
	if err := json.Unmarshal([]byte(e.must(nil, "vm", "show", e.vm, "--json")), &v); err != nil {
		tb.Fatal(err)
	}
	port = strconv.Itoa(v.Network.SSHPort)
	return []string{
		"-i", filepath.Join(e.home, "config", "banger", "ssh", "id_ed25519"),
		"-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + filepath.Join(e.home, "state", "banger", "known_hosts"),
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "HostKeyAlias=" + e.vm + ".banger",
		"-o", "BatchMode=yes",
		"-o", "LogLevel=ERROR",
	}, port
}

// BenchmarkVMExec runs `banger vm exec NAME -- true` against `ssh` over a
// ControlMaster connection to the same VM (both reuse a connection).
func BenchmarkVMExec(b *testing.B) {
	e := newVMEnv(b, nil)
	opts, port := e.sshDirect(b)
	cm := append(opts, "-p", port, "-o", "ControlMaster=auto", "-o", "ControlPath="+filepath.Join(e.home, "cm-%C"), "-o", "ControlPersist=600")
	dest := "root@127.0.0.1"
	b.Cleanup(func() { e.cmd(nil, "ssh", append(cm, "-O", "exit", dest)...) })
	// Warm both: the master connection, the daemon's pooled one.
	if r := e.cmd(nil, "ssh", append(cm, dest, "true")...); r.code != 0 {
		b.Fatalf("ssh: %d %s", r.code, r.err)
	}
	e.must(nil, "vm", "exec", e.vm, "--", "true")

	var ours, theirs []time.Duration
	for b.Loop() {
		t0 := time.Now()
		if r := e.run(nil, "vm", "exec", e.vm, "--", "true"); r.code != 0 {
			b.Fatalf("banger vm exec: %d %s", r.code, r.err)
		}
		t1 := time.Now()
		if r := e.cmd(nil, "ssh", append(cm, dest, "true")...); r.code != 0 {
			b.Fatalf("ssh: %d %s", r.code, r.err)
		}
		ours = append(ours, t1.Sub(t0))
		theirs = append(theirs, time.Since(t1))
	}
	report(b, "exec", ours, theirs)
}

// BenchmarkVMCopy100MiB copies 100 MiB to the VM and back with `banger vm
// cp` against `scp` (SFTP protocol, OpenSSH 9) to the same VM.
func BenchmarkVMCopy100MiB(b *testing.B) {
	e := newVMEnv(b, nil)
	opts, port := e.sshDirect(b)
	scp := append([]string{"-q", "-P", port}, opts...)
	local := b.TempDir()
	randomFile(b, filepath.Join(local, "big.bin"), 100<<20)
	up := func(ours bool) {
		if ours {
			e.must(nil, "vm", "cp", filepath.Join(local, "big.bin"), e.vm+":/root/ours.bin")
		} else if r := e.cmd(nil, "scp", append(scp, filepath.Join(local, "big.bin"), "root@127.0.0.1:/root/theirs.bin")...); r.code != 0 {
			b.Fatalf("scp: %d %s", r.code, r.err)
		}
	}
	down := func(ours bool) {
		if ours {
			e.must(nil, "vm", "cp", e.vm+":/root/ours.bin", filepath.Join(local, "ours.bin"))
		} else if r := e.cmd(nil, "scp", append(scp, "root@127.0.0.1:/root/theirs.bin", filepath.Join(local, "theirs.bin"))...); r.code != 0 {
			b.Fatalf("scp: %d %s", r.code, r.err)
		}
	}
	var oursUp, theirsUp, oursDown, theirsDown []time.Duration
	timed := func(f func(bool), ours bool) time.Duration {
		t0 := time.Now()
		f(ours)
		return time.Since(t0)
	}
	for b.Loop() {
		oursUp = append(oursUp, timed(up, true))
		theirsUp = append(theirsUp, timed(up, false))
		oursDown = append(oursDown, timed(down, true))
		theirsDown = append(theirsDown, timed(down, false))
	}
	b.SetBytes(2 * 100 << 20)
	report(b, "upload", oursUp, theirsUp)
	report(b, "download", oursDown, theirsDown)
}

// report gives the mean and the median of both sides in milliseconds, and
// the ratios (ours / theirs) of each: the median resists the outliers a
// shared machine produces, the mean is what a user waits in total.
func report(b *testing.B, what string, ours, theirs []time.Duration) {
	if len(ours) == 0 {
		return
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	mean := func(ds []time.Duration) time.Duration {
		var sum time.Duration
		for _, d := range ds {
			sum += d
		}
		return sum / time.Duration(len(ds))
	}
	median := func(ds []time.Duration) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		if len(s)%2 == 1 {
			return s[len(s)/2]
		}
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	mo, mt, po, pt := mean(ours), mean(theirs), median(ours), median(theirs)
	b.ReportMetric(ms(mo), what+"-banger-mean-ms")
	b.ReportMetric(ms(mt), what+"-openssh-mean-ms")
	b.ReportMetric(float64(mo)/float64(mt), what+"-mean-ratio")
	b.ReportMetric(ms(po), what+"-banger-p50-ms")
	b.ReportMetric(ms(pt), what+"-openssh-p50-ms")
	b.ReportMetric(float64(po)/float64(pt), what+"-p50-ratio")
	b.Logf("%s over %d runs: banger mean %.1f ms p50 %.1f ms; openssh mean %.1f ms p50 %.1f ms; ratio mean %.3f p50 %.3f",
		what, len(ours), ms(mo), ms(po), ms(mt), ms(pt), float64(mo)/float64(mt), float64(po)/float64(pt))
}
