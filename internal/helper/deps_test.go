package helper

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
)

// banger-helper runs as root, so everything it links is attack surface: it
// must not link the daemon's database, the CLI and TUI frameworks, or any
// HTTP client or server. (After tailscale's cmd/tailscaled/deps_test.go.)
func TestHelperDeps(t *testing.T) {
	testutil.RequireCommand(t, "go")
	out, err := exec.Command("go", "list", "-deps", "github.com/bangerhq/banger/cmd/banger-helper").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := make(map[string]bool)
	for _, p := range strings.Fields(string(out)) {
		deps[p] = true
	}
	// A sanity check that the listing is the helper's.
	for _, want := range []string{"github.com/bangerhq/banger/internal/helper", "github.com/bangerhq/banger/internal/helperapi"} {
		if !deps[want] {
			t.Fatalf("go list -deps does not include %s; is the listing right?", want)
		}
	}
	banned := []struct{ prefix, why string }{
		{"modernc.org/sqlite", "the daemon's database"},
		{"database/sql", "the daemon's database"},
		{"github.com/spf13/cobra", "the CLI"},
		{"github.com/charmbracelet/bubbletea", "the TUI"},
		{"github.com/charmbracelet/lipgloss", "the TUI"},
		{"net/http", "an HTTP client or server"},
		{"github.com/miekg/dns", "the daemon's DNS server"},
	}
	for p := range deps {
		for _, b := range banned {
			if p == b.prefix || strings.HasPrefix(p, b.prefix+"/") {
				t.Errorf("banger-helper links %s (%s)", p, b.why)
			}
		}
	}
}
