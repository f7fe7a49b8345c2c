#!/usr/bin/env bash
# Runs blockvol locally, without Docker: a Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager) with the CRDs, Node objects node-1..3 and the blockvol-system
# namespace; the operator; the CSI controller (with the CSI sidecars if they are built);
# and per node a node agent and a CSI node plugin, each a plain process; then it plays
# the kubelet (blockvol-local mount) to mount the demo PVC on node-1 and writes hello.txt.
#
# Everything runs in the background after this script returns; state, logs and PID files
# live under $BLOCKVOL_LOCAL_DIR (default ./.local-cluster). Stop everything with
# hack/down.sh. Ctrl-C while this script runs stops what it already started.
# A second run reuses the debug build (cargo is incremental) and the cached Go tools.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
STATE="${BLOCKVOL_LOCAL_DIR:-$REPO/.local-cluster}"
BIN="$REPO/target/debug"
NODES=(node-1 node-2 node-3)
# Bounds of the waits below, in seconds.
CLUSTER_READY_TIMEOUT_S=180
PROCESS_SETTLE_TIMEOUT_S=30
PVC_BOUND_TIMEOUT_S=120

T0=$(date +%s.%N)
STEP_T=$T0
STEP_NAME=""
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
step() {
  [ -n "$STEP_NAME" ] && printf '    done in %s\n' "$(elapsed "$STEP_T")"
  STEP_NAME="$*"
  STEP_T=$(date +%s.%N)
  printf '==> [%6s] %s\n' "$(elapsed "$T0")" "$*"
}
note() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# A free loopback TCP port (others may run clusters and tests on this machine).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ -f "$STATE/pids/00-control-plane.pid" ] && kill -0 "$(cat "$STATE/pids/00-control-plane.pid")" 2>/dev/null; then
  die "a local cluster is already running under $STATE; stop it with hack/down.sh first"
fi

interrupted() {
  trap - INT TERM
  printf '\ninterrupted: stopping what was started\n' >&2
  BLOCKVOL_LOCAL_DIR="$STATE" "$REPO/hack/down.sh" || true
  exit 130
}
trap interrupted INT TERM

# start NAME ORDER LOG CMD...: runs CMD in its own session, records its PID.
start() {
  local name=$1 order=$2 log=$3
  shift 3
  setsid "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$STATE/pids/$order-$name.pid"
  # A process that cannot start (bad flag, taken port) usually exits at once; one that
  # serves a socket is up once the socket exists.
  local deadline=$((SECONDS + PROCESS_SETTLE_TIMEOUT_S)) checks=0
  while :; do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "$name exited at start (log: $log)"; }
    if [ -n "${WAIT_SOCKET:-}" ]; then
      [ -S "$WAIT_SOCKET" ] && break
      [ $SECONDS -lt $deadline ] || die "$name did not create $WAIT_SOCKET in ${PROCESS_SETTLE_TIMEOUT_S}s (log: $log)"
    else
      checks=$((checks + 1))
      [ $checks -gt 5 ] && break
    fi
    sleep 0.2
  done
  note "$name: pid $pid, log $log"
}

step "pinned Kubernetes tools (built once, cached)"
if [ -n "${BLOCKVOL_TOOLS_BIN:-}" ] && [ -x "$BLOCKVOL_TOOLS_BIN/kube-apiserver" ]; then
  export PATH="$BLOCKVOL_TOOLS_BIN:$PATH"
else
  hack/tools/build.sh
  # shellcheck source=hack/tools/env.sh
  source hack/tools/env.sh
fi
note "$BLOCKVOL_TOOLS_BIN"

step "building blockvol (debug, incremental)"
# Line tables only: full debug info makes each Kubernetes-client binary ~250 MB.
# Unchanged crates are reused; incremental data inside a crate is not kept (disk).
export CARGO_PROFILE_DEV_DEBUG=line-tables-only CARGO_INCREMENTAL=0
cargo build --bins --locked -p api -p operator -p node-agent -p csi -p tools -p kubectl-blockvol 2>&1 \
  | { grep -Ev '^\s+(Compiling|Checking)' || true; } \
  || die "the build failed"
for b in blockvol-local blockvol-operator blockvol-agent blockvol-csi crdgen kubectl-blockvol; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done

step "CRDs (deploy/crds/)"
"$BIN/crdgen" >/dev/null 2>&1
ls deploy/crds/ | sed 's/^/    /'

rm -rf "$STATE/run" "$STATE/pids" "$STATE/ready"
mkdir -p "$STATE/pids" "$STATE/logs" "$STATE/run"

