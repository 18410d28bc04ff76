package guest

// Hooks and internals for the external tests (package guest_test, which
// may import guesttest).

// SetTestHookOpen sets the hook Home.Open runs between its lexical check
// and the open; nil clears it.
func SetTestHookOpen(f func(rel string)) { testHookOpen = f }

// SetTestHookBeforeSend sets the hook Sync runs after it scanned a file and
// before it opens it again to send it; nil clears it.
func SetTestHookBeforeSend(f func(abs string)) { testHookBeforeSend = f }

// PoolConns is how many connections the pool holds for a VM.
func PoolConns(p *Pool, name string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v := p.vms[name]; v != nil {
		return len(v.conns)
	}
	return 0
}
