#!/usr/bin/env bash
# Compares blockvol's NBD server (engine volume on a file, and the same server over a
# plain file) with `nbdkit file` on the same disk, through fio's nbd engine. Runs are
# interleaved (A B C, A B C, ...) so drift hits every server alike; prints the median
# and min–max of each, and the ratio of each blockvol variant to nbdkit.
#
# Usage: bench/nbd_vs_nbdkit.sh [DIR]   (env: REPS=5 RUNTIME_S=8 SIZE_MIB=1024)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-/var/tmp/blockvol-nbd-bench}
REPS=${REPS:-5}
RUNTIME_S=${RUNTIME_S:-8}
SIZE_MIB=${SIZE_MIB:-1024}
WAL_MIB=${WAL_MIB:-256}
PORT_ENGINE=${PORT_ENGINE:-10901}
PORT_RAW=${PORT_RAW:-10902}
PORT_NBDKIT=${PORT_NBDKIT:-10903}

for tool in fio nbdkit nbdinfo python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (hack/deps.sh installs it)" >&2; exit 1; }
done

# The Kubernetes crates are linked into node-agent but not used by nbd_serve; building
# them unoptimized saves many minutes without touching the measured path.
cargo build --release -q -p node-agent --example nbd_serve \
  --config 'profile.release.package.k8s-openapi.opt-level=0' \
  --config 'profile.release.package.kube-client.opt-level=0' \
  --config 'profile.release.package.kube-runtime.opt-level=0' \
  --config 'profile.release.package.kube.opt-level=0' \
  --config 'profile.release.package.api.opt-level=0'
SERVE=target/release/examples/nbd_serve

mkdir -p "$DIR"
rm -f "$DIR"/engine.img "$DIR"/raw.img "$DIR"/nbdkit.img "$DIR"/*.log
truncate -s "${SIZE_MIB}M" "$DIR/nbdkit.img"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

"$SERVE" --file "$DIR/engine.img" --create --size-mib "$SIZE_MIB" --wal-mib "$WAL_MIB" \
  --listen "127.0.0.1:$PORT_ENGINE" >"$DIR/engine.log" 2>&1 &
pids+=($!)
"$SERVE" --file "$DIR/raw.img" --backend raw --create --size-mib "$SIZE_MIB" \
  --listen "127.0.0.1:$PORT_RAW" >"$DIR/raw.log" 2>&1 &
pids+=($!)
nbdkit -f -i 127.0.0.1 -p "$PORT_NBDKIT" file "$DIR/nbdkit.img" >"$DIR/nbdkit.log" 2>&1 &
pids+=($!)

declare -A URI=(
  [engine]="nbd://127.0.0.1:$PORT_ENGINE/vol"
  [raw]="nbd://127.0.0.1:$PORT_RAW/vol"
  [nbdkit]="nbd://127.0.0.1:$PORT_NBDKIT/"
)
TARGETS=(engine raw nbdkit)

for t in "${TARGETS[@]}"; do
  ok=""
  for _ in $(seq 1 100); do
    if nbdinfo --size "${URI[$t]}" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "$t server did not come up; see $DIR/$t.log" >&2; exit 1; }
done

run_fio() { # target workload-args... ; prints fio JSON
  local t=$1; shift
  fio --name=bench --ioengine=nbd --uri="${URI[$t]}" --size="${SIZE_MIB}M" \
    --output-format=json "$@" | sed -n '/^{/,$p'
}

echo "==> preconditioning: sequential fill of every target (reads hit real data)"
for t in "${TARGETS[@]}"; do
  run_fio "$t" --rw=write --bs=1M --iodepth=4 --end_fsync=1 >/dev/null
done

declare -A WORKLOAD=(
  [randwrite-4k-qd16-fsync32]="--rw=randwrite --bs=4k --iodepth=16 --fsync=32"
  [randread-4k-qd16]="--rw=randread --bs=4k --iodepth=16"
  [seqwrite-1m-qd4]="--rw=write --bs=1M --iodepth=4"
)
ORDER=(randwrite-4k-qd16-fsync32 randread-4k-qd16 seqwrite-1m-qd4)

RESULTS="$DIR/results.tsv"
: >"$RESULTS"
for w in "${ORDER[@]}"; do
  for rep in $(seq 1 "$REPS"); do
    for t in "${TARGETS[@]}"; do
      # shellcheck disable=SC2086
      json=$(run_fio "$t" ${WORKLOAD[$w]} --time_based --runtime="$RUNTIME_S" --ramp_time=1)
      read -r iops mibs < <(python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1048576
print(f"{iops:.0f} {bw:.1f}")' <<<"$json")
      printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$t" "$rep" "$iops" "$mibs" | tee -a "$RESULTS"
    done
  done
done

echo
echo "==> medians over $REPS runs of ${RUNTIME_S}s (min-max); ratio = blockvol / nbdkit"
python3 - "$RESULTS" <<'PY'
import statistics, sys, collections
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = collections.defaultdict(list)
for w, t, _, iops, mibs in rows:
    by[(w, t)].append((float(iops), float(mibs)))
workloads = list(dict.fromkeys(r[0] for r in rows))
print(f"{'workload':28} {'target':8} {'IOPS median':>12} {'IOPS min-max':>18} {'MiB/s':>8} {'vs nbdkit':>9}")
for w in workloads:
    base = statistics.median(i for i, _ in by[(w, "nbdkit")])
    for t in ("engine", "raw", "nbdkit"):
        v = by[(w, t)]
        med = statistics.median(i for i, _ in v)
        mib = statistics.median(m for _, m in v)
        lo, hi = min(i for i, _ in v), max(i for i, _ in v)
        print(f"{w:28} {t:8} {med:12.0f} {lo:8.0f}-{hi:<9.0f} {mib:8.1f} {med / base:9.2f}")
PY
