package helper

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/bangerhq/banger/internal/helperapi"
)

// resolvedSocket exists while systemd-resolved runs (its varlink API).
const resolvedSocket = "/run/systemd/resolve/io.systemd.Resolve"

// resolvectlArgs are the resolvectl calls that make the host send
// "*.banger" queries, and only those, to the gateway: a per-link DNS
// server, a routing-only domain (the "~" prefix) and no default route, so
// every other name keeps going where it went before.
func resolvectlArgs(bridge string, gw netip.Addr) [][]string {
	return [][]string{
		{"dns", bridge, gw.String()},
		{"domain", bridge, "~" + helperapi.DNSDomain},
		{"default-route", bridge, "false"},
	}
}

// configureResolved sets up split DNS for the bridge when systemd-resolved
// runs, and reports whether it did. Per-link settings are runtime state:
// they vanish when the link or resolved goes away, which is why the daemon
// calls EnsureDNSRedirect on every start.
func (s *Server) configureResolved(ctx context.Context, bridge string, gw netip.Addr) (bool, error) {
	if !s.resolvedAvailable() {
		return false, nil
	}
	for _, args := range resolvectlArgs(bridge, gw) {
		if err := resolvectl(ctx, args...); err != nil {
			return false, fmt.Errorf("configure systemd-resolved for %q: %w", bridge, err)
		}
	}
	return true, nil
}

// revertResolved drops the bridge's per-link resolved settings, when both
// resolved and the bridge exist.
func (s *Server) revertResolved(ctx context.Context, bridge string) error {
	if !s.resolvedAvailable() {
		return nil
	}
	if _, err := netlink.LinkByName(bridge); linkNotFound(err) {
		return nil
	}
	if err := resolvectl(ctx, "revert", bridge); err != nil {
		return fmt.Errorf("revert systemd-resolved settings of %q: %w", bridge, err)
	}
	return nil
}

// resolvedAvailable is false inside a test's network namespace: resolved
// runs in the host's namespace and would apply the settings to whatever
// host interface has the same index.
func (s *Server) resolvedAvailable() bool {
	if s.cfg.NetNS != "" {
		return false
	}
	if _, err := os.Stat(resolvedSocket); err != nil {
		return false
	}
	_, err := exec.LookPath("resolvectl")
	return err == nil
}

func resolvectl(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "resolvectl", args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			return fmt.Errorf("resolvectl %s: %w", strings.Join(args, " "), err)
		}
		return fmt.Errorf("resolvectl %s: %w: %s", strings.Join(args, " "), err, msg)
	}
	return nil
}
