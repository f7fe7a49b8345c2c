#!/usr/bin/env bash
# Runs the blockvol real-node suite (e2e/tests/real_nodes.rs) against a kind cluster, for
# machines with Docker (needs docker, kind, kubectl, helm, cargo). Without Docker,
# `cargo test -p e2e --test real_nodes` starts hack/cluster.sh instead.
#
#   hack/e2e-kind.sh                  # create the cluster, build and load the images,
#                                     # install the chart, run the suite, delete the cluster
#   KEEP_CLUSTER=1 hack/e2e-kind.sh   # leave the cluster running afterwards
#
# Steps:
#   1. kind create cluster from deploy/kind.yaml (3 workers; each worker's
#      /var/lib/blockvol is /tmp/blockvol-kind/worker-N on the host), node image
#      $KIND_NODE_IMAGE (the chart needs Kubernetes 1.34 or later).
#   2. hack/images.sh --kind: builds the images hack/cluster.sh uses (localhost/blockvol,
#      localhost/csi-provisioner|csi-attacher|csi-resizer, localhost/pause,
#      localhost/busybox, all tagged dev) as OCI archives and loads each into every kind
#      node with `kind load image-archive`.
#   3. helm install charts/blockvol with exactly the image values hack/cluster.sh sets
#      (image pull policy Never: the images exist only on the nodes), --wait.
#   4. cargo test -p e2e --test real_nodes with BLOCKVOL_REAL_CLUSTER_KUBECONFIG set to
#      the kind cluster: the suite then uses that cluster instead of starting
#      hack/cluster.sh, and leaves it up (step 5 deletes it).
#   5. kind delete cluster (unless KEEP_CLUSTER is set).
#
# Environment: KIND_CLUSTER_NAME (default blockvol-e2e), KIND_NODE_IMAGE (default
# kindest/node:v1.34.0), ROLLOUT_TIMEOUT (default 300s), KEEP_CLUSTER.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KIND_CLUSTER_NAME:-blockvol-e2e}"
NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.34.0}"
KUBECONFIG_FILE="${TMPDIR:-/tmp}/blockvol-kind-$CLUSTER.kubeconfig"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-300s}"
# The suite's test pods use localhost/busybox:dev (e2e::realnodes::BUSYBOX_IMAGE), so
# every image is built with the tag dev.
TAG=dev
NS=blockvol-system

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
kind create cluster --name "$CLUSTER" --config deploy/kind.yaml --image "$NODE_IMAGE" \
  --kubeconfig "$KUBECONFIG_FILE"
export KUBECONFIG="$KUBECONFIG_FILE"

BLOCKVOL_IMAGE_TAG="$TAG" hack/images.sh --kind "$CLUSTER"

# The same image values as hack/cluster.sh (chart_image_args); everything else default.
image_args=(
  --set image.repository=localhost/blockvol --set "image.tag=$TAG" --set image.pullPolicy=Never
)
for s in provisioner attacher resizer; do
  image_args+=(--set "sidecars.$s.image=localhost/csi-$s:$TAG")
done
helm install blockvol charts/blockvol --namespace "$NS" --create-namespace \
  "${image_args[@]}" --wait --timeout "$ROLLOUT_TIMEOUT"
kubectl -n "$NS" rollout status deployment --timeout "$ROLLOUT_TIMEOUT"
kubectl -n "$NS" rollout status daemonset --timeout "$ROLLOUT_TIMEOUT"

BLOCKVOL_REAL_CLUSTER_KUBECONFIG="$KUBECONFIG_FILE" \
  cargo test -p e2e --locked --test real_nodes -- --nocapture
