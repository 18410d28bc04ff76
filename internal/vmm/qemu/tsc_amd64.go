package qemu

import (
	"bytes"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

func rdtsc() uint64

// measureTSCkHz measures the host's TSC frequency against CLOCK_MONOTONIC_RAW
// over window. It returns 0 unless /proc/cpuinfo promises a constant,
// non-stop TSC, without which the number means nothing to a guest.
func measureTSCkHz(window time.Duration) int64 {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !bytes.Contains(info, []byte(" constant_tsc")) || !bytes.Contains(info, []byte(" nonstop_tsc")) {
		return 0
	}
	now := func() int64 {
		var ts unix.Timespec
		if unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, &ts) != nil {
			return 0
		}
		return ts.Nano()
	}
	// Bracket each clock read between two TSC reads and keep the tightest
	// of a few tries, so a preemption between the reads does not skew it.
	sample := func() (tsc uint64, ns int64) {
		best := ^uint64(0)
		for range 5 {
			a := rdtsc()
			n := now()
			b := rdtsc()
			if b-a < best {
				best, tsc, ns = b-a, a+(b-a)/2, n
			}
		}
		return tsc, ns
	}
	t0, n0 := sample()
	time.Sleep(window)
	t1, n1 := sample()
	if n0 == 0 || n1 <= n0 || t1 <= t0 {
		return 0
	}
	return int64(float64(t1-t0) / (float64(n1-n0) / 1e6))
}
