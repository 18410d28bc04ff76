package vm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"
)

// tcpEcho serves "echo:<what the client sent until it half-closed>" on a
// loopback port and returns its address.
func tcpEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				b, _ := io.ReadAll(c)
				_, _ = fmt.Fprintf(c, "echo:%s", b)
			}()
		}
	}()
	return ln.Addr().String()
}

// udpEcho answers each datagram with "echo:<datagram>".
func udpEcho(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
		}
	}()
	return pc.LocalAddr().String()
}

func freeLoopback(t *testing.T) string {
	t.Helper()
	p, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", p)
}

// A TCP relay carries both directions, passes a client's half-close on
// (so the whole answer still arrives), and Close ends live connections and
// frees the port.
func TestTCPProxy(t *testing.T) {
	target := tcpEcho(t)
	listen := freeLoopback(t)
	p, err := startProxy("tcp", listen, target, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		c, err := net.Dial("tcp4", listen)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = fmt.Fprintf(c, "hello %d", i)
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		_ = c.Close()
		if err != nil || string(got) != fmt.Sprintf("echo:hello %d", i) {
			t.Fatalf("relayed answer %q, %v", got, err)
		}
	}
	// A connection still open when the relay closes is ended.
	idle, err := net.Dial("tcp4", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = idle.Close() }()
	time.Sleep(50 * time.Millisecond) // let the relay accept it
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	_ = idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := idle.Read(make([]byte, 1)); err == nil {
		t.Error("a relayed connection survived Close")
	} else if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		t.Error("a relayed connection stayed open after Close")
	}
	ln, err := net.Listen("tcp4", listen)
	if err != nil {
		t.Fatalf("port not freed by Close: %v", err)
	}
	_ = ln.Close()
}

// A TCP relay to a guest port where nothing listens closes the client's
// connection instead of leaving it hanging.
func TestTCPProxyTargetDown(t *testing.T) {
	listen := freeLoopback(t)
	p, err := startProxy("tcp", listen, freeLoopback(t), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp4", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 16)); !errors.Is(err, io.EOF) {
		t.Fatalf("read from a relay without target = %d, %v; want EOF", n, err)
	}
}

// A UDP relay gives each client its own session: every client gets the
// answers to its own datagrams, and Close frees the port.
func TestUDPProxy(t *testing.T) {
	target := udpEcho(t)
	listen := freeLoopback(t)
	p, err := startProxy("udp", listen, target, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var clients []net.Conn
	for range 3 {
		c, err := net.Dial("udp4", listen)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		clients = append(clients, c)
	}
	for round := range 2 {
		for i, c := range clients {
			msg := fmt.Sprintf("client %d round %d", i, round)
			if _, err := c.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			if err != nil || string(buf[:n]) != "echo:"+msg {
				t.Fatalf("client %d got %q, %v", i, buf[:n], err)
			}
		}
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp4", listen)
	if err != nil {
		t.Fatalf("port not freed by Close: %v", err)
	}
	_ = pc.Close()
}

// A relay refuses a protocol other than tcp or udp, and a port in use.
func TestProxyRefuses(t *testing.T) {
	if _, err := startProxy("sctp", freeLoopback(t), "127.0.0.1:1", slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "sctp") {
		t.Errorf("sctp relay: %v", err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	if p, err := startProxy("tcp", ln.Addr().String(), "127.0.0.1:1", slog.New(slog.DiscardHandler)); err == nil {
		p.Close()
		t.Error("relay listened on a port in use")
	}
}
