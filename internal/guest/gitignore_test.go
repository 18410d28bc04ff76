package guest

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The matcher follows gitignore(5) line by line: anchoring, directory-only
// patterns, negation, '**', classes, escapes and trailing spaces.
func TestGitignorePatterns(t *testing.T) {
	cases := []struct {
		pattern string
		path    string
		dir     bool
		want    bool
	}{
		{"*.log", "a.log", false, true},
		{"*.log", "deep/er/a.log", false, true},
		{"*.log", "a.logx", false, false},
		{"build/", "build", true, true},
		{"build/", "build", false, false},
		{"build/", "src/build", true, true},
		{"/build", "build", false, true},
		{"/build", "src/build", false, false},
		{"doc/frotz", "doc/frotz", false, true},
		{"doc/frotz", "a/doc/frotz", false, false},
		{"doc/*.txt", "doc/a.txt", false, true},
		{"doc/*.txt", "doc/x/a.txt", false, false},
		{"**/foo", "foo", false, true},
		{"**/foo", "a/b/foo", false, true},
		{"**/foo/bar", "x/foo/bar", false, true},
		{"abc/**", "abc/x", false, true},
		{"abc/**", "abc/x/y", false, true},
		{"abc/**", "abc", true, false},
		{"a/**/b", "a/b", false, true},
		{"a/**/b", "a/x/y/b", false, true},
		{"a/**/b", "ab", false, false},
		{"fo?", "foo", false, true},
		{"fo?", "fo/", false, false},
		{"[abc].txt", "b.txt", false, true},
		{"[!abc].txt", "b.txt", false, false},
		{"[^abc].txt", "d.txt", false, true},
		{"[a-c]x", "bx", false, true},
		{"[a-c]x", "dx", false, false},
		{"[]]x", "]x", false, true},
		{"[abc", "a", false, false},
		{`\#notcomment`, "#notcomment", false, true},
		{`\!bang`, "!bang", false, true},
		{`space\ `, "space ", false, true},
		{"trail   ", "trail", false, true},
		{`star\*`, "star*", false, true},
		{`star\*`, "starx", false, false},
		{"a*b*c", "axxbyyc", false, true},
		{"a*b*c", "axxbyy", false, false},
		{"*", "anything", true, true},
	}
	for _, tc := range cases {
		p, ok := parseIgnoreLine(tc.pattern)
		if !ok {
			t.Errorf("pattern %q did not parse", tc.pattern)
			continue
		}
		if got := p.match(tc.path, tc.dir); got != tc.want {
			t.Errorf("%q matches %q (dir %v) = %v, want %v", tc.pattern, tc.path, tc.dir, got, tc.want)
		}
	}
	for _, skip := range []string{"", "   ", "# comment", "!", "/"} {
		if _, ok := parseIgnoreLine(skip); ok {
			t.Errorf("line %q should not be a pattern", skip)
		}
	}
}

// Deeper .gitignore files win over shallower ones and, within a file, the
// last matching line wins; negation re-includes.
func TestGitignoreStack(t *testing.T) {
	st := ignoreStack{
		parseGitignore("", []byte("*.log\n!keep.log\nsecret/\n")),
		parseGitignore("sub", []byte("!*.log\nlocal.txt\n")),
	}
	cases := []struct {
		path string
		dir  bool
		want bool
	}{
		{"a.log", false, true},
		{"keep.log", false, false},
		{"sub/a.log", false, false},
		{"sub/local.txt", false, true},
		{"local.txt", false, false},
		{"secret", true, true},
		{"sub/secret", true, true},
		{"subway/local.txt", false, false},
	}
	for _, tc := range cases {
		if got := st.ignored(tc.path, tc.dir); got != tc.want {
			t.Errorf("ignored(%q) = %v, want %v", tc.path, got, tc.want)
		}
	}
}

// On a real tree, the files the matcher keeps are the ones git keeps
// (git check-ignore is the reference), when git is installed.
func TestGitignoreAgainstGit(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("requires git for the reference answers")
	}
	dir := t.TempDir()
	files := map[string]string{
		".gitignore":         "*.o\n/out/\n!important.o\ndocs/**/*.tmp\n[Tt]emp*\n",
		"a.o":                "",
		"important.o":        "",
		"src/b.o":            "",
		"src/main.c":         "",
		"out/x":              "",
		"src/out/y":          "",
		"docs/a/b/c.tmp":     "",
		"docs/c.tmp":         "",
		"Temp1":              "",
		"src/.gitignore":     "!b.o\n*.c\n",
		"src/lib/keep.c":     "",
		"src/lib/.gitignore": "!keep.c\n",
	}
	for p, c := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("git", "-C", dir, "init", "-q").CombinedOutput(); err != nil {
		t.Fatalf("git init: %v %s", err, out)
	}
	cmd := exec.Command("git", "-C", dir, "ls-files", "--others", "--exclude-standard")
	cmd.Env = append(os.Environ(), "GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_SYSTEM=/dev/null")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Fields(string(out))
	sort.Strings(want)

	var got []string
	var walk func(rel string, st ignoreStack)
	walk = func(rel string, st ignoreStack) {
		full := filepath.Join(dir, rel)
		if b, err := os.ReadFile(filepath.Join(full, ".gitignore")); err == nil {
			st = append(st[:len(st):len(st)], parseGitignore(rel, b))
		}
		des, _ := os.ReadDir(full)
		for _, d := range des {
			if d.Name() == ".git" {
				continue
			}
			r := d.Name()
			if rel != "" {
				r = rel + "/" + r
			}
			if st.ignored(r, d.IsDir()) {
				continue
			}
			if d.IsDir() {
				walk(r, st)
			} else {
				got = append(got, r)
			}
		}
	}
	walk("", nil)
	sort.Strings(got)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("kept files differ from git's (-git +ours):\n%s", diff)
	}
}

// FuzzGitignore feeds arbitrary .gitignore text and paths to the matcher:
// it must never panic or hang, whatever the user's files hold.
func FuzzGitignore(f *testing.F) {
	f.Add("*.log\n!keep.log\n/build/\na/**/b\n[a-", "a/x/b")
	f.Add(`\`, "x")
	f.Add("**/**/***", "a/b/c")
	f.Fuzz(func(t *testing.T, data, path string) {
		st := ignoreStack{parseGitignore("", []byte(data))}
		st.ignored(path, false)
		st.ignored(path, true)
	})
}
