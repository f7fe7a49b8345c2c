#!/usr/bin/env bash
# Builds the pinned test tools (etcd, kube-apiserver, kubectl, promtool, ...) from Go
# modules into a cache outside the clone, keyed by a hash of the pinning go.mod/go.sum
# files, so a rebuild only happens when a pin changes. Idempotent; safe to run
# concurrently (a lock serialises builds of the same key). Each module's binaries are
# also kept under a key of that module alone (`modules/<module>-<key>/`), and the bin
# directory of the overall key links to them, so changing one module's pins rebuilds
# only that module.
#
#   hack/tools/build.sh              build whatever is missing
#   hack/tools/build.sh etcd kubectl build only the named binaries (if missing)
#   hack/tools/build.sh --print-bin  print the bin directory for the current pins
#
# Environment: BLOCKVOL_TOOLS_CACHE (default ~/.cache/blockvol-tools).
set -euo pipefail

tools_dir="$(cd "$(dirname "$0")" && pwd)"

if ! command -v go >/dev/null; then
  echo "tools: the Go toolchain (go) is not on PATH; install Go 1.26 or newer" >&2
  exit 1
fi

kube_version="v1.34.4"

# Version stamps the Kubernetes binaries report (kubectl version, /version); without them
# they report v0.0.0-master and client/server skew checks complain.
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X ${pkg}.gitVersion=${kube_version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=34"
  kube_ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done

# module directory | output binary name | Go package
# Binaries of one module are built by a single `go build` so they share compile work; a
# name ending in `.test` is a test binary, built with `go test -c` (Kubernetes' e2e.test).
# The e2e tools are a module group of their own (same pins as `kubernetes`) so adding
# them does not change the `kubernetes` key and rebuild the control plane.
targets=(
  "etcd|etcd|go.etcd.io/etcd/server/v3"
  "kubernetes|kube-apiserver|k8s.io/kubernetes/cmd/kube-apiserver"
  "kubernetes|kubectl|k8s.io/kubernetes/cmd/kubectl"
  "kubernetes|kube-controller-manager|k8s.io/kubernetes/cmd/kube-controller-manager"
  "kubernetes|kube-scheduler|k8s.io/kubernetes/cmd/kube-scheduler"
  "kubernetes|kubelet|k8s.io/kubernetes/cmd/kubelet"
  "csi-sanity|csi-sanity|github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
  "helm|helm|helm.sh/helm/v3/cmd/helm"
  "csi-sidecars|csi-attacher|github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher"
  "csi-sidecars|csi-resizer|github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"
  "csi-provisioner|csi-provisioner|github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
  "promtool|promtool|github.com/prometheus/prometheus/cmd/promtool"
  "kubernetes-e2e|e2e.test|k8s.io/kubernetes/test/e2e"
  "kubernetes-e2e|ginkgo|github.com/onsi/ginkgo/v2/ginkgo"
  "kubernetes-e2e|agnhost|k8s.io/kubernetes/test/images/agnhost"
)

ldflags_for() {
  case "$1" in
    kubernetes) printf '%s' "$kube_ldflags" ;;
    kubernetes-e2e) printf '%s' "$kube_ldflags" ;;
    helm) printf '%s' "-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0" ;;
    csi-sanity) printf '%s' "-s -w -X main.VERSION=v5.6.0" ;;
    *) printf '%s' "-s -w" ;;
  esac
}

modules=()
for t in "${targets[@]}"; do
  m="${t%%|*}"
  [[ " ${modules[*]} " == *" $m "* ]] || modules+=("$m")
done

# The cache key covers everything that changes the output: the pins and the build recipe.
cache_key() {
  {
    for m in "${modules[@]}"; do
      cat "$tools_dir/$m/go.mod" "$tools_dir/$m/go.sum"
    done
    printf '%s\n' "${targets[@]}" "$(declare -f ldflags_for)" "$kube_ldflags" "$(go env GOVERSION GOOS GOARCH)"
  } | sha256sum | cut -c1-16
}

# The key of one module's binaries: its pins, its targets and its recipe.
module_key() {
  local m="$1"
  {
    cat "$tools_dir/$m/go.mod" "$tools_dir/$m/go.sum"
    for t in "${targets[@]}"; do
      [ "${t%%|*}" = "$m" ] && printf '%s\n' "$t"
    done
    ldflags_for "$m"
    go env GOVERSION GOOS GOARCH
  } | sha256sum | cut -c1-16
}

cache_root="${BLOCKVOL_TOOLS_CACHE:-$HOME/.cache/blockvol-tools}"
key="$(cache_key)"
bin_dir="$cache_root/$key/bin"

