#!/usr/bin/env bash
# Installs the system packages blockvol's tests and local cluster use (idempotent).
set -euo pipefail

packages=(nbdkit libnbd-bin fio qemu-utils e2fsprogs xfsprogs fuse3 iproute2 iptables util-linux python3-libnbd linux-perf)
# The real-node cluster (hack/cluster.sh) and its images (hack/images.sh): container
# runtime, CNI plugins, the forwarders, busybox for test pods, a static C toolchain for
# the pause image, and the packages of the blockvol image's host tools.
packages+=(containerd runc containernetworking-plugins busybox-static socat conntrack gcc libc6-dev binutils python3)
packages+=($(awk '!/^#/ && NF {print $1}' "$(dirname "$0")/../deploy/image-tools.txt" | sort -u))
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
