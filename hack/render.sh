#!/usr/bin/env bash
# Renders the Helm chart into deploy/blockvol.yaml (static manifests for kubectl apply,
# the CRDs included: the chart keeps them in templates/crds/).
# With --check, fails when the committed file differs from a fresh render, and checks that
# the image registry override and imagePullSecrets reach every image and every pod.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-helm}
command -v "$helm" >/dev/null || {
  echo "render: $helm not found; run hack/tools/build.sh helm and put its bin dir on PATH" >&2
  echo "        (or: source hack/tools/env.sh), or set HELM" >&2
  exit 1
}
out=deploy/blockvol.yaml
# helm template assumes an old Kubernetes; render for the one the chart requires.
kube_version=1.34.0
render() {
  echo "# Rendered from charts/blockvol by hack/render.sh; do not edit."
  echo "# The peer-authentication Secret is not included: create it first with"
  echo "#   kubectl -n blockvol-system create secret generic blockvol-peer-secret \\"
  echo "#     --from-literal=peer-secret=\"\$(head -c 32 /dev/urandom | base64)\""
  "$helm" template blockvol charts/blockvol --namespace blockvol-system --kube-version "$kube_version" \
    --set createPeerSecret=false
}
# Renders with a registry override and two pull secrets (one per spelling), the optional
# registrar sidecar on, and checks that every image comes from that registry and every pod
# template names both secrets.
check_overrides() {
  local r images mirrored pods secrets
  r="$("$helm" template blockvol charts/blockvol --namespace blockvol-system --kube-version "$kube_version" \
    --set image.registry=registry.example.com/mirror \
    --set-json 'imagePullSecrets=["regcred",{"name":"othercred"}]' \
    --set sidecars.nodeDriverRegistrar.enabled=true)"
  images=$(grep -cE '^ +image: ' <<<"$r")
  mirrored=$(grep -cE '^ +image: registry\.example\.com/mirror/[^/]' <<<"$r")
  pods=$(grep -cE '^ +containers:$' <<<"$r")
  secrets=$(grep -A2 -E '^ +imagePullSecrets:$' <<<"$r" | grep -cE -- '- name: (regcred|othercred)$')
  if [ "$images" -eq 0 ] || [ "$images" != "$mirrored" ]; then
    echo "image.registry reaches $mirrored of $images images:" >&2
    grep -E '^ +image: ' <<<"$r" | grep -v 'registry\.example\.com/mirror/' >&2
    exit 1
  fi
  if [ "$pods" -eq 0 ] || [ "$secrets" != $((pods * 2)) ]; then
    echo "imagePullSecrets reach $secrets of $((pods * 2)) pod-template entries" >&2
    exit 1
  fi
  echo "image.registry reaches all $images images; imagePullSecrets all $pods pod templates"
}
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$out" <(render) >/dev/null; then
    echo "$out is stale: run hack/render.sh and commit the result" >&2
    diff -u "$out" <(render) | head -40 >&2
    exit 1
  fi
  echo "$out matches the chart"
  check_overrides
else
  # Written to a temporary file first, so a failed render never leaves a partial file.
  tmp="$(mktemp "$out.XXXXXX")"
  trap 'rm -f "$tmp"' EXIT
  render > "$tmp"
  mv "$tmp" "$out"
  echo "wrote $out"
fi
