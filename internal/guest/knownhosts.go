package guest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
	"golang.org/x/sys/unix"
)

var (
	// ErrHostUnknown means no key is pinned for the host.
	ErrHostUnknown = errors.New("host key not pinned")
	// ErrHostKeyChanged means keys are pinned for the host and the one it
	// offered is not among them.
	ErrHostKeyChanged = errors.New("host key changed")
)

// banger's known_hosts is its own file (paths.Layout.KnownHosts), owned by
// the daemon and never the user's ~/.ssh/known_hosts. It only ever holds
// plain (unhashed) lines written by Add: one line per key, naming every
// address of one VM. Lines it did not write (comments, markers, hashed
// hosts) are kept as they are.

// hostnameRe is a lowercase DNS name: labels of letters, digits and inner
// '-', dot-separated.
var hostnameRe = regexp.MustCompile(`^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$`)

// canonicalHost validates a known_hosts address and returns it as
// known_hosts spells it: "host" for port 22, "[host]:port" otherwise. host
// is an IP address or a lowercase DNS name; patterns, negations, hashes,
// whitespace and commas are refused, since they would change what a line
// matches.
func canonicalHost(h string) (string, error) {
	host, port := h, "22"
	if strings.HasPrefix(h, "[") {
		end := strings.Index(h, "]:")
		if end < 0 {
			return "", fmt.Errorf("host %q: want [host]:port", h)
		}
		host, port = h[1:end], h[end+2:]
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 || strconv.FormatUint(p, 10) != port {
		return "", fmt.Errorf("host %q: bad port %q", h, port)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", fmt.Errorf("host %q: zoned addresses are not supported", h)
		}
		host = ip.String()
	} else if len(host) > 253 || !hostnameRe.MatchString(host) {
		return "", fmt.Errorf("host %q: want an IP address or a lowercase DNS name, optionally as [host]:port", h)
	}
	if port == "22" {
		return host, nil
	}
	return "[" + host + "]:" + port, nil
}

func canonicalHosts(hosts []string) ([]string, error) {
	if len(hosts) == 0 {
		return nil, errors.New("no hosts")
	}
	out := make([]string, 0, len(hosts))
	seen := map[string]bool{}
	for _, h := range hosts {
		c, err := canonicalHost(h)
		if err != nil {
			return nil, err
		}
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	return out, nil
}

// Add pins keys for hosts (a VM's addresses: "127.0.0.1" for port 22,
// "[127.0.0.1]:2222", "dev.banger"), replacing whatever was pinned for any
// of them before, so a stale key of a deleted VM that had the same address
// can never be accepted. The file is rewritten atomically under a lock, so
// concurrent Adds and Removes (VMs created in parallel) all land.
func Add(path string, hosts []string, keys []ssh.PublicKey) error {
	hs, err := canonicalHosts(hosts)
	if err != nil {
		return fmt.Errorf("pin host keys in %s: %w", path, err)
	}
	if len(keys) == 0 {
		return fmt.Errorf("pin host keys in %s: no keys", path)
	}
	var add []string
	for _, k := range keys {
		if k == nil {
			return fmt.Errorf("pin host keys in %s: nil key", path)
		}
		add = append(add, knownhosts.Line(hs, k))
	}
	err = rewrite(path, func(lines []string) []string {
		return append(dropHosts(lines, hs), add...)
	})
	if err != nil {
		return fmt.Errorf("pin host keys in %s: %w", path, err)
	}
	return nil
}

// Remove unpins hosts: they disappear from every line, and a line left with
// no host goes. Removing a host that is not there is not an error.
func Remove(path string, hosts []string) error {
	hs, err := canonicalHosts(hosts)
	if err != nil {
		return fmt.Errorf("unpin host keys in %s: %w", path, err)
	}
	if err := rewrite(path, func(lines []string) []string { return dropHosts(lines, hs) }); err != nil {
		return fmt.Errorf("unpin host keys in %s: %w", path, err)
	}
	return nil
}

// dropHosts removes hosts from the host lists of plain lines.
func dropHosts(lines, hosts []string) []string {
	drop := map[string]bool{}
	for _, h := range hosts {
		drop[h] = true
	}
	var out []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || t[0] == '#' || t[0] == '@' || t[0] == '|' {
			out = append(out, l)
			continue
		}
		field, rest, _ := strings.Cut(t, " ")
		var keep []string
		for _, h := range strings.Split(field, ",") {
			if !drop[h] {
				keep = append(keep, h)
			}
		}
		switch {
		case len(keep) == 0:
		case len(keep) == len(strings.Split(field, ",")):
			out = append(out, l)
		default:
			out = append(out, strings.Join(keep, ",")+" "+rest)
		}
	}
	return out
}

