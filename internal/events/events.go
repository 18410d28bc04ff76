// Package events is the daemon's in-process event bus. Services publish
// state changes and progress; the server streams them to clients as NDJSON
// (GET /v1/events) and long operations stream their own.
package events

import (
	"sync"
	"time"

	"github.com/bangerhq/banger/internal/api"
)

// subscriberBuffer bounds each subscriber's queue: a slow client loses
// events (and is told so) rather than slowing the daemon down.
const subscriberBuffer = 256

// Bus fans events out to subscribers. The zero value is ready to use.
type Bus struct {
	mu   sync.Mutex // guards seq and subs
	seq  uint64
	subs map[*Subscription]struct{}
}

// Subscription receives events published after it was made.
type Subscription struct {
	C      <-chan api.Event
	c      chan api.Event
	filter func(api.Event) bool
	bus    *Bus
	once   sync.Once
	// dropped counts events lost because the subscriber was slow; guarded
	// by bus.mu.
	dropped uint64
}

// Publish stamps e with a sequence number and time and delivers it to every
// subscriber whose filter accepts it, without blocking.
func (b *Bus) Publish(e api.Event) api.Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	e.Seq = b.seq
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	for s := range b.subs {
		if s.filter != nil && !s.filter(e) {
			continue
		}
		select {
		case s.c <- e:
		default:
			s.dropped++
		}
	}
	return e
}

// Subscribe returns a subscription; filter may be nil for every event.
// Callers must Close it.
func (b *Bus) Subscribe(filter func(api.Event) bool) *Subscription {
	c := make(chan api.Event, subscriberBuffer)
	s := &Subscription{C: c, c: c, filter: filter, bus: b}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.subs == nil {
		b.subs = map[*Subscription]struct{}{}
	}
	b.subs[s] = struct{}{}
	return s
}

// Dropped returns and resets the number of events this subscriber missed.
func (s *Subscription) Dropped() uint64 {
	s.bus.mu.Lock()
	defer s.bus.mu.Unlock()
	n := s.dropped
	s.dropped = 0
	return n
}

// Close ends the subscription and closes C.
func (s *Subscription) Close() {
	s.once.Do(func() {
		s.bus.mu.Lock()
		delete(s.bus.subs, s)
		s.bus.mu.Unlock()
		close(s.c)
	})
}
