package vm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/helper"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
)

// Bridge-mode tests never touch the host's network. The test creates a
// network namespace standing for "the host" and one standing for "the
// internet" behind an uplink, then runs itself again inside the first
// (ip netns exec): everything the child does — the helper's bridge, taps
// and nftables table, QEMU, the DNS server, port forward relays — lives in
// that namespace and goes with it.
const (
	envNetNS     = "BANGER_TEST_NETNS"      // the namespace the child runs in
	envNetNSTest = "BANGER_TEST_NETNS_TEST" // the test or benchmark it runs
	envInternet  = "BANGER_TEST_INTERNET"   // host:port of the "internet" server
)

// The uplink between "the host" and "the internet".
const (
	uplinkHost     = "10.99.0.1"
	uplinkInternet = "10.99.0.2"
)

// testOwner is the owner uid the helper serves in these tests: not root
// (the helper refuses that), and nobody's.
const testOwner = 4242

// netnsChild reports whether this process is the child rerunInNetNS
// started for tb, and returns the namespace it runs in.
func netnsChild(tb testing.TB) (string, bool) {
	if os.Getenv(envNetNSTest) == tb.Name() && os.Getenv(envNetNS) != "" {
		return os.Getenv(envNetNS), true
	}
	return "", false
}

// requireNetNS skips unless namespaces, the helper's tools and QEMU are
// usable here.
func requireNetNS(tb testing.TB) {
	tb.Helper()
	testutil.RequireRoot(tb)
	testutil.RequireCommand(tb, "ip", "nft", "losetup", "qemu-system-x86_64", "qemu-img")
}

func randomName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func mustRun(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// rerunInNetNS makes the namespaces, serves "the internet" (a TCP server
// that answers every connection with the address it came from), runs this
// test binary again inside the host namespace with args, relays its output
// to tb's log and returns it. The namespaces are deleted afterwards.
func rerunInNetNS(tb testing.TB, args ...string) string {
	tb.Helper()
	hostNS, inetNS := randomName("bgrt-h"), randomName("bgrt-i")
	for _, ns := range []string{hostNS, inetNS} {
		mustRun(tb, "ip", "netns", "add", ns)
		tb.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				tb.Errorf("ip netns del %s: %v: %s", ns, err, out)
			}
		})
		mustRun(tb, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	mustRun(tb, "ip", "-n", hostNS, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", inetNS)
	mustRun(tb, "ip", "-n", hostNS, "addr", "add", uplinkHost+"/24", "dev", "up0")
	mustRun(tb, "ip", "-n", hostNS, "link", "set", "up0", "up")
	mustRun(tb, "ip", "-n", inetNS, "addr", "add", uplinkInternet+"/24", "dev", "up1")
	mustRun(tb, "ip", "-n", inetNS, "link", "set", "up1", "up")

	ln, err := listenInNetNS(inetNS, "tcp4", uplinkInternet+":0")
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = fmt.Fprintf(c, "%s\n", c.RemoteAddr().(*net.TCPAddr).IP)
			_ = c.Close()
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", hostNS, exe, "-test.v", "-test.count=1"}, args...)...)
	cmd.Env = append(os.Environ(), envNetNS+"="+hostNS, envNetNSTest+"="+tb.Name(), envInternet+"="+ln.Addr().String())
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var out strings.Builder
	relayed := make(chan struct{})
	go func() {
		defer close(relayed)
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			tb.Log("child: " + sc.Text())
			out.WriteString(sc.Text() + "\n")
		}
	}()
	err = cmd.Run()
	_ = pw.Close()
	<-relayed
	if err != nil {
		tb.Fatalf("the test inside namespace %s failed: %v", hostNS, err)
	}
	return out.String()
}

// listenInNetNS listens in another namespace from a thread that entered it
// and is never unlocked: the thread ends with its goroutine, so nothing
// else ever runs in that namespace, while the socket stays there.
func listenInNetNS(ns, network, addr string) (net.Listener, error) {
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("enter namespace %s: %w", ns, err)}
			return
		}
		ln, err := net.Listen(network, addr)
		ch <- result{ln, err}
	}()
	r := <-ch
	return r.ln, r.err
}

// bridgeEnv is a VM service in bridge mode inside the child's namespace,
// with banger-helper serving in the same process.
type bridgeEnv struct {
	*env
	ns     string
	helper *helperapi.Client
	subnet network.Subnet
	bridge BridgeConfig
	// drivers are added to every service newService builds.
	drivers map[vmm.Kind]vmm.Driver
}

