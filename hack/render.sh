#!/usr/bin/env bash
# Renders the Helm chart into deploy/blockvol.yaml (static manifests for kubectl apply,
# the CRDs included: the chart keeps them in templates/crds/).
# With --check, fails when the committed file differs from a fresh render.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-helm}
out=deploy/blockvol.yaml
render() {
  echo "# Rendered from charts/blockvol by hack/render.sh; do not edit."
  echo "# The peer-authentication Secret is not included: create it first with"
  echo "#   kubectl -n blockvol-system create secret generic blockvol-peer-secret \\"
  echo "#     --from-literal=peer-secret=\"\$(head -c 32 /dev/urandom | base64)\""
  "$helm" template blockvol charts/blockvol --namespace blockvol-system --set createPeerSecret=false
}
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$out" <(render) >/dev/null; then
    echo "$out is stale: run hack/render.sh and commit the result" >&2
    diff -u "$out" <(render) | head -40 >&2
    exit 1
  fi
  echo "$out matches the chart"
else
  render > "$out"
  echo "wrote $out"
fi
