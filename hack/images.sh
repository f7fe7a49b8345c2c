#!/usr/bin/env bash
# Builds the images the chart and the real-node tests use, as OCI archives, without a
# container daemon, and optionally loads them:
#
#   localhost/blockvol:$TAG           blockvol-operator, -agent, -csi and the host tools of
#                                     deploy/image-tools.txt with their shared libraries
#   localhost/csi-provisioner:$TAG,   the CSI sidecars, from the pinned Go modules
#   localhost/csi-attacher:$TAG,      (hack/tools/build.sh)
#   localhost/csi-resizer:$TAG
#   localhost/pause:$TAG              the pod sandbox (a static C program)
#   localhost/busybox:$TAG            busybox-static, for test pods
#
#   hack/images.sh [--release] [--out DIR] [--load CONTAINERD_SOCKET]... [--docker] [--kind NAME]
#   hack/images.sh --tool-files    print the files the host tools add to the blockvol image
#
# --release builds the binaries with the release profile (default: the dev profile,
# stripped of debug info). With BLOCKVOL_IMAGES_NO_CARGO=1 the binaries already built
# are used as they are (for callers that run under cargo, which holds the build lock). TAG is $BLOCKVOL_IMAGE_TAG (default: dev). The archives land in
# DIR (default: target/images). --load imports them into the containerd at that socket
# (`ctr -n k8s.io images import`); --docker runs `docker load`; --kind NAME runs
# `kind load image-archive`. deploy/Dockerfile builds the same blockvol image with Docker;
# both take the host tools from deploy/image-tools.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

profile=dev
out="$repo/target/images"
loads=()
docker_load=no
kind_cluster=""
tool_files=no
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --out) out="$2"; shift ;;
    --load) loads+=("$2"); shift ;;
    --docker) docker_load=yes ;;
    --kind) kind_cluster="$2"; shift ;;
    --tool-files) tool_files=yes ;;
    *) echo "images: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
tag="${BLOCKVOL_IMAGE_TAG:-dev}"
start=$SECONDS

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A root with Debian's merged-/usr layout, so library paths ldd prints resolve.
new_root() {
  local root="$1"
  mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc,tmp,proc,sys,dev,run,var/tmp}
  ln -s usr/bin "$root/bin"
  ln -s usr/sbin "$root/sbin"
  ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  chmod 1777 "$root/tmp" "$root/var/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
}

# Copies FILE to the same path under ROOT (resolving symlinks in the directory part).
copy_file() {
  local root="$1" file="$2" dir
  dir="$(readlink -f "$(dirname "$file")")"
  mkdir -p "$root$dir"
  if [ -L "$file" ]; then
    # Keep the link (mkfs.ext4 -> mke2fs) and copy what it points to.
    cp -a "$file" "$root$dir/"
    copy_file "$root" "$(readlink -f "$file")"
  elif [ ! -e "$root$dir/$(basename "$file")" ]; then
    cp -L --preserve=mode "$file" "$root$dir/"
  fi
}

# Copies the shared libraries (and the dynamic loader) ELF file FILE needs.
copy_libs() {
  local root="$1" file="$2" lib
  ldd "$file" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    copy_file "$root" "$lib"
  done
}

# The host tools of deploy/image-tools.txt, installed on this machine by hack/deps.sh.
image_tools() {
  awk '!/^#/ && NF {print $2}' deploy/image-tools.txt
}

root="$work/blockvol"
new_root "$root"
for t in $(image_tools); do
  path="$(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v "$t")" || {
    echo "images: $t is not installed (hack/deps.sh installs deploy/image-tools.txt's packages)" >&2
    exit 1
  }
  copy_file "$root" "$path"
  copy_libs "$root" "$(readlink -f "$path")"
done
ln -s /proc/self/mounts "$root/etc/mtab"
if [ "$tool_files" = yes ]; then
  (cd "$root" && find . ! -type d | sed 's|^\./|/|' | LC_ALL=C sort)
  exit 0
fi

tools_bin="$(hack/tools/build.sh --print-bin)"
hack/tools/build.sh csi-provisioner csi-attacher csi-resizer >/dev/null

if [ -n "${BLOCKVOL_IMAGES_NO_CARGO:-}" ]; then
  [ "$profile" = release ] && bin_dir="$repo/target/release" || bin_dir="$repo/target/debug"
  for b in blockvol-operator blockvol-agent blockvol-csi; do
    [ -x "$bin_dir/$b" ] || { echo "images: $bin_dir/$b is not built (cargo build --bins -p operator -p node-agent -p csi)" >&2; exit 1; }
  done
elif [ "$profile" = release ]; then
  echo "==> images: cargo build (release profile)"
  cargo build --release --locked -q -p operator -p node-agent -p csi \
    --bin blockvol-operator --bin blockvol-agent --bin blockvol-csi
  bin_dir="$repo/target/release"
else
  echo "==> images: cargo build (dev profile)"
  cargo build --locked -q -p operator -p node-agent -p csi \
    --bin blockvol-operator --bin blockvol-agent --bin blockvol-csi
  bin_dir="$repo/target/debug"
fi

mkdir -p "$out"
echo "==> images: root filesystems"
for b in blockvol-operator blockvol-agent blockvol-csi; do
  objcopy --strip-debug "$bin_dir/$b" "$root/usr/local/bin/$b"
  copy_libs "$root" "$bin_dir/$b"
done

pause_root="$work/pause"
new_root "$pause_root"
gcc -static -O2 -o "$pause_root/pause" hack/images/pause.c
strip "$pause_root/pause"

busybox_root="$work/busybox"
new_root "$busybox_root"
cp /bin/busybox "$busybox_root/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$busybox_root/usr/bin/$applet" ] || ln -s busybox "$busybox_root/usr/bin/$applet"
done

sidecar_root() {
  local name="$1" r="$work/$1"
  new_root "$r"
  cp "$tools_bin/$name" "$r/$name"
}
for s in csi-provisioner csi-attacher csi-resizer; do sidecar_root "$s"; done

echo "==> images: OCI archives in $out"
oci() { python3 hack/oci-image.py "$@"; }
oci "$root" "localhost/blockvol:$tag" "$out/blockvol.tar" --entrypoint '["/usr/local/bin/blockvol-agent"]' &
blockvol_oci=$!
oci "$pause_root" "localhost/pause:$tag" "$out/pause.tar" --entrypoint '["/pause"]'
oci "$busybox_root" "localhost/busybox:$tag" "$out/busybox.tar" --cmd '["sh"]'
for s in csi-provisioner csi-attacher csi-resizer; do
  oci "$work/$s" "localhost/$s:$tag" "$out/$s.tar" --entrypoint "[\"/$s\"]"
done
wait "$blockvol_oci"
# What went into the blockvol image, for reading.
(cd "$root" && find . ! -type d | sed 's|^\./|/|' | LC_ALL=C sort) >"$out/blockvol.files"

archives=(blockvol pause busybox csi-provisioner csi-attacher csi-resizer)
for sock in "${loads[@]}"; do
  for a in "${archives[@]}"; do
    ctr --address "$sock" -n k8s.io images import "$out/$a.tar" >/dev/null
  done
  echo "    loaded into $sock"
done
if [ "$docker_load" = yes ]; then
  for a in "${archives[@]}"; do docker load -i "$out/$a.tar"; done
fi
if [ -n "$kind_cluster" ]; then
  for a in "${archives[@]}"; do kind load image-archive "$out/$a.tar" --name "$kind_cluster"; done
fi
echo "==> images: done in $((SECONDS - start))s"
du -sh "$out"/*.tar
