package image

import (
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/config"
)

// BasePackages are installed into every built image on top of Debian's
// minbase variant: a kernel and an initramfs generator (MODULES=most, so the
// cloud kernel's virtio modules are in the initrd), systemd as init, sshd,
// and what the guest's network and DNS need. systemd-resolved is there so
// that the DNS servers systemd-networkd learns reach /etc/resolv.conf.
var BasePackages = []string{
	"ca-certificates",
	"initramfs-tools",
	"iproute2",
	"linux-image-cloud-amd64",
	"openssh-server",
	"sudo",
	"systemd-resolved",
	"systemd-sysv",
	"udev",
}

// baseScript is banger's own customization, run in every built image before
// the user's scripts ("setup") and after them ("finalize").
//
//go:embed base-customize.sh
var baseScript string

// recipeVersion changes whenever the way a recipe is turned into an image
// changes in a way the recipe fields do not capture (hook order, mkfs
// options); it is part of the recipe hash.
const recipeVersion = 1

// Limits on a build request. A request body is at most api.MaxRequestBody
// anyway; these give clear errors before that.
const (
	maxExtraPackages = 256
	maxScripts       = 32
	maxScriptBytes   = 256 << 10
	// minImageSize is the smallest --size accepted up front; the real
	// floor is what the content needs, checked once it is known.
	minImageSize = 256 << 20
	maxImageSize = 2 << 40
)

