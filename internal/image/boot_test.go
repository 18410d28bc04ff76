package image_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/image/imagetest"
	"github.com/bangerhq/banger/internal/testutil"
	"golang.org/x/crypto/ssh"
)

// A VM made from the default image the way the VM service makes one (the
// files Service.Files names, a clone of the rootfs with an identity written
// in) boots under QEMU, prints BANGER-READY
// on the serial console only once sshd accepts connections (the first
// handshake after it succeeds), logs in root with the owner's key against
// the pinned host key, and offers a login prompt on ttyS0.
func TestDefaultImageBoots(t *testing.T) {
	testutil.SkipShort(t, "boots a VM under QEMU TCG")
	testutil.RequireCommand(t, "qemu-system-x86_64")
	ctx := t.Context()
	svc := imagetest.NewService(t)
	imagetest.ImportDefault(t, svc, image.DefaultImageName)
	files, err := svc.Files(ctx, image.DefaultImageName)
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()

	disk := filepath.Join(work, "disk.ext4")
	c, err := image.ChooseCloner(ctx, files.Rootfs, work, image.CloneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Clone(ctx, files.Rootfs, disk); err != nil {
		t.Fatal(err)
	}
	hostKeys, err := guest.GenerateHostKeys()
	if err != nil {
		t.Fatal(err)
	}
	_, clientKey, _ := ed25519.GenerateKey(rand.Reader)
	client, err := ssh.NewSignerFromKey(clientKey)
	if err != nil {
		t.Fatal(err)
	}
	machineID, _ := guest.NewMachineID()
	const mac = "52:54:00:12:34:56"
	id := guest.Identity{
		Hostname:       "boot-test",
		Net:            guest.NetConfig{Mode: guest.NetUser, MAC: mac},
		AuthorizedKeys: [][]byte{ssh.MarshalAuthorizedKey(client.PublicKey())},
		HostKeys:       hostKeys,
		MachineID:      machineID,
	}
	idFiles, err := id.Files()
	if err != nil {
		t.Fatal(err)
	}
	if err := ext4.WriteFiles(ctx, disk, idFiles); err != nil {
		t.Fatal(err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	qemu := exec.Command("qemu-system-x86_64",
		"-accel", "tcg", "-cpu", "max", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on", "-m", "1024", "-smp", "2",
		"-nographic", "-no-reboot",
		"-kernel", files.Kernel, "-initrd", files.Initrd,
		"-append", "console=ttyS0 root=/dev/vda rw panic=-1"+tscParam(),
		"-drive", "id=root,file="+disk+",format=raw,if=none", "-device", "virtio-blk-device,drive=root",
		"-netdev", fmt.Sprintf("user,id=n0,hostfwd=tcp:127.0.0.1:%d-:22", port),
		"-device", "virtio-net-device,netdev=n0,mac="+mac,
		"-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0")
	qemu.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := qemu.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	qemu.Stderr = qemu.Stdout
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-qemu.Process.Pid, syscall.SIGKILL)
		_ = qemu.Wait()
	})

	var mu sync.Mutex
	var console bytes.Buffer
	ready := make(chan time.Time, 1)
	login := make(chan struct{}, 1)
	go func() {
		// Raw chunks, not lines: the login prompt ends without a newline.
		buf := make([]byte, 32<<10)
		for {
			n, err := out.Read(buf)
			mu.Lock()
			console.Write(buf[:n])
			text := console.String()
			mu.Unlock()
			if strings.Contains(text, "BANGER-READY") {
				select {
				case ready <- time.Now():
				default:
				}
			}
			if strings.Contains(text, "boot-test login:") {
				select {
				case login <- struct{}{}:
				default:
				}
			}
			if err != nil {
				return
			}
		}
	}()
	consoleTail := func() string {
		mu.Lock()
		defer mu.Unlock()
		s := console.String()
		if len(s) > 6000 {
			s = s[len(s)-6000:]
		}
		return s
	}
	start := time.Now()
	select {
	case at := <-ready:
		t.Logf("BANGER-READY after %s", at.Sub(start).Round(100*time.Millisecond))
	case <-time.After(8 * time.Minute):
		t.Fatalf("no BANGER-READY on the console after 8 minutes; console:\n%s", consoleTail())
	}

	// One handshake, no retry: the signal means sshd listens.
	hostKeyOK := func(_ string, _ net.Addr, key ssh.PublicKey) error {
		for _, k := range hostKeys.PublicKeys() {
			if bytes.Equal(k.Marshal(), key.Marshal()) {
				return nil
			}
		}
		return fmt.Errorf("host key %s is not one of the injected keys", ssh.FingerprintSHA256(key))
	}
	conn, err := ssh.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &ssh.ClientConfig{
		User:              "root",
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(client)},
		HostKeyCallback:   hostKeyOK,
		HostKeyAlgorithms: []string{ssh.KeyAlgoED25519},
		Timeout:           time.Minute,
	})
	if err != nil {
		t.Fatalf("first SSH handshake after BANGER-READY: %v; console:\n%s", err, consoleTail())
	}
	defer func() { _ = conn.Close() }()
	sess, err := conn.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	got, err := sess.CombinedOutput("hostname; systemctl is-active ssh banger-ready systemd-networkd systemd-resolved; findmnt -no SOURCE,FSTYPE /; readlink /etc/resolv.conf; ls /etc/ssh/ | grep -c host_ || true")
	if err != nil {
		t.Fatalf("run commands in the guest: %v\n%s", err, got)
	}
	want := "boot-test\nactive\nactive\nactive\nactive\n/dev/vda ext4\n../run/systemd/resolve/stub-resolv.conf\n4\n"
	if string(got) != want {
		t.Errorf("guest says:\n%s\nwant:\n%s", got, want)
	}
	select {
	case <-login:
	case <-time.After(2 * time.Minute):
		t.Errorf("no login prompt on ttyS0; console:\n%s", consoleTail())
	}
	if os.Getenv("BANGER_TEST_VERBOSE") != "" {
		t.Logf("console:\n%s", consoleTail())
	}
}

// tscParam tells a TCG guest the TSC frequency: without a PIT or HPET on
// microvm the kernel cannot calibrate it and may hang early in boot.
func tscParam() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			var mhz float64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%f", &mhz); err == nil && mhz > 0 {
				return fmt.Sprintf(" tsc_early_khz=%d", int64(mhz*1000))
			}
		}
	}
	return ""
}
