package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/testutil"
	"github.com/bangerhq/banger/internal/vmm"
	"github.com/bangerhq/banger/internal/vmm/firecracker"
	"github.com/bangerhq/banger/internal/vmm/firecracker/fcfake"
)

// tapOwner reads a tap's owner uid from sysfs; "" when the tap is gone.
func tapOwner(vmID string) string {
	b, err := os.ReadFile(filepath.Join("/sys/class/net", network.TapName(vmID), "owner"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// tapMaster is the bridge a tap is attached to.
func tapMaster(vmID string) string {
	link, err := os.Readlink(filepath.Join("/sys/class/net", network.TapName(vmID), "master"))
	if err != nil {
		return ""
	}
	return filepath.Base(link)
}

func apiCode(err error) api.Code {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Code
	}
	return ""
}

// queryA asks server for name's A record over proto.
func queryA(t *testing.T, server, proto, name string) []string {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	c := &dns.Client{Net: proto, Timeout: 5 * time.Second}
	resp, _, err := c.Exchange(q, server)
	if err != nil {
		t.Fatalf("query %s over %s at %s: %v", name, proto, server, err)
	}
	var out []string
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out
}

// Bridge mode end to end on two real guests, in a namespace of the test's
// own: each VM gets its own address of the subnet, a tap owned by the owner
// on the bridge and SSH on <address>:22; they ping each other by
// <name>.banger; a guest reaches a server beyond the uplink through NAT and
// is seen there as the uplink's address; the host side resolves a VM name
// through the gateway's port 53; TCP and UDP port forwards serve traffic,
// refuse a host port another VM or program holds, and survive a daemon
// restart and a VM restart, which also keeps the VM's address.
func TestBridgeNetwork(t *testing.T) {
	testutil.SkipShort(t, "boots real VMs")
	requireNetNS(t)
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t) // build or find it here, not in the namespace
		rerunInNetNS(t, "-test.run", "^TestBridgeNetwork$")
		return
	}
	be := newBridgeEnv(t, ns)
	ctx := context.Background()

	var wg sync.WaitGroup
	for _, n := range []string{"alpha", "beta"} {
		wg.Add(1)
		go func() { defer wg.Done(); be.create(t, n) }()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	alpha, _ := be.svc.Get(ctx, "alpha")
	beta, _ := be.svc.Get(ctx, "beta")
	for _, v := range []api.VM{alpha, beta} {
		a := mustAddr(t, v.Network.IP)
		if v.Network.Mode != NetBridge || !be.subnet.IsGuestAddr(a) || v.Network.SSHHost != v.Network.IP || v.Network.SSHPort != 22 {
			t.Fatalf("%s's network: %+v", v.Name, v.Network)
		}
		if owner, master := tapOwner(v.ID), tapMaster(v.ID); owner != fmt.Sprint(testOwner) || master != network.DefaultBridge {
			t.Fatalf("%s's tap: owner %q on %q, want owner %d on %s", v.Name, owner, master, testOwner, network.DefaultBridge)
		}
	}
	if alpha.Network.IP == beta.Network.IP {
		t.Fatalf("both VMs got %s", alpha.Network.IP)
	}
	if info, err := be.svc.SSH(ctx, "alpha"); err != nil || info.Host != alpha.Network.IP || info.Port != 22 || info.HostKeyAlias != "alpha.banger" {
		t.Fatalf("ssh info: %+v, %v", info, err)
	}

	t.Run("ping by name", func(t *testing.T) {
		for _, pair := range [][2]api.VM{{alpha, beta}, {beta, alpha}} {
			from, to := pair[0], pair[1]
			be.installBusybox(t, from.Name)
			out := be.runIn(t, from.Name, "busybox ping -c 1 -W 10 "+to.Name+".banger", nil)
			if !strings.Contains(out, "("+to.Network.IP+")") || !strings.Contains(out, "1 packets received") {
				t.Errorf("%s pinging %s.banger:\n%s", from.Name, to.Name, out)
			}
		}
	})

	t.Run("nat to the internet", func(t *testing.T) {
		server := os.Getenv(envInternet)
		host, port, _ := net.SplitHostPort(server)
		out := be.runIn(t, "alpha", fmt.Sprintf("timeout 20 bash -c 'exec 3<>/dev/tcp/%s/%s && cat <&3'", host, port), nil)
		if strings.TrimSpace(out) != uplinkHost {
			t.Errorf("the internet saw the guest as %q, want the uplink's %s (masqueraded)", out, uplinkHost)
		}
	})

	t.Run("host resolves names", func(t *testing.T) {
		gw := net.JoinHostPort(be.subnet.Gateway().String(), "53")
		for _, proto := range []string{"udp", "tcp"} {
			if got := queryA(t, gw, proto, "alpha.banger"); !slices.Equal(got, []string{alpha.Network.IP}) {
				t.Errorf("alpha.banger over %s = %v, want %s", proto, got, alpha.Network.IP)
			}
		}
		if got := queryA(t, gw, "udp", "nosuch.banger"); len(got) != 0 {
			t.Errorf("nosuch.banger = %v", got)
		}
	})

	tcpHost, udpHost := hostPort(t), hostPort(t)
	t.Run("port forwards", func(t *testing.T) {
		be.startGuestServers(t, "alpha", 8080, 9090)
		if _, err := be.svc.AddPort(ctx, "alpha", api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost, GuestPort: 8080}); err != nil {
			t.Fatal(err)
		}
		if _, err := be.svc.AddPort(ctx, "alpha", api.PortForwardRequest{Proto: "udp", HostPort: udpHost, GuestPort: 9090}); err != nil {
			t.Fatal(err)
		}
		if got := tcpGreeting(t, loopback(tcpHost)); got != "hello from alpha" {
			t.Errorf("tcp forward answered %q", got)
		}
		if got := udpEchoes(t, loopback(udpHost), "ping"); got != "echo:ping" {
			t.Errorf("udp forward answered %q", got)
		}
		fs, err := be.svc.Ports(ctx, "alpha")
		want := []api.PortForward{
			{Proto: "tcp", HostIP: "127.0.0.1", HostPort: tcpHost, GuestPort: 8080, Active: true},
			{Proto: "udp", HostIP: "127.0.0.1", HostPort: udpHost, GuestPort: 9090, Active: true},
		}
		if d := cmp.Diff(want, fs); err != nil || d != "" {
			t.Errorf("Ports (-want +got), %v:\n%s", err, d)
		}
		// Another VM cannot take a forwarded host port, nor one another
		// program holds; nothing is recorded for either.
		if _, err := be.svc.AddPort(ctx, "beta", api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost, GuestPort: 80}); apiCode(err) != api.CodeConflict || !strings.Contains(err.Error(), `forwarded to vm "alpha"`) {
			t.Errorf("forward of alpha's port to beta: %v", err)
		}
		held, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = held.Close() }()
		heldPort := held.Addr().(*net.TCPAddr).Port
		if _, err := be.svc.AddPort(ctx, "beta", api.PortForwardRequest{Proto: "tcp", HostPort: heldPort, GuestPort: 80}); apiCode(err) != api.CodeConflict || !strings.Contains(err.Error(), "in use") {
			t.Errorf("forward of a port in use: %v", err)
		}
		if fs, _ := be.svc.Ports(ctx, "beta"); len(fs) != 0 {
			t.Errorf("refused forwards were recorded: %+v", fs)
		}
	})

	t.Run("daemon restart", func(t *testing.T) {
		be.restartDaemon(t)
		if v, _ := be.svc.Get(ctx, "alpha"); v.State != api.VMRunning || v.Network.IP != alpha.Network.IP {
			t.Fatalf("alpha after daemon restart: %s %+v", v.State, v.Network)
		}
		if got := tcpGreeting(t, loopback(tcpHost)); got != "hello from alpha" {
			t.Errorf("tcp forward after daemon restart answered %q", got)
		}
		if got := udpEchoes(t, loopback(udpHost), "again"); got != "echo:again" {
			t.Errorf("udp forward after daemon restart answered %q", got)
		}
		if got := queryA(t, net.JoinHostPort(be.subnet.Gateway().String(), "53"), "udp", "beta.banger"); !slices.Equal(got, []string{beta.Network.IP}) {
			t.Errorf("beta.banger after daemon restart = %v", got)
		}
	})

	t.Run("vm restart", func(t *testing.T) {
		if _, err := be.svc.Stop(ctx, "alpha", false, 0); err != nil {
			t.Fatal(err)
		}
		if owner := tapOwner(alpha.ID); owner != "" {
			t.Error("the tap outlived the stop")
		}
		fs, _ := be.svc.Ports(ctx, "alpha")
		if len(fs) != 2 || fs[0].Active || fs[1].Active {
			t.Errorf("forwards of a stopped VM: %+v", fs)
		}
		if err := probePort(api.PortForwardRequest{Proto: "tcp", HostPort: tcpHost}); err != nil {
			t.Errorf("the relay kept its port after the stop: %v", err)
		}
		v, err := be.svc.Start(ctx, "alpha", false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if v.Network.IP != alpha.Network.IP {
			t.Errorf("address changed across a restart: %s -> %s", alpha.Network.IP, v.Network.IP)
		}
		be.startGuestServers(t, "alpha", 8080, 9090)
		if got := tcpGreeting(t, loopback(tcpHost)); got != "hello from alpha" {
			t.Errorf("tcp forward after vm restart answered %q", got)
		}
		if got := udpEchoes(t, loopback(udpHost), "back"); got != "echo:back" {
			t.Errorf("udp forward after vm restart answered %q", got)
		}
	})

	for _, v := range []api.VM{alpha, beta} {
		if err := be.svc.Delete(ctx, v.Name, true); err != nil {
			t.Fatal(err)
		}
		if tapOwner(v.ID) != "" {
			t.Errorf("%s's tap outlived the delete", v.Name)
		}
	}
	if rs, _ := be.svc.Store.ListResources(ctx, ""); len(rs) != 0 {
		t.Errorf("resources left: %+v", rs)
	}
	if err := probePort(api.PortForwardRequest{Proto: "udp", HostPort: udpHost}); err != nil {
		t.Errorf("a relay kept its port after the delete: %v", err)
	}
}

