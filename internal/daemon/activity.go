package daemon

import (
	"context"
	"sync"
)

// activity counts operations in flight and lets the daemon stop once none
// is, refusing new ones meanwhile. It implements server.Tracker.
type activity struct {
	mu       sync.Mutex // guards n, draining, idle
	n        int
	draining bool
	idle     chan struct{} // closed when n drops to 0 while draining
}

func (a *activity) Begin() (end func(), ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.draining {
		return nil, false
	}
	a.n++
	var once sync.Once
	return func() { once.Do(a.end) }, true
}

func (a *activity) end() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.n--
	if a.n == 0 && a.idle != nil {
		close(a.idle)
		a.idle = nil
	}
}

func (a *activity) InFlight() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.n
}

// drain refuses new operations and waits until those in flight finish.
func (a *activity) drain(ctx context.Context) error {
	a.mu.Lock()
	a.draining = true
	if a.n == 0 {
		a.mu.Unlock()
		return nil
	}
	if a.idle == nil {
		a.idle = make(chan struct{})
	}
	idle := a.idle
	a.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
