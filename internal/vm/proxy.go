package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// In bridge mode a port forward is a userspace relay in bangerd from
// 127.0.0.1:HOST to <guest address>:GUEST. A relay in the daemon needs no
// privilege and no nftables rule (a DNAT of loopback traffic needs
// route_localnet, a host-wide sysctl), and it goes away with the daemon
// instead of outliving it as a kernel rule nobody owns.

// Relay limits.
const (
	// proxyDialTimeout bounds connecting to the guest for one client.
	proxyDialTimeout = 10 * time.Second
	// udpIdle is how long a UDP client's session lives without traffic,
	// as conntrack keeps a UDP stream.
	udpIdle = 2 * time.Minute
	// maxUDPSessions bounds the clients one UDP relay tracks; datagrams
	// from further clients are dropped until a session expires.
	maxUDPSessions = 1024
	maxDatagram    = 64 << 10
)

// startProxy listens on listen ("127.0.0.1:8080") and relays proto ("tcp"
// or "udp") to target. Close stops listening and ends every relayed
// connection.
func startProxy(proto, listen, target string, log *slog.Logger) (io.Closer, error) {
	switch proto {
	case "tcp":
		ln, err := net.Listen("tcp4", listen)
		if err != nil {
			return nil, err
		}
		p := &tcpProxy{ln: ln, target: target, log: log, conns: map[net.Conn]struct{}{}}
		p.wg.Add(1)
		go p.serve()
		return p, nil
	case "udp":
		pc, err := net.ListenPacket("udp4", listen)
		if err != nil {
			return nil, err
		}
		raddr, err := net.ResolveUDPAddr("udp4", target)
		if err != nil {
			_ = pc.Close()
			return nil, fmt.Errorf("resolve %s: %w", target, err)
		}
		p := &udpProxy{pc: pc, target: raddr, log: log, sessions: map[string]*udpSession{}}
		p.wg.Add(1)
		go p.serve()
		return p, nil
	}
	return nil, fmt.Errorf("relay protocol %q is not tcp or udp", proto)
}

// tcpProxy relays each accepted connection to the target.
type tcpProxy struct {
	ln     net.Listener
	target string
	log    *slog.Logger
	wg     sync.WaitGroup

	mu     sync.Mutex // guards conns and closed
	conns  map[net.Conn]struct{}
	closed bool
}

func (p *tcpProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("port forward stopped accepting", "listen", p.ln.Addr(), "err", err)
			}
			return
		}
		if !p.track(c) {
			_ = c.Close()
			return
		}
		p.wg.Add(1)
		go p.relay(c)
	}
}

// track registers a connection so Close can end it; false once closed.
func (p *tcpProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *tcpProxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
}

func (p *tcpProxy) relay(client net.Conn) {
	defer p.wg.Done()
	defer func() { _ = client.Close(); p.untrack(client) }()
	ctx, cancel := context.WithTimeout(context.Background(), proxyDialTimeout)
	guest, err := (&net.Dialer{}).DialContext(ctx, "tcp4", p.target)
	cancel()
	if err != nil {
		p.log.Debug("port forward: connect to guest", "target", p.target, "err", err)
		return
	}
	if !p.track(guest) {
		_ = guest.Close()
		return
	}
	defer func() { _ = guest.Close(); p.untrack(guest) }()
	// Each direction ends with a half-close, so a client that shuts down
	// its sending side still gets the guest's whole answer.
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(guest, client)
		closeWrite(guest)
	}()
	_, _ = io.Copy(client, guest)
	closeWrite(client)
	<-done
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

// Close stops accepting and ends every relayed connection.
func (p *tcpProxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// udpProxy relays datagrams: each client address gets a session, a socket
// connected to the target whose replies go back to that client.
type udpProxy struct {
	pc     net.PacketConn
	target *net.UDPAddr
	log    *slog.Logger
	wg     sync.WaitGroup

	mu       sync.Mutex // guards sessions and closed
	sessions map[string]*udpSession
	closed   bool
}

type udpSession struct {
	conn   *net.UDPConn
	client net.Addr
	mu     sync.Mutex // guards last
	last   time.Time
}

func (s *udpSession) touch() {
	s.mu.Lock()
	s.last = time.Now()
	s.mu.Unlock()
}

func (s *udpSession) idleFor() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Since(s.last)
}

func (p *udpProxy) serve() {
	defer p.wg.Done()
	buf := make([]byte, maxDatagram)
	for {
		n, from, err := p.pc.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("port forward stopped reading", "listen", p.pc.LocalAddr(), "err", err)
			}
			return
		}
		s := p.session(from)
		if s == nil {
			continue
		}
		s.touch()
		if _, err := s.conn.Write(buf[:n]); err != nil {
			p.log.Debug("port forward: send to guest", "target", p.target, "err", err)
		}
	}
}

// session returns the client's session, making it on its first datagram;
// nil when the relay is closed or full.
func (p *udpProxy) session(from net.Addr) *udpSession {
	key := from.String()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	if s, ok := p.sessions[key]; ok {
		return s
	}
	if len(p.sessions) >= maxUDPSessions {
		p.log.Debug("port forward: too many udp clients; dropping", "client", key)
		return nil
	}
	conn, err := net.DialUDP("udp4", nil, p.target)
	if err != nil {
		p.log.Debug("port forward: open udp session", "target", p.target, "err", err)
		return nil
	}
	s := &udpSession{conn: conn, client: from, last: time.Now()}
	p.sessions[key] = s
	p.wg.Add(1)
	go p.replies(key, s)
	return s
}

// replies sends the guest's answers back to the client until the session
// is idle for udpIdle or the relay closes.
func (p *udpProxy) replies(key string, s *udpSession) {
	defer p.wg.Done()
	defer func() {
		p.mu.Lock()
		if p.sessions[key] == s {
			delete(p.sessions, key)
		}
		p.mu.Unlock()
		_ = s.conn.Close()
	}()
	buf := make([]byte, maxDatagram)
	for {
		_ = s.conn.SetReadDeadline(time.Now().Add(udpIdle))
		n, err := s.conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && s.idleFor() < udpIdle {
				continue // the client spoke recently
			}
			if errors.As(err, &ne) && ne.Timeout() {
				return
			}
			// An ICMP port unreachable from the guest (nothing listens
			// yet) surfaces as ECONNREFUSED on the connected socket; the
			// session stays for the client's next try.
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return
		}
		s.touch()
		if _, err := p.pc.WriteTo(buf[:n], s.client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Debug("port forward: answer udp client", "client", s.client, "err", err)
		}
	}
}

// Close stops the relay and every session.
func (p *udpProxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	err := p.pc.Close()
	for _, s := range p.sessions {
		_ = s.conn.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}
