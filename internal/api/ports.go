package api

import (
	"fmt"
	"strconv"
	"strings"
)

// Port forward protocols.
const (
	ProtoTCP = "tcp"
	ProtoUDP = "udp"
)

// ForwardHost is the host address every port forward listens on: the
// loopback, so a forward never publishes a guest to the LAN.
const ForwardHost = "127.0.0.1"

// PortForwardRequest is the body of POST /v1/vms/{name}/ports: publish the
// guest's GuestPort on ForwardHost:HostPort.
type PortForwardRequest struct {
	Proto     string `json:"proto"` // ProtoTCP or ProtoUDP
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// Validate checks the request's fields; it says nothing of whether the
// port is free.
func (r PortForwardRequest) Validate() error {
	if r.Proto != ProtoTCP && r.Proto != ProtoUDP {
		return Errorf(CodeInvalidArgument, "protocol %q is not tcp or udp", r.Proto)
	}
	if r.HostPort < 1 || r.HostPort > 65535 {
		return Errorf(CodeInvalidArgument, "host port %d is out of range 1..65535", r.HostPort)
	}
	if r.GuestPort < 1 || r.GuestPort > 65535 {
		return Errorf(CodeInvalidArgument, "guest port %d is out of range 1..65535", r.GuestPort)
	}
	return nil
}

// PortForward is one recorded forward of a VM, as GET /v1/vms/{name}/ports
// lists them.
type PortForward struct {
	Proto     string `json:"proto"`
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	// Active says whether the forward serves right now: the VM runs and
	// the host port was free when it was bound.
	Active bool `json:"active"`
}

// String is the forward as `banger vm port` takes it: "8080:80" or
// "5353:53/udp".
func (f PortForward) String() string {
	return PortSpec(f.Proto, f.HostPort, f.GuestPort)
}

// PortSpec renders a forward as "HOST:GUEST" with "/udp" for UDP.
func PortSpec(proto string, hostPort, guestPort int) string {
	s := strconv.Itoa(hostPort) + ":" + strconv.Itoa(guestPort)
	if proto == ProtoUDP {
		s += "/udp"
	}
	return s
}

// ParsePortSpec parses "HOST:GUEST", "HOST:GUEST/tcp" or "HOST:GUEST/udp".
// With guestOptional, a bare "HOST" (or "HOST/udp") is accepted too and
// gives GuestPort 0: removing a forward needs only its host side.
func ParsePortSpec(spec string, guestOptional bool) (PortForwardRequest, error) {
	bad := func(why string) (PortForwardRequest, error) {
		want := "HOST:GUEST or HOST:GUEST/udp, like 8080:80"
		if guestOptional {
			want = "HOST, HOST/udp or HOST:GUEST[/udp], like 8080"
		}
		return PortForwardRequest{}, Errorf(CodeInvalidArgument, "port forward %q: %s", spec, why).WithHint("write " + want)
	}
	req := PortForwardRequest{Proto: ProtoTCP}
	ports, proto, hasProto := strings.Cut(spec, "/")
	if hasProto {
		switch proto {
		case ProtoTCP, ProtoUDP:
			req.Proto = proto
		default:
			return bad(fmt.Sprintf("protocol %q is not tcp or udp", proto))
		}
	}
	host, guest, hasGuest := strings.Cut(ports, ":")
	if !hasGuest && !guestOptional {
		return bad("no guest port")
	}
	var err error
	if req.HostPort, err = parsePort(host); err != nil {
		return bad("host port: " + err.Error())
	}
	if hasGuest {
		if req.GuestPort, err = parsePort(guest); err != nil {
			return bad("guest port: " + err.Error())
		}
	}
	return req, nil
}

// parsePort accepts a decimal port 1..65535 without sign or leading zeros
// (which some tools read as octal).
func parsePort(s string) (int, error) {
	if s == "" {
		return 0, fmt.Errorf("missing")
	}
	if len(s) > 5 || s[0] == '0' || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%q is not a port number", s)
	}
	n, _ := strconv.Atoi(s)
	if n > 65535 {
		return 0, fmt.Errorf("%d is out of range 1..65535", n)
	}
	return n, nil
}
