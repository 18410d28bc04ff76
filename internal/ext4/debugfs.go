package ext4

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// debugfs reads its command file through the "ss" library, whose parser
// splits arguments on spaces and tabs, groups them with double quotes (""
// inside quotes is a literal quote), ends a command at a newline or carriage
// return, runs a line starting with '!' through the shell, and treats an
// argument written <N> as inode number N. Several commands also parse
// options that start with '-'. Rather than escape for that grammar (and trust
// every e2fsprogs version to agree), paths and symlink targets are held to a
// small character set in which none of it can arise; banger only writes paths
// of its own choosing.
const (
	maxPathLen      = 1024 // keeps the longest command line far below debugfs's BUFSIZ line buffer
	maxComponentLen = 255  // ext4's name limit
)

func allowedByte(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("._+-@:,=~%/", c) >= 0
}

// checkChars rejects anything debugfs's parser could read differently from
// us, naming what would happen.
func checkChars(what, s string) error {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if allowedByte(c) {
			continue
		}
		switch c {
		case '\n', '\r':
			return fmt.Errorf("%s %q contains a line break: debugfs would run the rest as a command of its own", what, s)
		case 0:
			return fmt.Errorf("%s %q contains a NUL byte: debugfs would cut the name there", what, s)
		case ' ', '\t':
			return fmt.Errorf("%s %q contains whitespace: debugfs splits arguments there", what, s)
		case '"':
			return fmt.Errorf("%s %q contains a double quote: debugfs would take it as quoting", what, s)
		default:
			return fmt.Errorf("%s %q contains %q: only letters, digits and ._+-@:,=~%% are allowed", what, s, c)
		}
	}
	return nil
}

// validatePath checks a path inside the image: absolute, clean (no "..",
// ".", empty or trailing components, so what the caller named is what gets
// written), no component that looks like an option, in the safe set above.
func validatePath(p string) error {
	if p == "" {
		return fmt.Errorf("empty path")
	}
	if len(p) > maxPathLen {
		return fmt.Errorf("path %.40q… is %d bytes, over %d", p, len(p), maxPathLen)
	}
	if err := checkChars("path", p); err != nil {
		return err
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("path %q is relative: debugfs would resolve it against its current directory", p)
	}
	if p == "/" {
		return fmt.Errorf("path %q is the root directory", p)
	}
	for _, c := range strings.Split(p[1:], "/") {
		switch {
		case c == "..":
			return fmt.Errorf("path %q contains \"..\": it could climb out of the directory it names", p)
		case c == "." || c == "":
			return fmt.Errorf("path %q is not clean (want %q)", p, filepath.Clean(p))
		case c[0] == '-':
			return fmt.Errorf("path %q has a component starting with '-': debugfs commands could take it as an option", p)
		case len(c) > maxComponentLen:
			return fmt.Errorf("path %q has a component over %d bytes", p, maxComponentLen)
		}
	}
	return nil
}

// validateReadPath is validatePath plus the root directory, which can be
// read but not written.
func validateReadPath(p string) error {
	if p == "/" {
		return nil
	}
	return validatePath(p)
}

// validateTarget checks a symlink target. It is stored, not resolved, so it
// may be relative and contain ".."; it is still one debugfs argument.
func validateTarget(t string) error {
	if t == "" {
		return fmt.Errorf("empty symlink target")
	}
	if len(t) > maxPathLen {
		return fmt.Errorf("symlink target %.40q… is %d bytes, over %d", t, len(t), maxPathLen)
	}
	if err := checkChars("symlink target", t); err != nil {
		return err
	}
	if t[0] == '-' {
		return fmt.Errorf("symlink target %q starts with '-': debugfs could take it as an option", t)
	}
	return nil
}

// File is one entry for WriteFiles. Exactly one kind applies: a regular file
// (the default, with Data), a directory (Dir), a symbolic link (Symlink
// holds the target) or a removal (Remove).
type File struct {
	Path string
	// Mode holds permission bits plus os.ModeSetuid, os.ModeSetgid and
	// os.ModeSticky; type bits come from the kind. Zero for symlinks and
	// removals.
	Mode     os.FileMode
	UID, GID int
	Data     []byte
	Dir      bool
	Symlink  string
	// Remove deletes Path if it exists; a directory there is an error.
	Remove bool
}

