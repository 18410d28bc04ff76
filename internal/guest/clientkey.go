package guest

import (
	"errors"
	"fmt"
	"io/fs"

	"golang.org/x/crypto/ssh"
)

// LoadClientKey loads the owner's existing SSH key for reaching VMs,
// without creating one: the CLI uses the key the daemon made, and a
// missing key means something is wrong with the install, not that one is
// due.
func LoadClientKey(path string) (ssh.Signer, error) {
	s, err := loadClientKey(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load ssh key %s: it does not exist (hint: the daemon creates it with the first VM)", path)
	}
	return s, err
}
