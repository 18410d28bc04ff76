// Package config reads config.toml. Unknown keys and bad values are errors
// that name the file, the line and the key: a typo must not silently fall
// back to a default.
package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/bangerhq/banger/internal/api"
)

// Config is config.toml. The zero values of its fields mean "default";
// Default() fills them.
type Config struct {
	VM       VM         `toml:"vm"`
	Network  Network    `toml:"network"`
	Daemon   Daemon     `toml:"daemon"`
	Image    Image      `toml:"image"`
	FileSync []FileSync `toml:"file_sync"`
}

// VM holds defaults for `banger vm create`.
type VM struct {
	Image  string `toml:"image"`
	VMM    string `toml:"vmm"` // auto, firecracker, qemu
	CPUs   int    `toml:"cpus"`
	Memory Size   `toml:"memory"`
	Disk   Size   `toml:"disk"`
	// StopTimeout bounds a graceful stop before the VMM is killed.
	StopTimeout Duration `toml:"stop_timeout"`
}

// Network configures bridge mode.
type Network struct {
	Bridge string `toml:"bridge"`
	Subnet string `toml:"subnet"` // gateway address with prefix, e.g. 172.30.0.1/24
	// DNSPort is the high port bangerd's DNS server listens on.
	DNSPort int `toml:"dns_port"`
}

// Daemon configures bangerd.
type Daemon struct {
	LogFormat string `toml:"log_format"` // text or json
	LogLevel  string `toml:"log_level"`  // debug, info, warn, error
}

// Image configures the default build recipe.
type Image struct {
	Suite  string `toml:"suite"`
	Mirror string `toml:"mirror"`
}

// FileSync copies a host file or directory into VMs.
type FileSync struct {
	Host  string `toml:"host"`
	Guest string `toml:"guest"`
}

// Size is a byte count written "1GiB", "512M" or a plain integer.
type Size int64

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	n, err := api.ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (s Size) MarshalText() ([]byte, error) { return []byte(api.FormatSize(int64(s))), nil }

// Duration is a time.Duration written "30s", "2m".
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Default returns the built-in configuration.
func Default() Config {
	return Config{
		VM: VM{Image: "default", VMM: "auto", CPUs: 2, Memory: Size(1 * api.GiB), Disk: Size(8 * api.GiB),
			StopTimeout: Duration(30 * time.Second)},
		Network: Network{Bridge: "banger0", Subnet: "172.30.0.1/24", DNSPort: 10053},
		Daemon:  Daemon{LogFormat: "text", LogLevel: "info"},
		Image:   Image{Suite: "bookworm", Mirror: "http://deb.debian.org/debian"},
	}
}

// Error is a configuration error at a place in a file.
type Error struct {
	File string
	Line int // 0 when unknown
	Key  string
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Key != "" {
		fmt.Fprintf(&b, ": key %s", e.Key)
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// Load reads path over the defaults. A missing file is the defaults.
func Load(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Default(), nil
	}
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes data (named path in errors) over the defaults and validates it.
func Parse(path string, data []byte) (Config, error) {
	cfg := Default()
	// Decode into a zero value first so that validation can tell an explicit
	// value from a default, then merge.
	var file Config
	md, err := toml.Decode(string(data), &file)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return Config{}, &Error{File: path, Line: pe.Position.Line, Key: pe.LastKey, Msg: pe.Message}
		}
		// Type mismatches come as plain errors: "toml: line 2 (last key "vm.cpus"): …".
		if m := decodeErrRe.FindStringSubmatch(err.Error()); m != nil {
			line, _ := strconv.Atoi(m[1])
			return Config{}, &Error{File: path, Line: line, Key: m[2], Msg: m[3]}
		}
		return Config{}, &Error{File: path, Msg: err.Error()}
	}
	lines := keyLines(string(data))
	var errs []error
	for _, k := range md.Undecoded() {
		errs = append(errs, &Error{File: path, Line: lines[k.String()], Key: k.String(), Msg: "unknown key"})
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	merge(&cfg, file, md)
	for _, fe := range cfg.validate() {
		errs = append(errs, &Error{File: path, Line: lines[fe.key], Key: fe.key, Msg: fe.msg})
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	return cfg, nil
}

// merge copies every key the file defined over the defaults.
func merge(cfg *Config, f Config, md toml.MetaData) {
	set := func(key ...string) bool { return md.IsDefined(key...) }
	if set("vm", "image") {
		cfg.VM.Image = f.VM.Image
	}
	if set("vm", "vmm") {
		cfg.VM.VMM = f.VM.VMM
	}
	if set("vm", "cpus") {
		cfg.VM.CPUs = f.VM.CPUs
	}
	if set("vm", "memory") {
		cfg.VM.Memory = f.VM.Memory
	}
	if set("vm", "disk") {
		cfg.VM.Disk = f.VM.Disk
	}
	if set("vm", "stop_timeout") {
		cfg.VM.StopTimeout = f.VM.StopTimeout
	}
	if set("network", "bridge") {
		cfg.Network.Bridge = f.Network.Bridge
	}
	if set("network", "subnet") {
		cfg.Network.Subnet = f.Network.Subnet
	}
	if set("network", "dns_port") {
		cfg.Network.DNSPort = f.Network.DNSPort
	}
	if set("daemon", "log_format") {
		cfg.Daemon.LogFormat = f.Daemon.LogFormat
	}
	if set("daemon", "log_level") {
		cfg.Daemon.LogLevel = f.Daemon.LogLevel
	}
	if set("image", "suite") {
		cfg.Image.Suite = f.Image.Suite
	}
	if set("image", "mirror") {
		cfg.Image.Mirror = f.Image.Mirror
	}
	cfg.FileSync = f.FileSync
}

type fieldError struct{ key, msg string }

var decodeErrRe = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]+)"\): (.*)$`)

