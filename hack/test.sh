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

step "benchmark suite, smoke mode (about a minute; bench/run.sh runs the real thing)"
cargo build --locked -q -p node-agent -p operator -p e2e \
  --bin blockvol-agent --bin blockvol-operator --bin blockvol-bench
target/debug/blockvol-bench --mode smoke --out target/bench-smoke --agent-build "dev profile"

echo
echo "all blockvol tests passed"
