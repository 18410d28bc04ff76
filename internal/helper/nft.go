package helper

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// banger's nftables table, family inet, holds four base chains:
//
//	postrouting (nat, srcnat):  ip saddr <subnet> oifname != <bridge> masquerade
//	forward (filter):           iifname <bridge> accept
//	                            oifname <bridge> ct state established,related accept
//	                            oifname <bridge> drop
//	prerouting (nat, dstnat):   iifname <bridge> ip daddr <gw> udp/tcp dport 53 dnat to <gw>:<port>
//	output (nat, dstnat):       ip daddr <gw> udp/tcp dport 53 dnat to <gw>:<port>
//
// Each Ensure writes its chains and their rules in one netlink batch that
// first flushes them, so it is atomic and idempotent, and converges after a
// configuration change. Nothing outside the table is ever read or written.
// The last forward rule keeps guests unreachable from other hosts (as
// libvirt's NAT mode does): only replies are forwarded to the bridge; the
// host itself reaches guests directly, not through forward. Accepting in
// our forward chain cannot override a drop elsewhere (another table's
// forward policy drop, e.g. Docker's): banger's doctor reports that.
const (
	chainPostrouting = "postrouting"
	chainForward     = "forward"
	chainPrerouting  = "prerouting"
	chainOutput      = "output"
)

func bangerTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: helperapi.NFTable}
}

// natChains returns the NAT and forwarding chains; dnsChains those of the
// DNS redirect.
func natChains(t *nftables.Table) (post, fwd *nftables.Chain) {
	return &nftables.Chain{Name: chainPostrouting, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource},
		&nftables.Chain{Name: chainForward, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter}
}

func dnsChains(t *nftables.Table) (pre, out *nftables.Chain) {
	return &nftables.Chain{Name: chainPrerouting, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest},
		&nftables.Chain{Name: chainOutput, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest}
}

// ifname is an interface name as nft compares it: NUL-padded to IFNAMSIZ.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchIPv4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func matchIfname(key expr.MetaKey, op expr.CmpOp, name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: ifname(name)},
	}
}

// matchAddr matches the IPv4 source (offset 12) or destination (16).
func matchAddr(offset uint32, p netip.Prefix) []expr.Any {
	load := &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4}
	if p.IsSingleIP() {
		return []expr.Any{load, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Addr().AsSlice()}}
	}
	return []expr.Any{
		load,
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: net.CIDRMask(p.Bits(), 32), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

func accept() expr.Any { return &expr.Verdict{Kind: expr.VerdictAccept} }

func rule(t *nftables.Table, c *nftables.Chain, parts ...[]expr.Any) *nftables.Rule {
	var exprs []expr.Any
	for _, p := range parts {
		exprs = append(exprs, p...)
	}
	return &nftables.Rule{Table: t, Chain: c, Exprs: exprs}
}

// natRules are the rules of natChains.
func natRules(t *nftables.Table, post, fwd *nftables.Chain, bridge string, subnet netip.Prefix) []*nftables.Rule {
	ctState := make([]byte, 4)
	binary.NativeEndian.PutUint32(ctState, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED)
	return []*nftables.Rule{
		rule(t, post, matchIPv4(), matchAddr(12, subnet.Masked()),
			matchIfname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, bridge),
			[]expr.Any{&expr.Masq{}}),
		rule(t, fwd, matchIfname(expr.MetaKeyIIFNAME, expr.CmpOpEq, bridge), []expr.Any{accept()}),
		rule(t, fwd, matchIfname(expr.MetaKeyOIFNAME, expr.CmpOpEq, bridge), []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ctState, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
			accept(),
		}),
		rule(t, fwd, matchIfname(expr.MetaKeyOIFNAME, expr.CmpOpEq, bridge), []expr.Any{
			&expr.Verdict{Kind: expr.VerdictDrop},
		}),
	}
}

