package helperapi

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// FuzzDecodeRequest feeds arbitrary bytes to the helper's decoder, the
// first thing that touches input from the socket. Whatever it accepts must
// pass Validate, be a registered op, and survive a re-encode unchanged;
// whatever it refuses must be refused with a helper error code.
func FuzzDecodeRequest(f *testing.F) {
	for _, op := range everyOp {
		b, err := EncodeRequest(op)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"op":"delete_tap","args":{"name":"bgr-0123456789","name":"eth0"}}`))
	f.Add([]byte(`{"op":"attach_loop","args":{"vm_id":"0123456789","file":"../x"}}`))
	f.Add([]byte(`{"op":"create_tap","args":{"name":"bgr-0123456789","bridge":"banger0","owner_uid":0}}`))
	f.Add([]byte(`{"op":"list_owned"} {}`))
	f.Add([]byte(`{"op":"launch_jailed","args":{"vm_id":"0123456789","cpus":1,"memory_mib":64,"kernel":"vmlinux","disks":[{"id":"root","file":"root.img","id":"x"}]}}`))
	f.Add([]byte(`{"op":"kill_jailed","args":{"vm_id":"0123456789"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		op, err := DecodeRequest(data)
		if err != nil {
			var he *Error
			if !errors.As(err, &he) || (he.Code != CodeInvalid && he.Code != CodeUnknownOp) {
				t.Fatalf("DecodeRequest error %v has no invalid/unknown_op code", err)
			}
			return
		}
		if err := op.Validate(); err != nil {
			t.Fatalf("accepted op fails Validate: %v", err)
		}
		if _, ok := registry[op.OpName()]; !ok {
			t.Fatalf("accepted unregistered op %q", op.OpName())
		}
		again, err := EncodeRequest(op)
		if err != nil {
			t.Fatal(err)
		}
		back, err := DecodeRequest(again)
		if err != nil {
			t.Fatalf("re-encoded request %s refused: %v", again, err)
		}
		if diff := cmp.Diff(op, back); diff != "" {
			t.Fatalf("re-encode changed the op (-first +second):\n%s", diff)
		}
	})
}
