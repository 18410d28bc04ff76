package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/crypto/ssh"

	"github.com/bangerhq/banger/internal/api"
	"github.com/bangerhq/banger/internal/ext4"
	"github.com/bangerhq/banger/internal/guest"
	"github.com/bangerhq/banger/internal/helperapi"
	"github.com/bangerhq/banger/internal/image"
	"github.com/bangerhq/banger/internal/network"
	"github.com/bangerhq/banger/internal/revert"
	"github.com/bangerhq/banger/internal/store"
	"github.com/bangerhq/banger/internal/vmm"
)

// withDefaults fills a create request's zero values from the configuration.
func (s *Service) withDefaults(req api.VMCreateRequest) api.VMCreateRequest {
	if req.Image == "" {
		req.Image = s.Config.VM.Image
	}
	if req.CPUs == 0 {
		req.CPUs = s.Config.VM.CPUs
	}
	if req.MemoryBytes == 0 {
		req.MemoryBytes = int64(s.Config.VM.Memory)
	}
	if req.DiskBytes == 0 {
		req.DiskBytes = int64(s.Config.VM.Disk)
	}
	if req.VMM == "" {
		req.VMM = s.Config.VM.VMM
	}
	return req
}

// Create makes a VM and, unless NoStart, boots it and (unless NoWait) waits
// until it answers SSH with its pinned host key. Everything is validated
// before anything is made; a failure at any later step removes what was
// made, so no half-made VM, disk, key or row remains.
func (s *Service) Create(ctx context.Context, req api.VMCreateRequest, progress ProgressFunc) (api.VM, error) {
	if progress == nil {
		progress = func(api.Event) {}
	}
	req = s.withDefaults(req)
	if err := validateSpec(req, s.Limits); err != nil {
		return api.VM{}, err
	}
	if _, err := s.Store.GetVM(ctx, req.Name); err == nil {
		return api.VM{}, api.Errorf(api.CodeAlreadyExists, "a VM named %q already exists", req.Name).
			WithHint("pick another name, or banger vm delete " + req.Name)
	}
	// Bridge networking whenever the helper answers; user mode otherwise.
	bn, _ := s.bridge(ctx)
	kind, accel, err := s.chooseVMM(ctx, req.VMM, bn != nil, progress)
	if err != nil {
		return api.VM{}, err
	}
	im, err := s.Images.Ensure(ctx, req.Image, progress)
	if err != nil {
		return api.VM{}, err
	}
	files, err := s.Images.BootFiles(ctx, req.Image)
	if err != nil {
		return api.VM{}, err
	}
	if kind == vmm.Firecracker && files.Vmlinux == "" {
		return api.VM{}, api.Errorf(api.CodeFailedPrecondition, "image %q has no ELF vmlinux for Firecracker", req.Image).WithHint("use --vmm qemu")
	}
	if st, err := os.Stat(files.Rootfs); err != nil {
		return api.VM{}, fmt.Errorf("image %q: %w", req.Image, err)
	} else if req.DiskBytes < st.Size() {
		return api.VM{}, api.Errorf(api.CodeInvalidArgument, "disk %s is smaller than image %q's root filesystem (%s)",
			api.FormatSize(req.DiskBytes), req.Image, api.FormatSize(st.Size()))
	}

	id := helperapi.NewVMID()
	row := store.VM{
		ID: id, Name: req.Name, ImageID: im.ID, ImageName: im.Name, VMM: req.VMM,
		CPUs: req.CPUs, MemoryBytes: req.MemoryBytes, DiskBytes: req.DiskBytes,
		NetMode: NetUser, State: string(api.VMCreating),
	}
	if bn != nil {
		row.NetMode = NetBridge
	}
	rt := Runtime{VMM: kind, Accel: accel, Creating: true}
	cloner, err := s.planDisk(ctx, row, &rt, files)
	if err != nil {
		return api.VM{}, err
	}
	// The row and the intents of everything create makes go in one
	// commit, before any of it exists.
	intents := []store.Resource{
		{Kind: resVMDir, Ref: s.Layout.VMDir(id)},
		{Kind: resDisk, Ref: rt.Disk.Path, Data: mustJSON(diskData{Strategy: rt.Disk.Strategy})},
		{Kind: resKnownHosts, Ref: alias(req.Name)},
	}
	if rt.Seed != "" {
		intents = append(intents, store.Resource{Kind: resSeed, Ref: rt.Seed})
	}
	if err := s.insertVM(ctx, &row, &rt, bn, intents); err != nil {
		return api.VM{}, err
	}
	unlock := s.lock(id)
	defer unlock()
	log := s.Log.With("vm", req.Name, "id", id)
	log.Info("creating vm", "image", req.Image, "vmm", kind, "accel", accel, "cpus", req.CPUs, "memory", req.MemoryBytes,
		"disk", rt.Disk.Strategy, "net", row.NetMode, "ip", rt.Network.IP)
	s.publish(req.Name, "vm.state", string(api.VMCreating))

	r := revert.New()
	defer r.Fail()
	r.Add(func() {
		// The request may be cancelled: undo with a context that is not.
		ctx := context.WithoutCancel(ctx)
		if err := s.destroyLocked(ctx, row); err != nil {
			log.Error("roll back failed create", "err", err)
		}
	})
	crashpoint("create:row")

	if err := os.Mkdir(s.Layout.VMDir(row.ID), 0o700); err != nil {
		return api.VM{}, fmt.Errorf("make vm directory: %w", err)
	}
	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "disk"}, Message: "cloning the image's disk (" + string(rt.Disk.Strategy) + ")"})
	if identityInClone(rt.Disk) {
		if err := s.makeDisk(ctx, row, rt, cloner, files); err != nil {
			return api.VM{}, err
		}
		crashpoint("create:disk")
		if err := s.writeIdentity(ctx, row, &rt, progress); err != nil {
			return api.VM{}, err
		}
	} else {
		// The identity goes to a seed disk of its own: write it (keys,
		// known_hosts, seed, each synced) while the disk is cloned.
		diskRT := rt
		var diskErr error
		var wg sync.WaitGroup
		wg.Go(func() { diskErr = s.makeDisk(ctx, row, diskRT, cloner, files) })
		idErr := s.writeIdentity(ctx, row, &rt, progress)
		wg.Wait()
		if err := errors.Join(diskErr, idErr); err != nil {
			return api.VM{}, err
		}
		crashpoint("create:disk")
	}
	crashpoint("create:identity")

	switch {
	case req.NoStart:
		rt.Creating = false
		err = s.changeVM(ctx, row, store.VMChange{From: []string{string(api.VMCreating)}, State: string(api.VMStopped),
			Runtime: encodeRuntime(rt), MarkCreated: true})
	case req.NoWait:
		err = s.bootLocked(ctx, row, rt, bootOptions{finishCreate: true}, progress, api.VMCreating)
	default:
		if err = s.bootLocked(ctx, row, rt, bootOptions{wait: true}, progress, api.VMCreating); err == nil {
			err = s.finishCreate(ctx, id)
		}
	}
	if err != nil {
		return api.VM{}, err
	}
	r.Success()
	log.Info("vm created")
	if s.OnReady != nil && !req.NoStart && !req.NoWait {
		if err := s.OnReady(ctx, req.Name, progress); err != nil {
			log.Warn("after-ready step failed", "err", err)
			progress(api.Event{Type: "vm.notice", Name: req.Name, Message: "warning: " + err.Error()})
		}
	}
	return s.Get(ctx, req.Name)
}

