#!/usr/bin/env bash
# Runs the blockvol e2e suite against a kind cluster (needs Docker, kind, kubectl, helm).
#
#   hack/e2e-kind.sh          # create the cluster, build and load the image, install, test
#   KEEP_CLUSTER=1 hack/e2e-kind.sh   # leave the cluster running afterwards
#
# Steps: kind create cluster from deploy/kind.yaml (3 workers, /var/lib/blockvol of each
# under /tmp/blockvol-kind on the host) -> hack/images.sh --kind (the same images
# hack/cluster.sh uses) -> helm install charts/blockvol into blockvol-system with those
# images -> wait for the rollout -> cargo test -p e2e with BLOCKVOL_E2E_KUBECONFIG and
# BLOCKVOL_REAL_CLUSTER_KUBECONFIG pointing at the kind cluster, so the real-pod tests
# run there as they run on hack/cluster.sh. Without Docker use hack/cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER="${KIND_CLUSTER_NAME:-blockvol-e2e}"
KUBECONFIG_FILE="${TMPDIR:-/tmp}/blockvol-kind-$CLUSTER.kubeconfig"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-300s}"

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "error: no Docker engine reachable" >&2; exit 1; }

cleanup() {
  if [ -z "${KEEP_CLUSTER:-}" ]; then
    kind delete cluster --name "$CLUSTER" || true
  else
    echo "cluster kept: export KUBECONFIG=$KUBECONFIG_FILE"
  fi
}
trap cleanup EXIT

mkdir -p /tmp/blockvol-kind/worker-{1,2,3}
kind create cluster --name "$CLUSTER" --config deploy/kind.yaml --kubeconfig "$KUBECONFIG_FILE"
export KUBECONFIG="$KUBECONFIG_FILE"

hack/images.sh --kind "$CLUSTER"

helm install blockvol charts/blockvol --namespace blockvol-system --create-namespace \
  --set image.repository=localhost/blockvol --set image.tag=dev --set image.pullPolicy=Never \
  --set sidecars.provisioner.image=localhost/csi-provisioner:dev \
  --set sidecars.attacher.image=localhost/csi-attacher:dev \
  --set sidecars.resizer.image=localhost/csi-resizer:dev \
  --wait --timeout "$ROLLOUT_TIMEOUT"
kubectl -n blockvol-system rollout status deployment --timeout "$ROLLOUT_TIMEOUT"
kubectl -n blockvol-system rollout status daemonset --timeout "$ROLLOUT_TIMEOUT"

BLOCKVOL_E2E_KUBECONFIG="$KUBECONFIG_FILE" BLOCKVOL_REAL_CLUSTER_KUBECONFIG="$KUBECONFIG_FILE" cargo test -p e2e --locked -- --test-threads=1
