#!/usr/bin/env bash
# Installs the Debian packages banger and its tests use. Idempotent: it
# only calls apt when something is missing. Run as root (or with sudo).
set -euo pipefail

packages=(
  # VMMs and disk tools
  qemu-system-x86 qemu-utils
  # image builds
  mmdebstrap uidmap e2fsprogs xfsprogs
  # kernel payload decompressors (xz with the x86 filter, lzo)
  xz-utils lzop lz4 zstd bzip2
  # networking
  nftables iproute2
  # reaching guests
  openssh-client
  # tests: a real sshd stands in for a guest where booting one adds minutes
  openssh-server
  # tests: loop devices, setpriv, a busybox for test initramfs
  util-linux busybox-static cpio
  # build
  make git ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Loop devices for the disk tests and dm-snapshot-free clones.
modprobe loop 2>/dev/null || true

if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  echo "note: Go is at /usr/local/go/bin; add it to PATH"
fi
