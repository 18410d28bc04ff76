package guest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Pool keeps SSH connections to VMs open for the daemon, so that an exec
// costs a channel on a live connection instead of a TCP connect, a key
// exchange and an authentication (hundreds of milliseconds on a TCG
// guest). Connections are verified against the pinned host key when they
// are made, probed with keepalives, replaced when they fail, and dropped
// when their VM stops.
//
// sshd allows ten sessions per connection (MaxSessions); a VM with more
// commands running at once gets a further connection, closed again after
// it has been idle for a while.
type Pool struct {
	// Resolve says how to reach a VM now; its address changes when the VM
	// boots again.
	Resolve func(ctx context.Context, name string) (Target, error)
	Log     *slog.Logger
	// Keepalive is the interval of keepalive probes (15 s when zero); a
	// connection that does not answer one within the interval is closed.
	Keepalive time.Duration
	// IdleClose closes a VM's extra connections after this long without a
	// session (1 min when zero). The first one stays while the VM runs.
	IdleClose time.Duration

	mu     sync.Mutex // guards vms, closed
	vms    map[string]*vmConns
	closed bool
}

// maxSessionsPerConn stays below sshd's default MaxSessions of 10.
const maxSessionsPerConn = 8

type vmConns struct {
	gen   uint64 // bumped by Drop, so a dial that raced it is discarded
	conns []*pooledConn
	// dialing is closed when the dial in progress finishes; nil when none.
	dialing chan struct{}
	dialErr error
}

type pooledConn struct {
	client   *ssh.Client
	target   Target
	sessions int // guarded by Pool.mu
	idleAt   time.Time
	dead     bool
	done     chan struct{} // closed when the connection ends
}

// Lease is one use of a pooled connection; Release it when done.
type Lease struct {
	Client *ssh.Client
	pool   *Pool
	name   string
	conn   *pooledConn
	once   sync.Once
}

// Release returns the lease's share of its connection.
func (l *Lease) Release() {
	l.once.Do(func() { l.pool.release(l.name, l.conn) })
}

// Broken marks the connection as failed (a session could not be opened on
// it) and releases the lease; the next Get makes a new connection.
func (l *Lease) Broken() {
	l.once.Do(func() {
		l.pool.mu.Lock()
		l.conn.dead = true
		l.pool.mu.Unlock()
		_ = l.conn.client.Close()
		l.pool.release(l.name, l.conn)
	})
}

func (p *Pool) keepalive() time.Duration {
	if p.Keepalive > 0 {
		return p.Keepalive
	}
	return 15 * time.Second
}

func (p *Pool) idleClose() time.Duration {
	if p.IdleClose > 0 {
		return p.IdleClose
	}
	return time.Minute
}

// ErrPoolClosed is returned by Get after Close.
var ErrPoolClosed = errors.New("ssh connection pool is closed")

// Get leases a connection to the VM, dialling one when none has room.
func (p *Pool) Get(ctx context.Context, name string) (*Lease, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		if p.vms == nil {
			p.vms = map[string]*vmConns{}
		}
		v := p.vms[name]
		if v == nil {
			v = &vmConns{}
			p.vms[name] = v
		}
		for _, c := range v.conns {
			if !c.dead && c.sessions < maxSessionsPerConn {
				c.sessions++
				p.mu.Unlock()
				return &Lease{Client: c.client, pool: p, name: name, conn: c}, nil
			}
		}
		if wait := v.dialing; wait != nil {
			// Someone is dialling this VM: wait for that instead of
			// dialling too, then look again.
			p.mu.Unlock()
			select {
			case <-wait:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			p.mu.Lock()
			err := v.dialErr
			p.mu.Unlock()
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
				return nil, err
			}
			// Dialled, or the dialler gave up on its own account: look
			// again (and dial ourselves if need be).
			continue
		}
		done := make(chan struct{})
		v.dialing, v.dialErr = done, nil
		gen := v.gen
		p.mu.Unlock()

		c, err := p.dial(ctx, name)

		p.mu.Lock()
		v.dialing, v.dialErr = nil, err
		close(done)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		if p.closed || p.vms[name] != v || v.gen != gen {
			// Dropped (the VM stopped) or closed while we dialled.
			p.mu.Unlock()
			_ = c.client.Close()
			if p.closed {
				return nil, ErrPoolClosed
			}
			return nil, fmt.Errorf("ssh %s: the VM stopped while connecting", name)
		}
		c.sessions = 1
		v.conns = append(v.conns, c)
		p.mu.Unlock()
		go p.watch(name, c)
		return &Lease{Client: c.client, pool: p, name: name, conn: c}, nil
	}
}

