package helperapi

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// everyOp holds one valid instance of every operation.
var everyOp = []Op{
	EnsureBridge{Name: "banger0", CIDR: "172.30.0.1/24"},
	DeleteBridge{Name: "banger0"},
	CreateTap{Name: goodTap, Bridge: "banger0", OwnerUID: 1000},
	DeleteTap{Name: goodTap},
	EnsureNAT{Bridge: "banger0", CIDR: "172.30.0.1/24"},
	RemoveNAT{},
	EnsureDNSRedirect{Bridge: "banger0", BridgeIP: "172.30.0.1", Port: 5353},
	AttachLoop{VMID: goodID, File: "rootfs.ext4", ReadOnly: true},
	DetachLoop{Device: "/dev/loop3"},
	CreateSnapshot{VMID: goodID, Origin: "origin.ext4", COW: "cow.img"},
	RemoveSnapshot{VMID: goodID},
	LaunchJailed{VMID: goodID, CPUs: 2, MemoryMiB: 512, Kernel: "vmlinux", Initrd: "initrd.img",
		Disks: []JailDisk{{ID: "root", File: "root.img"}, {ID: "data_1", File: "data.img", ReadOnly: true}}, Tap: true},
	KillJailed{VMID: goodID},
	ListOwned{},
}

// Every operation survives EncodeRequest → DecodeRequest unchanged, and
// the registry serves exactly the operations listed here.
func TestRequestRoundTrip(t *testing.T) {
	names := make(map[string]bool)
	for _, op := range everyOp {
		b, err := EncodeRequest(op)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeRequest(b)
		if err != nil {
			t.Fatalf("DecodeRequest(%s): %v", b, err)
		}
		if diff := cmp.Diff(op, got); diff != "" {
			t.Errorf("%s round trip (-want +got):\n%s", op.OpName(), diff)
		}
		names[op.OpName()] = true
	}
	for _, n := range OpNames() {
		if !names[n] {
			t.Errorf("op %q is served but not covered by everyOp", n)
		}
	}
}

