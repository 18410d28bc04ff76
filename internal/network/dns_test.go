package network

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"
)

// fakeUpstream is a real DNS server on loopback standing in for the host's
// resolver: example.com has an address; big.example has a TXT answer too
// large for plain UDP, so over UDP it answers truncated, as a real server
// does.
type fakeUpstream struct {
	addr    string
	queries atomic.Int64
	banger  atomic.Int64 // queries for the banger zone, which must never arrive
}

func startUpstream(t *testing.T) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		u.queries.Add(1)
		q := r.Question[0]
		if dns.IsSubDomain("banger.", dns.CanonicalName(q.Name)) {
			u.banger.Add(1)
		}
		m := new(dns.Msg)
		m.SetReply(r)
		switch {
		case q.Name == "example.com." && q.Qtype == dns.TypeA:
			m.Answer = append(m.Answer, mustRR(t, "example.com. 60 IN A 93.184.216.34"))
		case q.Name == "big.example." && q.Qtype == dns.TypeTXT:
			if w.RemoteAddr().Network() == "udp" {
				m.Truncated = true
				break
			}
			for i := range 40 {
				m.Answer = append(m.Answer, mustRR(t, fmt.Sprintf(`big.example. 60 IN TXT "record %02d padding padding padding"`, i)))
			}
		default:
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	pc, ln, err := listenBoth("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.addr = pc.LocalAddr().String()
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		go func() { _ = srv.ActivateAndServe() }()
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return u
}

func mustRR(t *testing.T, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return rr
}

func startTestDNS(t *testing.T, cfg DNSConfig) *DNSServer {
	t.Helper()
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Lookup == nil {
		vms := map[string]netip.Addr{"dev": netip.MustParseAddr("172.30.0.5")}
		cfg.Lookup = func(name string) (netip.Addr, bool) { a, ok := vms[name]; return a, ok }
	}
	s, err := StartDNS(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// query sends one question over proto and returns the reply.
func query(t *testing.T, proto, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	c := &dns.Client{Net: proto, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s query %s %s: %v", proto, name, dns.TypeToString[qtype], err)
	}
	return r
}

// answers renders a reply's answer section compactly for comparison.
func answers(r *dns.Msg) []string {
	var out []string
	for _, rr := range r.Answer {
		out = append(out, strings.ReplaceAll(rr.String(), "\t", " "))
	}
	return out
}

// The server answers "<vm>.banger" from the lookup, refuses other names in
// the zone with NXDOMAIN, and forwards the rest, over both UDP and TCP.
func TestDNSServer(t *testing.T) {
	up := startUpstream(t)
	s := startTestDNS(t, DNSConfig{Upstreams: []string{up.addr}})
	tests := []struct {
		name    string
		qname   string
		qtype   uint16
		rcode   int
		auth    bool
		answers []string
		soa     bool // SOA in the authority section (negative answers)
	}{
		{"vm address", "dev.banger.", dns.TypeA, dns.RcodeSuccess, true, []string{"dev.banger. 5 IN A 172.30.0.5"}, false},
		{"names are case-insensitive", "DEV.Banger.", dns.TypeA, dns.RcodeSuccess, true, []string{"DEV.Banger. 5 IN A 172.30.0.5"}, false},
		{"no IPv6 for a vm: NODATA", "dev.banger.", dns.TypeAAAA, dns.RcodeSuccess, true, nil, true},
		{"unknown vm", "nope.banger.", dns.TypeA, dns.RcodeNameError, true, nil, true},
		{"below a vm name", "www.dev.banger.", dns.TypeA, dns.RcodeNameError, true, nil, true},
		{"zone apex SOA", "banger.", dns.TypeSOA, dns.RcodeSuccess, true,
			[]string{"banger. 5 IN SOA ns.banger. hostmaster.banger. 1 3600 600 86400 5"}, false},
		{"forwarded", "example.com.", dns.TypeA, dns.RcodeSuccess, false, []string{"example.com. 60 IN A 93.184.216.34"}, false},
		{"forwarded NXDOMAIN", "nope.example.", dns.TypeA, dns.RcodeNameError, false, nil, false},
	}
	for _, proto := range []string{"udp", "tcp"} {
		for _, tt := range tests {
			t.Run(proto+"/"+tt.name, func(t *testing.T) {
				r := query(t, proto, s.Addr(), tt.qname, tt.qtype)
				if r.Rcode != tt.rcode {
					t.Errorf("rcode %s, want %s", dns.RcodeToString[r.Rcode], dns.RcodeToString[tt.rcode])
				}
				if r.Authoritative != tt.auth {
					t.Errorf("authoritative %v, want %v", r.Authoritative, tt.auth)
				}
				if diff := cmp.Diff(tt.answers, answers(r)); diff != "" {
					t.Errorf("answers (-want +got):\n%s", diff)
				}
				if gotSOA := len(r.Ns) == 1 && r.Ns[0].Header().Rrtype == dns.TypeSOA; gotSOA != tt.soa {
					t.Errorf("SOA in authority: %v, want %v (%v)", gotSOA, tt.soa, r.Ns)
				}
			})
		}
	}
	if n := up.banger.Load(); n != 0 {
		t.Errorf("%d queries for the banger zone leaked upstream", n)
	}
}

// A large upstream answer comes back whole over TCP and truncated (TC set,
// so the client retries over TCP) over plain UDP.
func TestDNSForwardTruncation(t *testing.T) {
	up := startUpstream(t)
	s := startTestDNS(t, DNSConfig{Upstreams: []string{up.addr}})
	if r := query(t, "tcp", s.Addr(), "big.example.", dns.TypeTXT); len(r.Answer) != 40 || r.Truncated {
		t.Errorf("tcp: %d answers, truncated %v; want 40, false", len(r.Answer), r.Truncated)
	}
	r := query(t, "udp", s.Addr(), "big.example.", dns.TypeTXT)
	if !r.Truncated {
		t.Errorf("udp: answer of %d records not truncated", len(r.Answer))
	}
	r.Compress = true // as it went over the wire
	if n := r.Len(); n > dns.MinMsgSize {
		t.Errorf("udp: %d-byte answer exceeds %d", n, dns.MinMsgSize)
	}
}

// With no upstream answering, a forwarded query gets SERVFAIL within the
// configured timeout rather than hanging the client.
func TestDNSUpstreamDown(t *testing.T) {
	// A UDP port that answers nothing: bound and never read.
	dead, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dead.Close() }()
	s := startTestDNS(t, DNSConfig{Upstreams: []string{dead.LocalAddr().String()}, Timeout: 200 * time.Millisecond})
	r := query(t, "udp", s.Addr(), "example.com.", dns.TypeA)
	if r.Rcode != dns.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	// Banger names still resolve without any upstream.
	if r := query(t, "udp", s.Addr(), "dev.banger.", dns.TypeA); len(r.Answer) != 1 {
		t.Errorf("dev.banger: %v", r.Answer)
	}
}

// Upstreams come from resolv.conf, are re-read when it changes, and never
// include the server itself (directly or through the redirected port 53).
func TestDNSResolvConf(t *testing.T) {
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	write := func(body string, mtime time.Time) {
		t.Helper()
		if err := os.WriteFile(rc, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(rc, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	write("# generated\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nsearch example\n", now)
	s := startTestDNS(t, DNSConfig{ResolvConf: rc})
	self, _, _ := net.SplitHostPort(s.Addr())
	if diff := cmp.Diff([]string{"10.0.0.53:53", "[fe80::1%eth0]:53"}, s.upstreams()); diff != "" {
		t.Errorf("upstreams (-want +got):\n%s", diff)
	}
	write("nameserver "+self+"\nnameserver 10.0.0.54\n", now.Add(time.Second))
	if diff := cmp.Diff([]string{"10.0.0.54:53"}, s.upstreams()); diff != "" {
		t.Errorf("after rewrite (-want +got):\n%s", diff)
	}
}

// A bind conflict is reported by StartDNS itself.
func TestDNSBindError(t *testing.T) {
	s := startTestDNS(t, DNSConfig{})
	_, err := StartDNS(t.Context(), DNSConfig{Addr: s.Addr(), Lookup: func(string) (netip.Addr, bool) { return netip.Addr{}, false }})
	if err == nil {
		t.Fatal("second StartDNS on the same address succeeded")
	}
}

// FuzzDNSRespond feeds arbitrary packets, as a guest could send them, to
// the server's query handling: whatever unpacks gets an answer with the
// query's id and never a panic; names in the zone are never forwarded.
func FuzzDNSRespond(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"dev.banger.", dns.TypeA}, {"x.dev.banger.", dns.TypeAAAA}, {"banger.", dns.TypeSOA}, {"example.com.", dns.TypeA}} {
		m := new(dns.Msg)
		m.SetQuestion(q.name, q.qtype)
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	s := &DNSServer{
		cfg: DNSConfig{
			Lookup:    func(name string) (netip.Addr, bool) { return netip.MustParseAddr("172.30.0.5"), name == "dev" },
			Upstreams: []string{"127.0.0.1:1"}, // refused at once: forwarding fails fast
			Timeout:   50 * time.Millisecond,
			TTL:       DefaultDNSTTL,
		},
		zone: "banger.",
		addr: "127.0.0.1:5353",
		log:  slog.New(slog.DiscardHandler),
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := new(dns.Msg)
		if r.Unpack(b) != nil || r.Response {
			return
		}
		for _, proto := range []string{"udp", "tcp"} {
			resp := s.respond(r, proto)
			if resp.Id != r.Id {
				t.Fatalf("answer id %d, want %d", resp.Id, r.Id)
			}
			if proto == "udp" {
				resp.Compress = true
				if resp.Len() > 65535 {
					t.Fatalf("udp answer of %d bytes", resp.Len())
				}
			}
		}
	})
}

// The server binds an address no interface carries yet, as the daemon does
// before the helper has created the bridge.
func TestDNSBindsBeforeAddressExists(t *testing.T) {
	s := startTestDNS(t, DNSConfig{Addr: "192.0.2.77:0"}) // TEST-NET-1: on no interface
	if host, _, _ := net.SplitHostPort(s.Addr()); host != "192.0.2.77" {
		t.Errorf("bound %s", s.Addr())
	}
}