func (p *Pool) dial(ctx context.Context, name string) (*pooledConn, error) {
	t, err := p.Resolve(ctx, name)
	if err != nil {
		return nil, err
	}
	client, err := Dial(ctx, t)
	if err != nil {
		return nil, err
	}
	p.Log.Debug("ssh connection opened", "vm", name, "addr", t.Addr)
	return &pooledConn{client: client, target: t, done: make(chan struct{})}, nil
}

func (p *Pool) release(name string, c *pooledConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c.sessions--
	if c.sessions == 0 {
		c.idleAt = time.Now()
	}
	if c.dead {
		p.removeLocked(name, c)
	}
}

func (p *Pool) removeLocked(name string, c *pooledConn) {
	v := p.vms[name]
	if v == nil {
		return
	}
	for i, x := range v.conns {
		if x == c {
			v.conns = append(v.conns[:i:i], v.conns[i+1:]...)
			break
		}
	}
}

// watch probes the connection with keepalives until it ends, closing it
// when a probe goes unanswered, and closes extra connections left idle.
func (p *Pool) watch(name string, c *pooledConn) {
	go func() {
		_ = c.client.Wait()
		close(c.done)
	}()
	tick := time.NewTicker(p.keepalive())
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			p.mu.Lock()
			c.dead = true
			p.removeLocked(name, c)
			p.mu.Unlock()
			p.Log.Debug("ssh connection closed", "vm", name, "addr", c.target.Addr)
			return
		case <-tick.C:
		}
		if p.closeIfIdleExtra(name, c) {
			continue // done fires next
		}
		if err := probe(c.client, p.keepalive()); err != nil {
			p.Log.Info("ssh connection lost", "vm", name, "err", err)
			_ = c.client.Close()
		}
	}
}

// closeIfIdleExtra closes c if it is not its VM's first connection and has
// had no session for IdleClose.
func (p *Pool) closeIfIdleExtra(name string, c *pooledConn) bool {
	p.mu.Lock()
	v := p.vms[name]
	extra := v != nil && len(v.conns) > 1 && v.conns[0] != c && c.sessions == 0 && time.Since(c.idleAt) >= p.idleClose()
	if extra {
		c.dead = true
		p.removeLocked(name, c)
	}
	p.mu.Unlock()
	if extra {
		_ = c.client.Close()
	}
	return extra
}

// probe sends an OpenSSH keepalive request and waits for any answer (sshd
// answers failure to requests it does not know: that is alive).
func probe(c *ssh.Client, timeout time.Duration) error {
	res := make(chan error, 1)
	go func() {
		_, _, err := c.SendRequest("keepalive@openssh.com", true, nil)
		res <- err
	}()
	select {
	case err := <-res:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("no answer to a keepalive within %s", timeout)
	}
}

// Drop closes the VM's connections: it stopped, or is gone.
func (p *Pool) Drop(name string) {
	p.mu.Lock()
	v := p.vms[name]
	delete(p.vms, name)
	if v != nil {
		v.gen++
	}
	p.mu.Unlock()
	if v != nil {
		for _, c := range v.conns {
			_ = c.client.Close()
		}
	}
}

// Close closes every connection; Get fails afterwards.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	vms := p.vms
	p.vms = nil
	p.mu.Unlock()
	for _, v := range vms {
		for _, c := range v.conns {
			_ = c.client.Close()
		}
	}
}

// isConnFailure tells a dead connection (retry on a new one) from a
// refusal by a live server, which answers with an OpenChannelError.
func isConnFailure(err error) bool {
	var oce *ssh.OpenChannelError
	return err != nil && !errors.As(err, &oce)
}
