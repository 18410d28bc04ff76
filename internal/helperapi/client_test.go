package helperapi

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeHelper serves the wire protocol on a real unix socket with handle
// deciding each answer, so the client's framing, descriptor passing and
// error mapping are exercised end to end without root.
func fakeHelper(t *testing.T, handle func(op Op, conn *net.UnixConn)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "helper.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = conn.Close() }()
				b, err := ReadRequest(conn)
				if err == nil {
					var op Op
					op, err = DecodeRequest(b)
					if err == nil {
						handle(op, conn)
						return
					}
				}
				_ = WriteResponse(conn, nil, nil, err)
			}()
		}
	}()
	return sock
}

// A result round-trips and a descriptor sent with it arrives as an open
// file on the same object.
func TestClientAttachLoopPassesDescriptor(t *testing.T) {
	data := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(data, []byte("block device stand-in"), 0o600); err != nil {
		t.Fatal(err)
	}
	var gotOp Op
	sock := fakeHelper(t, func(op Op, conn *net.UnixConn) {
		gotOp = op
		f, err := os.Open(data)
		if err != nil {
			_ = WriteResponse(conn, nil, nil, err)
			return
		}
		defer f.Close()
		_ = WriteResponse(conn, AttachLoopResult{Device: "/dev/loop9"}, []*os.File{f}, nil)
	})
	c := &Client{Socket: sock}
	req := AttachLoop{VMID: goodID, File: "rootfs.ext4", ReadOnly: true}
	res, f, err := c.AttachLoop(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if diff := cmp.Diff(AttachLoopResult{Device: "/dev/loop9"}, res); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(Op(req), gotOp); diff != "" {
		t.Errorf("request seen by the helper (-want +got):\n%s", diff)
	}
	b, err := io.ReadAll(f)
	if err != nil || string(b) != "block device stand-in" {
		t.Fatalf("read passed descriptor: %q, %v", b, err)
	}
}

// A helper error reaches the caller with its code (errors.Is) and message,
// and a call missing its descriptor fails instead of returning a nil file.
func TestClientErrors(t *testing.T) {
	sock := fakeHelper(t, func(op Op, conn *net.UnixConn) {
		switch op.(type) {
		case DeleteTap:
			_ = WriteResponse(conn, nil, nil, Errorf(CodeForbidden, "tap is not banger's"))
		case AttachLoop:
			_ = WriteResponse(conn, AttachLoopResult{Device: "/dev/loop1"}, nil, nil)
		default:
			_ = WriteResponse(conn, nil, nil, errors.New("boom"))
		}
	})
	c := &Client{Socket: sock}
	err := c.DeleteTap(t.Context(), DeleteTap{Name: goodTap})
	if !errors.Is(err, ErrForbidden) {
		t.Errorf("DeleteTap error %v, want ErrForbidden", err)
	}
	if want := `helper delete_tap: tap is not banger's`; err == nil || err.Error() != want {
		t.Errorf("DeleteTap error %q, want %q", err, want)
	}
	if _, f, err := c.AttachLoop(t.Context(), AttachLoop{VMID: goodID, File: "x"}); err == nil || f != nil {
		t.Errorf("AttachLoop without descriptor = %v, %v; want an error and no file", f, err)
	}
	if err := c.RemoveNAT(t.Context()); !errors.Is(err, ErrInternal) {
		t.Errorf("RemoveNAT error %v, want ErrInternal", err)
	}
	// Invalid requests never leave the client.
	if err := c.DeleteTap(t.Context(), DeleteTap{Name: "eth0"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("DeleteTap(eth0) error %v, want ErrInvalid", err)
	}
}

// A call returns when its context ends even if the helper never answers.
func TestClientContextCancel(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	sock := fakeHelper(t, func(op Op, conn *net.UnixConn) { <-release })
	c := &Client{Socket: sock}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := c.ListOwned(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ListOwned error %v, want context.DeadlineExceeded", err)
	}
}

// A client without a socket path fails clearly instead of dialing "".
func TestClientNoSocket(t *testing.T) {
	var c Client
	if _, err := c.ListOwned(t.Context()); err == nil {
		t.Fatal("ListOwned on a zero Client succeeded")
	}
}

// A helper that answers without reading the request (as it does for a
// refused peer) and closes still gets its answer through to the caller.
func TestClientReadsAnswerToUnreadRequest(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "helper.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			_ = WriteResponse(conn, nil, nil, Errorf(CodeForbidden, "uid 65534 may not use banger-helper"))
			_ = conn.Close()
		}
	}()
	c := &Client{Socket: sock}
	for range 20 {
		if _, err := c.ListOwned(t.Context()); !errors.Is(err, ErrForbidden) {
			t.Fatalf("ListOwned: %v, want ErrForbidden", err)
		}
	}
}

// LaunchJailed sends the whole request, disks included, and returns the
// helper's result; KillJailed reports the helper's error code.
func TestClientJailOps(t *testing.T) {
	want := LaunchJailedResult{
		PID: 4242, StartTime: 123456, Socket: "/var/lib/banger-jail/firecracker/0123456789/api.sock",
		Log: "/var/lib/banger-jail/firecracker/0123456789/firecracker.log", ConsoleLog: "/var/lib/banger/vms/0123456789/console.log",
		Root: "/var/lib/banger-jail/firecracker/0123456789/root", UID: 900000, GID: 900000,
		Cgroup: "banger-jail/0123456789", Limits: []string{"memory.max=671088640"},
	}
	var got Op
	sock := fakeHelper(t, func(op Op, conn *net.UnixConn) {
		switch op.(type) {
		case LaunchJailed:
			got = op
			_ = WriteResponse(conn, want, nil, nil)
		default:
			_ = WriteResponse(conn, nil, nil, Errorf(CodeForbidden, "jail dir is not root's"))
		}
	})
	c := &Client{Socket: sock}
	req := LaunchJailed{VMID: goodID, CPUs: 2, MemoryMiB: 512, Kernel: "vmlinux",
		Disks: []JailDisk{{ID: "root", File: "root.img"}, {ID: "data", File: "data.img", ReadOnly: true}}, Tap: true}
	res, err := c.LaunchJailed(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, res); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(Op(req), got); diff != "" {
		t.Errorf("request seen by the helper (-want +got):\n%s", diff)
	}
	if err := c.KillJailed(t.Context(), KillJailed{VMID: goodID}); !errors.Is(err, ErrForbidden) {
		t.Errorf("KillJailed: %v, want ErrForbidden", err)
	}
}
