#!/usr/bin/env bash
# Runs Kubernetes' own storage test suites (the External.Storage specs of e2e.test,
# pinned at the release of the other tools by hack/tools/kubernetes-e2e) against
# blockvol's CSI driver, as e2e/k8s-storage/testdriver.yaml declares it:
#
#   hack/k8s-storage-e2e.sh [FOCUS]
#
# FOCUS is a regular expression over the spec names, added to 'External.Storage' (e.g.
# 'volumeMode|volumeIO'; default: every External.Storage spec that is not [Disruptive]).
# The cluster is the one of $KUBECONFIG or $BLOCKVOL_REAL_CLUSTER_KUBECONFIG if set
# (blockvol's chart installed); otherwise
# `hack/cluster.sh up` starts one (three kubelets, the chart installed) and `down` takes
# it away at the end. The test images the suites run are built here without a container
# daemon and loaded into each node's containerd under the names e2e.test asks for (see
# `load_test_images`; a cluster of KUBECONFIG that hack/cluster.sh did not start must
# have them already).
#
# Writes the JUnit report, e2e.test's log and a summary to $BLOCKVOL_K8S_E2E_OUT (default
# target/k8s-storage-e2e) and ends with the line
#   k8s-storage-e2e: N passed, M failed, K skipped
# where skipped counts the specs that matched the focus but did not apply to the driver
# (their reasons, grouped, are in summary.txt). Exits non-zero if any spec failed.
#
# Environment: BLOCKVOL_K8S_E2E_PROCS (parallel ginkgo processes, default 3),
# BLOCKVOL_K8S_E2E_SKIP (extra skip regex), BLOCKVOL_K8S_E2E_TIMEOUT (default 60m).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

focus_extra="${1:-}"
out="${BLOCKVOL_K8S_E2E_OUT:-$repo/target/k8s-storage-e2e}"
procs="${BLOCKVOL_K8S_E2E_PROCS:-3}"
timeout="${BLOCKVOL_K8S_E2E_TIMEOUT:-60m}"
tag="${BLOCKVOL_IMAGE_TAG:-dev}"
cluster_dir="${BLOCKVOL_CLUSTER_DIR:-/tmp/blockvol-cluster}"

log() { printf '==> k8s-storage-e2e: %s\n' "$*" >&2; }

hack/tools/build.sh e2e.test ginkgo agnhost kubectl >&2
bin="$(hack/tools/build.sh --print-bin)"

# The images e2e.test runs in its pods for the storage suites, by the names it asks for
# (pull policy IfNotPresent): busybox for the test pods, agnhost for the exec and host-exec
# pods, pause for the pods that only hold a volume, jessie-dnsutils (Debian) for the pods
# that read and write with GNU dd's iflag/oflag=nocache. The suites run only shell
# commands in the nginx pods (sh, chmod, ls), so that name is the busybox image too.
e2e_busybox="registry.k8s.io/e2e-test-images/busybox:1.37.0-1"
e2e_busybox_aliases=("registry.k8s.io/e2e-test-images/nginx:1.14-4")
e2e_agnhost="registry.k8s.io/e2e-test-images/agnhost:2.56"
e2e_dnsutils="registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7"
e2e_pause="registry.k8s.io/pause:3.10.1"
listed="$("$bin/e2e.test" --list-images 2>/dev/null)"
for img in "$e2e_busybox" "${e2e_busybox_aliases[@]}" "$e2e_agnhost" "$e2e_dnsutils" "$e2e_pause"; do
  grep -qxF "$img" <<<"$listed" || {
    echo "k8s-storage-e2e: e2e.test no longer lists $img; update the image names here" >&2
    exit 1
  }
done