// rewrite applies edit to the file's lines under an exclusive flock on a
// lock file beside it (the file itself is replaced by rename, so it cannot
// carry the lock), then replaces it atomically.
func rewrite(path string, edit func([]string) []string) error {
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open lock: %w", err)
	}
	defer lock.Close() // releases the flock
	if err := flockRetry(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	var lines []string
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return err
	default:
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			lines = append(lines, sc.Text())
		}
		if err := sc.Err(); err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
	}
	lines = edit(lines)
	var buf bytes.Buffer
	for _, l := range lines {
		buf.WriteString(l)
		buf.WriteByte('\n')
	}
	return writeReplace(path, buf.Bytes(), 0o644)
}

func flockRetry(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// HostKeyCallback verifies a VM's host key against banger's known_hosts at
// path, read once now: build one per connection so recent Adds are seen. It
// is strict: a host with no pinned key and a key that is not the pinned one
// are both refused (ErrHostUnknown, ErrHostKeyChanged); nothing is ever
// learned on first use. The hostname is what the caller dialled; one without
// a port means port 22, and the connection need not be TCP (vsock, a unix
// socket proxy), since only the hostname is matched.
func HostKeyCallback(path string) (ssh.HostKeyCallback, error) {
	db, err := knownhosts.New(path)
	if err != nil {
		return nil, fmt.Errorf("load known hosts %s: %w", path, err)
	}
	return func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		if hostname == "" {
			return fmt.Errorf("verify host key: no hostname to look up in %s: %w", path, ErrHostUnknown)
		}
		if _, _, err := net.SplitHostPort(hostname); err != nil {
			hostname = net.JoinHostPort(strings.Trim(hostname, "[]"), "22")
		}
		// knownhosts needs a host:port remote even when the hostname wins.
		if _, ok := remote.(*net.TCPAddr); !ok {
			remote = &net.TCPAddr{IP: net.IPv4zero}
		}
		err := db(hostname, remote, key)
		if err == nil {
			return nil
		}
		fp := ssh.FingerprintSHA256(key)
		var ke *knownhosts.KeyError
		var re *knownhosts.RevokedError
		switch {
		case errors.As(err, &ke) && len(ke.Want) == 0:
			return fmt.Errorf("verify host key of %s: %w: %s %s is not in %s (banger pins keys when it creates a VM and never trusts on first use; hint: was this VM created by another banger?)",
				hostname, ErrHostUnknown, key.Type(), fp, path)
		case errors.As(err, &ke):
			var pinned []string
			for _, w := range ke.Want {
				pinned = append(pinned, w.Key.Type()+" "+ssh.FingerprintSHA256(w.Key))
			}
			return fmt.Errorf("verify host key of %s: %w: offered %s %s, pinned %s in %s (another machine may be answering at this address)",
				hostname, ErrHostKeyChanged, key.Type(), fp, strings.Join(pinned, ", "), path)
		case errors.As(err, &re):
			return fmt.Errorf("verify host key of %s: %w: %s %s is revoked in %s", hostname, ErrHostKeyChanged, key.Type(), fp, path)
		default:
			return fmt.Errorf("verify host key of %s: %w", hostname, err)
		}
	}, nil
}
