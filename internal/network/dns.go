package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// DNS defaults.
const (
	DefaultResolvConf = "/etc/resolv.conf"
	DefaultDNSTimeout = 2 * time.Second
	// DefaultDNSTTL is short: a VM's address changes when it is re-created.
	DefaultDNSTTL = 5
)

// DNSConfig configures the daemon's DNS server.
type DNSConfig struct {
	// Addr is host:port for both UDP and TCP, e.g. "172.30.0.1:5353" (the
	// helper redirects the gateway's port 53 to it). Port 0 picks a free
	// port, the same for UDP and TCP.
	Addr string
	// Lookup maps a VM name, lower-cased, to its address. It is called
	// concurrently.
	Lookup func(name string) (netip.Addr, bool)
	// Upstreams are "host:port" resolvers for names outside the banger
	// zone. When empty they are read from ResolvConf, again whenever that
	// file changes.
	Upstreams  []string
	ResolvConf string        // default DefaultResolvConf
	Timeout    time.Duration // per upstream exchange; default DefaultDNSTimeout
	TTL        uint32        // of answers; default DefaultDNSTTL
	Logger     *slog.Logger  // default: discard
}

// DNSServer answers A queries for "<vm>.banger." from a lookup callback,
// NXDOMAIN for other names under "banger.", and forwards everything else
// to the host's resolvers.
type DNSServer struct {
	cfg   DNSConfig
	zone  string // "banger."
	addr  string // the bound host:port
	udp   *dns.Server
	tcp   *dns.Server
	log   *slog.Logger
	done  chan struct{} // closed when both servers have stopped
	close sync.Once

	mu       sync.Mutex // guards the resolv.conf cache below
	rcStamp  string     // size and mtime of ResolvConf when last read
	rcServer []string
}

// StartDNS binds UDP and TCP on cfg.Addr and serves until Close or until
// ctx ends. Bind errors are returned here, not later.
func StartDNS(ctx context.Context, cfg DNSConfig) (*DNSServer, error) {
	if cfg.Lookup == nil {
		return nil, errors.New("start dns: no lookup function")
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = DefaultResolvConf
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultDNSTimeout
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultDNSTTL
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pc, ln, err := listenBoth(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("start dns on %s: %w", cfg.Addr, err)
	}
	s := &DNSServer{
		cfg:  cfg,
		zone: Domain + ".",
		addr: pc.LocalAddr().String(),
		log:  log.With("component", "dns"),
		done: make(chan struct{}),
	}
	var started sync.WaitGroup
	started.Add(2)
	s.udp = &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(s.serveUDP), NotifyStartedFunc: started.Done}
	s.tcp = &dns.Server{Listener: ln, Handler: dns.HandlerFunc(s.serveTCP), NotifyStartedFunc: started.Done}
	var stopped sync.WaitGroup
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		stopped.Add(1)
		go func() {
			defer stopped.Done()
			if err := srv.ActivateAndServe(); err != nil {
				s.log.Warn("dns server stopped", "err", err)
			}
		}()
	}
	go func() { stopped.Wait(); close(s.done) }()
	started.Wait()
	context.AfterFunc(ctx, func() { _ = s.Close() })
	return s, nil
}

// listenConfig sets IP_FREEBIND: the daemon may bind the gateway address
// before the helper has put it on the bridge, and its sockets stay valid
// while the bridge is re-created.
var listenConfig = net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_FREEBIND, 1)
	}); err != nil {
		return err
	}
	return serr
}}

// listenBoth binds UDP and TCP on the same address. With port 0 the TCP
// port is taken from the UDP one, retrying when something holds it.
func listenBoth(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	ctx := context.Background()
	for range 10 {
		pc, err := listenConfig.ListenPacket(ctx, "udp4", addr)
		if err != nil {
			return nil, nil, err
		}
		bound := net.JoinHostPort(host, fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port))
		ln, err := listenConfig.Listen(ctx, "tcp4", bound)
		if err == nil {
			return pc, ln, nil
		}
		_ = pc.Close()
		if port != "0" || !errors.Is(err, syscall.EADDRINUSE) {
			return nil, nil, err
		}
	}
	return nil, nil, errors.New("no port free for both udp and tcp")
}

// Addr is the bound host:port (UDP and TCP).
func (s *DNSServer) Addr() string { return s.addr }

// Close stops both servers and waits for them.
func (s *DNSServer) Close() error {
	var err error
	s.close.Do(func() {
		err = errors.Join(s.udp.Shutdown(), s.tcp.Shutdown())
		<-s.done
	})
	return err
}

func (s *DNSServer) serveUDP(w dns.ResponseWriter, r *dns.Msg) { s.serve(w, r, "udp") }
func (s *DNSServer) serveTCP(w dns.ResponseWriter, r *dns.Msg) { s.serve(w, r, "tcp") }

func (s *DNSServer) serve(w dns.ResponseWriter, r *dns.Msg, proto string) {
	if err := w.WriteMsg(s.respond(r, proto)); err != nil {
		s.log.Debug("write dns response", "err", err)
	}
}

