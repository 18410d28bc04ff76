// Package revert undoes the finished steps of a multi-step operation when a
// later step fails, in reverse order:
//
//	r := revert.New()
//	defer r.Fail()
//	... create a thing; r.Add(func() { remove it })
//	... more steps
//	r.Success()
//
// It follows lxc/incus shared/revert.
package revert

import "sync"

// Reverter collects undo functions.
type Reverter struct {
	mu   sync.Mutex // guards fns
	fns  []func()
	done bool
}

// New returns an empty Reverter.
func New() *Reverter { return &Reverter{} }

// Add registers an undo function; the last added runs first.
func (r *Reverter) Add(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fns = append(r.fns, f)
}

// Fail runs the undo functions in reverse order, unless Success was called.
// It is meant to be deferred.
func (r *Reverter) Fail() {
	r.mu.Lock()
	if r.done {
		r.mu.Unlock()
		return
	}
	r.done = true
	fns := r.fns
	r.fns = nil
	r.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}

// Success keeps what was done: a later Fail does nothing.
func (r *Reverter) Success() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done = true
	r.fns = nil
}