if [ "${1:-}" = "--print-bin" ]; then
  printf '%s\n' "$bin_dir"
  exit 0
fi

# Binaries asked for on the command line (default: all).
wanted() {
  [ ${#requested[@]} -eq 0 ] && return 0
  [[ " ${requested[*]} " == *" $1 "* ]]
}
requested=("$@")
for r in "${requested[@]}"; do
  found=no
  for t in "${targets[@]}"; do
    IFS='|' read -r _ name _ <<<"$t"
    [ "$name" = "$r" ] && found=yes
  done
  if [ "$found" = no ]; then
    echo "tools: unknown binary '$r'" >&2
    exit 2
  fi
done

all_present() {
  for t in "${targets[@]}"; do
    IFS='|' read -r _ name _ <<<"$t"
    wanted "$name" || continue
    [ -x "$bin_dir/$name" ] || return 1
  done
}

if all_present; then
  echo "==> tools: all present in $bin_dir"
  exit 0
fi

mkdir -p "$bin_dir"
exec 9>"$cache_root/$key/.lock"
flock 9

export GOFLAGS="-trimpath -mod=readonly"
export CGO_ENABLED=0

# Binaries a build of another overall key already made from the same module pins.
for t in "${targets[@]}"; do
  IFS='|' read -r tm name _ <<<"$t"
  wanted "$name" || continue
  [ -x "$bin_dir/$name" ] && continue
  stored="$cache_root/modules/$tm-$(module_key "$tm")/$name"
  if [ -x "$stored" ]; then
    ln -f "$stored" "$bin_dir/$name" 2>/dev/null || cp -f "$stored" "$bin_dir/$name"
  fi
done
if all_present; then
  echo "==> tools: all present in $bin_dir (reused from unchanged module pins)"
  exit 0
fi

echo "==> tools: building into $bin_dir"
total_start=$SECONDS
for m in "${modules[@]}"; do
  store="$cache_root/modules/$m-$(module_key "$m")"
  pkgs=()
  names=()
  for t in "${targets[@]}"; do
    IFS='|' read -r tm name pkg <<<"$t"
    [ "$tm" = "$m" ] || continue
    wanted "$name" || continue
    [ -x "$bin_dir/$name" ] && continue
    pkgs+=("$pkg")
    names+=("$name")
  done
  [ ${#pkgs[@]} -gt 0 ] || continue

  stage="$(mktemp -d "$cache_root/$key/stage.XXXXXX")"
  log="$cache_root/$key/build-$m.log"
  start=$SECONDS
  echo "    $m: go build ${names[*]} (log: $log)"
  # `go build -o dir/` names a binary after its package; single packages get an explicit
  # name because some (etcd's server/v3) would otherwise be named after the module path.
  # Test binaries (`*.test`) are built one by one with `go test -c`.
  cmd_pkgs=()
  cmd_names=()
  test_pkgs=()
  test_names=()
  for i in "${!pkgs[@]}"; do
    if [[ "${names[$i]}" == *.test ]]; then
      test_pkgs+=("${pkgs[$i]}")
      test_names+=("${names[$i]}")
    else
      cmd_pkgs+=("${pkgs[$i]}")
      cmd_names+=("${names[$i]}")
    fi
  done
  if [ ${#cmd_pkgs[@]} -eq 1 ]; then
    out="$stage/${cmd_names[0]}"
  else
    out="$stage/"
  fi
  if ! (
    if [ ${#cmd_pkgs[@]} -gt 0 ]; then
      (cd "$tools_dir/$m" && go build -ldflags="$(ldflags_for "$m")" -o "$out" "${cmd_pkgs[@]}")
    fi &&
      for i in "${!test_pkgs[@]}"; do
        (cd "$tools_dir/$m" && go test -c -ldflags="$(ldflags_for "$m")" \
          -o "$stage/${test_names[$i]}" "${test_pkgs[$i]}") || exit 1
      done
  ) >"$log" 2>&1; then
    cat "$log" >&2
    rm -rf "$stage"
    echo "tools: building $m failed (see above)" >&2
    exit 1
  fi
  for i in "${!pkgs[@]}"; do
    name="${names[$i]}"
    built="$stage/$name"
    [ -x "$built" ] || built="$stage/$(basename "${pkgs[$i]}")"
    mkdir -p "$store"
    mv -f "$built" "$store/$name"
    ln -f "$store/$name" "$bin_dir/$name" 2>/dev/null || cp -f "$store/$name" "$bin_dir/$name"
    printf '    built %-26s %4ds  (%s)\n' "$name" $((SECONDS - start)) "$(du -h "$bin_dir/$name" | cut -f1)"
  done
  rm -rf "$stage"
done
echo "==> tools: done in $((SECONDS - total_start))s"
