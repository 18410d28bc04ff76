package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Without root, mmdebstrap (unshare mode) can build a tree whose owners are
// right only inside its user namespace; seen from outside they are subuids,
// and the tree is unreadable and undeletable by the user. Its tarball is
// right everywhere, so an unprivileged build asks for the tarball, unpacks
// it as the user (every file then belongs to the user), makes the ext4 image
// from that with ext4.Make, and finally sets in the image, with debugfs,
// what the unpacked tree could not carry: owners, the modes the user had to
// widen to read and delete it, device nodes and FIFOs, and extended
// attributes such as file capabilities.

// inodeFix is what the image must get for one path that the unpacked tree
// does not say right.
type inodeFix struct {
	path     string // absolute inside the image
	uid, gid int
	// mode is the full st_mode (type and permission bits), set when the
	// tree's differs or the node is made by debugfs.
	mode uint32
	// node is "c", "b" or "p" for a device node or FIFO debugfs creates.
	node         string
	major, minor int64
	xattrs       map[string]string
}

// Type bits of st_mode.
const (
	sIFIFO = 0o010000
	sIFCHR = 0o020000
	sIFDIR = 0o040000
	sIFBLK = 0o060000
	sIFREG = 0o100000
	sIFLNK = 0o120000
)

// unpackRootfs unpacks the tarball at tarPath into dir (which must exist
// and be empty) and returns the fixes the image needs afterwards. Entries
// cannot escape dir: every path is resolved inside an os.Root, and ".."
// components are refused.
func unpackRootfs(ctx context.Context, tarPath, dir string) (fixes []inodeFix, err error) {
	f, err := os.Open(tarPath)
	if err != nil {
		return nil, fmt.Errorf("unpack root file system: %w", err)
	}
	defer f.Close()
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("unpack root file system: %w", err)
	}
	defer func() { _ = root.Close() }()

	type dirTime struct {
		name string
		t    time.Time
	}
	var dirTimes []dirTime
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("unpack root file system: read %s: %w", tarPath, err)
		}
		name, err := tarEntryName(hdr.Name)
		if err != nil {
			return nil, fmt.Errorf("unpack root file system: %w", err)
		}
		fix, err := unpackEntry(root, name, hdr, tr)
		if err != nil {
			return nil, fmt.Errorf("unpack root file system: %s: %w", hdr.Name, err)
		}
		if fix != nil {
			fixes = append(fixes, *fix)
		}
		if hdr.Typeflag == tar.TypeDir {
			dirTimes = append(dirTimes, dirTime{name, hdr.ModTime})
		}
	}
	// Directory times last: creating entries inside changed them.
	for i := len(dirTimes) - 1; i >= 0; i-- {
		if err := root.Chtimes(dirTimes[i].name, dirTimes[i].t, dirTimes[i].t); err != nil {
			return nil, fmt.Errorf("unpack root file system: %w", err)
		}
	}
	return fixes, nil
}

// tarEntryName turns "./usr/bin/ls" into "usr/bin/ls" ("." for the root)
// and refuses names that debugfs cannot take or that climb out.
func tarEntryName(n string) (string, error) {
	// debugfs takes names in double quotes and backslashes literally
	// (systemd unit names hold \x2d); a quote or line break it cannot.
	if strings.ContainsAny(n, "\"\n\r\x00") {
		return "", fmt.Errorf("entry %q: double quotes and line breaks in file names are not supported", n)
	}
	rel := strings.TrimSuffix(strings.TrimPrefix(n, "./"), "/")
	if rel == "" || rel == "." {
		return ".", nil
	}
	for _, c := range strings.Split(rel, "/") {
		if c == "" || c == "." || c == ".." {
			return "", fmt.Errorf("entry %q is not a clean relative path", n)
		}
	}
	return rel, nil
}

// unpackEntry creates one entry. Everything is created owned by the caller
// with at least owner read and write (directories also search), so that
// mke2fs can read the tree and the staging directory can be removed; the
// fix restores the recorded owner and mode in the image.
func unpackEntry(root *os.Root, name string, hdr *tar.Header, r io.Reader) (*inodeFix, error) {
	fix := &inodeFix{path: "/" + strings.TrimPrefix(name, "."), uid: hdr.Uid, gid: hdr.Gid, xattrs: tarXattrs(hdr)}
	if name == "." {
		fix.path = "/"
	}
	perm := uint32(hdr.Mode) & 0o7777
	switch hdr.Typeflag {
	case tar.TypeDir:
		if name != "." {
			if err := root.Mkdir(name, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return nil, err
			}
		}
		if err := chmodWidened(root, name, perm, 0o700, sIFDIR, fix); err != nil {
			return nil, err
		}
	case tar.TypeReg:
		out, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		_, err = io.Copy(out, r)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		if err := chmodWidened(root, name, perm, 0o600, sIFREG, fix); err != nil {
			return nil, err
		}
		if err := root.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
			return nil, err
		}
	case tar.TypeSymlink:
		if err := root.Symlink(hdr.Linkname, name); err != nil {
			return nil, err
		}
	case tar.TypeLink:
		target, err := tarEntryName(hdr.Linkname)
		if err != nil {
			return nil, err
		}
		// The inode's fix came with its first name.
		return nil, root.Link(target, name)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		// Only root can mknod; debugfs makes the node in the image.
		switch hdr.Typeflag {
		case tar.TypeChar:
			fix.node, fix.mode = "c", sIFCHR|perm
		case tar.TypeBlock:
			fix.node, fix.mode = "b", sIFBLK|perm
		default:
			fix.node, fix.mode = "p", sIFIFO|perm
		}
		fix.major, fix.minor = hdr.Devmajor, hdr.Devminor
	default:
		return nil, fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	return fix, nil
}

