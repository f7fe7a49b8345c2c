#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, without Docker: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler, and three kubelet nodes, each with its own
# containerd, kubelet root, cgroup root, network namespace and node address, so the
# chart's host-network DaemonSet runs once per node without clashes.
#
#   hack/cluster.sh up [--no-chart] [--no-images]   start it; the last line printed is
#                                                  the admin kubeconfig's path
#   hack/cluster.sh down                           stop it and remove every trace
#   hack/cluster.sh status                         print the kubeconfig path if it is up
#
# `up` builds the images (hack/images.sh), loads them into every node's containerd and,
# unless --no-chart, installs charts/blockvol into blockvol-system with only the image
# values pointed at them, then waits until the operator, the CSI controller and the node
# DaemonSet are Ready and the node plugin is registered with every kubelet.
#
# Layout. Addresses live only inside namespaces this script creates: a bridge namespace
# holds the bridge; the control plane's namespace (10.203.0.2) and each node's namespace
# (10.203.0.1N, pods 10.204.N.0/24) hang on it with a veth. Each node's namespace has its
# own PID namespace (its own /proc) and mount namespace too, where /var/lib, /var/log and
# /run are private tmpfs with the node's own directories bound in (/var/lib/kubelet,
# /var/lib/blockvol, /var/lib/cni, /var/lib/containerd, /var/log/pods), so all three use
# the chart's default paths and nothing they mount is visible on the machine. The machine reaches the API server on
# 127.0.0.1:PORT through socat and a unix socket; inside each node namespace the API's
# service address 10.96.0.1:443 is a socat to the control plane (no kube-proxy). Every
# process runs in the freezer cgroup /blockvol-cluster, which `down` freezes and kills in
# one step; the namespaces die with their processes.
#
# Environment: BLOCKVOL_CLUSTER_DIR (default /tmp/blockvol-cluster), BLOCKVOL_IMAGE_TAG
# (default dev), BLOCKVOL_CLUSTER_NODES (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

dir="${BLOCKVOL_CLUSTER_DIR:-/tmp/blockvol-cluster}"
tag="${BLOCKVOL_IMAGE_TAG:-dev}"
nodes="${BLOCKVOL_CLUSTER_NODES:-3}"
cg_name=blockvol-cluster
cp_ip=10.203.0.2
service_ip=10.96.0.1
sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)
host_dirs=(/var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/netns /opt/containerd)
# cgroup v1 hierarchies the kubelet needs its cgroup root in.
cg_controllers=(cpu cpuacct cpuset memory pids blkio devices freezer hugetlb systemd)

log() { printf '==> cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: %s\n' "$*" >&2; exit 1; }
node_ip() { printf '10.203.0.%d' $((10 + $1)); }
node_name() { printf 'bv-node-%d' "$1"; }

cg_path() { # controller, relative path
  local c="$1" base="/sys/fs/cgroup/$1"
  [ "$1" = systemd ] && base=/sys/fs/cgroup/systemd
  printf '%s/%s' "$base" "$2"
}

# ---------------------------------------------------------------------------------------
# down

# Detaches loop devices whose backing file is under a node path (the kubelet's block
# volumes, the agents' FUSE files); other users' loop devices are left alone.
detach_loops() {
  local dev file
  losetup -n -l -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case "$file" in
      /var/lib/kubelet/* | /var/lib/blockvol/* | "$dir"/*) losetup -d "$dev" 2>/dev/null || true ;;
    esac
  done
}

cgroup_pids() {
  local f
  [ -d "$(cg_path freezer "$cg_name")" ] || return 0
  find "$(cg_path freezer "$cg_name")" -name cgroup.procs -exec cat {} + 2>/dev/null
}

kill_all() {
  local freezer waited=0 c
  freezer="$(cg_path freezer "$cg_name")"
  [ -d "$freezer" ] || return 0
  # A failed `up` tears down from the shell that joined the cluster's cgroups to start
  # it (make_cgroups): leave them first, or freezing the cgroup would freeze this
  # teardown too.
  for c in freezer pids; do
    [ -w "$(cg_path "$c" "")cgroup.procs" ] || continue
    echo $$ >"$(cg_path "$c" "")cgroup.procs" 2>/dev/null || true
    echo "$BASHPID" >"$(cg_path "$c" "")cgroup.procs" 2>/dev/null || true
  done
  # Frozen processes cannot fork while they are being killed.
  echo FROZEN >"$freezer/freezer.state" 2>/dev/null || true
  for _ in $(seq 1 50); do
    [ "$(cat "$freezer/freezer.state" 2>/dev/null)" = FROZEN ] && break
    sleep 0.1
  done
  cgroup_pids | xargs -r kill -KILL 2>/dev/null || true
  echo THAWED >"$freezer/freezer.state" 2>/dev/null || true
  while [ -n "$(cgroup_pids)" ]; do
    waited=$((waited + 1))
    [ $waited -le 300 ] || { log "processes still alive after 30 s: $(cgroup_pids | xargs)"; break; }
    cgroup_pids | xargs -r kill -KILL 2>/dev/null || true
    sleep 0.1
  done
}

remove_cgroups() {
  local base
  # Every hierarchy, also those only runc writes to (the cgroup2 one of a hybrid setup).
  for base in /sys/fs/cgroup/*/"$cg_name"; do
    [ -d "$base" ] || continue
    # Deepest first; a cgroup dir holds only control files once its children are gone.
    find "$base" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$base" ] && log "cgroup $base still present"
  done
  return 0
}

