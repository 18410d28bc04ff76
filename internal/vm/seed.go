package vm

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bangerhq/banger/internal/ext4"
)

// The seed disk carries a VM's identity for clones the daemon cannot write
// into before boot (qcow2 overlays, dm-snapshots). It is a plain tar archive
// used as a raw disk: the image's banger-seed.service checks that its first
// entry is .banger-seed, deletes the paths listed in .banger-remove and
// unpacks the rest over / with the archived owners and modes. A tar needs no
// mkfs and no debugfs, so it is written in well under a millisecond.
const (
	seedMagic      = ".banger-seed"
	seedRemoveList = ".banger-remove"
)

// seedArchive renders identity files as the seed disk's content.
func seedArchive(files []ext4.File) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Now().Truncate(time.Second)
	add := func(h *tar.Header, data []byte) error {
		h.ModTime, h.Format = mtime, tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(&tar.Header{Name: seedMagic, Mode: 0o644, Typeflag: tar.TypeReg, Size: 2}, []byte("1\n")); err != nil {
		return nil, err
	}
	var remove []string
	for _, f := range files {
		if f.Remove {
			remove = append(remove, f.Path)
		}
	}
	if len(remove) > 0 {
		list := []byte(strings.Join(remove, "\n") + "\n")
		if err := add(&tar.Header{Name: seedRemoveList, Mode: 0o644, Typeflag: tar.TypeReg, Size: int64(len(list))}, list); err != nil {
			return nil, err
		}
	}
	for _, f := range files {
		if f.Remove {
			continue
		}
		if !filepath.IsAbs(f.Path) || filepath.Clean(f.Path) != f.Path || f.Path == "/" {
			return nil, fmt.Errorf("seed: path %q is not absolute and clean", f.Path)
		}
		h := &tar.Header{Name: strings.TrimPrefix(f.Path, "/"), Mode: int64(f.Mode.Perm()), Uid: f.UID, Gid: f.GID}
		var data []byte
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case f.Symlink != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Symlink
		default:
			h.Typeflag, h.Size, data = tar.TypeReg, int64(len(f.Data)), f.Data
		}
		if err := add(h, data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil // tar pads to 512-byte blocks: a valid disk size
}

// makeSeed writes the seed disk to path, durably, without replacing
// anything.
func makeSeed(path string, files []ext4.File) error {
	data, err := seedArchive(files)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err = f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
	}
	return err
}