// DecodeRequest refuses malformed and smuggled requests; each case names
// the attack or mistake it stands for.
func TestDecodeRequestRefuses(t *testing.T) {
	tests := []struct {
		name string
		in   string
		code Code
	}{
		{"unknown op: a 'run command' the helper must never grow", `{"op":"exec","args":{"argv":["/bin/sh"]}}`, CodeUnknownOp},
		{"op name in another case", `{"op":"CREATE_TAP","args":{}}`, CodeUnknownOp},
		{"no op at all", `{"args":{}}`, CodeUnknownOp},
		{"unknown field: a free-form path", `{"op":"attach_loop","args":{"vm_id":"0123456789","file":"rootfs.ext4","path":"/etc/shadow"}}`, CodeInvalid},
		{"unknown envelope field", `{"op":"list_owned","args":{},"sudo":true}`, CodeInvalid},
		{"duplicate key: the first passes review, the last is used", `{"op":"delete_tap","args":{"name":"bgr-0123456789","name":"eth0"}}`, CodeInvalid},
		{"duplicate op", `{"op":"list_owned","op":"remove_nat"}`, CodeInvalid},
		{"key in another case slips past a reviewer's grep", `{"op":"delete_tap","args":{"Name":"bgr-0123456789"}}`, CodeInvalid},
		{"trailing second request", `{"op":"list_owned"}{"op":"remove_nat"}`, CodeInvalid},
		{"trailing garbage", `{"op":"list_owned"} x`, CodeInvalid},
		{"not an object", `["list_owned"]`, CodeInvalid},
		{"args not an object", `{"op":"delete_tap","args":"bgr-0123456789"}`, CodeInvalid},
		{"wrong type: uid as string", `{"op":"create_tap","args":{"name":"bgr-0123456789","bridge":"banger0","owner_uid":"1000"}}`, CodeInvalid},
		{"negative uid wraps to root's neighbour", `{"op":"create_tap","args":{"name":"bgr-0123456789","bridge":"banger0","owner_uid":-1}}`, CodeInvalid},
		{"uid overflowing 32 bits wraps to 0", `{"op":"create_tap","args":{"name":"bgr-0123456789","bridge":"banger0","owner_uid":4294967296}}`, CodeInvalid},
		{"valid JSON, invalid name", `{"op":"delete_tap","args":{"name":"eth0"}}`, CodeInvalid},
		{"missing args for an op that needs them", `{"op":"delete_tap"}`, CodeInvalid},
		{"empty input", ``, CodeInvalid},
		{"truncated", `{"op":"delete_tap","args":{"name":"bgr-01`, CodeInvalid},
		{"duplicate key inside a disk: the first file passes review, the last is linked",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":[{"id":"root","file":"root.img","file":"../x"}]}}`, CodeInvalid},
		{"key in another case inside a disk",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":[{"ID":"root","file":"root.img"}]}}`, CodeInvalid},
		{"unknown field inside a disk: a free-form host path",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":[{"id":"root","file":"root.img","path":"/etc/shadow"}]}}`, CodeInvalid},
		{"disks not an array",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":{"id":"root","file":"root.img"}}}`, CodeInvalid},
		{"a disk that is not an object",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":["root.img"]}}`, CodeInvalid},
		{"fractional cpus",
			`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1.5,"memory_mib":64,"kernel":"vmlinux"}}`, CodeInvalid},
		{"oversize request", `{"op":"list_owned","args":{},"pad":"` + strings.Repeat("x", MaxRequestSize) + `"}`, CodeInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			op, err := DecodeRequest([]byte(tt.in))
			if err == nil {
				t.Fatalf("DecodeRequest = %#v, want an error", op)
			}
			var he *Error
			if !errors.As(err, &he) || he.Code != tt.code {
				t.Fatalf("DecodeRequest error %v, want code %s", err, tt.code)
			}
		})
	}
}

// A nested array of objects may be null or empty, as encoding/json
// itself sends a nil slice.
func TestDecodeRequestNullDisks(t *testing.T) {
	for _, in := range []string{
		`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":null}}`,
		`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":[]}}`,
	} {
		if _, err := DecodeRequest([]byte(in)); err != nil {
			t.Errorf("DecodeRequest(%s): %v", in, err)
		}
	}
}

// An op without fields may omit args or send null.
func TestDecodeRequestNoArgs(t *testing.T) {
	for _, in := range []string{`{"op":"list_owned"}`, `{"op":"list_owned","args":null}`, `{"op":"remove_nat","args":{}}`} {
		if _, err := DecodeRequest([]byte(in)); err != nil {
			t.Errorf("DecodeRequest(%s): %v", in, err)
		}
	}
}

// EncodeResponse keeps the code of a wrapped *Error and the whole message
// chain, and reports other errors as internal.
func TestEncodeResponse(t *testing.T) {
	tests := []struct {
		name string
		res  any
		fds  int
		err  error
		want Response
	}{
		{"ok with result", AttachLoopResult{Device: "/dev/loop1"}, 1, nil,
			Response{OK: true, FDs: 1, Result: json.RawMessage(`{"device":"/dev/loop1"}`)}},
		{"ok without result", nil, 0, nil, Response{OK: true}},
		{"wrapped coded error", nil, 0, errors.Join(errors.New("create tap \"bgr-0123456789\""), ErrExists),
			Response{Error: &Error{Code: CodeExists, Message: "create tap \"bgr-0123456789\"\nexists"}}},
		{"plain error", nil, 0, errors.New("netlink: boom"),
			Response{Error: &Error{Code: CodeInternal, Message: "netlink: boom"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got Response
			if err := json.Unmarshal(EncodeResponse(tt.res, tt.fds, tt.err), &got); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// errors.Is matches a helper error on its code, through wrapping.
func TestErrorIs(t *testing.T) {
	err := errors.Join(errors.New("context"), &Error{Code: CodeNotFound, Message: "open vms/x/rootfs: no such file"})
	if !errors.Is(err, ErrNotFound) {
		t.Error("not ErrNotFound")
	}
	if errors.Is(err, ErrForbidden) {
		t.Error("matches ErrForbidden")
	}
}

// BenchmarkDecodeRequest measures the strict decode + Validate that every
// helper request goes through.
func BenchmarkDecodeRequest(b *testing.B) {
	req, err := EncodeRequest(CreateTap{Name: goodTap, Bridge: "banger0", OwnerUID: 1000})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeRequest(req); err != nil {
			b.Fatal(err)
		}
	}
}