down() {
  detach_loops
  kill_all
  # Loop devices whose last user just died; their FUSE mounts go with the namespaces.
  detach_loops
  if [ -f "$dir/sysctls" ]; then
    while IFS='=' read -r key value; do
      sysctl -q -w "$key=$value" >/dev/null || log "cannot restore $key"
    done <"$dir/sysctls"
  fi
  remove_cgroups
  # Host directories the kubelet or containerd create despite their settings, only if
  # they did not exist before `up` (recorded then) and are empty.
  if [ -f "$dir/created-host-dirs" ]; then
    while read -r d; do
      [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
    done <"$dir/created-host-dirs"
  fi
  # Mounts under the cluster dir on the machine's own namespace (none are made there;
  # this only guards against a half-finished `up`).
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$dir"
  log "down"
}

# ---------------------------------------------------------------------------------------
# up

pki() {
  local p="$dir/pki"
  mkdir -p "$p"
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$p/ca.key" -subj "/CN=blockvol-cluster-ca" -days 30 -out "$p/ca.crt" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/sa.key" 2>/dev/null
  openssl ec -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  cert() { # name subject [sans]
    openssl ecparam -name prime256v1 -genkey -noout -out "$p/$1.key" 2>/dev/null
    openssl req -new -key "$p/$1.key" -subj "$2" -out "$p/$1.csr" 2>/dev/null
    local ext="$p/$1.ext"
    {
      echo "basicConstraints=CA:FALSE"
      echo "keyUsage=digitalSignature,keyEncipherment"
      if [ -n "${3:-}" ]; then
        echo "extendedKeyUsage=serverAuth,clientAuth"
        echo "subjectAltName=$3"
      else
        echo "extendedKeyUsage=clientAuth"
      fi
    } >"$ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -days 30 -extfile "$ext" -out "$p/$1.crt" 2>/dev/null
  }
  cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:$cp_ip,IP:$service_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=blockvol-admin"
  cert kcm "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  for n in $(seq 1 "$nodes"); do
    cert "node-$n" "/O=system:nodes/CN=system:node:$(node_name "$n")"
  done
}

kubeconfig() { # file server cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: blockvol
  cluster: {server: "$2", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: user
  user: {client-certificate: "$dir/pki/$3.crt", client-key: "$dir/pki/$3.key"}
contexts:
- name: blockvol
  context: {cluster: blockvol, user: user}
current-context: blockvol
EOF
}

# Starts "$@" detached, its output in LOGFILE, inside the cluster's cgroup (inherited).
spawn() { # logfile command...
  local logf="$1"
  shift
  setsid "$@" </dev/null >>"$logf" 2>&1 &
  echo $!
}

# A process that only holds namespaces: `unshare` into new ones, then wait forever.
holder() { # pidfile unshare-flags...
  local pidf="$1"
  shift
  # The pid as the machine sees it (in a new PID namespace $$ is 1): /proc is still the
  # machine's, and the shell opens /proc/self/stat itself.
  setsid unshare "$@" -- sh -c 'exec 3</proc/self/stat; read -r p _ <&3; exec 3<&-; echo "$p" >"$0"; exec sleep infinity' "$pidf" </dev/null >/dev/null 2>&1 &
  local w=0
  until [ -s "$pidf" ]; do
    w=$((w + 1))
    [ $w -le 100 ] || die "namespace holder did not start"
    sleep 0.05
  done
  cat "$pidf"
}

wait_for() { # description timeout-seconds command...
  local what="$1" timeout="$2" start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$timeout" ] || die "timed out after ${timeout}s waiting for $what (logs: $dir/logs)"
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

make_cgroups() {
  local c base sub
  for c in "${cg_controllers[@]}"; do
    [ -d "$(cg_path "$c" "")" ] || continue
    for sub in "" /system $(for n in $(seq 1 "$nodes"); do printf ' /node-%d' "$n"; done); do
      base="$(cg_path "$c" "$cg_name$sub")"
      mkdir -p "$base"
      if [ "$c" = cpuset ]; then
        cat "$(dirname "$base")/cpuset.cpus" >"$base/cpuset.cpus"
        cat "$(dirname "$base")/cpuset.mems" >"$base/cpuset.mems"
      fi
    done
  done
  # This script and everything it starts: the daemons, the holders, containerd's shims.
  echo $$ >"$(cg_path freezer "$cg_name/system")/cgroup.procs"
  echo $$ >"$(cg_path pids "$cg_name/system")/cgroup.procs"
}

start_node() { # n
  local n="$1" nd="$dir/node-$n" name ip pid
  name="$(node_name "$n")"
  ip="$(node_ip "$n")"
  mkdir -p "$nd"/{kubelet,blockvol,cni,containerd,pods,containers,cni-conf,state}
  pid="$(cat "$dir/holder-node-$n.pid")"

  # Addresses and routes: own address, the API service address on lo, the other nodes'
  # pod ranges through them.
  local ns=(nsenter -t "$pid" -n)
  "${ns[@]}" ip link set lo up
  "${ns[@]}" ip addr add "$ip/24" dev eth0
  "${ns[@]}" ip link set eth0 up
  "${ns[@]}" ip addr add "$service_ip/32" dev lo
  for m in $(seq 1 "$nodes"); do
    [ "$m" = "$n" ] || "${ns[@]}" ip route add "10.204.$m.0/24" via "$(node_ip "$m")"
  done
  "${ns[@]}" sysctl -q -w net.ipv4.ip_forward=1

  cat >"$nd/cni-conf/10-blockvol.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "blockvol-cluster", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.204.$n.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "$nd/state"
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:$tag"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni-conf"
EOF
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
healthzBindAddress: $ip
healthzPort: 10248
cgroupDriver: cgroupfs
cgroupRoot: /$cg_name/node-$n
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
oomScoreAdj: 0
containerRuntimeEndpoint: unix://$nd/containerd.sock
resolvConf: /etc/resolv.conf
serializeImagePulls: false
maxPods: 40
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: "$dir/pki/ca.crt"}
authorization: {mode: AlwaysAllow}
EOF
  kubeconfig "$nd/kubelet.kubeconfig" "https://$cp_ip:6443" "node-$n"

  # The node's private view of the file system: its own /var/lib, /var/log and /run with
  # the node directories bound in at the chart's default paths.
  cat >"$nd/start.sh" <<EOF
set -eu
# The node's own /proc: its PID 1 is the namespace holder, whose mount namespace is the
# node's, so a privileged pod's "nsenter --mount=/proc/1/ns/mnt" (the host-exec pods
# of Kubernetes' storage tests) enters the node's view of the file system.
mount -t proc node-proc /proc
mount -t tmpfs -o mode=755 node-var-lib /var/lib
mount -t tmpfs -o mode=755 node-var-log /var/log
mount -t tmpfs -o mode=755 node-run /run
mkdir -p /var/lib/kubelet /var/lib/blockvol /var/lib/cni /var/lib/containerd /var/log/pods /var/log/containers
mount --bind "$nd/kubelet" /var/lib/kubelet
# Bidirectional mount propagation (the CSI node plugin) needs a shared kubelet dir.
mount --make-rshared /var/lib/kubelet
mount --bind "$nd/blockvol" /var/lib/blockvol
# So does the data dir: the attach launcher's FUSE mounts reach the agent through it.
mount --make-rshared /var/lib/blockvol
mount --bind "$nd/cni" /var/lib/cni
mount --bind "$nd/containerd" /var/lib/containerd
mount --bind "$nd/pods" /var/log/pods
mount --bind "$nd/containers" /var/log/containers
setsid socat TCP-LISTEN:443,bind=$service_ip,reuseaddr,fork TCP:$cp_ip:6443 </dev/null >>"$dir/logs/node-$n-socat.log" 2>&1 &
setsid containerd --config "$nd/containerd.toml" </dev/null >>"$dir/logs/node-$n-containerd.log" 2>&1 &
echo \$! >"$nd/containerd.pid"
EOF
  nsenter -t "$pid" -n -m -p -- sh "$nd/start.sh"
  wait_for "containerd of $name" 30 ctr --address "$nd/containerd.sock" version
}

start_kubelet() { # n
  local n="$1" nd="$dir/node-$n" pid
  pid="$(cat "$dir/holder-node-$n.pid")"
  spawn "$dir/logs/node-$n-kubelet.log" nsenter -t "$pid" -n -m -p -- \
    "$bin/kubelet" --config="$nd/kubelet.yaml" --kubeconfig="$nd/kubelet.kubeconfig" \
    --root-dir=/var/lib/kubelet --hostname-override="$(node_name "$n")" \
    --node-ip="$(node_ip "$n")" -v=1 >"$nd/kubelet.pid"
}

up_failed() {
  local f
  for f in "$dir"/logs/*.log; do
    [ -s "$f" ] || continue
    printf -- '--- %s (last lines)\n' "$f" >&2
    tail -n 15 "$f" >&2
  done
  if [ -n "${BLOCKVOL_CLUSTER_KEEP_ON_FAILURE:-}" ]; then
    log "up failed; left up for a post-mortem ($dir); hack/cluster.sh down removes it"
  else
    log "up failed; taking down"
    down
  fi
}

kc() { "$bin/kubectl" --kubeconfig="$dir/admin.kubeconfig" "$@"; }

node_ready() {
  local ready
  ready="$(kc get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)"
  [ "$ready" -eq "$nodes" ]
}

driver_registered() {
  local count
  count="$(kc get csinodes -o jsonpath='{range .items[*]}{.spec.drivers[*].name}{"\n"}{end}' | grep -c csi.blockvol.io)"
  [ "$count" -eq "$nodes" ]
}

up() {
  local no_chart=no no_images=no
  for a in "$@"; do
    case "$a" in
      --no-chart) no_chart=yes ;;
      --no-images) no_images=yes ;;
      *) die "unknown argument $a" ;;
    esac
  done
  if [ -e "$dir" ]; then
    # A cluster whose processes are all gone (its owner was killed) is cleaned up; a
    # live one is left alone.
    [ -z "$(cgroup_pids)" ] || die "the cluster in $dir is up; hack/cluster.sh down stops it"
    log "removing the remains of a cluster that was not taken down"
    down
  fi
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, mounts, cgroups)"
  for t in containerd runc socat nsenter unshare openssl python3 /usr/lib/cni/bridge; do
    command -v "$t" >/dev/null || die "$t is missing; run hack/deps.sh"
  done
  local start=$SECONDS
  # Only what the cluster runs (hack/images.sh builds the sidecars it packs).
  hack/tools/build.sh etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl helm >&2
  bin="$(hack/tools/build.sh --print-bin)"
  mkdir -p "$dir/logs"
  # From here on, a failure takes down what was started (after showing the logs' ends;
  # BLOCKVOL_CLUSTER_KEEP_ON_FAILURE=1 leaves it up for a post-mortem).
  trap up_failed EXIT

  for s in "${sysctls[@]}"; do printf '%s=%s\n' "$s" "$(sysctl -n "$s")"; done >"$dir/sysctls"
  for d in "${host_dirs[@]}"; do [ -e "$d" ] || echo "$d"; done >"$dir/created-host-dirs"
  make_cgroups
  pki

  log "namespaces and the bridge"
  local br cp
  br="$(holder "$dir/holder-bridge.pid" --net)"
  cp="$(holder "$dir/holder-cp.pid" --net)"
  nsenter -t "$br" -n ip link add br0 type bridge
  nsenter -t "$br" -n ip link set br0 up
  nsenter -t "$br" -n ip link add cp type veth peer name eth0 netns "/proc/$cp/ns/net"
  nsenter -t "$br" -n ip link set cp master br0 up
  nsenter -t "$cp" -n ip link set lo up
  nsenter -t "$cp" -n ip addr add "$cp_ip/24" dev eth0
  nsenter -t "$cp" -n ip link set eth0 up
  for n in $(seq 1 "$nodes"); do
    local np
    np="$(holder "$dir/holder-node-$n.pid" --net --mount --propagation private --pid --fork)"
    nsenter -t "$br" -n ip link add "n$n" type veth peer name eth0 netns "/proc/$np/ns/net"
    nsenter -t "$br" -n ip link set "n$n" master br0 up
    nsenter -t "$cp" -n ip route add "10.204.$n.0/24" via "$(node_ip "$n")"
  done

  log "control plane"
  local cpn=(nsenter -t "$cp" -n)
  spawn "$dir/logs/etcd.log" "${cpn[@]}" "$bin/etcd" --name=blockvol --data-dir="$dir/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=blockvol=http://127.0.0.1:2380 --unsafe-no-fsync=true --log-level=warn >/dev/null
  spawn "$dir/logs/kube-apiserver.log" "${cpn[@]}" "$bin/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --advertise-address="$cp_ip" \
    --secure-port=6443 --cert-dir="$dir/apiserver-certs" \
    --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
    --client-ca-file="$dir/pki/ca.crt" \
    --kubelet-client-certificate="$dir/pki/admin.crt" --kubelet-client-key="$dir/pki/admin.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --service-cluster-ip-range=10.96.0.0/16 --profiling=false -v=1 >/dev/null
  spawn "$dir/logs/socat-apiserver-cp.log" "${cpn[@]}" socat \
    "UNIX-LISTEN:$dir/apiserver.sock,fork,unlink-early" TCP:127.0.0.1:6443 >/dev/null
  local port
  port="$(free_port)"
  spawn "$dir/logs/socat-apiserver-host.log" socat \
    "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$dir/apiserver.sock" >/dev/null
  kubeconfig "$dir/admin.kubeconfig" "https://127.0.0.1:$port" admin
  kubeconfig "$dir/kcm.kubeconfig" "https://127.0.0.1:6443" kcm
  kubeconfig "$dir/scheduler.kubeconfig" "https://127.0.0.1:6443" scheduler
  wait_for "kube-apiserver" 90 kc get --raw /readyz
  spawn "$dir/logs/kube-controller-manager.log" "${cpn[@]}" "$bin/kube-controller-manager" \
    --kubeconfig="$dir/kcm.kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false \
    --use-service-account-credentials=true --service-account-private-key-file="$dir/pki/sa.key" \
    --root-ca-file="$dir/pki/ca.crt" --cluster-signing-cert-file="$dir/pki/ca.crt" \
    --cluster-signing-key-file="$dir/pki/ca.key" -v=1 >/dev/null
  spawn "$dir/logs/kube-scheduler.log" "${cpn[@]}" "$bin/kube-scheduler" \
    --kubeconfig="$dir/scheduler.kubeconfig" --bind-address=127.0.0.1 --secure-port=0 \
    --leader-elect=false -v=1 >/dev/null

  log "nodes: containerd"
  for n in $(seq 1 "$nodes"); do start_node "$n"; done
  if [ "$no_images" = no ]; then
    local loads=()
    for n in $(seq 1 "$nodes"); do loads+=(--load "$dir/node-$n/containerd.sock"); done
    hack/images.sh "${loads[@]}" >&2
  fi
  log "nodes: kubelet"
  for n in $(seq 1 "$nodes"); do start_kubelet "$n"; done
  wait_for "$nodes Ready nodes" 120 node_ready
  log "control plane and $nodes nodes Ready after $((SECONDS - start))s"

  if [ "$no_chart" = no ]; then
    log "helm install charts/blockvol"
    kc create namespace blockvol-system >/dev/null
    HELM_CACHE_HOME="$dir/helm/cache" HELM_CONFIG_HOME="$dir/helm/config" HELM_DATA_HOME="$dir/helm/data" \
      "$bin/helm" --kubeconfig="$dir/admin.kubeconfig" install blockvol charts/blockvol \
      --namespace blockvol-system $(chart_image_args) --wait --timeout 5m >&2
    wait_for "the node plugin registered on $nodes nodes" 120 driver_registered
    log "chart Ready after $((SECONDS - start))s"
  fi
  trap - EXIT
  echo "$dir/admin.kubeconfig"
}

# The only values `up` sets: the locally built images.
chart_image_args() {
  printf -- '--set image.repository=localhost/blockvol --set image.tag=%s --set image.pullPolicy=Never ' "$tag"
  local s
  for s in provisioner attacher resizer; do
    printf -- '--set sidecars.%s.image=localhost/csi-%s:%s ' "$s" "$s" "$tag"
  done
}

case "${1:-}" in
  up)
    shift
    up "$@"
    ;;
  down)
    down
    ;;
  status)
    [ -f "$dir/admin.kubeconfig" ] || die "not up"
    echo "$dir/admin.kubeconfig"
    ;;
  *)
    echo "usage: hack/cluster.sh up [--no-chart] [--no-images] | down | status" >&2
    exit 2
    ;;
esac
