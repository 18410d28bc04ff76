package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/api"
)

// A malformed forward is refused before the CLI contacts (or starts) a
// daemon, with the usage in the hint.
func TestVMPortRefusesBadSpecs(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir()) // no daemon there, and none may be started
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"vm", "port", "dev", "8080"}, 2, "no guest port"},
		{[]string{"vm", "port", "dev", "8080:80/sctp"}, 2, `protocol "sctp"`},
		{[]string{"vm", "port", "dev", "8080:80", "70000:80"}, 2, "out of range"},
		{[]string{"vm", "port", "dev", "--remove"}, 1, "--remove needs the forwards"},
		{[]string{"vm", "port", "dev", "--remove", "x/udp"}, 2, "not a port number"},
	} {
		t.Run(strings.Join(tc.args[2:], " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := Run(t.Context(), tc.args, strings.NewReader(""), &stdout, &stderr)
			if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d mentioning %q", code, stderr.String(), tc.code, tc.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q", stdout.String())
			}
		})
	}
}

// The list shows each forward as host address, guest port, protocol and
// whether it serves now; an empty list says how to add one.
func TestRenderPorts(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := renderPorts(&stdout, &stderr, "dev", []api.PortForward{
		{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80, Active: true},
		{Proto: "udp", HostIP: "127.0.0.1", HostPort: 5353, GuestPort: 53},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "HOST            GUEST  PROTO  ACTIVE\n" +
		"127.0.0.1:8080  80     tcp    yes\n" +
		"127.0.0.1:5353  53     udp    no\n"
	if stdout.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", stdout.String(), want)
	}
	stdout.Reset()
	if err := renderPorts(&stdout, &stderr, "dev", nil); err != nil || stdout.Len() != 0 || !strings.Contains(stderr.String(), "banger vm port dev 8080:80") {
		t.Errorf("empty list: stdout %q stderr %q, %v", stdout.String(), stderr.String(), err)
	}
}
