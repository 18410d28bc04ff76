package guest

import (
	"context"
	"fmt"
	"net"
	"time"

	"golang.org/x/crypto/ssh"
)

// Target is how banger reaches one VM over SSH.
type Target struct {
	// Addr is host:port to dial (127.0.0.1:<forwarded port> in user mode).
	Addr string
	// Alias names the VM in known_hosts ("dev.banger"), independent of
	// the address and port, which change between boots.
	Alias      string
	User       string
	Signer     ssh.Signer
	KnownHosts string
}

// Dial opens an SSH connection and verifies the host key against the pinned
// one. The context bounds the TCP connect and the handshake.
func Dial(ctx context.Context, t Target) (*ssh.Client, error) {
	verify, err := HostKeyCallback(t.KnownHosts)
	if err != nil {
		return nil, err
	}
	alias := t.Alias
	cfg := &ssh.ClientConfig{
		User: t.User,
		Auth: []ssh.AuthMethod{ssh.PublicKeys(t.Signer)},
		HostKeyCallback: func(_ string, remote net.Addr, key ssh.PublicKey) error {
			return verify(alias, remote, key)
		},
		// Offer only the algorithms of the keys banger pinned, so the
		// server cannot pick one we hold no pin for.
		HostKeyAlgorithms: []string{ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256},
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, fmt.Errorf("ssh %s (%s): %w", t.Alias, t.Addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c, chans, reqs, err := ssh.NewClientConn(conn, t.Addr, cfg)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("ssh %s (%s): %w", t.Alias, t.Addr, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return ssh.NewClient(c, chans, reqs), nil
}
