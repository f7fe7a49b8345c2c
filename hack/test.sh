#!/usr/bin/env bash
# Runs every blockvol test on this machine: installs what the tests need (system
# packages, the pinned Kubernetes binaries), then lints and runs the test suites. The
# suites include the real-node tests (e2e/tests/real_nodes.rs): they start
# hack/cluster.sh (three kubelets, images built here, the chart installed), run pods
# with PVCs and take the cluster down again.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
hack/deps.sh
if [ -x hack/tools/build.sh ]; then
  hack/tools/build.sh
  # shellcheck disable=SC1091
  source hack/tools/env.sh
fi

step "format (cargo fmt --check)"
cargo fmt --all -- --check

step "layout rules (hack/check-layout.sh)"
hack/check-layout.sh

step "lint (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "CRDs match the Rust types (deploy/crds and the chart's templates/crds)"
cargo test -q --locked -p api --test crds

if command -v helm >/dev/null; then
  step "Helm chart (lint, rendered manifests match)"
  helm lint --quiet charts/blockvol
  hack/render.sh --check
  step "alert rules (promtool check rules, promtool test rules)"
  cargo test -q --locked -p e2e --test monitoring alert_rules
fi

step "tests (cargo test)"
cargo test --workspace --locked

step "Kubernetes' storage suites against csi.blockvol.io (own real-kubelet cluster, ~7 min)"
# Growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this machine's sandbox
# withholds even from root (docs/testing.md): that one online-expansion spec is left out.
env -u KUBECONFIG -u BLOCKVOL_REAL_CLUSTER_KUBECONFIG BLOCKVOL_K8S_E2E_PROCS=6 \
  BLOCKVOL_K8S_E2E_SKIP='\(default fs\)\(allowExpansion\)\] volume-expand should resize volume when PVC is edited while pod is using it' \
  hack/k8s-storage-e2e.sh \
  '\] (provisioning|volumes|volumeMode|volumeIO|subPath|fsgroupchangepolicy|multiVolume|volume-expand|volumeLimits) '

step "benchmark suite, smoke mode (about a minute; bench/run.sh runs the real thing)"
cargo build --locked -q -p node-agent -p operator -p tools \
  --bin blockvol-agent --bin blockvol-operator --bin blockvol-bench
target/debug/blockvol-bench --mode smoke --out target/bench-smoke --agent-build "dev profile"

echo
echo "all blockvol tests passed"
