package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bangerhq/banger/internal/api"
)

// A missing file is the defaults, and the defaults validate.
func TestLoadMissingIsDefault(t *testing.T) {
	cfg, err := Load(filepath.Join(t.TempDir(), "nope.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(Default(), cfg); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	if errs := Default().validate(); len(errs) != 0 {
		t.Fatalf("defaults do not validate: %v", errs)
	}
}

// Keys set in the file override defaults; unset keys keep them.
func TestParseOverrides(t *testing.T) {
	doc := `
[vm]
cpus = 4
memory = "2GiB"
stop_timeout = "10s"

[network]
subnet = "10.77.0.1/24"

[[file_sync]]
host = "~/.gitconfig"
guest = "/root/.gitconfig"
`
	cfg, err := Parse("config.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.VM.CPUs = 4
	want.VM.Memory = Size(2 * api.GiB)
	want.VM.StopTimeout = Duration(10 * time.Second)
	want.Network.Subnet = "10.77.0.1/24"
	want.FileSync = []FileSync{{Host: "~/.gitconfig", Guest: "/root/.gitconfig"}}
	if d := cmp.Diff(want, cfg); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

// Unknown keys and bad values name the file, the line and the key.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"unknown key", "[vm]\ncpus = 2\ncpu = 3\n", "config.toml:3: key vm.cpu: unknown key"},
		{"unknown table", "[vms]\ncpus = 2\n", "config.toml:1: key vms: unknown key"},
		{"bad range", "\n[vm]\ncpus = 0\n", "config.toml:3: key vm.cpus: 0 is out of range 1..256"},
		{"bad enum", "[vm]\nvmm = \"kvm\"\n", `config.toml:2: key vm.vmm: "kvm" is not one of auto, firecracker, qemu`},
		{"bad size", "[vm]\nmemory = \"1GB\"\n", `config.toml:2: key vm.memory:`},
		{"wrong type", "[vm]\ncpus = \"two\"\n", `config.toml:2: key vm.cpus:`},
		{"bad subnet", "[network]\nsubnet = \"172.30.0.0/24\"\n", `config.toml:2: key network.subnet:`},
		{"syntax", "[vm\n", "config.toml:2: expected"},
		{"relative guest path", "[[file_sync]]\nhost = \"~/x\"\nguest = \"x\"\n", `config.toml:3: key file_sync.guest:`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("config.toml", []byte(tt.doc))
			if err == nil {
				t.Fatal("Parse succeeded")
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("error %q does not start with %q", err, tt.want)
			}
		})
	}
}

// Load reports the real path of the file in its errors.
func TestLoadNamesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte("bogus = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if err == nil || !strings.HasPrefix(err.Error(), path+":1: key bogus") {
		t.Fatalf("Load error = %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("[vm]\ncpus = 2\n")
	f.Add("[[file_sync]]\nhost=\"a\"\nguest=\"/b\"\n")
	f.Fuzz(func(t *testing.T, doc string) {
		cfg, err := Parse("f.toml", []byte(doc))
		if err == nil && len(cfg.validate()) != 0 {
			t.Fatalf("Parse accepted an invalid config: %v", cfg.validate())
		}
	})
}
