package version

import "testing"

// Line pins the exact --version format shared by banger and bangerd.
func TestLine(t *testing.T) {
	tests := []struct {
		info Info
		want string
	}{
		{Info{Version: "v0.1.0", Commit: "abcd1234ef567890abcd1234ef567890abcd1234", BuiltAt: "2026-04-28T20:45:50Z"},
			"banger v0.1.0 (commit abcd1234, built 2026-04-28T20:45:50Z)"},
		{Info{Version: "dev", Commit: "1c1ca7d6", BuiltAt: "2026-04-28T20:45:50Z"},
			"banger dev (commit 1c1ca7d6, built 2026-04-28T20:45:50Z)"},
	}
	for _, tt := range tests {
		if got := tt.info.Line("banger"); got != tt.want {
			t.Errorf("Line() = %q, want %q", got, tt.want)
		}
	}
}

// An unstamped build still reports a version; it is "dev".
func TestGetDefaultsToDev(t *testing.T) {
	if Version != "" {
		t.Skip("binary is stamped")
	}
	if got := Get().Version; got != "dev" {
		t.Fatalf("Get().Version = %q, want dev", got)
	}
}

// Builds that differ in build time alone are different builds.
func TestSameBuild(t *testing.T) {
	a := Info{Version: "dev", Commit: "c", BuiltAt: "t1"}
	b := a
	if !a.SameBuild(b) {
		t.Fatal("identical infos differ")
	}
	b.BuiltAt = "t2"
	if a.SameBuild(b) {
		t.Fatal("different build times compare equal")
	}
}
