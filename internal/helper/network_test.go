package helper

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"

	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/network"
)

const (
	testID  = "00c0ffee01"
	testTap = "bgr-00c0ffee01"
	testGW  = "172.30.0.1"
)

var subnet, _ = network.ParseSubnet(network.DefaultCIDR)

// ipLink is the part of `ip -d -j link` the tests look at.
type ipLink struct {
	Name     string   `json:"ifname"`
	Flags    []string `json:"flags"`
	Master   string   `json:"master"`
	MTU      int      `json:"mtu"`
	Address  string   `json:"address"`
	LinkInfo struct {
		Kind string         `json:"info_kind"`
		Data map[string]any `json:"info_data"`
	} `json:"linkinfo"`
	Addrs []struct {
		Family string `json:"family"`
		Local  string `json:"local"`
		Prefix int    `json:"prefixlen"`
	} `json:"addr_info"`
}

func links(t *testing.T, ns string) map[string]ipLink {
	t.Helper()
	var ls []ipLink
	if err := json.Unmarshal([]byte(run(t, "ip", "-n", ns, "-d", "-j", "addr", "show")), &ls); err != nil {
		t.Fatal(err)
	}
	m := make(map[string]ipLink)
	for _, l := range ls {
		m[l.Name] = l
	}
	return m
}

func hasFlag(l ipLink, flag string) bool {
	for _, f := range l.Flags {
		if f == flag {
			return true
		}
	}
	return false
}

