package server

import (
	"context"
	"net"

	"golang.org/x/sys/unix"
)

type peerKey struct{}

// ConnContext attaches the connecting process's credentials, read with
// SO_PEERCRED when the connection is accepted, to every request on it. The
// kernel fills them in; nothing the client sends can change them. Use it as
// http.Server.ConnContext.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, cred)
}

// Peer returns the credentials ConnContext attached, or nil.
func Peer(ctx context.Context) *unix.Ucred {
	c, _ := ctx.Value(peerKey{}).(*unix.Ucred)
	return c
}
