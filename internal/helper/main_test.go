package helper

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/bangerhq/banger/internal/testutil"
)

// The flags produce the configuration the unit file asks for, with the
// system socket and banger0 as defaults, and refuse what a misconfigured
// install would pass.
func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    Config
		format  string
		wantErr string
	}{
		{"minimal", []string{"--owner-uid", "1000", "--state-dir", "/var/lib/banger"},
			Config{OwnerUID: 1000, StateDir: "/var/lib/banger", Socket: "/run/banger/helper.sock", Bridge: "banger0"}, "text", ""},
		{"everything", []string{"--owner-uid=1001", "--state-dir=/srv/banger", "--socket=/run/x/h.sock", "--bridge=banger3", "--log-format=json"},
			Config{OwnerUID: 1001, StateDir: "/srv/banger", Socket: "/run/x/h.sock", Bridge: "banger3"}, "json", ""},
		{"no owner", []string{"--state-dir", "/var/lib/banger"}, Config{}, "", "--owner-uid is required"},
		{"root as owner", []string{"--owner-uid", "0", "--state-dir", "/var/lib/banger"}, Config{}, "", "--owner-uid is required"},
		{"uid -1", []string{"--owner-uid", "4294967295", "--state-dir", "/var/lib/banger"}, Config{}, "", "--owner-uid is required"},
		{"no state dir", []string{"--owner-uid", "1000"}, Config{}, "", "--state-dir is required"},
		{"relative state dir", []string{"--owner-uid", "1000", "--state-dir", "var/lib/banger"}, Config{}, "", "state dir"},
		{"state dir /", []string{"--owner-uid", "1000", "--state-dir", "/"}, Config{}, "", "state dir"},
		{"foreign bridge", []string{"--owner-uid", "1000", "--state-dir", "/v", "--bridge", "docker0"}, Config{}, "", "bridge name"},
		{"bad log format", []string{"--owner-uid", "1000", "--state-dir", "/v", "--log-format", "xml"}, Config{}, "", "--log-format"},
		{"stray argument", []string{"--owner-uid", "1000", "--state-dir", "/v", "extra"}, Config{}, "", "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, format, err := parseFlags(tt.args, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, cfg, cmpopts.IgnoreFields(Config{}, "Logger")); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
			if format != tt.format {
				t.Errorf("log format %q, want %q", format, tt.format)
			}
		})
	}
}

// Listen makes a 0600 socket owned by the owner, replaces a stale socket,
// and refuses to replace a live one or anything that is not a socket.
func TestListen(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "sub", "helper.sock")
	ln, err := Listen(sock, testOwner)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %v, want a 0600 socket", fi.Mode())
	}
	if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != testOwner {
		t.Errorf("socket owned by uid %d, want %d", uid, testOwner)
	}
	if _, err := Listen(sock, testOwner); err == nil || !strings.Contains(err.Error(), "another helper is listening") {
		t.Errorf("Listen over a live socket: %v", err)
	}
	// A socket left behind by a killed helper is replaced.
	ln.SetUnlinkOnClose(false)
	_ = ln.Close()
	ln, err = Listen(sock, testOwner)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	if c, err := net.Dial("unix", sock); err != nil {
		t.Errorf("dial the new socket: %v", err)
	} else {
		_ = c.Close()
	}
	_ = ln.Close()

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, testOwner); err == nil {
		t.Error("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(file); string(b) != "keep me" {
		t.Error("the regular file changed")
	}
}