// chooseVMM resolves "auto" and checks an explicit choice can run here:
// Firecracker when its binary is there, KVM guests run and the VM gets a
// bridge (Firecracker has no user-mode networking), QEMU otherwise.
func (s *Service) chooseVMM(ctx context.Context, want string, bridged bool, progress ProgressFunc) (vmm.Kind, vmm.Accel, error) {
	probe := s.KVM(ctx)
	_, fcOK := s.Drivers[vmm.Firecracker]
	switch want {
	case "firecracker":
		if !fcOK {
			return "", "", api.Errorf(api.CodeFailedPrecondition, "firecracker is not available here").WithHint("install firecracker, or use --vmm qemu")
		}
		// Firecracker has no user-mode networking: it needs a tap on the
		// bridge, which only the root helper can make.
		if !bridged {
			return "", "", api.Errorf(api.CodeFailedPrecondition, "firecracker VMs need bridge networking through banger-helper, which is not answering").
				WithHint("start banger-helper as root (README, \"Bridge networking\"), or use --vmm qemu")
		}
		return vmm.Firecracker, vmm.KVM, nil
	case "auto", "qemu":
		if want == "auto" && fcOK && bridged && probe.Usable {
			return vmm.Firecracker, vmm.KVM, nil
		}
		if probe.Usable {
			return vmm.QEMU, vmm.KVM, nil
		}
		s.mu.Lock()
		first := !s.tcgNoted
		s.tcgNoted = true
		s.mu.Unlock()
		msg := "using QEMU with software emulation (TCG): " + probe.Reason
		if first {
			s.Log.Warn(msg)
		}
		progress(api.Event{Type: "vm.notice", Message: msg})
		return vmm.QEMU, vmm.TCG, nil
	}
	return "", "", api.Errorf(api.CodeInvalidArgument, "vmm %q is not one of auto, firecracker, qemu", want)
}

