#!/usr/bin/env bash
# Installs the system packages blockvol's tests and local cluster use (idempotent).
set -euo pipefail

packages=(nbdkit libnbd-bin fio qemu-utils e2fsprogs xfsprogs fuse3 iproute2 iptables util-linux python3-libnbd linux-perf)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "==> system packages: all present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "==> installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
