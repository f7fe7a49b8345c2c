#!/usr/bin/env bash
# The benchmark suite in one command: fio against blockvol volumes served by node agent
# processes (RF1, RF2 syncAll, RF3 syncAll, RF3 async, on a local control plane), against
# `nbdkit file`, and against a local file (libaio, O_DIRECT). Targets are interleaved in
# every repetition; the report has medians, min–max, ratios and agent CPU per I/O.
# Further rows: fio on ext4 through an attached RF3 device against ext4 on a local loop
# device, failover time under a lost-write checker, replica rebuild rate against the
# disk, (--perf) the agents' top functions from `perf record -e cpu-clock -g`, and, only
# when --rows names it, scale: per volume count a fresh 3-agent cluster with that many
# 1 MiB RF3 volumes created at once (time to Ready, idle CPU/memory/API requests, SIGKILL
# of the agent with the most primaries under the lost-write checker, time to delete).
#
# Usage: bench/run.sh [--mode smoke|quick|full] [--reps N] [--runtime-s S] [--size-mib M]
#                     [--targets a,b] [--patterns p,q] [--out DIR] [--work-dir DIR]
#                     [--rows fio,ext4,failover,rebuild,scale] [--skip-rows a,b] [--perf]
#                     [--failover-trials N] [--rebuild-sizes-mib a,b]
#                     [--scale-volumes a,b] [--scale-idle-s S]
#   --mode     smoke: 1 × 1 s per pattern on nbdkit, local, rf1 (about a minute, checks
#              that the suite works; the other row groups are skipped with the reason,
#              scale even when --rows names it);
#              quick (default): 3 × 5 s, 256 MiB, rebuilds of 256 MiB and 1 GiB;
#              full: 5 × 10 s, 1 GiB, rebuilds of 1 GiB and 4 GiB
#   --rows     default: every row group but scale, which runs only when named
#              (e.g. `--rows scale --scale-volumes 100,500`: about 20 minutes here)
#   --out      report directory (default bench/results): <UTC timestamp>.json and .md
#   --work-dir scratch directory on the disk to measure (default /var/tmp/blockvol-bench);
#              a scale row stops when its disk has less than 5 GiB free
# Every option is passed to blockvol-bench (`target/debug/blockvol-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in fio nbdkit nbdinfo; do
  command -v "$tool" >/dev/null || { echo "missing $tool (hack/deps.sh installs it)" >&2; exit 1; }
done
if [ -z "${BLOCKVOL_TOOLS_BIN:-}" ]; then
  # shellcheck source=hack/tools/env.sh
  source hack/tools/env.sh
fi

# The storage path (engine, node-agent) is optimized; everything else keeps the dev
# profile, because release builds of the Kubernetes crates take very long. The agent is
# the same `blockvol-agent` binary users run, only built with these settings.
AGENT_BUILD="dev profile, engine and node-agent at opt-level 3, dependencies at opt-level 1"
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
cargo build --locked -q -p node-agent -p operator -p tools \
  --bin blockvol-agent --bin blockvol-operator --bin blockvol-bench \
  --config 'profile.dev.package.engine.opt-level=3' \
  --config 'profile.dev.package.node-agent.opt-level=3'

exec target/debug/blockvol-bench --agent-build "$AGENT_BUILD" "$@"