// The network operations, run twice each, leave exactly the expected bridge,
// tap and nftables table in a fresh namespace, leave a foreign table alone,
// and undo cleanly.
func TestNetworkOps(t *testing.T) {
	h := startHelper(t)
	ctx := t.Context()
	// Someone else's table, which banger must never touch.
	nsRun(t, h.ns, "nft", "add table inet other; add chain inet other in { type filter hook input priority 0; policy accept; }; add rule inet other in tcp dport 22 accept")
	foreign := nsRun(t, h.ns, "nft", "list", "table", "inet", "other")

	for i, wantCreated := range []bool{true, false} {
		res, err := h.client.EnsureBridge(ctx, subnet.EnsureBridge("banger0"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Created != wantCreated {
			t.Errorf("EnsureBridge #%d: created %v, want %v", i+1, res.Created, wantCreated)
		}
	}
	if err := h.client.CreateTap(ctx, network.CreateTap(testID, "banger0", testOwner)); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := h.client.EnsureNAT(ctx, subnet.EnsureNAT("banger0")); err != nil {
			t.Fatal(err)
		}
		res, err := h.client.EnsureDNSRedirect(ctx, subnet.EnsureDNSRedirect("banger0", 5353))
		if err != nil {
			t.Fatal(err)
		}
		if res.SplitDNS {
			t.Error("split DNS configured from inside a test namespace")
		}
	}

	ls := links(t, h.ns)
	br, tap := ls["banger0"], ls[testTap]
	if br.LinkInfo.Kind != "bridge" || !hasFlag(br, "UP") || br.Address != bridgeMAC("banger0").String() {
		t.Errorf("bridge: %+v", br)
	}
	if len(br.Addrs) != 1 || br.Addrs[0].Local != testGW || br.Addrs[0].Prefix != 24 {
		t.Errorf("bridge addresses: %+v", br.Addrs)
	}
	if tap.LinkInfo.Kind != "tun" || tap.Master != "banger0" || !hasFlag(tap, "UP") {
		t.Errorf("tap: %+v", tap)
	}
	wantTap := map[string]any{"type": "tap", "pi": false, "vnet_hdr": true, "multi_queue": false, "persist": true, "user": float64(testOwner)}
	gotTap := map[string]any{}
	for k := range wantTap {
		gotTap[k] = tap.LinkInfo.Data[k]
	}
	if diff := cmp.Diff(wantTap, gotTap); diff != "" {
		t.Errorf("tap details (-want +got):\n%s", diff)
	}
	if len(ls) != 3 {
		t.Errorf("links in the namespace: %v, want lo, banger0, %s", keys(ls), testTap)
	}
	golden(t, "ruleset.golden", nsRun(t, h.ns, "nft", "list", "ruleset"))
	if got := strings.TrimSpace(nsRun(t, h.ns, "sysctl", "-n", "net.ipv4.ip_forward")); got != "1" {
		t.Errorf("ip_forward = %s, want 1", got)
	}

	owned, err := h.client.ListOwned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(helperapi.ListOwnedResult{Bridges: []string{"banger0"}, Taps: []string{testTap}, NFTable: true,
		Loops: []helperapi.OwnedLoop{}, Snapshots: []helperapi.OwnedSnapshot{}, Jails: []helperapi.OwnedJail{}}, owned); diff != "" {
		t.Errorf("ListOwned (-want +got):\n%s", diff)
	}

	if err := h.client.CreateTap(ctx, network.CreateTap(testID, "banger0", testOwner)); !errors.Is(err, helperapi.ErrExists) {
		t.Errorf("second CreateTap: %v, want ErrExists", err)
	}
	for range 2 {
		if err := h.client.DeleteTap(ctx, helperapi.DeleteTap{Name: testTap}); err != nil {
			t.Fatal(err)
		}
		if err := h.client.RemoveNAT(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.client.DeleteBridge(ctx, helperapi.DeleteBridge{Name: "banger0"}); err != nil {
			t.Fatal(err)
		}
	}
	if ls := links(t, h.ns); len(ls) != 1 {
		t.Errorf("links left: %v", keys(ls))
	}
	if got := nsRun(t, h.ns, "nft", "list", "ruleset"); got != foreign {
		t.Errorf("ruleset after RemoveNAT:\n%s\nwant only the foreign table:\n%s", got, foreign)
	}
	for _, op := range []string{helperapi.OpEnsureBridge, helperapi.OpCreateTap, helperapi.OpEnsureNAT,
		helperapi.OpEnsureDNSRedirect, helperapi.OpListOwned, helperapi.OpDeleteTap, helperapi.OpRemoveNAT, helperapi.OpDeleteBridge} {
		h.wantOpLogged(op, "ok")
	}
	h.wantOpLogged(helperapi.OpCreateTap, "error")
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// The helper re-checks valid-looking requests against its own
// configuration: only its bridge, only its owner, only a bridge that
// carries the redirect's address, and never a link of another kind.
func TestNetworkOpsRefuseForeignTargets(t *testing.T) {
	h := startHelper(t)
	ctx := t.Context()
	if _, err := h.client.EnsureBridge(ctx, subnet.EnsureBridge("banger0")); err != nil {
		t.Fatal(err)
	}
	// A veth that merely carries banger's tap prefix is not a tap.
	run(t, "ip", "-n", h.ns, "link", "add", "bgr-0000000001", "type", "veth", "peer", "name", "peer0")
	tests := []struct {
		name string
		call func() error
		code helperapi.Code
	}{
		{"another bridge than the configured one", func() error {
			_, err := h.client.EnsureBridge(ctx, subnet.EnsureBridge("banger1"))
			return err
		}, helperapi.CodeForbidden},
		{"a tap for another uid than the owner", func() error {
			return h.client.CreateTap(ctx, network.CreateTap(testID, "banger0", 1000))
		}, helperapi.CodeForbidden},
		{"NAT for another bridge", func() error {
			return h.client.EnsureNAT(ctx, subnet.EnsureNAT("banger7"))
		}, helperapi.CodeForbidden},
		{"DNS redirect to an address the bridge does not carry", func() error {
			_, err := h.client.EnsureDNSRedirect(ctx, helperapi.EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.9", Port: 5353})
			return err
		}, helperapi.CodeInvalid},
		{"deleting a veth named like a tap", func() error {
			return h.client.DeleteTap(ctx, helperapi.DeleteTap{Name: "bgr-0000000001"})
		}, helperapi.CodeForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); !isCode(err, tt.code) {
				t.Fatalf("error %v, want code %s", err, tt.code)
			}
		})
	}
	if _, ok := links(t, h.ns)["bgr-0000000001"]; !ok {
		t.Error("the veth was deleted")
	}
	if got := nsRun(t, h.ns, "nft", "list", "ruleset"); got != "" {
		t.Errorf("refused requests changed the ruleset:\n%s", got)
	}
}

// router is a namespace running the helper (bridge + NAT) with a "guest"
// namespace on the bridge through a veth standing in for a tap, and an
// "internet" namespace behind an uplink that has no route back to the
// bridge's subnet.
type router struct {
	*harness
	guest, inet string
}

func startRouter(t *testing.T) *router {
	t.Helper()
	h := startHelper(t)
	r := &router{harness: h, guest: newNetNS(t), inet: newNetNS(t)}
	if _, err := h.client.EnsureBridge(t.Context(), subnet.EnsureBridge("banger0")); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "-n", h.ns, "link", "add", "vguest", "type", "veth", "peer", "name", "eth0", "netns", r.guest)
	run(t, "ip", "-n", h.ns, "link", "set", "vguest", "master", "banger0", "up")
	run(t, "ip", "-n", r.guest, "addr", "add", "172.30.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", r.guest, "link", "set", "eth0", "up")
	run(t, "ip", "-n", r.guest, "route", "add", "default", "via", testGW)

	run(t, "ip", "-n", h.ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", r.inet)
	run(t, "ip", "-n", h.ns, "addr", "add", "10.99.0.1/24", "dev", "up0")
	run(t, "ip", "-n", h.ns, "link", "set", "up0", "up")
	run(t, "ip", "-n", r.inet, "addr", "add", "10.99.0.2/24", "dev", "up1")
	run(t, "ip", "-n", r.inet, "link", "set", "up1", "up")
	return r
}

// A guest on the bridge reaches a TCP server beyond the uplink, and the
// server sees the router's uplink address: the helper's masquerade rule is
// what makes the connection work.
func TestNATMasquerade(t *testing.T) {
	r := startRouter(t)
	ctx := t.Context()
	if err := r.client.EnsureNAT(ctx, subnet.EnsureNAT("banger0")); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	inNS(t, r.inet, func() (err error) { ln, err = net.Listen("tcp", "10.99.0.2:0"); return err })
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = fmt.Fprint(c, c.RemoteAddr().(*net.TCPAddr).IP)
			_ = c.Close()
		}
	}()
	dial := func(timeout time.Duration) (string, error) {
		var c net.Conn
		var derr error
		inNS(t, r.guest, func() error { c, derr = net.DialTimeout("tcp", ln.Addr().String(), timeout); return nil })
		if derr != nil {
			return "", derr
		}
		defer func() { _ = c.Close() }()
		b, err := io.ReadAll(c)
		return string(b), err
	}
	seen, err := dial(10 * time.Second)
	if err != nil {
		t.Fatalf("guest dial through NAT: %v", err)
	}
	if seen != "10.99.0.1" {
		t.Errorf("server saw the guest as %s, want the router's 10.99.0.1", seen)
	}
	// Without the table the server's answer has no way back.
	if err := r.client.RemoveNAT(ctx); err != nil {
		t.Fatal(err)
	}
	if seen, err := dial(time.Second); err == nil {
		t.Errorf("guest reached the server without NAT (server saw %s)", seen)
	}
}

