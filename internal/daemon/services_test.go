package daemon

import (
	"bytes"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/config"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/paths"
	"github.com/bangerhq/banger/internal/testutil"
)

// The daemon asks the helper on the layout's helper socket for the
// configured bridge and subnet, sweeps disks through it only in a system
// install (whose helper shares the state dir), and turns bridge networking
// off, saying why, for a [network] section the helper would refuse.
func TestBridgeConfig(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	user := userLayout(t)
	cfg := config.Default()

	bc := bridgeConfig(user, cfg, log)
	if bc == nil {
		t.Fatalf("default config refused: %s", logs.String())
	}
	hc, ok := bc.Helper.(*helperapi.Client)
	if !ok || hc.Socket != user.HelperSocket() {
		t.Errorf("helper client %#v, want one on %s", bc.Helper, user.HelperSocket())
	}
	if bc.Bridge != "banger0" || bc.Subnet.CIDR() != "172.30.0.1/24" || bc.DNSPort != 10053 || bc.SharedStateDir {
		t.Errorf("bridge config %+v", bc)
	}
	if bc.OwnerUID != uint32(os.Getuid()) {
		t.Errorf("owner %d without a helper socket, want the daemon's uid %d", bc.OwnerUID, os.Getuid())
	}
	if sys := bridgeConfig(paths.System(), cfg, log); sys == nil || !sys.SharedStateDir {
		t.Errorf("system install: %+v", sys)
	}

	for _, tc := range []struct {
		name string
		set  func(*config.Config)
		want string
	}{
		{"bridge without banger's prefix", func(c *config.Config) { c.Network.Bridge = "br0" }, "br0"},
		{"public subnet", func(c *config.Config) { c.Network.Subnet = "8.8.8.1/24" }, "private"},
		{"gateway not the first host", func(c *config.Config) { c.Network.Subnet = "172.30.0.5/24" }, "first host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs.Reset()
			c := config.Default()
			tc.set(&c)
			if bc := bridgeConfig(user, c, log); bc != nil {
				t.Fatalf("accepted: %+v", bc)
			}
			if !strings.Contains(logs.String(), "bridge networking is off") || !strings.Contains(logs.String(), tc.want) {
				t.Errorf("log %q does not say why (%q)", logs.String(), tc.want)
			}
		})
	}
}

// Taps are made for the uid the helper's socket belongs to: the one owner
// the helper serves, even when the daemon itself runs as root.
func TestHelperOwner(t *testing.T) {
	testutil.RequireRoot(t)
	sock := filepath.Join(t.TempDir(), "helper.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	if err := os.Lchown(sock, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if got := helperOwner(sock); got != 4242 {
		t.Errorf("owner %d, want 4242", got)
	}
	if got := helperOwner(filepath.Join(t.TempDir(), "none.sock")); got != uint32(os.Getuid()) {
		t.Errorf("owner without a socket %d, want %d", got, os.Getuid())
	}
}