// dnsRules are the rules of dnsChains: port 53 on the gateway, UDP and
// TCP, to port on the same address.
func dnsRules(t *nftables.Table, pre, out *nftables.Chain, bridge string, gw netip.Addr, port uint16) []*nftables.Rule {
	var rules []*nftables.Rule
	dnat := func(proto byte) []expr.Any {
		portBE := binary.BigEndian.AppendUint16(nil, port)
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 53}},
			&expr.Immediate{Register: 1, Data: gw.AsSlice()},
			&expr.Immediate{Register: 2, Data: portBE},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2},
		}
	}
	dst := netip.PrefixFrom(gw, 32)
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		// From guests: arriving on the bridge.
		rules = append(rules, rule(t, pre, matchIPv4(),
			matchIfname(expr.MetaKeyIIFNAME, expr.CmpOpEq, bridge), matchAddr(16, dst), dnat(proto)))
	}
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		// From the host itself (systemd-resolved's split DNS).
		rules = append(rules, rule(t, out, matchIPv4(), matchAddr(16, dst), dnat(proto)))
	}
	return rules
}

// replaceChains adds table and chains if missing, flushes the chains and
// adds rules, all in one batch.
func replaceChains(chains []*nftables.Chain, rules []*nftables.Rule) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	c.AddTable(bangerTable())
	for _, ch := range chains {
		c.AddChain(ch)
		c.FlushChain(ch)
	}
	for _, r := range rules {
		c.AddRule(r)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("write nftables table inet %s: %w", helperapi.NFTable, err)
	}
	return nil
}

func (s *Server) ensureNAT(ctx context.Context, op helperapi.EnsureNAT) error {
	if err := s.checkBridge(op.Bridge); err != nil {
		return err
	}
	cidr, err := helperapi.ParseBridgeCIDR(op.CIDR)
	if err != nil {
		return err
	}
	return s.inNetNS(func() error {
		t := bangerTable()
		post, fwd := natChains(t)
		if err := replaceChains([]*nftables.Chain{post, fwd}, natRules(t, post, fwd, op.Bridge, cidr)); err != nil {
			return err
		}
		changed, err := enableForwarding()
		if changed {
			s.logFor(ctx).Info("enabled IPv4 forwarding", "reason", "NAT for the banger bridge")
		}
		return err
	})
}

func (s *Server) ensureDNSRedirect(ctx context.Context, op helperapi.EnsureDNSRedirect) (res helperapi.EnsureDNSRedirectResult, err error) {
	if err := s.checkBridge(op.Bridge); err != nil {
		return res, err
	}
	gw := netip.MustParseAddr(op.BridgeIP) // Validate parsed it
	err = s.inNetNS(func() error {
		ok, err := bridgeHasAddr(op.Bridge, gw)
		if err != nil {
			return err
		}
		if !ok {
			return helperapi.Errorf(helperapi.CodeInvalid, "bridge %q does not carry %s", op.Bridge, gw)
		}
		t := bangerTable()
		pre, out := dnsChains(t)
		return replaceChains([]*nftables.Chain{pre, out}, dnsRules(t, pre, out, op.Bridge, gw, op.Port))
	})
	if err != nil {
		return res, err
	}
	res.SplitDNS, err = s.configureResolved(ctx, op.Bridge, gw)
	return res, err
}

// tableExists reports whether the current namespace has banger's table.
func tableExists(c *nftables.Conn) (bool, error) {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == helperapi.NFTable {
			return true, nil
		}
	}
	return false, nil
}

func (s *Server) removeNAT(ctx context.Context) error {
	err := s.inNetNS(func() error {
		c, err := nftables.New()
		if err != nil {
			return fmt.Errorf("open nftables: %w", err)
		}
		ok, err := tableExists(c)
		if err != nil || !ok {
			return err
		}
		c.DelTable(bangerTable())
		if err := c.Flush(); err != nil {
			return fmt.Errorf("delete nftables table inet %s: %w", helperapi.NFTable, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return s.revertResolved(ctx, s.cfg.Bridge)
}
