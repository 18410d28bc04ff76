package events

import (
	"testing"

	"github.com/bangerhq/banger/internal/api"
)

// Subscribers get events in order with increasing sequence numbers; filters
// apply; a closed subscription gets nothing more.
func TestBus(t *testing.T) {
	var b Bus
	all := b.Subscribe(nil)
	vms := b.Subscribe(func(e api.Event) bool { return e.Kind == "vm" })
	b.Publish(api.Event{Type: "image.build", Kind: "image"})
	b.Publish(api.Event{Type: "vm.state", Kind: "vm", Name: "dev"})
	e1, e2 := <-all.C, <-all.C
	if e1.Seq != 1 || e2.Seq != 2 || e1.Time.IsZero() {
		t.Fatalf("events %+v %+v", e1, e2)
	}
	if e := <-vms.C; e.Name != "dev" {
		t.Fatalf("filtered subscriber got %+v", e)
	}
	vms.Close()
	vms.Close() // idempotent
	b.Publish(api.Event{Kind: "vm"})
	if _, ok := <-vms.C; ok {
		t.Fatal("closed subscription received an event")
	}
	all.Close()
}

// A slow subscriber never blocks Publish; it is told how many it missed.
func TestBusSlowSubscriber(t *testing.T) {
	var b Bus
	s := b.Subscribe(nil)
	defer s.Close()
	for range subscriberBuffer + 10 {
		b.Publish(api.Event{Type: "x"})
	}
	if d := s.Dropped(); d != 10 {
		t.Fatalf("dropped %d, want 10", d)
	}
	if d := s.Dropped(); d != 0 {
		t.Fatalf("Dropped did not reset: %d", d)
	}
}
