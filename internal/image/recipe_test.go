package image

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
	"github.com/google/go-cmp/cmp"
)

var testDefaults = config.Image{Suite: "bookworm", Mirror: "http://deb.debian.org/debian"}

// Names are DNS labels; each rejected one stands for an attack or a typo
// that would otherwise reach a path or a command line.
func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"default", true},
		{"a", true},
		{"dev-2", true},
		{strings.Repeat("a", 63), true},
		{"", false},                      // nothing to name a directory by
		{strings.Repeat("a", 64), false}, // longer than a DNS label
		{"Default", false},               // uppercase: two names for one image on case-folding file systems
		{"..", false},                    // climbs out of the images directory
		{"a/b", false},                   // a path, not a name
		{"a\nb", false},                  // forges log and progress lines
		{"-a", false},                    // read as an option by tools
		{"a-", false},
		{"a b", false},
		{"a.b", false}, // dots are kept for staging and deletion names
		{"é", false},
	} {
		err := ValidateName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		var ae *api.Error
		if err != nil && (!errors.As(err, &ae) || ae.Code != api.CodeInvalidArgument || ae.Hint == "") {
			t.Errorf("ValidateName(%q) = %#v, want invalid_argument with a hint", tc.name, err)
		}
	}
}

// Package names follow Debian Policy exactly; anything apt or mmdebstrap
// could read as a version, an option, a pattern or a path is refused.
func TestValidatePackage(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"curl", true},
		{"g++", true},
		{"libc6.1", true},
		{"python3-yaml", true},
		{"0ad", true},
		{"x", false},           // two characters at least
		{"Curl", false},        // uppercase
		{"-curl", false},       // an option to apt
		{"curl=7.88", false},   // a version pin
		{"curl:amd64", false},  // an architecture qualifier
		{"?name(curl)", false}, // an apt pattern
		{"./local.deb", false}, // a path mmdebstrap would install
		{"curl,vim", false},    // splits mmdebstrap's --include
		{"curl vim", false},    // two words
		{"curl\n", false},      // a line break
		{strings.Repeat("a", 129), false},
	} {
		if err := ValidatePackage(tc.name); (err == nil) != tc.ok {
			t.Errorf("ValidatePackage(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// NewRecipe fills defaults, merges and sorts packages, and refuses bad
// suites, mirrors, scripts and sizes with invalid_argument.
func TestNewRecipe(t *testing.T) {
	r, err := NewRecipe(api.ImageBuildRequest{
		Packages:  []string{"vim", "curl", "sudo", "vim"},
		Customize: []api.Script{{Name: "a.sh", Content: "true\n"}},
		Mirror:    "http://deb.debian.org/debian/",
		SizeBytes: 1<<30 + 1,
	}, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"curl", "vim"}, r.Extra); diff != "" {
		t.Errorf("extra packages (-want +got):\n%s", diff)
	}
	if r.Suite != "bookworm" || r.Mirror != "http://deb.debian.org/debian" || r.SizeBytes != 1<<30+1<<20 {
		t.Errorf("recipe %+v: want the default suite, the mirror without its slash, the size rounded up to a MiB", r)
	}
	for i := 1; i < len(r.Packages); i++ {
		if r.Packages[i-1] >= r.Packages[i] {
			t.Fatalf("packages not sorted and unique: %v", r.Packages)
		}
	}

	for _, tc := range []struct {
		what string
		req  api.ImageBuildRequest
	}{
		{"suite with a slash", api.ImageBuildRequest{Suite: "../etc"}},
		{"suite option", api.ImageBuildRequest{Suite: "-bookworm"}},
		{"mirror not a URL", api.ImageBuildRequest{Mirror: "deb.debian.org"}},
		{"mirror with a space (a sources.list line)", api.ImageBuildRequest{Mirror: "deb http://x/ bookworm main"}},
		{"mirror with credentials", api.ImageBuildRequest{Mirror: "http://u:p@x/debian"}},
		{"mirror ftp", api.ImageBuildRequest{Mirror: "ftp://x/debian"}},
		{"bad package", api.ImageBuildRequest{Packages: []string{"curl=1"}}},
		{"script name with a slash", api.ImageBuildRequest{Customize: []api.Script{{Name: "../x", Content: "true"}}}},
		{"script name with a quote", api.ImageBuildRequest{Customize: []api.Script{{Name: "a'b", Content: "true"}}}},
		{"empty script", api.ImageBuildRequest{Customize: []api.Script{{Name: "a", Content: " \n"}}}},
		{"binary script", api.ImageBuildRequest{Customize: []api.Script{{Name: "a", Content: "\x7fELF\x00"}}}},
		{"script twice", api.ImageBuildRequest{Customize: []api.Script{{Name: "a", Content: "true"}, {Name: "a", Content: "true"}}}},
		{"size too small", api.ImageBuildRequest{SizeBytes: 1 << 20}},
		{"size negative", api.ImageBuildRequest{SizeBytes: -1}},
	} {
		_, err := NewRecipe(tc.req, testDefaults)
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeInvalidArgument {
			t.Errorf("%s: %v, want invalid_argument", tc.what, err)
		}
	}
}

// The recipe hash changes with every input that shapes the image and not
// with how the request spelled it.
func TestRecipeHash(t *testing.T) {
	base := api.ImageBuildRequest{Packages: []string{"vim", "curl"}, Customize: []api.Script{{Name: "a.sh", Content: "echo a"}}}
	h := func(req api.ImageBuildRequest) string {
		t.Helper()
		r, err := NewRecipe(req, testDefaults)
		if err != nil {
			t.Fatal(err)
		}
		return r.Hash()
	}
	ref := h(base)
	same := base
	same.Packages = []string{"curl", "vim", "curl", "sudo"} // order, duplicates, a base package
	same.Mirror = testDefaults.Mirror + "/"
	if h(same) != ref {
		t.Error("hash depends on package order, duplicates or a trailing slash")
	}
	for what, change := range map[string]func(*api.ImageBuildRequest){
		"suite":          func(r *api.ImageBuildRequest) { r.Suite = "trixie" },
		"mirror":         func(r *api.ImageBuildRequest) { r.Mirror = "http://ftp.de.debian.org/debian" },
		"package":        func(r *api.ImageBuildRequest) { r.Packages = append(r.Packages, "git") },
		"script content": func(r *api.ImageBuildRequest) { r.Customize = []api.Script{{Name: "a.sh", Content: "echo b"}} },
		"script name":    func(r *api.ImageBuildRequest) { r.Customize = []api.Script{{Name: "b.sh", Content: "echo a"}} },
		"script order": func(r *api.ImageBuildRequest) {
			r.Customize = []api.Script{{Name: "b.sh", Content: "x"}, {Name: "a.sh", Content: "echo a"}}
		},
		"size": func(r *api.ImageBuildRequest) { r.SizeBytes = 4 << 30 },
	} {
		req := base
		req.Packages = append([]string(nil), base.Packages...)
		change(&req)
		if h(req) == ref {
			t.Errorf("changing the %s keeps the hash", what)
		}
	}
	r, _ := NewRecipe(base, testDefaults)
	if got := r.API(); got.RecipeHash != ref || len(got.Customize) != 1 || !strings.HasPrefix(got.Customize[0], "a.sh sha256:") {
		t.Errorf("API() = %+v", got)
	}
}

// Kernel releases order as versions, not as strings.
func TestCompareRelease(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"6.1.0-9-cloud-amd64", "6.1.0-28-cloud-amd64", -1},
		{"6.1.0-28-cloud-amd64", "6.1.0-28-cloud-amd64", 0},
		{"6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64", 1},
		{"6.1.0-28-cloud-amd64", "6.1.0-28-amd64", 1},
		{"6.1.0", "6.1.0-1", -1},
	} {
		if got := compareRelease(tc.a, tc.b); got != tc.want {
			t.Errorf("compareRelease(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := compareRelease(tc.b, tc.a); got != -tc.want {
			t.Errorf("compareRelease(%q, %q) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
	}
}

// A failing customize script is named in the error with its own output
// only; other failures carry mmdebstrap's last lines.
func TestExplain(t *testing.T) {
	lines := []string{
		"I: installing remaining packages inside the chroot...",
		markerStart + `base customization (setup)`,
		"Created symlink …",
		markerStart + `customize script "a.sh" (1/2)`,
		"hello",
		"oops: no such file",
		markerFail + `customize script "a.sh" (1/2) with exit status 3`,
		`E: setup failed: E: command failed: …`,
	}
	e := explain(1, lines)
	if e.script != `customize script "a.sh" (1/2)` || e.exit != 3 {
		t.Errorf("explain: script %q exit %d", e.script, e.exit)
	}
	if diff := cmp.Diff([]string{"hello", "oops: no such file"}, e.lines); diff != "" {
		t.Errorf("explain lines (-want +got):\n%s", diff)
	}
	if !strings.Contains(e.Error(), `customize script "a.sh" (1/2) failed (exit status 3):`+"\nhello\n") {
		t.Errorf("error text: %s", e.Error())
	}
	plain := explain(1, []string{"I: running apt-get update...", "E: apt-get update failed"})
	if plain.script != "" || len(plain.lines) != 2 || !strings.HasPrefix(plain.Error(), "mmdebstrap failed (exit status 1):") {
		t.Errorf("explain without marker: %+v", plain)
	}
}

// Output is split into lines on \n and \r, however it is chunked.
func TestLineWriter(t *testing.T) {
	var got []string
	w := &lineWriter{onLine: func(l string) { got = append(got, l) }}
	for _, chunk := range []string{"I: one\nI: t", "wo\r\n\n", "progress 10%\rprogress 20%\r", "last"} {
		if _, err := w.Write([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	w.flush()
	if diff := cmp.Diff([]string{"I: one", "I: two", "progress 10%", "progress 20%", "last"}, got); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
}

// shellQuote survives sh and keeps $1 expandable where asked.
func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"hooks/01.script":    `'hooks/01.script'`,
		"it's":               `'it'\''s'`,
		"$1/tmp/banger/x":    `"$1"/'tmp/banger/x'`,
		"/var/cache/a b/deb": `'/var/cache/a b/deb'`,
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

// The package cache keeps exactly the installed packages' files, under the
// names apt gives them, whether they were cached before or new.
func TestPackageCacheMerge(t *testing.T) {
	dir := t.TempDir()
	status := filepath.Join(dir, "status")
	if err := os.WriteFile(status, []byte(`Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b7

Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u10

Package: removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: tzdata
Status: install ok installed
Architecture: all
Version: 1:2025b-0+deb12u1
`), 0o644); err != nil {
		t.Fatal(err)
	}
	keep, err := installedDebs(status)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]bool{
		"bash_5.2.15-2+b7_amd64.deb":         true,
		"libc6_2.36-9+deb12u10_amd64.deb":    true,
		"tzdata_1%3a2025b-0+deb12u1_all.deb": true,
	}, keep); diff != "" {
		t.Errorf("installed (-want +got):\n%s", diff)
	}
	in, out := filepath.Join(dir, "debs"), filepath.Join(dir, "debs.new")
	if err := os.Mkdir(in, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(out, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"bash_5.2.15-2+b7_amd64.deb", "bash_5.2.15-2+b6_amd64.deb", "lock"} {
		if err := os.WriteFile(filepath.Join(in, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(in, "partial"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"libc6_2.36-9+deb12u10_amd64.deb", "tzdata_1%3a2025b-0+deb12u1_all.deb", "stray.deb"} {
		if err := os.WriteFile(filepath.Join(out, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := mergeCache(in, out, keep); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(in)
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if diff := cmp.Diff([]string{"bash_5.2.15-2+b7_amd64.deb", "libc6_2.36-9+deb12u10_amd64.deb", "tzdata_1%3a2025b-0+deb12u1_all.deb"}, got); diff != "" {
		t.Errorf("cache after merge (-want +got):\n%s", diff)
	}
}