func (s *Service) cloneOptions(vmID string, allowQCOW2 bool) image.CloneOptions {
	return image.CloneOptions{Snapshots: s.Snapshots, VMID: vmID, AllowQCOW2: allowQCOW2, Logger: s.Log}
}

// planDisk picks the clone strategy (probing the file system the VM's
// directory will be on) and fills in the disk's and seed's paths.
func (s *Service) planDisk(ctx context.Context, row store.VM, rt *Runtime, files BootFiles) (image.Cloner, error) {
	if err := os.MkdirAll(s.Layout.VMsDir(), 0o700); err != nil {
		return nil, err
	}
	opts := s.cloneOptions(row.ID, rt.VMM == vmm.QEMU)
	opts.Size = row.DiskBytes // a qcow2 overlay is made at full size at once
	cloner, err := image.ChooseCloner(ctx, files.Rootfs, s.Layout.VMsDir(), opts)
	if err != nil {
		return nil, err
	}
	dir := s.Layout.VMDir(row.ID)
	path := filepath.Join(dir, "root.img")
	if cloner.Format() == image.DiskQCOW2 {
		path = filepath.Join(dir, "root.qcow2")
	}
	rt.Disk = Disk{Path: path, Format: cloner.Format(), Strategy: cloner.Strategy()}
	if !identityInClone(rt.Disk) {
		rt.Seed = filepath.Join(dir, "seed.img")
	}
	return cloner, nil
}

// identityInClone says whether the identity can be written into the disk
// itself: only a raw ext4 file can be edited (debugfs) before boot.
func identityInClone(d Disk) bool {
	return d.Format == image.DiskRaw && d.Strategy != image.CloneDMSnapshot
}

// makeDisk clones the image's rootfs into the VM's (existing) directory and
// grows it to the requested size. It may run beside writeIdentity, so it
// reports no progress of its own.
func (s *Service) makeDisk(ctx context.Context, row store.VM, rt Runtime, cloner image.Cloner, files BootFiles) error {
	if err := cloner.Clone(ctx, files.Rootfs, rt.Disk.Path); err != nil {
		return fmt.Errorf("make disk: %w", err)
	}
	if identityInClone(rt.Disk) {
		// Grow file and file system now (resize2fs): the guest boots at
		// full size. A qcow2 overlay was made at full size and a
		// dm-snapshot is sized by the helper; the image's fstab
		// (x-systemd.growfs) grows their file system at boot.
		if err := ext4.Resize(ctx, rt.Disk.Path, row.DiskBytes); err != nil {
			return fmt.Errorf("grow disk: %w", err)
		}
	}
	return nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // plain data only
	}
	return b
}

// alias is the VM's name in banger's known_hosts.
func alias(name string) string { return name + "." + guest.DefaultDomain }

