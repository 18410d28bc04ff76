// Package version reports what build of banger is running.
//
// Version, Commit and BuiltAt are stamped by `make build` through -ldflags -X.
// An unstamped build (go build, go test) reports version "dev" and falls back to
// the VCS information the Go toolchain records, so a daemon built by hand can
// still be told apart from another build.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Stamped at link time: -X github.com/bangerhq/banger/internal/version.Version=v0.1.0 …
var (
	Version = ""
	Commit  = ""
	BuiltAt = ""
)

// Info describes one build. The JSON form is what the daemon reports on /v1/version.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	BuiltAt   string `json:"built_at"`
	GoVersion string `json:"go_version"`
	Platform  string `json:"platform"`
}

// Get returns the running binary's build information.
func Get() Info {
	info := Info{
		Version:   Version,
		Commit:    Commit,
		BuiltAt:   BuiltAt,
		GoVersion: runtime.Version(),
		Platform:  runtime.GOOS + "/" + runtime.GOARCH,
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if info.Commit == "" {
					info.Commit = s.Value
				}
			case "vcs.time":
				if info.BuiltAt == "" {
					info.BuiltAt = s.Value
				}
			}
		}
	}
	if info.Version == "" {
		info.Version = "dev"
	}
	if info.Commit == "" {
		info.Commit = "unknown"
	}
	if info.BuiltAt == "" {
		info.BuiltAt = "unknown"
	}
	return info
}

// ShortCommit is the first eight characters of the commit SHA.
func (i Info) ShortCommit() string {
	if len(i.Commit) > 8 {
		return i.Commit[:8]
	}
	return i.Commit
}

// Line is the one-line form printed by --version:
//
//	banger v0.1.0 (commit abcd1234, built 2026-04-28T20:45:50Z)
func (i Info) Line(binary string) string {
	return fmt.Sprintf("%s %s (commit %s, built %s)", binary, i.Version, i.ShortCommit(), i.BuiltAt)
}

// SameBuild reports whether two binaries come from the same build: same
// version, commit and build time. The CLI restarts a daemon that differs.
func (i Info) SameBuild(o Info) bool {
	return i.Version == o.Version && i.Commit == o.Commit && i.BuiltAt == o.BuiltAt
}