// newBridgeEnv starts the helper, changed by configure if given, and a
// bridge-mode VM service. It must run in a child rerunInNetNS started.
func newBridgeEnv(t testing.TB, ns string, configure ...func(*helper.Config)) *bridgeEnv {
	t.Helper()
	images := imagetest.NewService(t)
	imagetest.ImportDefault(t, images, image.DefaultImageName)
	sockDir, err := os.MkdirTemp("", "bgr-h-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "helper.sock")
	hcfg := helper.Config{
		OwnerUID: testOwner,
		StateDir: images.Layout.StateDir,
		Socket:   sock,
		Bridge:   network.DefaultBridge,
		// Already inside it; naming it keeps the helper off the host's
		// systemd-resolved too.
		NetNS:  "/run/netns/" + ns,
		Logger: testLogger(t).With("component", "helper"),
	}
	for _, c := range configure {
		c(&hcfg)
	}
	srv, err := helper.New(hcfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := helper.Listen(sock, testOwner)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	subnet, err := network.ParseSubnet(network.DefaultCIDR)
	if err != nil {
		t.Fatal(err)
	}
	be := &bridgeEnv{
		env:    &env{images: images},
		ns:     ns,
		helper: &helperapi.Client{Socket: sock},
		subnet: subnet,
	}
	be.bridge = BridgeConfig{
		Helper: be.helper, Bridge: network.DefaultBridge, Subnet: subnet, DNSPort: 10053,
		OwnerUID: testOwner, SharedStateDir: true,
		DNSUpstreams: []string{uplinkInternet + ":53"}, // nothing answers: only .banger names are asked
	}
	be.svc = be.newService(t)
	if err := be.svc.EnableBridge(t.Context()); err != nil {
		t.Fatalf("enable bridge: %v", err)
	}
	// Cleanups run in reverse: VMs go first (their taps through the
	// helper), then the helper stops.
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("helper: %v", err)
		}
	})
	t.Cleanup(func() {
		vms, _ := be.svc.List(context.Background())
		for _, v := range vms {
			if err := be.svc.Delete(context.Background(), v.Name, true); err != nil {
				t.Errorf("delete %s: %v", v.Name, err)
			}
		}
		be.svc.Close()
	})
	return be
}

// newService is a fresh VM service over the same store, as a restarted
// daemon would build it.
func (be *bridgeEnv) newService(t testing.TB) *Service {
	svc := newService(t, be.images)
	cfg := be.bridge
	svc.Bridge = &cfg
	for k, d := range be.drivers {
		svc.Drivers[k] = d
	}
	return svc
}

// restartDaemon lets go of the VMs as a stopping daemon does and builds a
// new service that enables the bridge and reconciles, as a starting one
// does.
func (be *bridgeEnv) restartDaemon(t *testing.T) {
	t.Helper()
	be.svc.Close()
	be.svc = be.newService(t)
	if err := be.svc.EnableBridge(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := be.svc.Reconcile(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// runIn runs a shell command in a VM with stdin, over SSH with the pinned
// key, and returns its combined output.
func (e *env) runIn(t *testing.T, name, cmd string, stdin io.Reader) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	target, err := e.svc.SSHTarget(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	c, err := guest.Dial(ctx, target)
	if err != nil {
		t.Fatalf("ssh to %s: %v", name, err)
	}
	defer func() { _ = c.Close() }()
	sess, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sess.Close() }()
	sess.Stdin = stdin
	out, err := sess.CombinedOutput(cmd)
	if err != nil {
		t.Fatalf("run %q in %s: %v\n%s", cmd, name, err, out)
	}
	return string(out)
}

// installBusybox copies a static busybox into the VM (for ping: the image
// has none).
func (e *env) installBusybox(t *testing.T, name string) {
	t.Helper()
	f, err := os.Open(testutil.Busybox(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	e.runIn(t, name, "cat > /usr/local/bin/busybox && chmod 755 /usr/local/bin/busybox", f)
}

// Guest servers, in the image's Perl (perl-base is essential in Debian): a
// TCP server that greets every connection, and a UDP echo.
const (
	guestTCPServer = `setsid -f perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>%d,Listen=>8,ReuseAddr=>1) or die $!; while($c=$s->accept){print $c "hello from %s\n"; close $c}' </dev/null >/dev/null 2>&1`
	guestUDPServer = `setsid -f perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>%d,Proto=>"udp") or die $!; while($s->recv($m,2048)){$s->send("echo:$m")}' </dev/null >/dev/null 2>&1`
)

func (e *env) startGuestServers(t *testing.T, name string, tcpPort, udpPort int) {
	t.Helper()
	e.runIn(t, name, fmt.Sprintf(guestTCPServer, tcpPort, name)+"; "+fmt.Sprintf(guestUDPServer, udpPort), nil)
}

// tcpGreeting connects to addr and reads one line, retrying for a while
// (a guest server may still be starting).
func tcpGreeting(t *testing.T, addr string) string {
	t.Helper()
	var last error
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			line, rerr := bufio.NewReader(c).ReadString('\n')
			_ = c.Close()
			if rerr == nil {
				return strings.TrimSpace(line)
			}
			err = rerr
		}
		last = err
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("no greeting from %s: %v", addr, last)
	return ""
}

// udpEchoes sends a datagram to addr and returns the answer, retrying for
// a while.
func udpEchoes(t *testing.T, addr, msg string) string {
	t.Helper()
	c, err := net.Dial("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	buf := make([]byte, 2048)
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte(msg)); err != nil {
			last = err
			time.Sleep(300 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err == nil {
			return string(buf[:n])
		}
		last = err
	}
	t.Fatalf("no udp answer from %s: %v", addr, last)
	return ""
}

// hostPort is a free loopback port for a forward in tests.
func hostPort(t *testing.T) int {
	t.Helper()
	p, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// mustAddr parses a VM's address.
func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatalf("address %q: %v", s, err)
	}
	return a
}