const specialBits = os.ModeSetuid | os.ModeSetgid | os.ModeSticky

func (f File) validate() error {
	if err := validatePath(f.Path); err != nil {
		return err
	}
	kinds := 0
	for _, k := range []bool{f.Dir, f.Symlink != "", f.Remove} {
		if k {
			kinds++
		}
	}
	if kinds > 1 {
		return fmt.Errorf("%s: more than one of Dir, Symlink and Remove set", f.Path)
	}
	if (kinds > 0) && len(f.Data) > 0 {
		return fmt.Errorf("%s: Data set on a directory, symlink or removal", f.Path)
	}
	if f.Mode&^(os.ModePerm|specialBits) != 0 {
		return fmt.Errorf("%s: mode %v carries type bits; use Dir or Symlink", f.Path, f.Mode)
	}
	if (f.Symlink != "" || f.Remove) && f.Mode != 0 {
		return fmt.Errorf("%s: mode %v on a symlink or removal", f.Path, f.Mode)
	}
	const maxID = 1<<32 - 2 // -1 (2^32-1) means "unchanged" to chown
	if f.UID < 0 || f.UID > maxID || f.GID < 0 || f.GID > maxID {
		return fmt.Errorf("%s: uid %d / gid %d out of range", f.Path, f.UID, f.GID)
	}
	if f.Remove && (f.UID != 0 || f.GID != 0) {
		return fmt.Errorf("%s: owner set on a removal", f.Path)
	}
	if f.Symlink != "" {
		if err := validateTarget(f.Symlink); err != nil {
			return fmt.Errorf("%s: %w", f.Path, err)
		}
	}
	return nil
}