# Archives of the e2e images: busybox and pause are hack/images.sh's (retagged); agnhost
# is the pinned agnhost binary on the busybox root (its commands need sh and nsenter);
# jessie-dnsutils is the busybox root with the machine's GNU dd and dash as sh (and their
# libraries).
build_test_images() {
  local images="$repo/target/images" work lib
  for a in busybox pause; do
    [ -f "$images/$a.tar" ] || { echo "k8s-storage-e2e: $images/$a.tar missing (hack/images.sh)" >&2; exit 1; }
  done
  work="$(mktemp -d)"
  # The single layer of an archive written by hack/oci-image.py.
  python3 -c '
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
index = json.load(t.extractfile("index.json"))
manifest = json.load(t.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
layer = manifest["layers"][0]["digest"].split(":")[1]
open(sys.argv[2], "wb").write(t.extractfile("blobs/sha256/" + layer).read())
' "$images/busybox.tar" "$work/busybox.tar.gz"
  mkdir -p "$work/agnhost" "$work/dnsutils"
  tar -xzf "$work/busybox.tar.gz" -C "$work/agnhost"
  tar -xzf "$work/busybox.tar.gz" -C "$work/dnsutils"
  cp "$bin/agnhost" "$work/agnhost/agnhost"
  ln -s agnhost "$work/agnhost/agnhost-2"
  mkdir -p "$work/agnhost/uploads"
  python3 hack/oci-image.py "$work/agnhost" "$e2e_agnhost" "$images/e2e-agnhost.tar" \
    --entrypoint '["/agnhost"]' --cmd '["pause"]'
  # busybox's sh runs its own applets before PATH, so the shell is dash.
  rm -f "$work/dnsutils/usr/bin/dd" "$work/dnsutils/usr/bin/sh"
  cp -L /usr/bin/dd "$work/dnsutils/usr/bin/dd"
  cp -L /bin/dash "$work/dnsutils/usr/bin/sh"
  for lib in $( (ldd /usr/bin/dd; ldd /bin/dash) | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$work/dnsutils$(dirname "$lib")"
    cp -L "$lib" "$work/dnsutils$lib"
  done
  python3 hack/oci-image.py "$work/dnsutils" "$e2e_dnsutils" "$images/e2e-jessie-dnsutils.tar" \
    --cmd '["sh"]'
  rm -rf "$work"
}

load_test_images() { # containerd sockets...
  local sock
  for sock in "$@"; do
    ctr --address "$sock" -n k8s.io images import "$repo/target/images/e2e-agnhost.tar" >/dev/null
    ctr --address "$sock" -n k8s.io images import "$repo/target/images/e2e-jessie-dnsutils.tar" >/dev/null
    for img in "$e2e_busybox" "${e2e_busybox_aliases[@]}"; do
      ctr --address "$sock" -n k8s.io images tag --force "localhost/busybox:$tag" "$img" >/dev/null
    done
    ctr --address "$sock" -n k8s.io images tag --force "localhost/pause:$tag" "$e2e_pause" >/dev/null
  done
}

started=no
finish() {
  local rc=$?
  if [ "$started" = yes ]; then
    log "taking the cluster down"
    hack/cluster.sh down >&2 || rc=1
  fi
  exit $rc
}
trap finish EXIT

kubeconfig="${KUBECONFIG:-${BLOCKVOL_REAL_CLUSTER_KUBECONFIG:-}}"
if [ -z "$kubeconfig" ]; then
  log "hack/cluster.sh up"
  started=yes
  kubeconfig="$(hack/cluster.sh up | tail -n 1)"
fi
# A cluster of hack/cluster.sh (started here or before): load the test images.
if [ "$(readlink -f "$kubeconfig")" = "$(readlink -f "$cluster_dir/admin.kubeconfig" 2>/dev/null || true)" ]; then
  build_test_images
  socks=()
  for s in "$cluster_dir"/node-*/containerd.sock; do socks+=("$s"); done
  load_test_images "${socks[@]}"
  log "test images loaded into ${#socks[@]} nodes"
fi
export KUBECONFIG="$kubeconfig"

rm -rf "$out"
mkdir -p "$out"
focus='External.Storage'
[ -z "$focus_extra" ] || focus="External.Storage.*($focus_extra)"
# Not run: [Disruptive] specs stop kubelets or restart nodes (they need SSH to a node);
# [Feature:...] specs need alpha features or other drivers; "any volume data source"
# runs the hello-populator and volume-data-source-validator images of kubernetes-csi,
# which are not built here.
skip='\[Disruptive\]|\[Feature:|any volume data source'
[ -z "${BLOCKVOL_K8S_E2E_SKIP:-}" ] || skip="$skip|$BLOCKVOL_K8S_E2E_SKIP"

log "e2e.test, focus '$focus', skip '$skip', $procs processes"
start=$SECONDS
set +e
"$bin/ginkgo" --procs="$procs" --timeout="$timeout" --no-color \
  --focus="$focus" --skip="$skip" \
  --junit-report=junit.xml --output-dir="$out" \
  "$bin/e2e.test" -- \
  --kubeconfig="$KUBECONFIG" --provider=local --repo-root="$repo" \
  --storage.testdriver="$repo/e2e/k8s-storage/testdriver.yaml" \
  --report-dir="$out" --disable-log-dump --allowed-not-ready-nodes=0 \
  >"$out/e2e.log" 2>&1
e2e_rc=$?
set -e
elapsed=$((SECONDS - start))
log "e2e.test exited $e2e_rc after ${elapsed}s (log: $out/e2e.log)"

if [ ! -s "$out/junit.xml" ]; then
  tail -n 30 "$out/e2e.log" >&2
  echo "k8s-storage-e2e: no JUnit report (e2e.test exited $e2e_rc before writing one)" >&2
  exit 1
fi
python3 - "$out/junit.xml" "$elapsed" "$out/junit-blockvol.xml" >"$out/summary.txt" <<'EOF'
import collections, re, sys, xml.etree.ElementTree as ET
# Specs filtered out by focus/skip are in the report as skipped without a reason of
# their own; those skipped at run time carry the reason the suite gave. The specs that
# ran or were skipped at run time also go to junit-blockvol.xml.
root = ET.parse(sys.argv[1]).getroot()
passed, failed, skipped = [], [], collections.defaultdict(list)
kept = ET.Element("testsuite", name="External Storage [Driver: csi.blockvol.io]")
for case in root.iter("testcase"):
    name = re.sub(r"^\[It\] ", "", case.get("name", ""))
    if not name.startswith("External Storage [Driver: csi.blockvol.io]"):
        continue
    s = case.find("skipped")
    if s is not None and (s.get("message") or "").strip() in ("", "skipped"):
        continue  # not selected
    kept.append(case)
    f = case.find("failure") if case.find("failure") is not None else case.find("error")
    if f is not None:
        why = " ".join((f.get("message") or "").split())[:240]
        failed.append(f"{name}\n       {why}")
        continue
    if s is None:
        passed.append(name)
        continue
    msg = (s.get("message") or "").strip()
    reason = re.sub(r"^skipped - ", "", msg).splitlines()[0]
    # Group by the suite's reason without the driver/pattern specifics.
    skipped[reason].append(name)
print(f"duration: {sys.argv[2]}s")
print(f"passed: {len(passed)}")
for n in sorted(passed):
    print(f"  PASS {n}")
print(f"failed: {len(failed)}")
for n in sorted(failed):
    print(f"  FAIL {n}")
print(f"skipped: {sum(len(v) for v in skipped.values())}")
for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
    print(f"  {len(names):4d} x {reason}")
kept.set("tests", str(len(kept)))
kept.set("failures", str(len(failed)))
kept.set("skipped", str(sum(len(v) for v in skipped.values())))
ET.ElementTree(kept).write(sys.argv[3], encoding="unicode")
print(f"k8s-storage-e2e: {len(passed)} passed, {len(failed)} failed, "
      f"{sum(len(v) for v in skipped.values())} skipped")
EOF
grep -E '^(failed|  FAIL|skipped|  +[0-9]+ x )' "$out/summary.txt" >&2 || true
tail -n 1 "$out/summary.txt"
[ "$e2e_rc" -eq 0 ]
