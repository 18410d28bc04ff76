package api

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Port specs parse into requests, and anything that is not exactly a
// decimal port pair with an optional tcp/udp suffix is refused.
func TestParsePortSpec(t *testing.T) {
	tests := []struct {
		spec     string
		optional bool
		want     PortForwardRequest
		wantErr  string
	}{
		{spec: "8080:80", want: PortForwardRequest{Proto: "tcp", HostPort: 8080, GuestPort: 80}},
		{spec: "8080:80/tcp", want: PortForwardRequest{Proto: "tcp", HostPort: 8080, GuestPort: 80}},
		{spec: "5353:53/udp", want: PortForwardRequest{Proto: "udp", HostPort: 5353, GuestPort: 53}},
		{spec: "65535:1", want: PortForwardRequest{Proto: "tcp", HostPort: 65535, GuestPort: 1}},
		{spec: "8080", optional: true, want: PortForwardRequest{Proto: "tcp", HostPort: 8080}},
		{spec: "8080/udp", optional: true, want: PortForwardRequest{Proto: "udp", HostPort: 8080}},
		{spec: "8080", wantErr: "no guest port"},
		{spec: "", wantErr: "no guest port"},
		{spec: ":80", wantErr: "host port: missing"},
		{spec: "8080:", wantErr: "guest port: missing"},
		{spec: "0:80", wantErr: "not a port number"},
		{spec: "080:80", wantErr: "not a port number"},
		{spec: "65536:80", wantErr: "out of range"},
		{spec: "99999999:80", wantErr: "not a port number"},
		{spec: "-1:80", wantErr: "not a port number"},
		{spec: "+80:80", wantErr: "not a port number"},
		{spec: "80:80/sctp", wantErr: `protocol "sctp"`},
		{spec: "80:80/UDP", wantErr: `protocol "UDP"`},
		{spec: "80:80/udp/tcp", wantErr: "protocol"},
		{spec: "1.2.3.4:80:80", wantErr: "not a port number"},
		{spec: "80:80:80", wantErr: "not a port number"},
		{spec: " 80:80", wantErr: "not a port number"},
		{spec: "80:80\n", wantErr: "not a port number"},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			got, err := ParsePortSpec(tt.spec, tt.optional)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParsePortSpec(%q) = %+v, %v; want an error containing %q", tt.spec, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("ParsePortSpec(%q) (-want +got):\n%s", tt.spec, d)
			}
		})
	}
}

// Whatever ParsePortSpec accepts validates (or lacks only the optional
// guest port) and prints back as the same forward.
func FuzzParsePortSpec(f *testing.F) {
	for _, s := range []string{"8080:80", "5353:53/udp", "1:65535/tcp", "0:0", "8080", "a:b/c"} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, spec string, optional bool) {
		req, err := ParsePortSpec(spec, optional)
		if err != nil {
			return
		}
		if req.GuestPort == 0 {
			if !optional {
				t.Fatalf("%q: no guest port accepted without guestOptional", spec)
			}
			req.GuestPort = 1
		}
		if err := req.Validate(); err != nil {
			t.Fatalf("%q parsed to an invalid request %+v: %v", spec, req, err)
		}
		back, err := ParsePortSpec(PortSpec(req.Proto, req.HostPort, req.GuestPort), false)
		if err != nil || back != req {
			t.Fatalf("%q: round trip gave %+v, %v; want %+v", spec, back, err, req)
		}
	})
}
