package cli

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/testutil"
)

// The printed entries are ones ssh itself reads as meant: for *.banger and
// for one VM by both names, through banger vm proxy, with banger's key and
// known_hosts and strict checking (ssh -G shows what ssh would use).
func TestSSHConfigAsSSHReadsIt(t *testing.T) {
	testutil.RequireCommand(t, "ssh")
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(home, "my config")) // a space, to be quoted
	t.Setenv("XDG_STATE_HOME", filepath.Join(home, "state"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(home, "data"))
	t.Setenv("XDG_RUNTIME_DIR", filepath.Join(home, "run"))
	exe, _ := os.Executable()
	cases := []struct {
		name  string // VM for a named entry, "" for the wildcard
		host  string // what the user types
		proxy string
	}{
		{"", "dev.banger", exe + " vm proxy %n"}, // ssh -G leaves %n unexpanded
		{"dev", "dev", exe + " vm proxy dev"},
		{"dev", "dev.banger", exe + " vm proxy dev"},
	}
	for _, tc := range cases {
		a := &app{}
		var buf bytes.Buffer
		if err := a.printSSHConfig(&buf, tc.name); err != nil {
			t.Fatal(err)
		}
		cfg := filepath.Join(t.TempDir(), "config")
		if err := os.WriteFile(cfg, buf.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.CommandContext(context.Background(), "ssh", "-G", "-F", cfg, tc.host).Output()
		if err != nil {
			t.Fatalf("ssh -G rejects the config: %v\n%s", err, buf.String())
		}
		got := map[string]string{}
		for _, l := range strings.Split(string(out), "\n") {
			k, v, _ := strings.Cut(l, " ")
			got[k] = v
		}
		want := map[string]string{
			"user":                  "root",
			"proxycommand":          tc.proxy,
			"identityfile":          filepath.Join(home, "my config", "banger", "ssh", "id_ed25519"),
			"identitiesonly":        "yes",
			"userknownhostsfile":    filepath.Join(home, "state", "banger", "known_hosts"),
			"stricthostkeychecking": "true",
			"updatehostkeys":        "false",
		}
		if tc.name != "" {
			want["hostkeyalias"] = "dev.banger"
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%q (entry %q): ssh reads %s = %q, want %q\n%s", tc.host, tc.name, k, got[k], v, buf.String())
			}
		}
	}
}

// exec without a command is a usage error (exit 2) caught before any
// daemon is asked.
func TestExecUsage(t *testing.T) {
	var out, errb bytes.Buffer
	code := Run(context.Background(), []string{"vm", "exec", "dev"}, strings.NewReader(""), &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "needs a VM name and a command") {
		t.Fatalf("exit %d, stderr %q", code, errb.String())
	}
}
