package ext4

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// WriteFiles puts files, directories and symlinks into the image and removes
// the entries marked Remove, in order, without mounting it.
//
// Existing regular files and symlinks at a path are replaced, existing
// directories are kept and get the entry's mode and owner; missing parents
// are created 0755 root:root. A parent that exists but is not a directory,
// or a directory where a file, symlink or removal is asked for, is an error.
// Parents may be symlinks to directories inside the image (as /lib is on
// merged-/usr systems), not symlinks made by the same call.
//
// It takes two debugfs runs whatever the number of files: a read-only probe
// of every path and parent, then one writing run planned from it. Planning
// first matters because debugfs runs every command of its file whatever the
// previous one did, and some failing commands damage the file system (a
// mkdir under a regular file allocates an inode it never links). The writing
// run then expects exact output from each command, and ends by stat-ing every
// entry to check type, mode, owner and size.
//
// WriteFiles is not atomic: after an error the image may hold part of the
// files. Callers write into a fresh per-VM copy and delete it on failure.
// Nothing else may use the image meanwhile.
func WriteFiles(ctx context.Context, image string, files []File) error {
	if err := writeFiles(ctx, image, files); err != nil {
		return fmt.Errorf("write files into %s: %w", image, err)
	}
	return nil
}

func writeFiles(ctx context.Context, image string, files []File) error {
	seen := map[string]bool{}
	for _, f := range files {
		if err := f.validate(); err != nil {
			return err
		}
		if seen[f.Path] {
			return fmt.Errorf("%s listed twice", f.Path)
		}
		seen[f.Path] = true
	}
	if len(files) == 0 {
		return nil
	}
	abs, err := absImage(image)
	if err != nil {
		return err
	}
	info, err := CheckSuperblock(abs)
	if err != nil {
		return err
	}
	if info.NeedsRecovery {
		return fmt.Errorf("%w (hint: run e2fsck -fy on it first)", ErrNeedsRecovery)
	}
	dir, err := os.MkdirTemp("", "banger-debugfs-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()

	state, err := probe(ctx, abs, dir, files)
	if err != nil {
		return err
	}
	p, err := plan(files, state)
	if err != nil {
		return err
	}
	for i, f := range files {
		if !f.Dir && f.Symlink == "" && !f.Remove {
			if err := os.WriteFile(filepath.Join(dir, dataName(i)), f.Data, 0o600); err != nil {
				return err
			}
		}
	}
	cmds := make([]string, len(p))
	for i, s := range p {
		cmds[i] = s.cmd
	}
	t, err := runDebugfs(ctx, abs, dir, true, cmds)
	if err != nil {
		return err
	}
	var errs []error
	for i, s := range p {
		if err := s.check(t[i]); err != nil {
			errs = append(errs, fmt.Errorf("debugfs %q: %w", s.cmd, err))
		}
	}
	return errors.Join(errs...)
}

func dataName(i int) string { return fmt.Sprintf("f%d", i) }

// pathState is what the plan knows of one path in the image.
type pathState struct {
	exists bool
	typ    os.FileMode // type bits of the name itself (not following a final symlink)
	isDir  bool        // resolves to a directory, through a symlink or not
}

// ancestors lists p's parents from the top, without "/".
func ancestors(p string) []string {
	var out []string
	for d := path.Dir(p); d != "/"; d = path.Dir(d) {
		out = append(out, d)
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// probe stats every entry and parent in one read-only run: "stat P" for the
// name itself, "stat P/." for whether it leads to a directory.
func probe(ctx context.Context, image, dir string, files []File) (map[string]pathState, error) {
	set := map[string]bool{}
	for _, f := range files {
		set[f.Path] = true
		for _, a := range ancestors(f.Path) {
			set[a] = true
		}
	}
	paths := make([]string, 0, len(set))
	for p := range set {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	cmds := make([]string, 0, 2*len(paths))
	for _, p := range paths {
		cmds = append(cmds, "stat "+p, "stat "+p+"/.")
	}
	t, err := runDebugfs(ctx, image, dir, false, cmds)
	if err != nil {
		return nil, fmt.Errorf("probe: %w", err)
	}
	state := make(map[string]pathState, len(paths))
	for i, p := range paths {
		self, err := parseStat(t[2*i])
		if err != nil {
			return nil, fmt.Errorf("probe %s: %w", p, err)
		}
		var s pathState
		if self.found {
			s.exists = true
			s.typ = self.info.Mode.Type()
			resolved, err := parseStat(t[2*i+1])
			if err != nil {
				return nil, fmt.Errorf("probe %s/.: %w", p, err)
			}
			s.isDir = resolved.found && resolved.info.Mode.IsDir()
		}
		state[p] = s
	}
	return state, nil
}

// at writes p for a debugfs command as PARENT/./BASE. mkdir, symlink, rm
// and write split their argument at the last '/' and look the parent up
// without following a final symlink, and an empty parent ("/tmp" split at
// its only slash) means the current directory, not the root. With "/."
// after the parent, the parent is always resolved as a directory, through a
// symlink if it is one, and a root-level name stays at the root.
func at(p string) string {
	d := path.Dir(p)
	if d == "/" {
		d = ""
	}
	return d + "/./" + path.Base(p)
}

// step is one debugfs command and the judgement of its output.
type step struct {
	cmd   string
	check func(lines []string) error
}

func expectNothing(lines []string) error {
	if len(lines) > 0 {
		return errors.New(strings.Join(lines, "; "))
	}
	return nil
}

func expectAllocated(lines []string) error {
	if len(lines) == 1 && allocatedRe.MatchString(lines[0]) {
		return nil
	}
	return fmt.Errorf("want \"Allocated inode: N\", got %q", strings.Join(lines, "; "))
}

func do(cmd string) step { return step{cmd: cmd, check: expectNothing} }

// describe names a type for error messages.
func describe(s pathState) string {
	switch {
	case !s.exists:
		return "missing"
	case s.typ == 0:
		return "a regular file"
	case s.typ&os.ModeSymlink != 0 && s.isDir:
		return "a symlink to a directory"
	case s.typ&os.ModeSymlink != 0:
		return "a symlink not leading to a directory"
	default:
		return "a " + strings.TrimLeft(s.typ.String(), "-") + " inode"
	}
}

// plan turns the entries into debugfs commands, simulating their effect on
// state so later entries see what earlier ones did.
func plan(files []File, state map[string]pathState) ([]step, error) {
	var steps []step
	remove := func(p string) {
		steps = append(steps, do("rm "+at(p)))
		state[p] = pathState{}
		// Whatever the probe saw below p (through a symlink) is gone.
		for q := range state {
			if strings.HasPrefix(q, p+"/") {
				state[q] = pathState{}
			}
		}
	}
	for i, f := range files {
		for _, a := range ancestors(f.Path) {
			s := state[a]
			switch {
			case s.isDir:
			case !s.exists:
				steps = append(steps, do("mkdir "+at(a)))
				state[a] = pathState{exists: true, typ: os.ModeDir, isDir: true}
			default:
				return nil, fmt.Errorf("%s: parent %s is %s, not a directory", f.Path, a, describe(s))
			}
		}
		s := state[f.Path]
		if s.exists && s.typ.IsDir() && !f.Dir {
			return nil, fmt.Errorf("%s is a directory; only a Dir entry may name it", f.Path)
		}
		switch {
		case f.Remove:
			if s.exists {
				remove(f.Path)
			}
			steps = append(steps, step{"stat " + at(f.Path), verifyAbsent})
			continue
		case f.Dir:
			if s.exists && !s.typ.IsDir() {
				remove(f.Path)
				s = pathState{}
			}
			if !s.exists {
				steps = append(steps, do("mkdir "+at(f.Path)))
			}
			steps = append(steps, do(fmt.Sprintf("sif %s mode 0%o", at(f.Path), 0o40000|unixMode(f.Mode))))
			state[f.Path] = pathState{exists: true, typ: os.ModeDir, isDir: true}
		case f.Symlink != "":
			if s.exists {
				remove(f.Path)
			}
			steps = append(steps, do("symlink "+at(f.Path)+" "+f.Symlink))
			state[f.Path] = pathState{exists: true, typ: os.ModeSymlink}
		default:
			if s.exists {
				remove(f.Path)
			}
			// write links the new inode into the current directory under
			// the name given (e2fsprogs before 1.47 take no path there).
			steps = append(steps,
				do("cd "+strings.TrimSuffix(at(f.Path), "/"+path.Base(f.Path))),
				step{"write " + dataName(i) + " " + path.Base(f.Path), expectAllocated},
				do(fmt.Sprintf("sif %s mode 0%o", at(f.Path), 0o100000|unixMode(f.Mode))),
			)
			state[f.Path] = pathState{exists: true}
		}
		steps = append(steps,
			do(fmt.Sprintf("sif %s uid %d", at(f.Path), f.UID)),
			do(fmt.Sprintf("sif %s gid %d", at(f.Path), f.GID)),
			step{"stat " + at(f.Path), verifyEntry(f)},
		)
	}
	return steps, nil
}

func verifyAbsent(lines []string) error {
	r, err := parseStat(lines)
	if err != nil {
		return err
	}
	if r.found {
		return fmt.Errorf("still present after removal")
	}
	return nil
}

// verifyEntry checks the final stat of an entry against what was asked.
func verifyEntry(f File) func([]string) error {
	return func(lines []string) error {
		r, err := parseStat(lines)
		if err != nil {
			return err
		}
		if !r.found {
			return fmt.Errorf("missing after write")
		}
		want := FileInfo{Mode: f.Mode, UID: f.UID, GID: f.GID}
		switch {
		case f.Dir:
			want.Mode |= os.ModeDir
			want.Size = r.info.Size // a directory's size is its blocks
		case f.Symlink != "":
			want.Mode = os.ModeSymlink | 0o777
			want.Size = int64(len(f.Symlink))
			want.Target = r.info.Target
			if r.fastDst && r.info.Target != f.Symlink {
				return fmt.Errorf("symlink target %q, want %q", r.info.Target, f.Symlink)
			}
		default:
			want.Size = int64(len(f.Data))
		}
		if r.info != want {
			return fmt.Errorf("got %+v, want %+v", r.info, want)
		}
		return nil
	}
}