step "control plane (etcd, kube-apiserver, kube-controller-manager), CRDs, nodes, namespace"
start control-plane 00 "$STATE/logs/control-plane.log" "$BIN/blockvol-local" "$STATE"
deadline=$((SECONDS + CLUSTER_READY_TIMEOUT_S))
until [ -f "$STATE/ready" ]; do
  kill -0 "$(cat "$STATE/pids/00-control-plane.pid")" 2>/dev/null \
    || { tail -n 30 "$STATE/logs/control-plane.log" >&2; die "the control plane failed to start"; }
  [ $SECONDS -lt $deadline ] || die "control plane not ready after ${CLUSTER_READY_TIMEOUT_S}s"
  sleep 0.5
done
export KUBECONFIG="$STATE/kubeconfig"
note "kubeconfig: $KUBECONFIG"
kubectl get nodes -L topology.kubernetes.io/zone | sed 's/^/    /'

step "operator"
start operator 10 "$STATE/logs/operator.log" env KUBECONFIG="$KUBECONFIG" \
  "$BIN/blockvol-operator" --namespace blockvol-system --identity local-operator \
  --metrics-addr "127.0.0.1:$(free_port)"

step "CSI controller"
mkdir -p "$STATE/run/controller"
CONTROLLER_SOCK="$STATE/run/controller/csi.sock"
WAIT_SOCKET="$CONTROLLER_SOCK" start csi-controller 20 "$STATE/logs/csi-controller.log" \
  env KUBECONFIG="$KUBECONFIG" "$BIN/blockvol-csi" --mode controller \
  --endpoint "unix://$CONTROLLER_SOCK"

step "CSI sidecars (csi-provisioner, csi-attacher, csi-resizer)"
SIDECARS=yes
for s in csi-provisioner csi-attacher csi-resizer; do
  [ -x "$BLOCKVOL_TOOLS_BIN/$s" ] || SIDECARS=no
done
if [ $SIDECARS = yes ]; then
  for s in csi-provisioner csi-attacher csi-resizer; do
    start "$s" 30 "$STATE/logs/$s.log" "$BLOCKVOL_TOOLS_BIN/$s" \
      --csi-address="$CONTROLLER_SOCK" --kubeconfig="$KUBECONFIG" --leader-election=false
  done
else
  note "skipped: the CSI sidecars are not built in $BLOCKVOL_TOOLS_BIN; PVCs will not be provisioned"
fi

step "node agents (${NODES[*]})"
AGENTS=no
if "$BIN/blockvol-agent" --help 2>/dev/null | grep -q -- '--data-address'; then
  AGENTS=yes
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/data/$n" "$STATE/run/$n"
    WAIT_SOCKET="$STATE/run/$n/agent.sock" start "agent-$n" 40 "$STATE/logs/agent-$n.log" \
      env KUBECONFIG="$KUBECONFIG" "$BIN/blockvol-agent" --node-name "$n" \
      --namespace blockvol-system --data-dir "$STATE/data/$n" \
      --data-address "127.0.0.1:$(free_port)" --agent-socket "$STATE/run/$n/agent.sock" \
      --peer-secret-file "$STATE/peer-secret" --lease-duration-seconds 10 \
      --metrics-addr "127.0.0.1:$(free_port)" --nbd-socket-dir "$STATE/run/$n/nbd"
  done
else
  note "skipped: blockvol-agent in this build is not the node daemon (it has no --data-address)"
fi

step "CSI node plugins"
if [ $AGENTS = yes ]; then
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/kubelet/$n"
    WAIT_SOCKET="$STATE/run/$n/csi.sock" start "csi-node-$n" 50 "$STATE/logs/csi-node-$n.log" \
      "$BIN/blockvol-csi" --mode node --node-id "$n" \
      --endpoint "unix://$STATE/run/$n/csi.sock" --agent-socket "$STATE/run/$n/agent.sock" \
      --kubelet-dir "$STATE/kubelet/$n"
    # What the kubelet does when node-driver-registrar shows it the plugin: the CSINode
    # entry (node id, topology keys) and the Node's topology label.
    "$BIN/blockvol-local" register --state-dir "$STATE" --node "$n" 2>>"$STATE/logs/kubelet.log" \
      || die "registering the CSI node plugin of $n failed (log: $STATE/logs/kubelet.log)"
  done
else
  note "skipped: a node plugin needs its node agent"
fi

step "StorageClass blockvol (3 replicas, syncAll)"
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: blockvol
provisioner: csi.blockvol.io
parameters:
  replicas: "3"
  durability: syncAll
