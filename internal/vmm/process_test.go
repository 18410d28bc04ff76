package vmm

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	ConsoleLoggerMain()
	os.Exit(m.Run())
}

// starttime is read after the last ')', whatever the command name holds.
func TestParseStartTime(t *testing.T) {
	stat := "1234 (we(ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10\n"
	got, err := parseStartTime([]byte(stat), false)
	if err != nil || got != 987654 {
		t.Fatalf("parseStartTime = %d, %v; want 987654", got, err)
	}
	if _, err := parseStartTime([]byte("1 (x) Z 1 2"), false); err == nil {
		t.Fatal("short or zombie stat accepted")
	}
	zombie := strings.Replace(stat, ") S ", ") Z ", 1)
	if _, err := parseStartTime([]byte(zombie), false); err == nil {
		t.Fatal("zombie accepted as alive")
	}
	if got, err := parseStartTime([]byte(zombie), true); err != nil || got != 987654 {
		t.Fatalf("unreaped child: %d, %v; want 987654", got, err)
	}
}

// The capped copy rotates once the cap is reached and never exceeds it.
func TestCopyCapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	in := bytes.Repeat([]byte("0123456789"), 25) // 250 bytes
	if err := CopyCapped(bytes.NewReader(in), path, 100); err != nil {
		t.Fatal(err)
	}
	cur, _ := os.ReadFile(path)
	old, _ := os.ReadFile(path + ".1")
	if len(cur) != 50 || len(old) != 100 {
		t.Fatalf("sizes: current %d, rotated %d; want 50, 100", len(cur), len(old))
	}
	if !bytes.Equal(append(old, cur...), in[100:]) {
		t.Fatal("rotated content is not the tail of the input")
	}
}

// A spawned process is in its own session, its output reaches the console
// log through the logger, and Wait reports its exit code.
func TestSpawnConsoleAndWait(t *testing.T) {
	log := filepath.Join(t.TempDir(), "console.log")
	p, err := Spawn(SpawnOptions{Argv: []string{"/bin/sh", "-c", "echo hello-console; exit 7"}, ConsoleLog: log})
	if err != nil {
		t.Fatal(err)
	}
	if code := p.Wait(); code != 7 {
		t.Fatalf("exit code %d, want 7", code)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(log)
		if strings.Contains(string(b), "hello-console") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("console log never got the output; has %q", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Find refuses a pid whose start time does not match (a recycled pid), and
// Wait on a found (non-child) process returns when it exits.
func TestFindAndWaitNonChild(t *testing.T) {
	p, err := Spawn(SpawnOptions{Argv: []string{"/bin/sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	if sid, _ := syscall.Getpgid(p.PID); sid != p.PID {
		t.Errorf("process group %d, want its own %d", sid, p.PID)
	}
	if _, err := Find(p.PID, p.StartTime+1); !errors.Is(err, ErrGone) {
		t.Fatalf("Find with wrong start time: %v, want ErrGone", err)
	}
	found, err := Find(p.PID, p.StartTime)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan int)
	go func() { done <- found.Wait() }()
	if err := found.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Reap it as its parent so the pidfd sees the exit.
	go p.Wait()
	select {
	case code := <-done:
		if code != -1 {
			t.Errorf("non-child exit code %d, want -1 (unknown)", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait on a found process never returned")
	}
	if found.Alive() {
		t.Fatal("killed process still alive")
	}
}
