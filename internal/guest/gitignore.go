package guest

import (
	"bytes"
	"strings"
)

// A .gitignore matcher for directory syncs, following gitignore(5):
//
//   - blank lines and lines starting with '#' are skipped; '\#' and '\!'
//     start literal patterns; unescaped trailing spaces are dropped;
//   - '!' negates: a later match re-includes what an earlier one excluded
//     (a file in an excluded directory stays excluded: the walk never
//     enters that directory);
//   - a trailing '/' matches directories only;
//   - a pattern with a '/' at its start or middle is relative to the
//     .gitignore's directory; without one it matches a name at any depth;
//   - '*' and '?' match within one path component, '[...]' is a class
//     ('!' or '^' negates it, ranges allowed), '\' escapes;
//   - '**' as a whole component matches any number of components, at
//     least one when it ends the pattern ("abc/**" is what is inside abc);
//   - .gitignore files deeper in the tree take precedence over shallower
//     ones, and within a file the last matching line wins.
//
// Only .gitignore files are read: not .git/info/exclude nor the user's
// core.excludesFile, which live outside the synced tree.

type ignorePattern struct {
	segs     []string
	negate   bool
	dirOnly  bool
	anchored bool
}

// ignoreFile is one .gitignore: its patterns and its directory relative
// to the sync root ("" for the root).
type ignoreFile struct {
	base string
	pats []ignorePattern
}

func parseGitignore(base string, data []byte) *ignoreFile {
	f := &ignoreFile{base: base}
	for _, line := range bytes.Split(data, []byte("\n")) {
		if p, ok := parseIgnoreLine(string(bytes.TrimSuffix(line, []byte("\r")))); ok {
			f.pats = append(f.pats, p)
		}
	}
	return f
}

func parseIgnoreLine(l string) (ignorePattern, bool) {
	l = trimTrailingSpaces(l)
	if l == "" || l[0] == '#' {
		return ignorePattern{}, false
	}
	var p ignorePattern
	switch {
	case l[0] == '!':
		p.negate = true
		l = l[1:]
	case strings.HasPrefix(l, `\!`), strings.HasPrefix(l, `\#`):
		l = l[1:]
	}
	if strings.HasSuffix(l, "/") {
		p.dirOnly = true
		l = strings.TrimRight(l, "/")
	}
	if l == "" {
		return ignorePattern{}, false
	}
	if strings.Contains(l, "/") {
		p.anchored = true
		l = strings.TrimLeft(l, "/")
	}
	if l == "" {
		return ignorePattern{}, false
	}
	for _, seg := range strings.Split(l, "/") {
		// "a/**/**/b" is "a/**/b"; collapsing keeps matching polynomial
		// in the number of distinct '**'.
		if seg == "**" && len(p.segs) > 0 && p.segs[len(p.segs)-1] == "**" {
			continue
		}
		p.segs = append(p.segs, seg)
	}
	return p, true
}

// trimTrailingSpaces drops trailing spaces not escaped with a backslash.
func trimTrailingSpaces(l string) string {
	end := len(l)
	for end > 0 && l[end-1] == ' ' {
		// Count the backslashes before this space: an odd number
		// escapes it.
		n := 0
		for i := end - 2; i >= 0 && l[i] == '\\'; i-- {
			n++
		}
		if n%2 == 1 {
			break
		}
		end--
	}
	return l[:end]
}

// match reports whether rel (slash-separated, relative to the pattern's
// .gitignore) matches.
func (p ignorePattern) match(rel string, isDir bool) bool {
	if p.dirOnly && !isDir {
		return false
	}
	if !p.anchored {
		name := rel[strings.LastIndexByte(rel, '/')+1:]
		return len(p.segs) == 1 && matchSegment(p.segs[0], name)
	}
	return matchSegments(p.segs, strings.Split(rel, "/"))
}

func matchSegments(pat, path []string) bool {
	for len(pat) > 0 {
		if pat[0] == "**" {
			rest := pat[1:]
			if len(rest) == 0 {
				return len(path) >= 1
			}
			for i := 0; i <= len(path); i++ {
				if matchSegments(rest, path[i:]) {
					return true
				}
			}
			return false
		}
		if len(path) == 0 || !matchSegment(pat[0], path[0]) {
			return false
		}
		pat, path = pat[1:], path[1:]
	}
	return len(path) == 0
}

// matchSegment matches one path component against a glob without '/':
// '*', '?', '[...]' and '\' escapes. It backtracks only to the last '*',
// which is enough since every other token matches exactly one byte.
func matchSegment(pat, s string) bool {
	px, sx := 0, 0
	starP, starS := -1, -1
	for sx < len(s) {
		if px < len(pat) {
			switch pat[px] {
			case '*':
				starP, starS = px, sx
				px++
				continue
			case '?':
				px++
				sx++
				continue
			case '[':
				n, ok, valid := matchClass(pat[px:], s[sx])
				if !valid {
					return false // an unterminated class matches nothing, as in git
				}
				if ok {
					px += n
					sx++
					continue
				}
			case '\\':
				if px+1 < len(pat) && pat[px+1] == s[sx] {
					px += 2
					sx++
					continue
				}
			default:
				if pat[px] == s[sx] {
					px++
					sx++
					continue
				}
			}
		}
		if starP < 0 {
			return false
		}
		starS++
		px, sx = starP+1, starS
	}
	for px < len(pat) && pat[px] == '*' {
		px++
	}
	return px == len(pat)
}

// matchClass matches c against the class at the start of pat ("[...]"),
// returning the class's length, whether c is in it, and whether the class
// is well formed.
func matchClass(pat string, c byte) (int, bool, bool) {
	i := 1
	negate := false
	if i < len(pat) && (pat[i] == '!' || pat[i] == '^') {
		negate = true
		i++
	}
	in := false
	first := true
	for i < len(pat) {
		if pat[i] == ']' && !first {
			return i + 1, in != negate, true
		}
		first = false
		lo := pat[i]
		if lo == '\\' && i+1 < len(pat) {
			i++
			lo = pat[i]
		}
		i++
		hi := lo
		if i+1 < len(pat) && pat[i] == '-' && pat[i+1] != ']' {
			hi = pat[i+1]
			if hi == '\\' && i+2 < len(pat) {
				hi = pat[i+2]
				i++
			}
			i += 2
		}
		if lo <= c && c <= hi {
			in = true
		}
	}
	return 0, false, false
}

// ignoreStack holds the .gitignore files of the directories from the sync
// root down to the one being walked, shallowest first.
type ignoreStack []*ignoreFile

// ignored reports whether rel (relative to the sync root) is excluded: the
// last matching pattern of the deepest file that has one decides.
func (st ignoreStack) ignored(rel string, isDir bool) bool {
	for i := len(st) - 1; i >= 0; i-- {
		f := st[i]
		sub := rel
		if f.base != "" {
			if !strings.HasPrefix(rel, f.base+"/") {
				continue
			}
			sub = rel[len(f.base)+1:]
		}
		for j := len(f.pats) - 1; j >= 0; j-- {
			if f.pats[j].match(sub, isDir) {
				return !f.pats[j].negate
			}
		}
	}
	return false
}