allowVolumeExpansion: true
volumeBindingMode: Immediate
reclaimPolicy: Delete
YAML
kubectl get storageclass blockvol | sed 's/^/    /'

step "demo PVC"
DEMO=no
if [ $SIDECARS = yes ] && [ $AGENTS = yes ]; then
  DEMO=yes
  kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: demo
  namespace: default
spec:
  storageClassName: blockvol
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
YAML
  kubectl wait --for=jsonpath='{.status.phase}'=Bound pvc/demo --timeout="${PVC_BOUND_TIMEOUT_S}s" \
    | sed 's/^/    /'
  kubectl get pvc demo | sed 's/^/    /'
else
  note "skipped: needs the CSI sidecars and the node agents (see above)"
fi

step "mount the demo volume on node-1 (VolumeAttachment, NodeStageVolume, NodePublishVolume)"
MOUNT=""
if [ $DEMO = yes ]; then
  # blockvol-local plays the kubelet: it registers node-1's plugin in its CSINode, creates
  # the VolumeAttachment (csi-attacher publishes it), then stages (mkfs.ext4 + mount) and
  # publishes (bind mount) through node-1's CSI node plugin. It prints the target path.
  MOUNT=$("$BIN/blockvol-local" mount --state-dir "$STATE" --pvc demo --node node-1 \
    --fs-type ext4 2>>"$STATE/logs/kubelet.log") \
    || { tail -n 20 "$STATE/logs/kubelet.log" >&2; die "mounting the demo volume failed (log: $STATE/logs/kubelet.log)"; }
  echo "hello from blockvol" >"$MOUNT/hello.txt"
  sync "$MOUNT/hello.txt"
  PV=$(kubectl get pvc demo -o jsonpath='{.spec.volumeName}')
  PRIMARY=$(kubectl get bv "$PV" -o jsonpath='{.status.primaryNode}')
  note "mounted at $MOUNT (ext4; PV $PV, primary replica on $PRIMARY)"
  note "$MOUNT/hello.txt: $(cat "$MOUNT/hello.txt")"
  findmnt -n -o SOURCE,FSTYPE,SIZE "$MOUNT" | sed 's/^/    /' || true
else
  note "skipped: there is no bound demo PVC (see above)"
fi

printf '    done in %s\n\n' "$(elapsed "$STEP_T")"
STEP_NAME=""
trap - INT TERM
cat <<MSG
blockvol is running locally (total $(elapsed "$T0")). State, logs and PID files: $STATE

Try next:
  export KUBECONFIG=$KUBECONFIG
  export PATH=$BIN:\$PATH                  # puts kubectl-blockvol on PATH as \`kubectl blockvol\`
  kubectl blockvol get volumes            # sizes, claims, in-sync n/m, attached node
  kubectl get bv,br,bn -A                 # volumes, replicas, nodes
  kubectl get nodes -L topology.kubernetes.io/zone
  tail -f $STATE/logs/operator.log
  ls $STATE/pids/                          # one PID file per process
MSG
if [ -n "$MOUNT" ]; then
  # The device on node-1 is served by node-1's agent, so a failover demo kills another
  # node's agent: the primary's if it is elsewhere, else a replica's.
  VICTIM=node-2
  [ "$PRIMARY" != node-1 ] && VICTIM=$PRIMARY
  cat <<MSG

The demo PVC is mounted on node-1 (M is its path):
  M=$MOUNT
Write to it (the sync makes the data durable on every in-sync replica):
  echo more >>\$M/hello.txt && sync \$M/hello.txt
Its story (replicas, lag, in-sync set, attachment, Events):
  kubectl blockvol describe volume default/demo
Kill a node agent and watch the volume (primary now on $PRIMARY):
  kubectl get bv -w &
  kill \$(cat $STATE/pids/40-agent-$VICTIM.pid)
  cat \$M/hello.txt                        # still readable and writable
Move the mount to node-2 (IO is forwarded to the primary when it is elsewhere):
  $BIN/blockvol-local unmount --state-dir $STATE --pvc demo --node node-1
  M=\$($BIN/blockvol-local mount --state-dir $STATE --pvc demo --node node-2)
MSG
elif [ $AGENTS = yes ]; then
  cat <<MSG
  kill \$(cat $STATE/pids/40-agent-node-1.pid)   # kill a node agent, then watch failover:
  kubectl get bv -w
MSG
fi
cat <<MSG

Stop everything: hack/down.sh
MSG