// unixMode converts permission and special bits to their st_mode values.
func unixMode(m os.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&os.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

// fileMode converts st_mode permission/special bits and debugfs's type name
// to an os.FileMode.
func fileMode(typ string, perm uint32) (os.FileMode, error) {
	m := os.FileMode(perm & 0o777)
	if perm&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if perm&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if perm&0o1000 != 0 {
		m |= os.ModeSticky
	}
	switch typ {
	case "regular":
	case "directory":
		m |= os.ModeDir
	case "symlink":
		m |= os.ModeSymlink
	case "FIFO":
		m |= os.ModeNamedPipe
	case "socket":
		m |= os.ModeSocket
	case "character special":
		m |= os.ModeDevice | os.ModeCharDevice
	case "block special":
		m |= os.ModeDevice
	default:
		return 0, fmt.Errorf("unknown inode type %q", typ)
	}
	return m, nil
}

// FileInfo is an inode as Stat reports it.
type FileInfo struct {
	Mode     os.FileMode // type and permission bits, as os.FileInfo.Mode()
	UID, GID int
	Size     int64
	Target   string // symlink target
}

// transcript holds a debugfs run's output, one slice of lines per command.
type transcript [][]string

var (
	bannerRe    = regexp.MustCompile(`^debugfs \S+ \(.*\)$`)
	allocatedRe = regexp.MustCompile(`^Allocated inode: \d+$`)
	inodeLineRe = regexp.MustCompile(`^Inode: \d+\s+Type: (.+?)\s+Mode:\s+(0[0-7]*)\s+Flags: `)
	userLineRe  = regexp.MustCompile(`^User:\s+(-?\d+)\s+Group:\s+(-?\d+)(?:\s+Project:\s+-?\d+)?\s+Size: (\d+)$`)
)

// Messages of the e2fsprogs error table (lib/ext2fs/ext2_err.et.in), printed
// untranslated under LC_ALL=C. They have not changed in decades.
const (
	msgNotFound = "File not found by ext2_lookup"
	msgNotDir   = "Ext2 inode is not a directory"
)

// runDebugfs runs cmds in one debugfs process and splits its output per
// command. With -f, debugfs unbuffers stdout and stderr and echoes each
// command as "debugfs: CMD" before running it, so with both streams on one
// pipe everything up to the next echo is that command's output, errors
// included. debugfs exits 0 whatever its commands did; callers judge each
// command's lines. dir holds the command file and any host files the
// commands name (relative to it).
func runDebugfs(ctx context.Context, image, dir string, writable bool, cmds []string) (transcript, error) {
	for _, c := range cmds {
		if strings.ContainsAny(c, "\n\r") {
			return nil, fmt.Errorf("debugfs command %q contains a line break", c)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cmds"), []byte(strings.Join(cmds, "\n")+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("write debugfs commands: %w", err)
	}
	args := []string{"-f", "cmds", image}
	if writable {
		args = append([]string{"-w"}, args...)
	}
	res, err := run(ctx, dir, "debugfs", args...)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(res.Out), "\n")
	t := make(transcript, len(cmds))
	var preamble []string
	next := 0
	for _, l := range lines {
		l = strings.TrimRight(l, "\r ")
		if next < len(cmds) && l == "debugfs: "+cmds[next] {
			next++
			continue
		}
		if l == "" {
			continue
		}
		if next == 0 {
			preamble = append(preamble, l)
		} else {
			t[next-1] = append(t[next-1], l)
		}
	}
	for _, l := range preamble {
		// Anything but the version banner before the first command is
		// debugfs failing to open the image.
		if !bannerRe.MatchString(l) {
			return nil, fmt.Errorf("debugfs open %s: %s", image, strings.Join(preamble, "; "))
		}
	}
	if next != len(cmds) {
		return nil, fmt.Errorf("debugfs ran %d of %d commands (exit %d): %s", next, len(cmds), res.Exit, strings.TrimSpace(string(res.Out)))
	}
	if res.Exit != 0 {
		return nil, fmt.Errorf("debugfs exit %d: %s", res.Exit, strings.TrimSpace(string(res.Out)))
	}
	return t, nil
}

// statResult is one "stat PATH" as debugfs printed it.
type statResult struct {
	found   bool
	notDir  bool // a component of the path's parent is not a directory
	info    FileInfo
	fastDst bool // Target came from the inode (a fast symlink)
}

func parseStat(lines []string) (statResult, error) {
	var r statResult
	if len(lines) == 1 && strings.Contains(lines[0], msgNotFound) {
		return r, nil
	}
	if len(lines) == 1 && strings.Contains(lines[0], msgNotDir) {
		r.notDir = true
		return r, nil
	}
	var typ string
	var perm uint64
	var haveInode, haveUser bool
	for _, l := range lines {
		if m := inodeLineRe.FindStringSubmatch(l); m != nil && !haveInode {
			typ = m[1]
			perm, _ = strconv.ParseUint(m[2], 8, 32)
			haveInode = true
		}
		if m := userLineRe.FindStringSubmatch(l); m != nil && !haveUser {
			r.info.UID = parseID(m[1])
			r.info.GID = parseID(m[2])
			size, err := strconv.ParseInt(m[3], 10, 64)
			if err != nil {
				return r, fmt.Errorf("parse stat size %q: %w", m[3], err)
			}
			r.info.Size = size
			haveUser = true
		}
		if t, ok := strings.CutPrefix(l, `Fast link dest: "`); ok && strings.HasSuffix(t, `"`) {
			r.info.Target = strings.TrimSuffix(t, `"`)
			r.fastDst = true
		}
	}
	if !haveInode || !haveUser {
		return r, fmt.Errorf("unexpected stat output: %s", strings.Join(lines, "; "))
	}
	mode, err := fileMode(typ, uint32(perm))
	if err != nil {
		return r, err
	}
	r.info.Mode = mode
	r.found = true
	return r, nil
}

// parseID reads a uid/gid that debugfs prints with %d, so ids above 2^31
// come out negative.
func parseID(s string) int {
	n, _ := strconv.ParseInt(s, 10, 64)
	if n < 0 {
		n += 1 << 32
	}
	return int(n)
}

// absImage resolves the image path: debugfs runs in a temporary directory.
func absImage(image string) (string, error) {
	abs, err := filepath.Abs(image)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(abs); err != nil {
		return "", err
	}
	return abs, nil
}

// Stat describes path inside the image without following a final symlink.
// A missing path gives an error wrapping fs.ErrNotExist.
func Stat(ctx context.Context, image, path string) (FileInfo, error) {
	if err := validateReadPath(path); err != nil {
		return FileInfo{}, fmt.Errorf("stat %s in image: %w", path, err)
	}
	abs, err := absImage(image)
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s in image: %w", path, err)
	}
	dir, err := os.MkdirTemp("", "banger-debugfs-")
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s in image: %w", path, err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	t, err := runDebugfs(ctx, abs, dir, false, []string{"stat " + path})
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s in %s: %w", path, image, err)
	}
	r, err := parseStat(t[0])
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s in %s: %w", path, image, err)
	}
	if !r.found {
		return FileInfo{}, fmt.Errorf("stat %s in %s: %w", path, image, fs.ErrNotExist)
	}
	if r.info.Mode&os.ModeSymlink != 0 && !r.fastDst {
		// A target over 59 bytes lives in a data block: dump reads it.
		t, err := runDebugfs(ctx, abs, dir, false, []string{"dump " + path + " target"})
		if err == nil && len(t[0]) > 0 {
			err = fmt.Errorf("%s", strings.Join(t[0], "; "))
		}
		if err != nil {
			return FileInfo{}, fmt.Errorf("read symlink %s in %s: %w", path, image, err)
		}
		b, err := os.ReadFile(filepath.Join(dir, "target"))
		if err != nil {
			return FileInfo{}, fmt.Errorf("read symlink %s in %s: %w", path, image, err)
		}
		r.info.Target = string(b)
	}
	if r.info.Mode&os.ModeSymlink != 0 && int64(len(r.info.Target)) != r.info.Size {
		return FileInfo{}, fmt.Errorf("read symlink %s in %s: target %q is not %d bytes", path, image, r.info.Target, r.info.Size)
	}
	return r.info, nil
}

