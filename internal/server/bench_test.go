package server

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/store"
)

// BenchmarkListVMs1000 measures the API round trip of GET /v1/vms with
// 1,000 VMs over the real unix socket and SQLite file (request sent to body
// fully read), reporting the p50 and the ratio against GET /v1/health on the
// same kind of client (the bare cost of a request) measured in the same run.
// It also reports the typed client's p50 including JSON decoding.
func BenchmarkListVMs1000(b *testing.B) {
	h := startServer(b)
	ctx := context.Background()
	if err := h.st.InsertImage(ctx, store.Image{ID: "i1", Name: "default", Source: "build", Metadata: []byte(`{"files":[]}`)}); err != nil {
		b.Fatal(err)
	}
	for i := range 1000 {
		v := store.VM{ID: fmt.Sprintf("%010x", i), Name: fmt.Sprintf("vm-%04d", i), ImageID: "i1", VMM: "qemu", CPUs: 2,
			MemoryBytes: 1 << 30, DiskBytes: 8 << 30, NetMode: "user", State: "running",
			Runtime: []byte(`{"network":{"ssh_host":"127.0.0.1","ssh_port":40000}}`)}
		if err := h.st.InsertVM(ctx, v); err != nil {
			b.Fatal(err)
		}
	}
	p50 := func(f func() error) time.Duration {
		var ds []time.Duration
		for range b.N {
			t0 := time.Now()
			if err := f(); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.sock)
	}}}
	get := func(path string, minBytes int64) func() error {
		return func() error {
			resp, err := hc.Get("http://bangerd" + path)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			n, err := io.Copy(io.Discard, resp.Body)
			if err == nil && (resp.StatusCode != 200 || n < minBytes) {
				err = fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
			}
			return err
		}
	}
	// Warm the connection and the list cache before measuring.
	if err := get("/v1/vms", 100000)(); err != nil {
		b.Fatal(err)
	}
	if _, err := h.c.ListVMs(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	list := p50(get("/v1/vms", 100000))
	health := p50(get("/v1/health", 10))
	decoded := p50(func() error {
		vms, err := h.c.ListVMs(ctx)
		if err == nil && len(vms) != 1000 {
			err = fmt.Errorf("%d vms", len(vms))
		}
		return err
	})
	b.ReportMetric(float64(list.Microseconds()), "p50-µs/list")
	b.ReportMetric(float64(health.Microseconds()), "p50-µs/health")
	b.ReportMetric(float64(decoded.Microseconds()), "p50-µs/list+decode")
	b.ReportMetric(float64(list)/float64(health), "list/health")
}