// hostState is what bridge-mode churn must leave as it found: the
// namespace's links, its whole nftables ruleset, the loop devices backed
// by files under the state dir, and the jail directory.
type hostState struct {
	Links []string
	NFT   string
	Loops []string
	Jails []string
}

func snapshotHost(t *testing.T, stateDir string) hostState {
	t.Helper()
	var links []struct {
		Name     string `json:"ifname"`
		Master   string `json:"master"`
		LinkInfo struct {
			Kind string `json:"info_kind"`
		} `json:"linkinfo"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ip", "-d", "-j", "link", "show")), &links); err != nil {
		t.Fatal(err)
	}
	var st hostState
	for _, l := range links {
		st.Links = append(st.Links, fmt.Sprintf("%s kind=%s master=%s", l.Name, l.LinkInfo.Kind, l.Master))
	}
	slices.Sort(st.Links)
	st.NFT = mustRun(t, "nft", "list", "ruleset")
	for _, line := range strings.Split(mustRun(t, "losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"), "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(f[1], stateDir+"/") {
			st.Loops = append(st.Loops, line)
		}
	}
	if es, err := os.ReadDir(stateDir + "-jail"); err == nil {
		for _, e := range es {
			st.Jails = append(st.Jails, e.Name())
		}
	}
	return st
}

// Twenty bridge-mode create/delete cycles, half booted (a tap and a port
// forward relay each) and half created stopped, leave the namespace's
// links, its nftables ruleset, the loop devices under the state dir and
// the jail directory exactly as they were, and no row behind; every cycle
// gets the subnet's first address again. Concurrent creates get distinct
// addresses. Then a daemon start removes a tap no VM holds and keeps a
// running VM's tap and a tap that is not banger's.
func TestBridgeChurn(t *testing.T) {
	testutil.SkipShort(t, "starts VMMs")
	requireNetNS(t)
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestBridgeChurn$")
		return
	}
	be := newBridgeEnv(t, ns)
	ctx := context.Background()
	stateDir := be.svc.Layout.StateDir
	before := snapshotHost(t, stateDir)
	first := be.subnet.Gateway().Next().String()
	fwdPort := hostPort(t)
	t0 := time.Now()
	for i := range 20 {
		boot := i%2 == 0
		v := be.create(t, "churn", func(r *api.VMCreateRequest) { r.NoWait, r.NoStart = boot, !boot })
		if v.Network.IP != first || v.Network.Mode != NetBridge {
			t.Fatalf("cycle %d: network %+v, want %s in bridge mode", i, v.Network, first)
		}
		if boot {
			if tapOwner(v.ID) == "" {
				t.Fatalf("cycle %d: no tap while the VM runs", i)
			}
			if _, err := be.svc.AddPort(ctx, "churn", api.PortForwardRequest{Proto: "tcp", HostPort: fwdPort, GuestPort: 80}); err != nil {
				t.Fatalf("cycle %d: %v", i, err)
			}
		}
		if err := be.svc.Delete(ctx, "churn", true); err != nil {
			t.Fatalf("cycle %d: delete: %v", i, err)
		}
	}
	t.Logf("20 cycles in %s", time.Since(t0).Round(time.Millisecond))
	if d := cmp.Diff(before, snapshotHost(t, stateDir)); d != "" {
		t.Errorf("host state after churn (-before +after):\n%s", d)
	}
	if rs, _ := be.svc.Store.ListResources(ctx, ""); len(rs) != 0 {
		t.Errorf("resources left: %+v", rs)
	}

	// Concurrent creates each get an address of their own.
	var mu sync.Mutex
	seen := map[string]string{}
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("par%d", i)
			v := be.create(t, name, func(r *api.VMCreateRequest) { r.NoStart = true })
			mu.Lock()
			defer mu.Unlock()
			if other, ok := seen[v.Network.IP]; ok || !be.subnet.IsGuestAddr(mustAddr(t, v.Network.IP)) {
				t.Errorf("%s got %s (also %q's)", name, v.Network.IP, other)
			}
			seen[v.Network.IP] = name
		}()
	}
	wg.Wait()
	for i := range 6 {
		if err := be.svc.Delete(ctx, fmt.Sprintf("par%d", i), false); err != nil {
			t.Fatal(err)
		}
	}

	// Reconciliation: a tap of no VM goes, a running VM's stays, and so
	// does a tap without banger's prefix.
	keep := be.create(t, "keep", func(r *api.VMCreateRequest) { r.NoWait = true })
	orphan := helperapi.NewVMID()
	if err := be.helper.CreateTap(ctx, network.CreateTap(orphan, network.DefaultBridge, testOwner)); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "ip", "tuntap", "add", "dev", "other0", "mode", "tap")
	be.restartDaemon(t)
	if tapOwner(orphan) != "" {
		t.Error("the orphaned tap survived reconciliation")
	}
	if tapOwner(keep.ID) == "" {
		t.Error("reconciliation removed a running VM's tap")
	}
	if _, err := os.Stat("/sys/class/net/other0"); err != nil {
		t.Error("reconciliation removed a tap that is not banger's")
	}
	if v, _ := be.svc.Get(ctx, "keep"); v.State != api.VMRunning {
		t.Errorf("keep after the restart: %s (%s)", v.State, v.StateReason)
	}
}

// A Firecracker VM (the spec-faithful fake: no KVM guests here) gets its
// tap on the bridge, passed to Firecracker as the network interface's host
// device, and loses it on delete; without bridge networking Firecracker is
// refused before anything is made.
func TestFirecrackerBridge(t *testing.T) {
	testutil.SkipShort(t, "imports the default image")
	requireNetNS(t)
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestFirecrackerBridge$")
		return
	}
	be := newBridgeEnv(t, ns)
	ctx := context.Background()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fcfake.EnvVersion, "1.14.2")
	fc := &firecracker.Driver{Executable: exe}
	be.svc.Drivers[vmm.Firecracker] = fc

	v := be.create(t, "fc", func(r *api.VMCreateRequest) { r.VMM = "firecracker"; r.NoWait = true })
	if v.VMM != "firecracker" || v.State != api.VMRunning || v.Network.Mode != NetBridge {
		t.Fatalf("firecracker VM: %+v", v)
	}
	if tapMaster(v.ID) != network.DefaultBridge {
		t.Fatal("the firecracker VM has no tap on the bridge")
	}
	// What Firecracker was configured with, from its own API.
	sock := be.svc.machine(v.ID).Handle().ControlSocket
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://firecracker/vm/config")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		NetworkInterfaces []firecracker.NetworkInterface `json:"network-interfaces"`
	}
	err = json.NewDecoder(resp.Body).Decode(&cfg)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.NetworkInterfaces) != 1 || cfg.NetworkInterfaces[0].HostDevName != network.TapName(v.ID) ||
		cfg.NetworkInterfaces[0].GuestMAC != network.MAC(v.ID).String() {
		t.Errorf("firecracker's network interfaces: %+v", cfg.NetworkInterfaces)
	}
	if err := be.svc.Delete(ctx, "fc", true); err != nil {
		t.Fatal(err)
	}
	if tapOwner(v.ID) != "" {
		t.Error("the tap outlived the delete")
	}

	user := newService(t, be.images)
	user.Drivers[vmm.Firecracker] = fc
	if _, err := user.Create(ctx, api.VMCreateRequest{Name: "fc2", VMM: "firecracker"}, nil); apiCode(err) != api.CodeFailedPrecondition || !strings.Contains(err.Error(), "bridge networking") {
		t.Errorf("firecracker without the helper: %v", err)
	}
	if vms, _ := user.List(ctx); len(vms) != 0 {
		t.Errorf("a refused create left %+v", vms)
	}
}

// A bridge-mode VM whose helper is gone stays as it was on start, with an
// error that says why; user-mode VMs are created meanwhile.
func TestBridgeVMNeedsHelper(t *testing.T) {
	testutil.SkipShort(t, "imports the default image")
	requireNetNS(t)
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestBridgeVMNeedsHelper$")
		return
	}
	be := newBridgeEnv(t, ns)
	ctx := context.Background()
	be.create(t, "bridged", func(r *api.VMCreateRequest) { r.NoStart = true })
	// The daemon restarts while the helper does not answer.
	be.svc.Close()
	svc := newService(t, be.images)
	svc.Bridge = &BridgeConfig{Helper: &helperapi.Client{Socket: filepath.Join(t.TempDir(), "gone.sock")}, Bridge: network.DefaultBridge,
		Subnet: be.subnet, DNSPort: 10054, OwnerUID: testOwner}
	be.svc = svc
	if err := svc.EnableBridge(ctx); !errors.Is(err, ErrNoHelper) {
		t.Fatalf("EnableBridge without a helper: %v", err)
	}
	if err := svc.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := svc.Start(ctx, "bridged", true, nil)
	if apiCode(err) != api.CodeFailedPrecondition || !strings.Contains(err.Error(), "uses bridge networking") || !strings.Contains(err.Error(), "banger-helper") {
		t.Fatalf("start without the helper: %v", err)
	}
	if v, _ := svc.Get(ctx, "bridged"); v.State != api.VMStopped {
		t.Errorf("after the refused start: %s (%s)", v.State, v.StateReason)
	}
	v := be.create(t, "rootless", func(r *api.VMCreateRequest) { r.NoStart = true })
	if v.Network.Mode != NetUser || v.Network.IP != "" {
		t.Errorf("VM created without the helper: %+v", v.Network)
	}
	if rs, _ := svc.Store.ListResources(ctx, v.ID); slices.ContainsFunc(rs, func(r store.Resource) bool { return r.Kind == resAddress }) {
		t.Error("a user-mode VM holds an address")
	}
}

// envCrash carries, to a process the crash test starts, the layout (JSON)
// and helper socket it creates a bridge-mode VM with.
const envCrash = "BANGER_TEST_BRIDGE_CRASH"

type crashSetup struct {
	Layout paths.Layout
	Socket string
	Name   string
}

// A daemon killed (SIGKILL) at any step of a bridge-mode create, before or
// after the tap exists, is reconciled on restart: the VM is rolled back,
// its tap and address are gone, and nothing is left in the namespace.
func TestBridgeCrashDuringCreate(t *testing.T) {
	testutil.SkipShort(t, "starts VMMs")
	requireNetNS(t)
	if raw := os.Getenv(envCrash); raw != "" {
		crashingCreate(t, raw)
		return
	}
	ns, child := netnsChild(t)
	if !child {
		imagetest.DefaultImage(t)
		rerunInNetNS(t, "-test.run", "^TestBridgeCrashDuringCreate$")
		return
	}
	be := newBridgeEnv(t, ns)
	ctx := context.Background()
	stateDir := be.svc.Layout.StateDir
	for _, point := range []string{"create:row", "create:identity", "start:tap", "start:spawn", "start:spawned"} {
		t.Run(point, func(t *testing.T) {
			before := snapshotHost(t, stateDir)
			name := crashCreate(t, "TestBridgeCrashDuringCreate", envCrash, point, be)
			row, err := be.svc.Store.GetVM(ctx, name)
			if err != nil {
				t.Fatalf("no row recorded before %s: %v", point, err)
			}
			pid := 0
			if rt, _ := decodeRuntime(row.Runtime); rt.Handle != nil {
				pid = rt.Handle.PID
			}
			be.restartDaemon(t)
			if left := be.leftovers(t, row.ID, pid); len(left) > 0 {
				t.Errorf("the VM interrupted at %s left: %v", point, left)
			}
			if tapOwner(row.ID) != "" {
				t.Errorf("the tap of the VM interrupted at %s is still there", point)
			}
			if d := cmp.Diff(before, snapshotHost(t, stateDir)); d != "" {
				t.Errorf("host state (-before +after):\n%s", d)
			}
		})
	}
}

// crashingCreate is the process TestBridgeCrashDuringCreate kills: a VM
// service over the test's layout and helper that creates one VM and dies
// at the crash point the environment names.
func crashingCreate(t *testing.T, raw string) {
	svc, cs := crashBridgeService(t, raw, 10055)
	// A create that waits for SSH: until it returns, the VM is one to roll
	// back (with NoWait the create is over once the VMM runs).
	_, err := svc.Create(context.Background(), api.VMCreateRequest{Name: cs.Name, CPUs: 1, MemoryBytes: 512 * api.MiB}, nil)
	t.Fatalf("create returned (%v) instead of dying at %s", err, crashAt)
}

// crashCreate reruns this test binary as test, which (seeing env) creates
// a VM over be's layout and helper in a process of its own, and checks
// that process was killed at point. It returns the VM's name.
func crashCreate(t *testing.T, test, env, point string, be *bridgeEnv) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	name := "crash-" + strings.ReplaceAll(point, ":", "-")
	setup, err := json.Marshal(crashSetup{Layout: be.svc.Layout, Socket: be.helper.Socket, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run", "^"+test+"$", "-test.v")
	cmd.Env = append(os.Environ(), env+"="+string(setup), crashpointEnv+"="+point)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the creating process was not killed at %s: %v\n%s", point, err, out)
	}
	return name
}

// crashBridgeService is the VM service of a process a crash test kills:
// over the layout and helper socket the test passed in raw, with bridge
// networking on and its DNS server on dnsPort.
func crashBridgeService(t *testing.T, raw string, dnsPort uint16) (*Service, crashSetup) {
	var cs crashSetup
	if err := json.Unmarshal([]byte(raw), &cs); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), cs.Layout.DB(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	images := &image.Service{Store: st, Layout: cs.Layout, Defaults: config.Default().Image, Log: testLogger(t)}
	svc := newService(t, images)
	sub, _ := network.ParseSubnet(network.DefaultCIDR)
	svc.Bridge = &BridgeConfig{Helper: &helperapi.Client{Socket: cs.Socket}, Bridge: network.DefaultBridge, Subnet: sub,
		DNSPort: dnsPort, OwnerUID: testOwner, SharedStateDir: true}
	if err := svc.EnableBridge(t.Context()); err != nil {
		t.Fatal(err)
	}
	return svc, cs
}