var (
	// Debian Policy 5.6.7: lowercase letters, digits, '+', '-' and '.',
	// at least two characters, starting with a letter or digit.
	packageRe = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	// Suites and codenames: bookworm, bookworm-backports, stable, sid.
	suiteRe = regexp.MustCompile(`^[a-z0-9][a-z0-9.+-]{0,63}$`)
	// Script names as shown in progress and errors, and in the recipe.
	scriptNameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`)
)

// ValidatePackage checks a Debian package name strictly: no versions, no
// architecture qualifiers, no apt patterns, nothing mmdebstrap or apt could
// read as an option.
func ValidatePackage(name string) error {
	if len(name) > 128 || !packageRe.MatchString(name) {
		return api.Errorf(api.CodeInvalidArgument, "package %q is not a Debian package name", name).
			WithHint("package names are lowercase letters, digits, '+', '-' and '.', starting with a letter or digit")
	}
	return nil
}

// Recipe is a validated, normalized build request: everything that decides
// what an image built from it contains.
type Recipe struct {
	Suite  string
	Mirror string
	// Packages is the full package set, BasePackages included, sorted and
	// without duplicates.
	Packages []string
	// Extra is the part of Packages the request asked for.
	Extra []string
	// Scripts run in order after banger's base customization.
	Scripts []api.Script
	// SizeBytes is the rootfs size asked for; 0 sizes it from the content.
	SizeBytes int64
}

// DefaultRecipe is what `banger image build NAME` builds without options.
func DefaultRecipe(defaults config.Image) (Recipe, error) {
	return NewRecipe(api.ImageBuildRequest{}, defaults)
}

// NewRecipe validates req's recipe fields (not its name) and fills in the
// defaults. Errors are *api.Error with code invalid_argument.
func NewRecipe(req api.ImageBuildRequest, defaults config.Image) (Recipe, error) {
	r := Recipe{Suite: req.Suite, Mirror: req.Mirror, SizeBytes: req.SizeBytes}
	if r.Suite == "" {
		r.Suite = defaults.Suite
	}
	if r.Mirror == "" {
		r.Mirror = defaults.Mirror
	}
	if !suiteRe.MatchString(r.Suite) {
		return Recipe{}, api.Errorf(api.CodeInvalidArgument, "suite %q is not a Debian suite name", r.Suite).
			WithHint("use a codename such as bookworm")
	}
	mirror, err := normalizeMirror(r.Mirror)
	if err != nil {
		return Recipe{}, err
	}
	r.Mirror = mirror

	if len(req.Packages) > maxExtraPackages {
		return Recipe{}, api.Errorf(api.CodeInvalidArgument, "%d packages asked for, at most %d", len(req.Packages), maxExtraPackages)
	}
	for _, p := range req.Packages {
		if err := ValidatePackage(p); err != nil {
			return Recipe{}, err
		}
		if !slices.Contains(BasePackages, p) && !slices.Contains(r.Extra, p) {
			r.Extra = append(r.Extra, p)
		}
	}
	slices.Sort(r.Extra)
	r.Packages = slices.Concat(BasePackages, r.Extra)
	slices.Sort(r.Packages)

	if len(req.Customize) > maxScripts {
		return Recipe{}, api.Errorf(api.CodeInvalidArgument, "%d customize scripts, at most %d", len(req.Customize), maxScripts)
	}
	seen := map[string]bool{}
	for _, s := range req.Customize {
		if !scriptNameRe.MatchString(s.Name) {
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "customize script name %q is not valid", s.Name).
				WithHint("name scripts with letters, digits, '.', '_', '+' and '-'")
		}
		if seen[s.Name] {
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "customize script %q given twice", s.Name)
		}
		seen[s.Name] = true
		switch {
		case strings.TrimSpace(s.Content) == "":
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "customize script %q is empty", s.Name)
		case len(s.Content) > maxScriptBytes:
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "customize script %q is %d bytes, at most %d", s.Name, len(s.Content), maxScriptBytes)
		case strings.ContainsRune(s.Content, 0):
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "customize script %q contains a NUL byte: not a script", s.Name)
		}
		r.Scripts = append(r.Scripts, s)
	}

	if r.SizeBytes != 0 {
		if r.SizeBytes < minImageSize || r.SizeBytes > maxImageSize {
			return Recipe{}, api.Errorf(api.CodeInvalidArgument, "image size %s is out of range %s to %s",
				api.FormatSize(r.SizeBytes), api.FormatSize(minImageSize), api.FormatSize(maxImageSize))
		}
		// ext4.Make wants whole blocks; a whole MiB reads better.
		r.SizeBytes = (r.SizeBytes + 1<<20 - 1) &^ (1<<20 - 1)
	}
	return r, nil
}

// normalizeMirror accepts http(s):// and file:/ URLs that mmdebstrap takes
// as a mirror (and not as a sources.list line or an option), without a
// trailing slash so that equal mirrors hash equally.
func normalizeMirror(m string) (string, error) {
	bad := func(why string) error {
		return api.Errorf(api.CodeInvalidArgument, "mirror %q %s", m, why).
			WithHint("give a Debian mirror URL such as http://deb.debian.org/debian")
	}
	if m == "" {
		return "", bad("is empty")
	}
	if len(m) > 1024 {
		return "", bad("is too long")
	}
	if strings.ContainsFunc(m, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '"' || r == '\'' || r == '\\' }) {
		return "", bad("contains spaces, quotes or control characters")
	}
	u, err := url.Parse(m)
	if err != nil {
		return "", bad("is not a URL")
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return "", bad("has no host")
		}
	case "file":
		if u.Path == "" || !strings.HasPrefix(u.Path, "/") {
			return "", bad("is not an absolute file: URL")
		}
	default:
		return "", bad("is not an http://, https:// or file:/ URL")
	}
	if u.User != nil {
		return "", bad("carries credentials (hint: configure them in apt's auth.conf instead)")
	}
	return strings.TrimRight(m, "/"), nil
}

// scriptDigest names a script in the recipe: its name and content hash.
func scriptDigest(s api.Script) string {
	sum := sha256.Sum256([]byte(s.Content))
	return s.Name + " sha256:" + hex.EncodeToString(sum[:])
}

// Hash is the recipe hash: sha256 over a canonical JSON encoding of every
// input that shapes the image (suite, mirror, the sorted package set,
// banger's base script and recipe version, the customize scripts' names
// and contents in order, the size). Equal hashes mean interchangeable
// images, which is what the test fixture cache keys on.
func (r Recipe) Hash() string {
	base := sha256.Sum256([]byte(baseScript))
	canon := struct {
		Version   int      `json:"v"`
		Suite     string   `json:"suite"`
		Mirror    string   `json:"mirror"`
		Packages  []string `json:"packages"`
		Base      string   `json:"base"`
		Customize []string `json:"customize"`
		SizeBytes int64    `json:"size"`
	}{recipeVersion, r.Suite, r.Mirror, r.Packages, hex.EncodeToString(base[:]), []string{}, r.SizeBytes}
	for _, s := range r.Scripts {
		canon.Customize = append(canon.Customize, scriptDigest(s))
	}
	b, err := json.Marshal(canon)
	if err != nil {
		panic(fmt.Sprintf("encode recipe: %v", err)) // plain strings and ints
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// API is the recipe as images show it.
func (r Recipe) API() *api.Recipe {
	out := &api.Recipe{
		Suite:      r.Suite,
		Mirror:     r.Mirror,
		Packages:   slices.Clone(r.Packages),
		SizeBytes:  r.SizeBytes,
		RecipeHash: r.Hash(),
	}
	for _, s := range r.Scripts {
		out.Customize = append(out.Customize, scriptDigest(s))
	}
	return out
}