// A host beyond the uplink that routes to the guests' subnet still cannot
// open a connection to a guest while NAT is in place; without banger's table
// it can, so the drop rule is what stops it.
func TestNATKeepsGuestsUnreachable(t *testing.T) {
	r := startRouter(t)
	ctx := t.Context()
	run(t, "ip", "-n", r.inet, "route", "add", "172.30.0.0/24", "via", "10.99.0.1")
	if err := r.client.EnsureNAT(ctx, subnet.EnsureNAT("banger0")); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	inNS(t, r.guest, func() (err error) { ln, err = net.Listen("tcp", "172.30.0.2:0"); return err })
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	dial := func() error {
		var derr error
		inNS(t, r.inet, func() error {
			var c net.Conn
			if c, derr = net.DialTimeout("tcp", ln.Addr().String(), time.Second); derr == nil {
				_ = c.Close()
			}
			return nil
		})
		return derr
	}
	if err := dial(); err == nil {
		t.Error("a host outside opened a connection to a guest through NAT")
	}
	if err := r.client.RemoveNAT(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err != nil {
		t.Errorf("without banger's table the outside dial fails too (%v): the test proves nothing", err)
	}
}

// A guest querying the gateway's port 53, and the router itself doing the
// same, are answered by a banger DNS server listening on a high port.
func TestDNSRedirect(t *testing.T) {
	r := startRouter(t)
	ctx := t.Context()
	var srv *network.DNSServer
	inNS(t, r.ns, func() (err error) {
		srv, err = network.StartDNS(ctx, network.DNSConfig{
			Addr:      testGW + ":5353",
			Lookup:    func(name string) (netip.Addr, bool) { return netip.MustParseAddr("172.30.0.2"), name == "dev" },
			Upstreams: []string{"192.0.2.1:53"}, // unused: only banger names are asked
		})
		return err
	})
	defer func() { _ = srv.Close() }()
	if _, err := r.client.EnsureDNSRedirect(ctx, subnet.EnsureDNSRedirect("banger0", 5353)); err != nil {
		t.Fatal(err)
	}
	for _, from := range []string{r.guest, r.ns} {
		for _, proto := range []string{"udp", "tcp"} {
			t.Run(fmt.Sprintf("%s/%s", map[string]string{r.guest: "guest", r.ns: "host"}[from], proto), func(t *testing.T) {
				var conn net.Conn
				inNS(t, from, func() (err error) { conn, err = net.DialTimeout(proto, testGW+":53", 5*time.Second); return err })
				defer func() { _ = conn.Close() }()
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				dc := &dns.Conn{Conn: conn}
				q := new(dns.Msg)
				q.SetQuestion("dev.banger.", dns.TypeA)
				if err := dc.WriteMsg(q); err != nil {
					t.Fatal(err)
				}
				resp, err := dc.ReadMsg()
				if err != nil {
					t.Fatalf("query %s:53 over %s: %v", testGW, proto, err)
				}
				if len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "172.30.0.2" {
					t.Errorf("answer %v, want dev.banger A 172.30.0.2", resp.Answer)
				}
			})
		}
	}
}
