#!/usr/bin/env bash
# Runs blockvol locally on this machine.
#
# In this build that means: build the binaries, write the CRDs, and show each
# binary's --help. The full local cluster (control plane, operator, CSI with its
# sidecars, three node agents and a demo PVC) is not assembled by this command yet.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "building blockvol (release)"
cargo build --release --locked --bins

step "CRDs (written to deploy/crds/ and charts/blockvol/crds/)"
cargo run -q --release --locked -p api --bin crdgen
ls -1 deploy/crds/

for bin in blockvol-operator blockvol-agent blockvol-csi; do
  step "$bin --help"
  "target/release/$bin" --help
done

cat <<'MSG'

blockvol is built. This command does not start a local cluster yet: the operator,
node agent and CSI binaries above are the pieces it will run. See README.md,
"What works today", for what each piece does in this build.
MSG
