package helper

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/helperapi"
)

// POSIX ACLs in their extended attribute form (posix_acl_xattr.h): a
// little-endian version word, then one (tag, perm, id) entry per line of
// the ACL, sorted by tag and, for named entries, by id.
const (
	aclXattrVersion = 2
	aclUserObj      = 0x01
	aclUser         = 0x02
	aclGroupObj     = 0x04
	aclMask         = 0x10
	aclOther        = 0x20
	aclUndefinedID  = 0xffffffff

	xattrACLAccess  = "system.posix_acl_access"
	xattrACLDefault = "system.posix_acl_default"
)

type aclEntry struct {
	tag, perm uint16
	id        uint32
}

func encodeACL(entries []aclEntry) []byte {
	b := make([]byte, 4, 4+8*len(entries))
	binary.LittleEndian.PutUint32(b, aclXattrVersion)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	return b
}

// userACL is "u::<own>, u:<uid>:<perm>, g::---, m::<perm>, o::---": the
// file's owner keeps own, one more user gets perm, nobody else anything.
func userACL(own uint16, uid uint32, perm uint16) []byte {
	return encodeACL([]aclEntry{
		{aclUserObj, own, aclUndefinedID},
		{aclUser, perm, uid},
		{aclGroupObj, 0, aclUndefinedID},
		{aclMask, perm, aclUndefinedID},
		{aclOther, 0, aclUndefinedID},
	})
}

// grantOwnerIn lets the owner into the directory dir (a jail root that the
// jail's uid owns, mode 0700): search access now, and read-write access to
// what is created in it from now on (the vsock socket Firecracker binds
// when configured, snapshots), through a default ACL. Nothing already in
// the directory changes. File systems without POSIX ACLs are refused.
func grantOwnerIn(dir *os.File, owner uint32) error {
	for _, x := range []struct {
		name string
		acl  []byte
	}{
		{xattrACLAccess, userACL(7, owner, 1)},
		{xattrACLDefault, userACL(7, owner, 7)},
	} {
		if err := unix.Fsetxattr(int(dir.Fd()), x.name, x.acl, 0); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) {
				return helperapi.Errorf(helperapi.CodeUnsupported, "grant the owner access to %s: the file system has no POSIX ACLs (hint: put the jail dir on ext4, xfs, btrfs or tmpfs)", dir.Name())
			}
			return fmt.Errorf("grant the owner access to %s: %w", dir.Name(), err)
		}
	}
	return nil
}
