package firecracker

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// BenchmarkBootSequence measures the driver's side of a boot: version
// negotiation, logger, and the configure+InstanceStart sequence against
// the in-process fake (one fresh fake per iteration, since InstanceStart
// succeeds once). It is the API overhead a real Firecracker adds its own
// work to.
func BenchmarkBootSequence(b *testing.B) {
	dir := shortDir(b)
	p, err := newPlan(testConfig(b, dir), 0)
	if err != nil {
		b.Fatal(err)
	}
	p.vsock = nil // the fake would bind the same path each iteration
	for b.Loop() {
		b.StopTimer()
		sock, _, stop := startFake(b, "1.16.1", fcfake.Options{})
		c := NewClient(sock, nil)
		b.StartTimer()
		caps, err := c.Negotiate(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		if err := c.PutLogger(context.Background(), Logger{Level: "Info"}); err != nil {
			b.Fatal(err)
		}
		calls, _, err := p.calls(caps)
		if err != nil {
			b.Fatal(err)
		}
		if err := runCalls(context.Background(), c, calls); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		c.Close()
		stop()
		b.StartTimer()
	}
}

// BenchmarkStart measures Driver.Start end to end with the fake binary:
// spawn (plus the console logger), socket wait, configuration and
// InstanceStart, then Kill and the wait for the exit.
func BenchmarkStart(b *testing.B) {
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	b.Setenv(fcfake.EnvVersion, "1.14.2")
	d := &Driver{Executable: exe}
	dir := shortDir(b)
	cfg := testConfig(b, dir)
	for b.Loop() {
		m, err := d.Start(context.Background(), cfg, nil)
		if err != nil {
			b.Fatal(err)
		}
		_ = m.Kill()
		select {
		case <-m.Done():
		case <-time.After(5 * time.Second):
			b.Fatal("kill did not end the process")
		}
	}
}