// writeIdentity generates the VM's host keys, pins them in known_hosts and
// writes hostname, network config, the owner's key and the host keys into
// the disk before first boot — into the clone itself when it is a raw ext4
// file, else into a seed disk the image applies at boot.
func (s *Service) writeIdentity(ctx context.Context, row store.VM, rt *Runtime, progress ProgressFunc) error {
	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "identity"}, Message: "writing the VM's identity and pinned host keys"})
	_, authLine, err := guest.LoadOrCreateClientKey(s.Layout.SSHKey())
	if err != nil {
		return err
	}
	keys, err := guest.GenerateHostKeys()
	if err != nil {
		return err
	}
	machineID, err := guest.NewMachineID()
	if err != nil {
		return err
	}
	netCfg := guest.NetConfig{Mode: guest.NetUser, MAC: network.MAC(row.ID).String()}
	if row.NetMode == NetBridge {
		bn := s.liveBridge()
		if bn == nil {
			return bridgeUnavailable(row.Name, ErrNoHelper)
		}
		sub := bn.cfg.Subnet
		addr, err := netip.ParseAddr(rt.Network.IP)
		if err != nil || !sub.IsGuestAddr(addr) {
			return fmt.Errorf("vm %s: address %q is not a guest address of %s", row.Name, rt.Network.IP, sub.Prefix())
		}
		// The gateway also answers DNS: the helper redirects its port 53
		// to the daemon's server for <vm>.banger and the outside.
		netCfg = guest.NetConfig{
			Mode:    guest.NetStatic,
			Address: netip.PrefixFrom(addr, sub.Prefix().Bits()).String(),
			Gateway: sub.Gateway().String(),
			DNS:     []string{sub.Gateway().String()},
			MAC:     netCfg.MAC,
		}
	}
	id := guest.Identity{
		Hostname:       row.Name,
		Net:            netCfg,
		AuthorizedKeys: [][]byte{authLine},
		HostKeys:       keys,
		MachineID:      machineID,
	}
	files, err := id.Files()
	if err != nil {
		return err
	}
	if err := guest.Add(s.Layout.KnownHosts(), []string{alias(row.Name)}, keys.PublicKeys()); err != nil {
		return fmt.Errorf("pin host keys: %w", err)
	}
	if rt.Seed == "" {
		if err := ext4.WriteFiles(ctx, rt.Disk.Path, files); err != nil {
			return fmt.Errorf("write identity into the disk: %w", err)
		}
	} else if err := makeSeed(rt.Seed, files); err != nil {
		return fmt.Errorf("write identity seed: %w", err)
	}
	rt.MachineID = machineID
	rt.HostKeys = nil
	for _, k := range keys.PublicKeys() {
		rt.HostKeys = append(rt.HostKeys, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k))))
	}
	return nil
}

// insertVM records the new VM and the intents of what create makes. A
// bridge-mode VM also gets the lowest free address of the subnet, recorded
// as a resource: the UNIQUE constraint settles two creates picking the same
// one, and the loser takes the next.
func (s *Service) insertVM(ctx context.Context, row *store.VM, rt *Runtime, bn *bridgeNet, intents []store.Resource) error {
	var tried []netip.Addr
	for {
		rs := intents
		if bn != nil {
			used, err := s.usedAddresses(ctx)
			if err != nil {
				return err
			}
			addr, err := bn.cfg.Subnet.Allocate(append(used, tried...))
			if err != nil {
				return api.Errorf(api.CodeFailedPrecondition, "no free address for a new VM: %v", err).
					WithHint("delete VMs you no longer need, or configure a larger [network] subnet")
			}
			tried = append(tried, addr)
			rt.Network.IP = addr.String()
			rs = append(slices.Clone(intents), store.Resource{Kind: resAddress, Ref: addr.String()})
		}
		row.Runtime = encodeRuntime(*rt)
		err := s.Store.InsertVM(ctx, *row, rs...)
		if !errors.Is(err, store.ErrExists) {
			return err
		}
		if _, gerr := s.Store.GetVM(ctx, row.Name); gerr == nil || bn == nil {
			return api.Errorf(api.CodeAlreadyExists, "a VM named %q already exists", row.Name)
		}
		// Another create took the address first: take the next one.
		if len(tried) >= 64 {
			return fmt.Errorf("allocate an address for vm %s: %d candidates were taken concurrently", row.Name, len(tried))
		}
	}
}

// finishCreate clears the creating flag: from here on a crash leaves a
// whole VM, not one to roll back.
func (s *Service) finishCreate(ctx context.Context, id string) error {
	row, err := s.Store.GetVMByID(ctx, id)
	if err != nil {
		return err
	}
	rt, err := decodeRuntime(row.Runtime)
	if err != nil {
		return err
	}
	rt.Creating = false
	return s.saveRuntime(ctx, id, rt)
}
