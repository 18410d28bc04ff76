package paths

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// User mode follows XDG variables and falls back to HOME-relative defaults.
func TestUserLayout(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want Layout
	}{
		{"xdg", map[string]string{
			"HOME": "/home/u", "XDG_CONFIG_HOME": "/c", "XDG_STATE_HOME": "/s",
			"XDG_DATA_HOME": "/d", "XDG_RUNTIME_DIR": "/run/user/1000",
		}, Layout{UserMode, "/c/banger", "/s/banger", "/d/banger", "/run/user/1000/banger"}},
		{"defaults", map[string]string{"HOME": "/home/u"},
			Layout{UserMode, "/home/u/.config/banger", "/home/u/.local/state/banger", "/home/u/.local/share/banger", "/home/u/.local/state/banger/run"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := userFrom(env(tt.env), 1000)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("layout (-want +got):\n%s", d)
			}
		})
	}
}

// Relative XDG paths and a missing HOME are errors, not silent guesses.
func TestUserLayoutRejects(t *testing.T) {
	for _, e := range []map[string]string{
		{},
		{"HOME": "relative"},
		{"HOME": "/h", "XDG_STATE_HOME": "state"},
		{"HOME": "/h", "XDG_RUNTIME_DIR": "run"},
	} {
		if _, err := userFrom(env(e), 1000); err == nil {
			t.Errorf("userFrom(%v) succeeded", e)
		}
	}
}

// System mode uses the fixed FHS locations.
func TestSystemLayout(t *testing.T) {
	l := System()
	if l.DB() != "/var/lib/banger/banger.db" || l.DaemonSocket() != "/run/banger/bangerd.sock" || l.ConfigFile() != "/etc/banger/config.toml" {
		t.Fatalf("unexpected system layout: %+v", l)
	}
}