// respond builds the answer to one query received over proto.
func (s *DNSServer) respond(r *dns.Msg, proto string) *dns.Msg {
	if len(r.Question) != 1 || r.Opcode != dns.OpcodeQuery {
		// The server's accept function already refuses these; a handler
		// that indexes Question must not trust that alone.
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeFormatError)
		return m
	}
	var resp *dns.Msg
	if q := r.Question[0]; dns.IsSubDomain(s.zone, dns.CanonicalName(q.Name)) {
		resp = s.answer(r)
	} else {
		resp = s.forward(r, proto)
	}
	if proto == "udp" {
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = max(int(opt.UDPSize()), dns.MinMsgSize)
		}
		resp.Truncate(size)
	}
	return resp
}

// answer serves the banger zone authoritatively.
func (s *DNSServer) answer(r *dns.Msg) *dns.Msg {
	q := r.Question[0]
	name := dns.CanonicalName(q.Name)
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.RecursionAvailable = true
	soa := s.soa()
	if q.Qclass != dns.ClassINET && q.Qclass != dns.ClassANY {
		m.Rcode = dns.RcodeRefused
		return m
	}
	if name == s.zone {
		if q.Qtype == dns.TypeSOA {
			m.Answer = []dns.RR{soa}
		} else {
			m.Ns = []dns.RR{soa}
		}
		return m
	}
	vm := strings.TrimSuffix(name, "."+s.zone)
	addr, ok := netip.Addr{}, false
	if !strings.Contains(vm, ".") {
		addr, ok = s.cfg.Lookup(vm)
	}
	if !ok || !addr.Is4() {
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{soa}
		return m
	}
	if q.Qtype != dns.TypeA && q.Qtype != dns.TypeANY {
		m.Ns = []dns.RR{soa} // the name exists, but has no record of this type
		return m
	}
	m.Answer = []dns.RR{&dns.A{
		Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: s.cfg.TTL},
		A:   addr.AsSlice(),
	}}
	return m
}

func (s *DNSServer) soa() *dns.SOA {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: s.zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: s.cfg.TTL},
		Ns:      "ns." + s.zone,
		Mbox:    "hostmaster." + s.zone,
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  s.cfg.TTL,
	}
}

// forward asks the upstreams in order and relays the first usable answer;
// SERVFAIL when none gives one. An answer truncated over UDP is asked again
// over TCP, so the client always gets the full answer or a correctly
// truncated one.
func (s *DNSServer) forward(r *dns.Msg, proto string) *dns.Msg {
	ups := s.upstreams()
	for _, up := range ups {
		resp, err := s.exchange(r, up, proto)
		if err != nil {
			s.log.Debug("forward dns query", "upstream", up, "name", r.Question[0].Name, "err", err)
			continue
		}
		if resp.Truncated && proto == "udp" {
			if full, err := s.exchange(r, up, "tcp"); err == nil {
				resp = full
			}
		}
		if resp.Rcode == dns.RcodeServerFailure || resp.Rcode == dns.RcodeRefused {
			continue
		}
		resp.Id = r.Id
		return resp
	}
	m := new(dns.Msg)
	m.SetRcode(r, dns.RcodeServerFailure)
	m.RecursionAvailable = true
	if len(ups) == 0 {
		s.log.Warn("no upstream dns resolver", "resolv_conf", s.cfg.ResolvConf)
	}
	return m
}

func (s *DNSServer) exchange(r *dns.Msg, upstream, proto string) (*dns.Msg, error) {
	c := &dns.Client{Net: proto, Timeout: s.cfg.Timeout, UDPSize: dns.DefaultMsgSize}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
	defer cancel()
	resp, _, err := c.ExchangeContext(ctx, r.Copy(), upstream)
	return resp, err
}

// upstreams returns the configured resolvers, or those of resolv.conf,
// without the server itself: forwarding to ourselves (directly, or through
// the gateway's redirected port 53) would loop.
func (s *DNSServer) upstreams() []string {
	ups := s.cfg.Upstreams
	if len(ups) == 0 {
		ups = s.resolvConfServers()
	}
	self, _, _ := net.SplitHostPort(s.addr)
	out := make([]string, 0, len(ups))
	for _, u := range ups {
		if u == s.addr || u == net.JoinHostPort(self, "53") {
			continue
		}
		out = append(out, u)
	}
	return out
}

// resolvConfServers reads the nameservers of ResolvConf, re-reading only
// when its size or modification time changed.
func (s *DNSServer) resolvConfServers() []string {
	fi, err := os.Stat(s.cfg.ResolvConf)
	if err != nil {
		s.log.Warn("read resolver configuration", "err", err)
		return nil
	}
	stamp := fmt.Sprint(fi.Size(), fi.ModTime().UnixNano())
	s.mu.Lock()
	defer s.mu.Unlock()
	if stamp == s.rcStamp {
		return s.rcServer
	}
	servers, err := ParseResolvConf(s.cfg.ResolvConf)
	if err != nil {
		s.log.Warn("read resolver configuration", "err", err)
		return s.rcServer
	}
	s.rcStamp, s.rcServer = stamp, servers
	return servers
}

// ParseResolvConf returns the "host:port" of every nameserver in a
// resolv.conf file.
func ParseResolvConf(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	out := make([]string, 0, len(cc.Servers))
	for _, srv := range cc.Servers {
		out = append(out, net.JoinHostPort(srv, cc.Port))
	}
	return out, nil
}
