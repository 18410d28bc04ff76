package cli

import "testing"

// NAME:PATH names a path in a VM only when NAME is a VM name; anything
// else is a local path, as with scp.
func TestSplitRemote(t *testing.T) {
	cases := []struct {
		arg, name, path string
		remote          bool
	}{
		{"dev:/tmp/x", "dev", "/tmp/x", true},
		{"dev:", "dev", "", true},
		{"dev:rel/path", "dev", "rel/path", true},
		{"dev.banger:/etc", "dev", "/etc", true},
		{"web-1:~/f", "web-1", "~/f", true},
		{"./dev:x", "", "./dev:x", false},
		{"/abs/dev:x", "", "/abs/dev:x", false},
		{"Dev:x", "", "Dev:x", false},
		{"-dev:x", "", "-dev:x", false},
		{"plain", "", "plain", false},
		{"dir/file:with-colon", "", "dir/file:with-colon", false},
		{"a:b:c", "a", "b:c", true},
	}
	for _, tc := range cases {
		name, path, remote := splitRemote(tc.arg)
		if name != tc.name || path != tc.path || remote != tc.remote {
			t.Errorf("splitRemote(%q) = %q %q %v, want %q %q %v", tc.arg, name, path, remote, tc.name, tc.path, tc.remote)
		}
	}
}
