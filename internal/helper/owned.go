package helper

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/bangerhq/banger/internal/helperapi"
)

// listOwned reports every kernel object that carries banger's names, so
// the daemon can match them against its records and remove orphans. It
// never lists anything else, and removes nothing itself.
func (s *Server) listOwned(ctx context.Context) (helperapi.ListOwnedResult, error) {
	res := helperapi.ListOwnedResult{Bridges: []string{}, Taps: []string{}, Loops: []helperapi.OwnedLoop{}, Snapshots: []helperapi.OwnedSnapshot{}, Jails: []helperapi.OwnedJail{}}
	err := s.inNetNS(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			name := l.Attrs().Name
			switch {
			case l.Type() == "bridge" && helperapi.ValidateBridgeName(name) == nil:
				res.Bridges = append(res.Bridges, name)
			case l.Type() == "tuntap" && helperapi.ValidateTapName(name) == nil:
				res.Taps = append(res.Taps, name)
			}
		}
		c, err := nftables.New()
		if err != nil {
			return fmt.Errorf("open nftables: %w", err)
		}
		res.NFTable, err = tableExists(c)
		return err
	})
	if err != nil {
		return res, err
	}
	loops, lerr := s.ownedLoops()
	snaps, serr := ownedSnapshots()
	jails, jerr := s.ownedJails()
	if err := errors.Join(lerr, serr, jerr, ctx.Err()); err != nil {
		return res, err
	}
	if jails != nil {
		res.Jails = jails
	}
	if loops != nil {
		res.Loops = loops
	}
	if snaps != nil {
		res.Snapshots = snaps
	}
	sort.Strings(res.Bridges)
	sort.Strings(res.Taps)
	sort.Slice(res.Loops, func(i, j int) bool { return res.Loops[i].Device < res.Loops[j].Device })
	return res, nil
}