var (
	bridgeName = regexp.MustCompile(`^[a-z][a-z0-9-]{0,14}$`)
	suiteName  = regexp.MustCompile(`^[a-z][a-z0-9-]{1,30}$`)
	imageName  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
)

func (c Config) validate() []fieldError {
	var errs []fieldError
	bad := func(key, format string, args ...any) {
		errs = append(errs, fieldError{key, fmt.Sprintf(format, args...)})
	}
	if !imageName.MatchString(c.VM.Image) {
		bad("vm.image", "%q is not an image name (lowercase letters, digits and '-')", c.VM.Image)
	}
	switch c.VM.VMM {
	case "auto", "qemu", "firecracker":
	default:
		bad("vm.vmm", "%q is not one of auto, firecracker, qemu", c.VM.VMM)
	}
	if c.VM.CPUs < 1 || c.VM.CPUs > 256 {
		bad("vm.cpus", "%d is out of range 1..256", c.VM.CPUs)
	}
	if c.VM.Memory < Size(128*api.MiB) {
		bad("vm.memory", "%s is below the 128MiB minimum", api.FormatSize(int64(c.VM.Memory)))
	}
	if c.VM.Disk < Size(512*api.MiB) {
		bad("vm.disk", "%s is below the 512MiB minimum", api.FormatSize(int64(c.VM.Disk)))
	}
	if c.VM.StopTimeout < Duration(time.Second) || c.VM.StopTimeout > Duration(time.Hour) {
		bad("vm.stop_timeout", "%s is out of range 1s..1h", time.Duration(c.VM.StopTimeout))
	}
	if !bridgeName.MatchString(c.Network.Bridge) {
		bad("network.bridge", "%q is not a valid interface name (lowercase, up to 15 characters)", c.Network.Bridge)
	}
	if p, err := netip.ParsePrefix(c.Network.Subnet); err != nil || !p.Addr().Is4() || p.Bits() < 16 || p.Bits() > 29 || p.Addr() == p.Masked().Addr() {
		bad("network.subnet", "%q must be an IPv4 gateway address with a /16../29 prefix, like 172.30.0.1/24", c.Network.Subnet)
	}
	if c.Network.DNSPort < 1024 || c.Network.DNSPort > 65535 {
		bad("network.dns_port", "%d is out of range 1024..65535", c.Network.DNSPort)
	}
	switch c.Daemon.LogFormat {
	case "text", "json":
	default:
		bad("daemon.log_format", "%q is not text or json", c.Daemon.LogFormat)
	}
	switch c.Daemon.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("daemon.log_level", "%q is not debug, info, warn or error", c.Daemon.LogLevel)
	}
	if !suiteName.MatchString(c.Image.Suite) {
		bad("image.suite", "%q is not a Debian suite name", c.Image.Suite)
	}
	if !strings.HasPrefix(c.Image.Mirror, "http://") && !strings.HasPrefix(c.Image.Mirror, "https://") && !strings.HasPrefix(c.Image.Mirror, "file:/") {
		bad("image.mirror", "%q is not an http(s):// or file:/ URL", c.Image.Mirror)
	}
	for _, fs := range c.FileSync {
		if fs.Host == "" || fs.Guest == "" {
			bad("file_sync", "each entry needs both host and guest")
		} else if !strings.HasPrefix(fs.Guest, "/") {
			bad("file_sync.guest", "%q must be an absolute guest path", fs.Guest)
		}
	}
	return errs
}

// keyLines maps each dotted key ("vm.cpus", "file_sync.host") to the line it
// is first defined on, for error messages. It understands table headers,
// array-of-table headers and dotted keys; that is all banger's config uses.
func keyLines(doc string) map[string]int {
	out := map[string]int{}
	var table string
	for i, raw := range strings.Split(doc, "\n") {
		line := strings.TrimSpace(raw)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "[") {
			h := strings.Trim(strings.SplitN(line, "#", 2)[0], " \t")
			h = strings.Trim(h, "[]")
			table = normKey(h)
			if _, ok := out[table]; !ok {
				out[table] = i + 1
			}
			continue
		}
		eq := strings.IndexByte(line, '=')
		if eq <= 0 {
			continue
		}
		key := normKey(line[:eq])
		if table != "" {
			key = table + "." + key
		}
		if _, ok := out[key]; !ok {
			out[key] = i + 1
		}
	}
	return out
}

func normKey(k string) string {
	parts := strings.Split(k, ".")
	for i, p := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
	}
	return strings.Join(parts, ".")
}
