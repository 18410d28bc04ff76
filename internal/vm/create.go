package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

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
	kind, accel, err := s.chooseVMM(ctx, req.VMM, progress)
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
		NetMode: "user", State: string(api.VMCreating),
	}
	rt := Runtime{VMM: kind, Accel: accel, Creating: true}
	row.Runtime = encodeRuntime(rt)
	if err := s.Store.InsertVM(ctx, row); err != nil {
		if errors.Is(err, store.ErrExists) {
			return api.VM{}, api.Errorf(api.CodeAlreadyExists, "a VM named %q already exists", req.Name)
		}
		return api.VM{}, err
	}
	unlock := s.lock(id)
	defer unlock()
	log := s.Log.With("vm", req.Name, "id", id)
	log.Info("creating vm", "image", req.Image, "vmm", kind, "accel", accel, "cpus", req.CPUs, "memory", req.MemoryBytes)
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

	if err := s.makeDisk(ctx, row, &rt, files, progress); err != nil {
		return api.VM{}, err
	}
	crashpoint("create:disk")
	if err := s.writeIdentity(ctx, row, &rt, progress); err != nil {
		return api.VM{}, err
	}
	if err := s.saveRuntime(ctx, id, rt); err != nil {
		return api.VM{}, err
	}
	crashpoint("create:identity")

	if req.NoStart {
		if err := s.setState(ctx, row, api.VMStopped, "", api.VMCreating); err != nil {
			return api.VM{}, err
		}
	} else if err := s.bootLocked(ctx, row, rt, !req.NoWait, progress, api.VMCreating); err != nil {
		return api.VM{}, err
	}
	if err := s.finishCreate(ctx, id); err != nil {
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

// chooseVMM resolves "auto" and checks an explicit choice can run here.
func (s *Service) chooseVMM(ctx context.Context, want string, progress ProgressFunc) (vmm.Kind, vmm.Accel, error) {
	probe := s.KVM(ctx)
	_, fcOK := s.Drivers[vmm.Firecracker]
	switch want {
	case "firecracker":
		if !fcOK {
			return "", "", api.Errorf(api.CodeFailedPrecondition, "firecracker is not available here").WithHint("install firecracker, or use --vmm qemu")
		}
		// Firecracker has no user-mode networking: it needs a tap on the
		// bridge, which only the root helper can make.
		return "", "", api.Errorf(api.CodeFailedPrecondition, "firecracker VMs need bridge networking through banger-helper, which is not running").
			WithHint("install the helper with banger system install, or use --vmm qemu")
	case "auto", "qemu":
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

// makeDisk clones the image's rootfs into the VM's directory by the
// cheapest strategy the host allows and grows it to the requested size.
func (s *Service) makeDisk(ctx context.Context, row store.VM, rt *Runtime, files BootFiles, progress ProgressFunc) error {
	dir := s.Layout.VMDir(row.ID)
	if err := s.acquire(ctx, row.ID, resVMDir, dir, nil, func() error { return os.MkdirAll(dir, 0o700) }); err != nil {
		return err
	}
	progress(api.Event{Type: "vm.progress", Name: row.Name, Progress: &api.Progress{Step: "disk"}, Message: "cloning the image's disk"})
	cloner, err := image.ChooseCloner(ctx, files.Rootfs, dir, s.cloneOptions(row.ID, rt.VMM == vmm.QEMU))
	if err != nil {
		return err
	}
	path := filepath.Join(dir, "root.img")
	if cloner.Format() == image.DiskQCOW2 {
		path = filepath.Join(dir, "root.qcow2")
	}
	err = s.acquire(ctx, row.ID, resDisk, path, diskData{Strategy: cloner.Strategy()}, func() error {
		if err := cloner.Clone(ctx, files.Rootfs, path); err != nil {
			return err
		}
		if cloner.Format() == image.DiskRaw && cloner.Strategy() != image.CloneDMSnapshot {
			// Grow file and filesystem now; the guest boots at full size.
			return ext4.Resize(ctx, path, row.DiskBytes)
		}
		// qcow2 and dm-snapshot disks grow as block devices here; the
		// image's fstab (x-systemd.growfs) grows the filesystem at boot.
		if cloner.Format() == image.DiskQCOW2 {
			return image.Grow(ctx, path, image.DiskQCOW2, row.DiskBytes)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("make disk: %w", err)
	}
	rt.Disk = Disk{Path: path, Format: cloner.Format(), Strategy: cloner.Strategy()}
	s.Log.Info("disk cloned", "vm", row.Name, "strategy", cloner.Strategy(), "format", cloner.Format())
	return nil
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
	id := guest.Identity{
		Hostname:       row.Name,
		Net:            guest.NetConfig{Mode: guest.NetUser, MAC: network.MAC(row.ID).String()},
		AuthorizedKeys: [][]byte{authLine},
		HostKeys:       keys,
		MachineID:      machineID,
	}
	files, err := id.Files()
	if err != nil {
		return err
	}
	a := alias(row.Name)
	if err := s.acquire(ctx, row.ID, resKnownHosts, a, nil, func() error {
		return guest.Add(s.Layout.KnownHosts(), []string{a}, keys.PublicKeys())
	}); err != nil {
		return fmt.Errorf("pin host keys: %w", err)
	}
	if rt.Disk.Format == image.DiskRaw && rt.Disk.Strategy != image.CloneDMSnapshot {
		if err := ext4.WriteFiles(ctx, rt.Disk.Path, files); err != nil {
			return fmt.Errorf("write identity into the disk: %w", err)
		}
	} else {
		seed := filepath.Join(s.Layout.VMDir(row.ID), "seed.img")
		if err := s.acquire(ctx, row.ID, resSeed, seed, nil, func() error { return makeSeed(ctx, seed, files) }); err != nil {
			return fmt.Errorf("write identity seed: %w", err)
		}
		rt.Seed = seed
	}
	rt.MachineID = machineID
	rt.HostKeys = nil
	for _, k := range keys.PublicKeys() {
		rt.HostKeys = append(rt.HostKeys, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k))))
	}
	return nil
}

// seedRemoveList names, inside a seed disk, the guest paths the seed
// service deletes (host keys an image carried that banger does not pin).
const seedRemoveList = "/.banger-remove"

// makeSeed writes the identity files into a small fresh ext4 image. The
// image's banger-seed.service copies its tree over / early at boot and
// deletes the paths listed in /.banger-remove.
func makeSeed(ctx context.Context, path string, files []ext4.File) error {
	empty, err := os.MkdirTemp("", "banger-seed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(empty)
	if err := ext4.Make(ctx, empty, path, 8*api.MiB, ext4.MakeOptions{Label: "banger-seed"}); err != nil {
		return err
	}
	var write []ext4.File
	var remove []string
	for _, f := range files {
		if f.Remove {
			remove = append(remove, f.Path)
			continue
		}
		write = append(write, f)
	}
	if len(remove) > 0 {
		write = append(write, ext4.File{Path: seedRemoveList, Mode: 0o644, Data: []byte(strings.Join(remove, "\n") + "\n")})
	}
	if err := ext4.WriteFiles(ctx, path, write); err != nil {
		os.Remove(path)
		return err
	}
	return nil
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
