package server

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/client"
	"github.com/bangerhq/banger/internal/events"
)

// fakePorts records the calls the handlers make.
type fakePorts struct {
	mu    sync.Mutex // guards calls
	calls []string
}

func (f *fakePorts) record(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
}

func (f *fakePorts) Ports(_ context.Context, name string) ([]api.PortForward, error) {
	f.record("list " + name)
	if name == "none" {
		return nil, nil
	}
	return []api.PortForward{{Proto: "tcp", HostIP: api.ForwardHost, HostPort: 8080, GuestPort: 80, Active: true}}, nil
}

func (f *fakePorts) AddPort(_ context.Context, name string, req api.PortForwardRequest) (api.PortForward, error) {
	f.record("add " + name + " " + api.PortSpec(req.Proto, req.HostPort, req.GuestPort))
	if req.HostPort == 9999 {
		return api.PortForward{}, api.Errorf(api.CodeConflict, "127.0.0.1:9999/tcp is in use")
	}
	return api.PortForward{Proto: req.Proto, HostIP: api.ForwardHost, HostPort: req.HostPort, GuestPort: req.GuestPort}, nil
}

func (f *fakePorts) RemovePort(_ context.Context, name string, req api.PortForwardRequest) error {
	f.record("remove " + name + " " + api.PortSpec(req.Proto, req.HostPort, req.GuestPort))
	return nil
}

func startPortServer(t *testing.T, ports PortService) *client.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	done := make(chan struct{})
	srv := &Server{
		Events: &events.Bus{},
		Info:   func() api.VersionInfo { return api.VersionInfo{Version: "test"} },
		Owner:  uint32(os.Getuid()),
		Done:   done,
		Log:    slog.New(slog.DiscardHandler),
		Ports:  ports,
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), ConnContext: ConnContext}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { close(done); _ = hs.Close() })
	return client.New(sock)
}

// The port endpoints route list, add and remove to the service with the
// request as sent, check it before the service sees it, and pass the
// service's errors through with their codes.
func TestPortEndpoints(t *testing.T) {
	fake := &fakePorts{}
	c := startPortServer(t, fake)
	ctx := t.Context()

	fs, err := c.Ports(ctx, "dev")
	if err != nil || len(fs) != 1 || fs[0].String() != "8080:80" || !fs[0].Active {
		t.Fatalf("Ports = %+v, %v", fs, err)
	}
	if fs, err := c.Ports(ctx, "none"); err != nil || fs == nil || len(fs) != 0 {
		t.Fatalf("Ports of a VM without forwards = %#v, %v; want an empty list", fs, err)
	}
	if f, err := c.AddPort(ctx, "dev", api.PortForwardRequest{Proto: "udp", HostPort: 5353, GuestPort: 53}); err != nil || f.String() != "5353:53/udp" {
		t.Fatalf("AddPort = %+v, %v", f, err)
	}
	if err := c.RemovePort(ctx, "dev", api.PortForwardRequest{Proto: "tcp", HostPort: 8080}); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePort(ctx, "dev", api.PortForwardRequest{Proto: "udp", HostPort: 5353, GuestPort: 53}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		call func() error
		code api.Code
		want string
	}{
		{"add with a bad protocol", func() error {
			_, err := c.AddPort(ctx, "dev", api.PortForwardRequest{Proto: "sctp", HostPort: 1, GuestPort: 1})
			return err
		}, api.CodeInvalidArgument, "not tcp or udp"},
		{"add with host port 0", func() error {
			_, err := c.AddPort(ctx, "dev", api.PortForwardRequest{Proto: "tcp", GuestPort: 1})
			return err
		}, api.CodeInvalidArgument, "host port 0"},
		{"add refused by the service", func() error {
			_, err := c.AddPort(ctx, "dev", api.PortForwardRequest{Proto: "tcp", HostPort: 9999, GuestPort: 80})
			return err
		}, api.CodeConflict, "in use"},
		{"remove with a bad protocol", func() error {
			return c.RemovePort(ctx, "dev", api.PortForwardRequest{Proto: "icmp", HostPort: 80})
		}, api.CodeInvalidArgument, "not tcp or udp"},
		{"remove of port 70000", func() error {
			return c.RemovePort(ctx, "dev", api.PortForwardRequest{Proto: "tcp", HostPort: 70000})
		}, api.CodeInvalidArgument, "out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ae *api.Error
			if err := tc.call(); !errors.As(err, &ae) || ae.Code != tc.code || !strings.Contains(ae.Message, tc.want) {
				t.Fatalf("error %v, want code %s mentioning %q", err, tc.code, tc.want)
			}
		})
	}
	want := []string{"list dev", "list none", "add dev 5353:53/udp", "remove dev 8080:0", "remove dev 5353:53/udp", "add dev 9999:80"}
	if d := cmp.Diff(want, fake.calls); d != "" {
		t.Errorf("service calls (-want +got):\n%s", d)
	}
}

// A daemon without a port service answers the port endpoints with
// "unavailable" instead of failing oddly.
func TestPortEndpointsUnavailable(t *testing.T) {
	c := startPortServer(t, nil)
	var ae *api.Error
	if _, err := c.Ports(t.Context(), "dev"); !errors.As(err, &ae) || ae.Code != api.CodeUnavailable {
		t.Fatalf("Ports = %v, want unavailable", err)
	}
}