// ReadFile returns the content of the regular file at path inside the image.
// A missing path gives an error wrapping fs.ErrNotExist.
func ReadFile(ctx context.Context, image, path string) ([]byte, error) {
	if err := validateReadPath(path); err != nil {
		return nil, fmt.Errorf("read %s in image: %w", path, err)
	}
	abs, err := absImage(image)
	if err != nil {
		return nil, fmt.Errorf("read %s in image: %w", path, err)
	}
	dir, err := os.MkdirTemp("", "banger-debugfs-")
	if err != nil {
		return nil, fmt.Errorf("read %s in image: %w", path, err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	t, err := runDebugfs(ctx, abs, dir, false, []string{"stat " + path, "dump " + path + " data"})
	if err != nil {
		return nil, fmt.Errorf("read %s in %s: %w", path, image, err)
	}
	r, err := parseStat(t[0])
	if err != nil {
		return nil, fmt.Errorf("read %s in %s: %w", path, image, err)
	}
	if !r.found {
		return nil, fmt.Errorf("read %s in %s: %w", path, image, fs.ErrNotExist)
	}
	if !r.info.Mode.IsRegular() {
		return nil, fmt.Errorf("read %s in %s: not a regular file (%v)", path, image, r.info.Mode.Type())
	}
	if len(t[1]) > 0 {
		return nil, fmt.Errorf("read %s in %s: %s", path, image, strings.Join(t[1], "; "))
	}
	b, err := os.ReadFile(filepath.Join(dir, "data"))
	if err != nil {
		return nil, fmt.Errorf("read %s in %s: %w", path, image, err)
	}
	if int64(len(b)) != r.info.Size {
		return nil, fmt.Errorf("read %s in %s: dumped %d bytes of %d", path, image, len(b), r.info.Size)
	}
	return b, nil
}
