package vm

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/image/imagetest"
)

// BenchmarkCreateToSSHBridgeVsUser measures `vm create` until the guest
// answers SSH with its pinned key, in bridge mode (tap, static address,
// SSH to <address>:22) and in user mode (slirp, DHCP, SSH through a
// forwarded port), alternating in one run on the same image, and reports
// the medians and their ratio. It runs inside a network namespace of its
// own, like the bridge tests: the parent re-runs the benchmark there with
// the same -benchtime and reports the child's figures. Under TCG each
// boot takes a minute or more on a busy two-core machine: run it with
// -benchtime 2x or so.
func BenchmarkCreateToSSHBridgeVsUser(b *testing.B) {
	requireNetNS(b)
	if n := benchIterations(); n > 1 && b.N == 1 {
		// The testing package's probe run before the N asked for: with
		// minutes per boot, not worth doing (here nor in the child).
		return
	}
	ns, child := netnsChild(b)
	if !child {
		imagetest.DefaultImage(b)
		out := rerunInNetNS(b, "-test.run", "^$", "-test.bench", "^BenchmarkCreateToSSHBridgeVsUser$",
			"-test.benchtime", strconv.Itoa(b.N)+"x")
		metrics, err := benchMetrics(out, "BenchmarkCreateToSSHBridgeVsUser")
		if err != nil {
			b.Fatal(err)
		}
		for unit, v := range metrics {
			b.ReportMetric(v, unit)
		}
		return
	}
	be := newBridgeEnv(b, ns)
	bridged := be.svc
	bridged.Log = slog.New(slog.DiscardHandler)
	user := newService(b, be.images) // no helper: user mode
	user.Log = slog.New(slog.DiscardHandler)
	b.Cleanup(user.Close)
	ctx := context.Background()
	bridged.KVM(ctx)
	user.KVM(ctx)
	boot := func(svc *Service, name, wantMode string) time.Duration {
		t0 := time.Now()
		v, err := svc.Create(ctx, api.VMCreateRequest{Name: name, CPUs: 1, MemoryBytes: 512 * api.MiB}, nil)
		d := time.Since(t0)
		if err != nil {
			b.Fatalf("create %s: %v", name, err)
		}
		if v.Network.Mode != wantMode {
			b.Fatalf("%s: network mode %q, want %q", name, v.Network.Mode, wantMode)
		}
		if err := svc.Delete(ctx, name, true); err != nil {
			b.Fatal(err)
		}
		return d
	}
	var bridgeDs, userDs []time.Duration
	b.ResetTimer()
	for i := range b.N {
		bridgeDs = append(bridgeDs, boot(bridged, fmt.Sprintf("br%d", i), NetBridge))
		userDs = append(userDs, boot(user, fmt.Sprintf("us%d", i), NetUser))
	}
	b.StopTimer()
	slices.Sort(bridgeDs)
	slices.Sort(userDs)
	bm, um := bridgeDs[len(bridgeDs)/2], userDs[len(userDs)/2]
	b.ReportMetric(bm.Seconds(), "bridge-s")
	b.ReportMetric(um.Seconds(), "user-s")
	b.ReportMetric(float64(bm)/float64(um), "bridge/user")
}

// benchIterations is N of -test.benchtime=Nx, or 0 for a duration.
func benchIterations() int {
	f := flag.Lookup("test.benchtime")
	if f == nil {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSuffix(f.Value.String(), "x"))
	if err != nil || !strings.HasSuffix(f.Value.String(), "x") {
		return 0
	}
	return n
}

// benchMetrics reads the custom metrics of a benchmark's result line in
// go test output ("BenchmarkX-2  1  123 ns/op  61.2 bridge-s …").
func benchMetrics(out, name string) (map[string]float64, error) {
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimPrefix(strings.TrimSpace(line), "child: ")
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], name) {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		m := map[string]float64{}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return nil, fmt.Errorf("benchmark line %q: %w", line, err)
			}
			if f[i+1] != "ns/op" {
				m[f[i+1]] = v
			}
		}
		return m, nil
	}
	return nil, fmt.Errorf("no result line for %s in the child's output", name)
}