// chmodWidened gives name perm plus need, and records perm in fix when the
// two differ.
func chmodWidened(root *os.Root, name string, perm, need, typ uint32, fix *inodeFix) error {
	disk := perm | need
	if err := root.Chmod(name, goMode(disk)); err != nil {
		return err
	}
	if disk != perm {
		fix.mode = typ | perm
	}
	return nil
}

// goMode converts st_mode permission bits to an os.FileMode.
func goMode(perm uint32) os.FileMode {
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
	return m
}

// tarXattrs returns an entry's extended attributes (GNU tar --xattrs
// stores them as SCHILY.xattr.* PAX records).
func tarXattrs(hdr *tar.Header) map[string]string {
	var x map[string]string
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if x == nil {
				x = map[string]string{}
			}
			x[name] = v
		}
	}
	return x
}

// applyFixes sets the fixes in the ext4 image with one debugfs run. The
// command file is written to scratch, a directory debugfs may read.
func applyFixes(ctx context.Context, image, scratch string, fixes []inodeFix) error {
	var cmds bytes.Buffer
	n := 0
	for _, f := range fixes {
		q := `"` + f.path + `"`
		if f.node != "" {
			// debugfs 1.47.0's mknod links a name containing '/' into the
			// current directory as it is: make the node from its parent.
			dir, base := path.Split(f.path)
			fmt.Fprintf(&cmds, "cd \"%s\"\n", dir)
			if f.node == "p" {
				fmt.Fprintf(&cmds, "mknod \"%s\" p\n", base)
			} else {
				fmt.Fprintf(&cmds, "mknod \"%s\" %s %d %d\n", base, f.node, f.major, f.minor)
			}
			cmds.WriteString("cd /\n")
		}
		fmt.Fprintf(&cmds, "sif %s uid %d\nsif %s gid %d\n", q, f.uid, q, f.gid)
		if f.mode != 0 {
			fmt.Fprintf(&cmds, "sif %s mode 0%o\n", q, f.mode)
		}
		for name, val := range f.xattrs {
			if strings.ContainsAny(name, " \"\n") {
				return fmt.Errorf("set attributes in %s: extended attribute name %q is not supported", image, name)
			}
			n++
			valFile := filepath.Join(scratch, fmt.Sprintf("xattr-%d", n))
			if err := os.WriteFile(valFile, []byte(val), 0o600); err != nil {
				return fmt.Errorf("set attributes in %s: %w", image, err)
			}
			fmt.Fprintf(&cmds, "ea_set -f \"%s\" %s %s\n", valFile, q, name)
		}
	}
	cmdFile := filepath.Join(scratch, "fixes.debugfs")
	if err := os.WriteFile(cmdFile, cmds.Bytes(), 0o600); err != nil {
		return fmt.Errorf("set attributes in %s: %w", image, err)
	}
	bin, err := sbinTool("debugfs")
	if err != nil {
		return fmt.Errorf("set attributes in %s: %w", image, err)
	}
	cmd := exec.CommandContext(ctx, bin, "-w", "-f", cmdFile, image)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBUGFS_PAGER=__none__", "PAGER=__none__")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("set attributes in %s: debugfs: %w: %s", image, err, bytes.TrimSpace(out))
	}
	// debugfs exits 0 whatever its commands did. With -f it echoes each
	// command as "debugfs: …" and prints nothing else unless a command
	// fails, but for mknod's "Allocated inode".
	var bad []string
	for _, l := range strings.Split(string(out), "\n") {
		if l == "" || strings.HasPrefix(l, "debugfs: ") || (strings.HasPrefix(l, "debugfs ") && strings.HasSuffix(l, ")")) ||
			allocatedRe.MatchString(l) {
			continue
		}
		bad = append(bad, l)
		if len(bad) == 10 {
			break
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("set attributes in %s: debugfs: %s", image, strings.Join(bad, "; "))
	}
	return nil
}

// allocatedRe is mknod's report of the inode it made.
var allocatedRe = regexp.MustCompile(`^Allocated inode: \d+$`)

// sbinTool finds a tool that Debian installs in /usr/sbin or /sbin, which
// an ordinary user's PATH lacks.
func sbinTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("find %s: not on PATH nor in /usr/sbin or /sbin", name)
}
