// Package guest holds what banger knows about the inside of a VM: the SSH
// identities on both ends, the pinned host keys, and the identity files
// written into a VM's disk before its first boot.
package guest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/crypto/ssh"
)

// clientKeyComment ends the owner key's public line, so it is recognisable
// in a guest's authorized_keys.
const clientKeyComment = "banger"

// LoadOrCreateClientKey returns the owner's SSH key for reaching VMs and its
// authorized_keys line (no trailing newline), creating an ed25519 key in
// OpenSSH format on first need: path 0600 in a 0700 directory, path+".pub"
// beside it.
//
// An existing key is never replaced: if path exists but cannot be read or
// parsed (a passphrase, a foreign format), that is an error the user must
// resolve. Creation is atomic and safe against a concurrent creator: the key
// is written to a temporary file and hard-linked into place, and whoever
// links second uses the winner's key. A missing .pub is (re)written from the
// private key; an existing one is left alone.
func LoadOrCreateClientKey(path string) (ssh.Signer, []byte, error) {
	for range 2 {
		signer, err := loadClientKey(path)
		if err == nil {
			line := authorizedLine(signer.PublicKey(), clientKeyComment)
			if err := ensurePub(path+".pub", line); err != nil {
				return nil, nil, err
			}
			return signer, line, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, nil, err
		}
		if err := createClientKey(path); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, nil, err
		}
		// Created, or lost the race to another creator: load what is there.
	}
	return nil, nil, fmt.Errorf("load ssh key %s: it keeps disappearing", path)
}

func loadClientKey(path string) (ssh.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("load ssh key %s: %w", path, err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	var missing *ssh.PassphraseMissingError
	switch {
	case errors.As(err, &missing):
		return nil, fmt.Errorf("load ssh key %s: it is passphrase-protected and banger needs an unencrypted one (hint: move it aside and banger makes a new one)", path)
	case err != nil:
		return nil, fmt.Errorf("load ssh key %s: %w (hint: banger does not replace an existing key; move it aside and banger makes a new one)", path, err)
	}
	return signer, nil
}

func createClientKey(path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create ssh key dir %s: %w", dir, err)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate ssh key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, clientKeyComment)
	if err != nil {
		return fmt.Errorf("encode ssh key: %w", err)
	}
	if err := writeNew(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return fmt.Errorf("create ssh key %s: %w", path, err)
	}
	return nil
}

// writeNew creates path with data, atomically and without replacing an
// existing file (which gives fs.ErrExist): a temporary file in the same
// directory, synced, then hard-linked to path.
func writeNew(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if err := writeSync(tmp, data, perm); err != nil {
		return err
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fs.ErrExist
		}
		return err
	}
	return syncDir(dir)
}

// writeReplace atomically replaces path with data (temp file + rename).
func writeReplace(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }() // fails harmlessly once renamed
	if err := writeSync(tmp, data, perm); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func writeSync(f *os.File, data []byte, perm os.FileMode) error {
	err := f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes a rename or link in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func ensurePub(path string, line []byte) error {
	if _, err := os.Lstat(path); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	err := writeNew(path, append(bytes.Clone(line), '\n'), 0o644)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("write ssh public key %s: %w", path, err)
	}
	return nil
}

// authorizedLine is key in authorized_keys format with a comment, without
// the trailing newline.
func authorizedLine(key ssh.PublicKey, comment string) []byte {
	line := bytes.TrimSuffix(ssh.MarshalAuthorizedKey(key), []byte("\n"))
	if comment != "" {
		line = append(append(line, ' '), comment...)
	}
	return line
}

// HostKey is one SSH host key pair for a guest.
type HostKey struct {
	// PrivatePEM is the private key file as sshd reads it (OpenSSH format).
	PrivatePEM []byte
	Public     ssh.PublicKey
}

// HostKeys are a guest's host keys: ed25519 for every current client,
// ECDSA P-256 for older ones without ed25519. bangerd generates them, pins
// the public halves in its known_hosts, and writes the pairs into the
// guest's /etc/ssh before first boot.
type HostKeys struct {
	ED25519 HostKey
	ECDSA   HostKey
}

// PublicKeys lists the public halves, ed25519 first.
func (h HostKeys) PublicKeys() []ssh.PublicKey {
	return []ssh.PublicKey{h.ED25519.Public, h.ECDSA.Public}
}

// GenerateHostKeys makes a fresh pair of host keys.
func GenerateHostKeys() (HostKeys, error) {
	_, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return HostKeys{}, fmt.Errorf("generate ed25519 host key: %w", err)
	}
	ecPriv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return HostKeys{}, fmt.Errorf("generate ecdsa host key: %w", err)
	}
	var pems [2][]byte
	for i, k := range []any{edPriv, ecPriv} {
		block, err := ssh.MarshalPrivateKey(k, "")
		if err != nil {
			return HostKeys{}, fmt.Errorf("encode host key: %w", err)
		}
		pems[i] = pem.EncodeToMemory(block)
	}
	return ParseHostKeys(pems[0], pems[1])
}

// ParseHostKeys rebuilds HostKeys from their private key files (as
// GenerateHostKeys or ssh-keygen write them), checking each is of its
// expected type.
func ParseHostKeys(ed25519PEM, ecdsaPEM []byte) (HostKeys, error) {
	var h HostKeys
	for _, k := range []struct {
		pem  []byte
		typ  string
		into *HostKey
	}{
		{ed25519PEM, ssh.KeyAlgoED25519, &h.ED25519},
		{ecdsaPEM, ssh.KeyAlgoECDSA256, &h.ECDSA},
	} {
		signer, err := ssh.ParsePrivateKey(k.pem)
		if err != nil {
			return HostKeys{}, fmt.Errorf("parse %s host key: %w", k.typ, err)
		}
		if got := signer.PublicKey().Type(); got != k.typ {
			return HostKeys{}, fmt.Errorf("parse %s host key: got a %s key", k.typ, got)
		}
		*k.into = HostKey{PrivatePEM: bytes.Clone(k.pem), Public: signer.PublicKey()}
	}
	return h, nil
}
