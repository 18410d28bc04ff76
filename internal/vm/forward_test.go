package vm

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/api"
)

// User-mode port forwards on a real guest: TCP and UDP forwards added
// while the VM runs serve at once (QEMU's hostfwd, through QMP); they
// survive a daemon restart (re-applied to the re-attached QEMU) and a VM
// restart (on QEMU's command line); a port another program holds is
// refused; removing a forward frees its port at once.
func TestUserModePortForwards(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.create(t, "fwd")
	if v.Network.Mode != NetUser {
		t.Fatalf("network mode %q, want user", v.Network.Mode)
	}
	e.startGuestServers(t, "fwd", 8080, 9090)
	tcpHost, udpHost := hostPort(t), hostPort(t)
	for _, req := range []api.PortForwardRequest{
		{Proto: "tcp", HostPort: tcpHost, GuestPort: 8080},
		{Proto: "udp", HostPort: udpHost, GuestPort: 9090},
	} {
		if f, err := e.svc.AddPort(ctx, "fwd", req); err != nil || !f.Active {
			t.Fatalf("AddPort(%+v) = %+v, %v", req, f, err)
		}
	}
	check := func(when string) {
		t.Helper()
		if got := tcpGreeting(t, loopback(tcpHost)); got != "hello from fwd" {
			t.Errorf("%s: tcp forward answered %q", when, got)
		}
		if got := udpEchoes(t, loopback(udpHost), when); got != "echo:"+when {
			t.Errorf("%s: udp forward answered %q", when, got)
		}
	}
	check("added")

	held, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = held.Close() }()
	_, err = e.svc.AddPort(ctx, "fwd", api.PortForwardRequest{Proto: "tcp", HostPort: held.Addr().(*net.TCPAddr).Port, GuestPort: 22})
	if apiCode(err) != api.CodeConflict || !strings.Contains(err.Error(), "in use") {
		t.Errorf("forward of a port in use: %v", err)
	}
	if _, err := e.svc.AddPort(ctx, "fwd", api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost, GuestPort: 80}); apiCode(err) != api.CodeAlreadyExists {
		t.Errorf("the same host port twice: %v", err)
	}

	// The daemon restarts; QEMU keeps serving, and the new daemon applies
	// the recorded forwards to it again.
	e.svc.Close()
	e.svc = newService(t, e.images)
	if err := e.svc.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	check("reattached")

	if _, err := e.svc.Restart(ctx, "fwd", false, nil); err != nil {
		t.Fatal(err)
	}
	fs, err := e.svc.Ports(ctx, "fwd")
	want := []api.PortForward{
		{Proto: "tcp", HostIP: "127.0.0.1", HostPort: tcpHost, GuestPort: 8080, Active: true},
		{Proto: "udp", HostIP: "127.0.0.1", HostPort: udpHost, GuestPort: 9090, Active: true},
	}
	if d := cmp.Diff(want, fs); err != nil || d != "" {
		t.Errorf("Ports after a VM restart (-want +got), %v:\n%s", err, d)
	}
	e.startGuestServers(t, "fwd", 8080, 9090)
	check("rebooted")

	if err := e.svc.RemovePort(ctx, "fwd", api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost}); err != nil {
		t.Fatal(err)
	}
	if err := probePort(api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost}); err != nil {
		t.Errorf("the removed forward's port is still held: %v", err)
	}
	if err := e.svc.RemovePort(ctx, "fwd", api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost}); apiCode(err) != api.CodeNotFound {
		t.Errorf("removing it again: %v", err)
	}
	if err := e.svc.RemovePort(ctx, "fwd", api.PortForwardRequest{Proto: "udp", HostPort: udpHost, GuestPort: 53}); apiCode(err) != api.CodeInvalidArgument {
		t.Errorf("removing with the wrong guest port: %v", err)
	}
}

// Port forward requests are checked before anything is recorded, and a
// stopped VM's forward is recorded (its port checked free now) and shown
// inactive.
func TestPortForwardRequests(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.create(t, "idle", func(r *api.VMCreateRequest) { r.NoStart = true })
	for _, tc := range []struct {
		name string
		req  api.PortForwardRequest
		code api.Code
	}{
		{"bad protocol", api.PortForwardRequest{Proto: "sctp", HostPort: 8080, GuestPort: 80}, api.CodeInvalidArgument},
		{"host port 0", api.PortForwardRequest{Proto: "tcp", GuestPort: 80}, api.CodeInvalidArgument},
		{"guest port 65536", api.PortForwardRequest{Proto: "tcp", HostPort: 8080, GuestPort: 65536}, api.CodeInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := e.svc.AddPort(ctx, "idle", tc.req); apiCode(err) != tc.code {
				t.Fatalf("AddPort(%+v) = %v, want %s", tc.req, err, tc.code)
			}
		})
	}
	if _, err := e.svc.AddPort(ctx, "nosuch", api.PortForwardRequest{Proto: "tcp", HostPort: 8080, GuestPort: 80}); apiCode(err) != api.CodeNotFound {
		t.Errorf("forward for a VM that does not exist: %v", err)
	}
	port := hostPort(t)
	f, err := e.svc.AddPort(ctx, "idle", api.PortForwardRequest{Proto: "udp", HostPort: port, GuestPort: 53})
	if err != nil || f.Active {
		t.Fatalf("forward of a stopped VM: %+v, %v", f, err)
	}
	if fs, _ := e.svc.Ports(ctx, "idle"); len(fs) != 1 || fs[0].Active || fs[0].String() != api.PortSpec("udp", port, 53) {
		t.Errorf("Ports = %+v", fs)
	}
}
