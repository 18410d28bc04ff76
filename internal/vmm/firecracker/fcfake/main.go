package fcfake

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"strconv"
)

// Environment that turns a test binary into the fake (see Main).
const (
	// EnvVersion selects the version to impersonate ("1.14.2"); its
	// presence is what makes Main take over.
	EnvVersion = "BANGER_FCFAKE_VERSION"
	// EnvNoKVM, when "1", makes InstanceStart fail as without /dev/kvm.
	EnvNoKVM = "BANGER_FCFAKE_NO_KVM"
)

// Exit codes of Firecracker (FcExitCode, src/vmm/src/lib.rs).
const (
	exitOK         = 0
	exitGeneric    = 1
	exitArgParsing = 153
)

// Main runs the fake Firecracker when EnvVersion is set and then exits the
// process; otherwise it returns false at once. A test binary calls it
// first thing in TestMain and passes its own path as the firecracker
// executable:
//
//	func TestMain(m *testing.M) {
//		vmm.ConsoleLoggerMain()
//		fcfake.Main()
//		os.Exit(m.Run())
//	}
func Main() bool {
	version := os.Getenv(EnvVersion)
	if version == "" {
		return false
	}
	os.Exit(Run(version, os.Args[1:], os.Getenv(EnvNoKVM) == "1", os.Stdout, os.Stderr))
	return true
}

// Run is the fake process: it parses Firecracker's command line, binds the
// API socket and serves until the guest resets or a fatal error, and
// returns the exit code.
func Run(version string, args []string, noKVM bool, stdout, stderr io.Writer) int {
	spec, err := LoadSpec(version)
	if err != nil {
		_, _ = fmt.Fprintln(stderr, err)
		return exitGeneric
	}
	sock := "/run/firecracker.socket"
	id := ""
	for i := 0; i < len(args); i++ {
		a := args[i]
		value := func() (string, bool) {
			if i+1 >= len(args) {
				return "", false
			}
			i++
			return args[i], true
		}
		switch a {
		case "--api-sock", "--id", "--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us":
			v, ok := value()
			if !ok {
				_, _ = fmt.Fprintf(stderr, "Arguments parsing error: The argument '%s' requires a value, but none was supplied\n", a)
				return exitArgParsing
			}
			switch a {
			case "--api-sock":
				sock = v
			case "--id":
				if !validInstanceID(v) {
					_, _ = fmt.Fprintf(stderr, "Invalid instance ID: %s\n", v) // approximate
					return exitGeneric
				}
				id = v
			default:
				if _, err := strconv.ParseUint(v, 10, 64); err != nil {
					_, _ = fmt.Fprintf(stderr, "Arguments parsing error: invalid value %q for %s\n", v, a)
					return exitArgParsing
				}
			}
		case "--no-seccomp":
		case "--version":
			_, _ = fmt.Fprintf(stdout, "Firecracker v%s\n\n", version)
			return exitOK
		default:
			_, _ = fmt.Fprintf(stderr, "Arguments parsing error: Found argument '%s' which wasn't expected, or isn't valid in this context.\n", a)
			return exitArgParsing
		}
	}

	exit := make(chan int, 1)
	srv := NewServer(spec, Options{ID: id, NoKVM: noKVM, Stdout: stdout, Exit: func(code int) {
		select {
		case exit <- code:
		default:
		}
	}})
	defer srv.Close()
	srv.Logf("INFO", "Running Firecracker v%s", version)

	// Firecracker binds without removing an existing file: a leftover
	// socket (or anything else) at the path is fatal.
	if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
		srv.Logf("ERROR", "RunWithApiError error: Failed to open the API socket at: %s. Check that it is not already used.", sock)
		srv.Logf("ERROR", "Firecracker exiting with error. exit_code=1")
		return exitGeneric
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		srv.Logf("ERROR", "RunWithApiError error: Failed to bind and run the HTTP server: %s", rustIOError(err))
		srv.Logf("ERROR", "Firecracker exiting with error. exit_code=1")
		return exitGeneric
	}
	// Firecracker leaves the socket file behind when it exits.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	hs := &http.Server{Handler: srv}
	go func() { _ = hs.Serve(ln) }()
	return <-exit
}

// validInstanceID is Firecracker's validate_instance_id: letters, digits
// and '-', 1 to 64 characters.
func validInstanceID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, r := range id {
		if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-' {
			return false
		}
	}
	return true
}
