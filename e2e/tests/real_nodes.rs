//! blockvol on real kubelet nodes (`hack/cluster.sh`): three kubelets with their own
//! containerd, the chart installed with the locally built images, and pods using PVCs.
//!
//! One test brings the cluster up once and runs the scenarios in order, because start-up
//! dominates: a filesystem PVC written and read back by a pod on one node; the pod
//! deleted and a new one placed on another node by node affinity, which must see the same
//! bytes; a raw block PVC written and read back with direct IO; a mounted xfs PVC grown
//! online, seen by the pod as a larger filesystem; a lost-write checker pod on a raw
//! block PVC while agents are killed (pod force-deleted, container killed) and `helm
//! upgrade` rolls the chart; `kubectl drain` of the node of a Deployment's pod on an xfs
//! PVC, whose replacement elsewhere must read the same bytes; then
//! `hack/cluster.sh down`, after
//! which nothing of the cluster may remain on the machine. The cluster is taken down when the test fails too (drop guard).
//!
//! Needs root, the Debian packages of hack/deps.sh and the pinned tools; it runs the
//! whole stack, so it takes minutes.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::realnodes::{BUSYBOX_IMAGE, HostTraces, RealCluster};
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::json;

const NS: &str = "real-nodes";
/// The chart's namespace (`hack/cluster.sh up` installs it there).
const CHART_NS: &str = "blockvol-system";
/// How long a pod may take from creation to completion (provisioning three replicas,
/// attaching, formatting, the IO itself).
const POD_TIMEOUT: Duration = Duration::from_secs(300);

/// The nodes pods may run on (not tainted NoSchedule), sorted by name.
async fn worker_nodes(cluster: &RealCluster) -> Vec<String> {
    let nodes = Api::<Node>::all(cluster.api().client())
        .list(&ListParams::default())
        .await
        .expect("nodes");
    let mut names: Vec<String> = nodes
        .items
        .into_iter()
        .filter(|n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.effect == "NoSchedule"))
        })
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    names
}

async fn create_namespace(cluster: &RealCluster) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(cluster.api().client())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

async fn create_pvc(cluster: &RealCluster, name: &str, class: &str, mode: &str, size: &str) {
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": mode,
            "resources": {"requests": {"storage": size}},
        }
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(cluster.api().client(), NS)
        .create(&PostParams::default(), &pvc)
        .await
        .expect("pvc");
}

/// A pod running `script` in busybox with the PVC at /data, required onto `node` or
/// (with `avoid`) onto any node but that one. Its termination message is the script's
/// last output line written to /dev/termination-log.
fn pod(name: &str, pvc: &str, script: &str, node: &str, avoid: bool) -> Pod {
    pod_with(name, pvc, script, node, avoid, false)
}

/// As [`pod`]; with `block` the PVC is a raw device at /dev/xvda instead of a mount.
fn pod_with(name: &str, pvc: &str, script: &str, node: &str, avoid: bool, block: bool) -> Pod {
    let operator = if avoid { "NotIn" } else { "In" };
    let attach = if block {
        json!({"volumeDevices": [{"name": "data", "devicePath": "/dev/xvda"}]})
    } else {
        json!({"volumeMounts": [{"name": "data", "mountPath": "/data"}]})
    };
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": operator, "values": [node]
                }]}]
            }}},
            "containers": [{
                "name": "io",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-ec", script],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}],
        }
    });
    for (k, v) in attach.as_object().unwrap() {
        pod["spec"]["containers"][0][k] = v.clone();
    }
    serde_json::from_value(pod).unwrap()
}

/// Runs `pod` to completion; returns (node, termination message). Panics with the pod's
/// status and log when it fails or times out.
async fn run_pod(cluster: &RealCluster, pod: Pod) -> (String, String) {
    let name = pod.metadata.name.clone().unwrap();
    Api::<Pod>::namespaced(cluster.api().client(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_pod_done(cluster, &name).await
}

/// Waits until pod `name` has finished; returns (node, termination message). Panics
/// with the pod's status and log when it fails or times out.
async fn wait_pod_done(cluster: &RealCluster, name: &str) -> (String, String) {
    let pods = Api::<Pod>::namespaced(cluster.api().client(), NS);
    let name = name.to_owned();
    let done = tokio::time::timeout(
        POD_TIMEOUT,
        await_condition(pods.clone(), &name, |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
        }),
    )
    .await;
    let current = pods.get(&name).await.expect("get pod");
    let phase = current
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if done.is_err() || phase != "Succeeded" {
        let log = cluster
            .api()
            .kubectl(["-n", NS, "logs", &name])
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let events = cluster
            .api()
            .kubectl(["-n", NS, "get", "events", "--sort-by=.lastTimestamp"])
            .await
            .unwrap_or_default();
        panic!(
            "pod {name} did not succeed (phase {phase:?}, timed out: {}):\nstatus: {:?}\nlog:\n{log}\nevents:\n{events}",
            done.is_err(),
            current.status
        );
    }
    let node = current.spec.and_then(|s| s.node_name).unwrap_or_default();
    let message = current
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.state)
        .and_then(|s| s.terminated)
        .and_then(|t| t.message)
        .unwrap_or_default();
    (node, message.trim().to_owned())
}

async fn delete_pod(cluster: &RealCluster, name: &str) {
    let pods = Api::<Pod>::namespaced(cluster.api().client(), NS);
    let uid = pods
        .get(name)
        .await
        .expect("get pod")
        .metadata
        .uid
        .unwrap_or_default();
    pods.delete(name, &DeleteParams::default())
        .await
        .expect("delete pod");
    tokio::time::timeout(
        POD_TIMEOUT,
        await_condition(pods, name, conditions::is_deleted(&uid)),
    )
    .await
    .expect("pod deleted in time")
    .expect("watch");
}

/// Writes 32 MiB of random data and its checksum, syncs, drops nothing from the cache
/// (the read-back in the second pod comes from another node's fresh mount).
const WRITE: &str = "head -c 33554432 /dev/urandom > /data/payload; \
    sum=$(sha256sum /data/payload | cut -d' ' -f1); echo \"$sum\" > /data/sum; sync; \
    [ \"$(sha256sum /data/payload | cut -d' ' -f1)\" = \"$sum\" ]; \
    echo \"$sum\" > /dev/termination-log";
/// Reads the payload back and checks it against the checksum written with it.
const READ: &str = "sum=$(sha256sum /data/payload | cut -d' ' -f1); \
    [ \"$sum\" = \"$(cat /data/sum)\" ]; echo \"$sum\" > /dev/termination-log";

/// Writes 8 MiB of random data to the raw device with direct IO and reads it back.
const RAW_IO: &str = "head -c 8388608 /dev/urandom > /tmp/payload; \
    dd if=/tmp/payload of=/dev/xvda bs=1M oflag=direct conv=fsync 2>/dev/null; \
    a=$(sha256sum /tmp/payload | cut -d' ' -f1); \
    b=$(dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); \
    [ \"$a\" = \"$b\" ]; echo \"$a\" > /dev/termination-log";
/// Reports the filesystem size (KiB) before and after it grows past 400000 KiB.
const GROW: &str = "size() { df -k /data | tail -1 | awk '{print $2}'; }; before=$(size); \
    while [ \"$(size)\" -le 400000 ]; do sleep 1; done; \
    echo \"$before $(size)\" > /dev/termination-log";
/// A StorageClass like the chart's, with xfs (its online growth needs no extra
/// capability, unlike ext4's on some hosts).
const XFS_CLASS: &str = "real-nodes-xfs";

async fn create_storage_class_xfs(cluster: &RealCluster) {
    let sc: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": XFS_CLASS},
        "provisioner": "csi.blockvol.io",
        "allowVolumeExpansion": true,
        "volumeBindingMode": "WaitForFirstConsumer",
        "parameters": {"replicas": "3", "durability": "syncAll", "fsType": "xfs"},
    }))
    .unwrap();
    Api::<StorageClass>::all(cluster.api().client())
        .create(&PostParams::default(), &sc)
        .await
        .expect("storage class");
}

/// Writes a payload once (first start), verifies it on every later start, then idles.
const MOVER: &str = "if [ -f /data/sum ]; then \
      s=$(sha256sum /data/payload | cut -d' ' -f1); \
      if [ \"$s\" = \"$(cat /data/sum)\" ]; then echo \"verified $s\"; else echo \"mismatch $s\"; fi; \
    else \
      head -c 16777216 /dev/urandom > /data/payload; \
      sha256sum /data/payload | cut -d' ' -f1 > /data/sum; sync; echo \"wrote $(cat /data/sum)\"; \
    fi; exec sleep 1000000";

/// The pods of the `mover` Deployment: (name, node, running).
async fn mover_pods(cluster: &RealCluster) -> Vec<(String, String, bool)> {
    Api::<Pod>::namespaced(cluster.api().client(), NS)
        .list(&ListParams::default().labels("app=mover"))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            (
                p.metadata.name.unwrap_or_default(),
                p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                running,
            )
        })
        .collect()
}

/// Polls until a running `mover` pod not on `avoid` logs a line starting with `prefix`;
/// returns (pod, node, line).
async fn wait_mover_log(
    cluster: &RealCluster,
    avoid: &str,
    prefix: &str,
) -> (String, String, String) {
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        for (pod, node, running) in mover_pods(cluster).await {
            if !running || node == avoid {
                continue;
            }
            let log = cluster
                .api()
                .kubectl(["-n", NS, "logs", &pod])
                .await
                .unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.starts_with(prefix)) {
                return (pod, node, line.to_owned());
            }
            assert!(
                !log.contains("mismatch"),
                "{pod} on {node} read other bytes: {log}"
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no running mover pod off {avoid:?} logged {prefix:?} in time: {:?}",
            mover_pods(cluster).await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn drain_moves_the_pod_and_the_volume_follows(cluster: &RealCluster) {
    // xfs here (ext4 crossed nodes above); xfs needs 300 MiB at least.
    create_pvc(cluster, "moving", XFS_CLASS, "Filesystem", "320Mi").await;
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mover", "namespace": NS},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "mover"}},
            "template": {
                "metadata": {"labels": {"app": "mover"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "io",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-ec", MOVER],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "moving"}}],
                }
            }
        }
    });
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), deployment.to_string()).expect("write manifest");
    let path = file.path().display().to_string();
    cluster
        .api()
        .kubectl(["apply", "-f", &path])
        .await
        .expect("create the deployment");
    let (_, first_node, wrote) = wait_mover_log(cluster, "", "wrote ").await;
    let sum = wrote.trim_start_matches("wrote ").to_owned();

    cluster
        .api()
        .kubectl([
            "drain",
            &first_node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=240s",
        ])
        .await
        .expect("kubectl drain");
    let (_, second_node, verified) = wait_mover_log(cluster, &first_node, "verified ").await;
    assert_ne!(second_node, first_node);
    assert_eq!(
        verified,
        format!("verified {sum}"),
        "the volume did not follow the pod from {first_node} to {second_node}"
    );
    cluster
        .api()
        .kubectl(["uncordon", &first_node])
        .await
        .expect("kubectl uncordon");
    cluster
        .api()
        .kubectl(["-n", NS, "delete", "deployment", "mover", "--wait=true"])
        .await
        .expect("delete the deployment");
    // The PVC can go once no pod uses it.
    let pods = Api::<Pod>::namespaced(cluster.api().client(), NS);
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    while !pods
        .list(&ListParams::default().labels("app=mover"))
        .await
        .expect("list pods")
        .items
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mover pods did not go"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A lost-write checker in busybox on a raw block device: round r writes the record
/// `blockvol r=R b=B` to block B = r mod 256 with direct IO and a FLUSH (`conv=fsync`)
/// and, once acknowledged, records r as the block's newest round. Every 50 rounds it
/// logs `round R errors E`. When /tmp/stop exists it reads every block back: a block
/// whose content is not its newest acknowledged record is lost. Its last line (also the
/// termination message) is `rounds R errors E lost L`.
const CHECKER: &str = "dev=/dev/xvda; r=0; errs=0; mkdir -p /tmp/acked; \
    while [ ! -f /tmp/stop ]; do \
      r=$((r+1)); b=$((r % 256)); \
      if printf 'blockvol r=%08d b=%04d' $r $b | \
         dd of=$dev bs=4096 seek=$b conv=sync,fsync oflag=direct 2>/tmp/err; then \
        echo $r > /tmp/acked/$b; \
      else errs=$((errs+1)); echo \"write error in round $r: $(cat /tmp/err)\"; fi; \
      [ $((r % 50)) -ne 0 ] || echo \"round $r errors $errs\"; \
    done; \
    lost=0; for f in /tmp/acked/*; do b=${f##*/}; \
      want=$(printf 'blockvol r=%08d b=%04d' $(cat $f) $b); \
      got=$(dd if=$dev bs=4096 skip=$b count=1 iflag=direct 2>/dev/null | head -c ${#want}); \
      [ \"$got\" = \"$want\" ] || { lost=$((lost+1)); echo \"lost: block $b holds '$got', not '$want'\"; }; \
    done; \
    echo \"rounds $r errors $errs lost $lost\" | tee /dev/termination-log";

/// The newest `round R` the checker pod `name` logged (0 before the first).
async fn checker_round(cluster: &RealCluster, name: &str) -> u64 {
    let log = cluster
        .api()
        .kubectl(["-n", NS, "logs", name])
        .await
        .unwrap_or_default();
    assert!(
        !log.contains("write error"),
        "the checker saw an IO error:\n{log}"
    );
    log.lines()
        .filter_map(|l| {
            l.strip_prefix("round ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until the checker `name` has acknowledged `more` rounds after the one it is
/// at now: its IO goes on. Returns the round reached.
async fn checker_advances(cluster: &RealCluster, name: &str, more: u64, after: &str) -> u64 {
    let from = checker_round(cluster, name).await;
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        let now = checker_round(cluster, name).await;
        if now >= from + more {
            eprintln!("checker {name}: rounds {from} -> {now} after {after}");
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "checker {name}: IO did not go on after {after} (round {now}, from {from})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The pods of the chart's `component` (node, attach, ...): (name, node, uid).
async fn chart_pods(cluster: &RealCluster, component: &str) -> Vec<(String, String, String)> {
    let pods = Api::<Pod>::namespaced(cluster.api().client(), CHART_NS)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/component={component}")))
        .await
        .expect("list chart pods");
    let mut out: Vec<_> = pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                p.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The images of the node pods that are not going away.
async fn node_pod_images(cluster: &RealCluster) -> Vec<String> {
    Api::<Pod>::namespaced(cluster.api().client(), CHART_NS)
        .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
        .await
        .expect("list node pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec?.containers.into_iter().next()?.image)
        .collect()
}

/// The node of the primary of the volume bound to PVC `pvc`.
async fn primary_node(cluster: &RealCluster, pvc: &str) -> String {
    let volume = Api::<PersistentVolumeClaim>::namespaced(cluster.api().client(), NS)
        .get(pvc)
        .await
        .expect("get pvc")
        .spec
        .and_then(|s| s.volume_name)
        .expect("the PVC is bound");
    let node = cluster
        .api()
        .kubectl([
            "get",
            "blockvolumes",
            "-A",
            "-o",
            &format!("jsonpath={{.items[?(@.metadata.name==\"{volume}\")].status.primaryNode}}"),
        ])
        .await
        .expect("get blockvolumes");
    assert!(!node.trim().is_empty(), "volume {volume} has no primary");
    node.trim().to_owned()
}

/// The node pod on `node` once it is Ready with every container running: (name, agent
/// container ID without the runtime prefix).
async fn ready_node_pod(cluster: &RealCluster, node: &str) -> (String, String) {
    let pods = Api::<Pod>::namespaced(cluster.api().client(), CHART_NS);
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        for (name, on, _) in chart_pods(cluster, "node").await {
            if on != node {
                continue;
            }
            let Ok(pod) = pods.get(&name).await else {
                continue;
            };
            let status = pod.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let agent = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .find(|c| {
                    c.name == "agent" && c.state.as_ref().is_some_and(|s| s.running.is_some())
                })
                .and_then(|c| c.container_id);
            if let (true, Some(id)) = (ready, agent) {
                let id = id.rsplit("://").next().unwrap_or_default().to_owned();
                return (name, id);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node pod on {node} did not become Ready"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A raw block PVC written by the checker pod while the agents are killed — the pod of
/// the primary's node force-deleted, the agent container of the writer's node killed
/// through containerd — and while `helm upgrade` rolls the node DaemonSet to a new image
/// tag: IO only pauses (no IO error reaches the pod), no acknowledged write is lost, and
/// the attach launcher's pods, which serve the attached devices, are never restarted.
async fn io_survives_agent_kills_and_a_helm_upgrade(cluster: &RealCluster, node: &str) {
    create_pvc(cluster, "checked", "blockvol", "Block", "64Mi").await;
    Api::<Pod>::namespaced(cluster.api().client(), NS)
        .create(
            &PostParams::default(),
            &pod_with("checker", "checked", CHECKER, node, false, true),
        )
        .await
        .expect("create the checker pod");
    checker_advances(cluster, "checker", 100, "the start").await;
    let launchers = chart_pods(cluster, "attach").await;

    let primary = primary_node(cluster, "checked").await;
    let (victim, _) = ready_node_pod(cluster, &primary).await;
    eprintln!("force-deleting {victim} on the primary's node {primary}");
    cluster
        .api()
        .kubectl([
            "-n",
            CHART_NS,
            "delete",
            "pod",
            &victim,
            "--force",
            "--grace-period=0",
        ])
        .await
        .expect("force-delete the node pod");
    checker_advances(
        cluster,
        "checker",
        100,
        "the node pod of the primary was force-deleted",
    )
    .await;

    if cluster.containerd_socket(node).is_some() {
        let (_, agent) = ready_node_pod(cluster, node).await;
        eprintln!("killing the agent container {agent} on the writer's node {node}");
        cluster
            .ctr(node, &["tasks", "kill", "--signal", "SIGKILL", &agent])
            .await
            .expect("kill the agent container");
        checker_advances(
            cluster,
            "checker",
            100,
            "the writer node's agent container was killed",
        )
        .await;

        // The same image under a new tag on every node: the upgrade changes every pod
        // template that names it.
        for n in worker_nodes(cluster).await {
            cluster
                .ctr(
                    &n,
                    &[
                        "images",
                        "tag",
                        "--force",
                        "localhost/blockvol:dev",
                        "localhost/blockvol:upgrade",
                    ],
                )
                .await
                .expect("tag the image");
        }
        let upgrade = cluster.helm(&[
            "upgrade",
            "blockvol",
            "charts/blockvol",
            "--namespace",
            CHART_NS,
            "--reuse-values",
            "--set",
            "image.tag=upgrade",
            "--wait",
            "--timeout",
            "5m",
        ]);
        let (upgraded, _) = tokio::join!(upgrade, async {
            // IO keeps going while the DaemonSet rolls.
            checker_advances(cluster, "checker", 50, "the upgrade started").await
        });
        upgraded.expect("helm upgrade");
        // `--wait` returns once the new pods are Ready; the old ones may still be going.
        let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
        loop {
            let images = node_pod_images(cluster).await;
            if images.iter().all(|i| i == "localhost/blockvol:upgrade") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node pods did not roll to the new tag: {images:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        checker_advances(cluster, "checker", 100, "the upgrade").await;
    } else {
        eprintln!(
            "the nodes' containerd is not reachable from here: container kill and upgrade skipped"
        );
    }
    assert_eq!(
        chart_pods(cluster, "attach").await,
        launchers,
        "the attach launcher pods were restarted"
    );

    cluster
        .api()
        .kubectl(["-n", NS, "exec", "checker", "--", "touch", "/tmp/stop"])
        .await
        .expect("stop the checker");
    let (_, result) = wait_pod_done(cluster, "checker").await;
    eprintln!("checker: {result}");
    let fields: Vec<&str> = result.split_whitespace().collect();
    assert!(
        fields.len() == 6 && fields[3] == "0" && fields[5] == "0",
        "the checker saw IO errors or lost writes: {result}"
    );
    delete_pod(cluster, "checker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_real_kubelets_keep_their_data_across_nodes_and_teardown_leaves_nothing() {
    let before = HostTraces::read();
    let mut cluster = RealCluster::up().await.expect("hack/cluster.sh up");

    // The chart's node plugin registered itself with every kubelet (no registrar).
    let csinodes = cluster
        .api()
        .kubectl([
            "get",
            "csinodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.drivers[*].name}{\"\\n\"}{end}",
        ])
        .await
        .expect("csinodes");
    let nodes = worker_nodes(&cluster).await;
    assert!(nodes.len() >= 2, "two nodes at least: {nodes:?}");
    for node in &nodes {
        assert!(
            csinodes.contains(&format!("{node}=csi.blockvol.io")),
            "{node} has no csi.blockvol.io registration: {csinodes}"
        );
    }

    create_namespace(&cluster).await;
    create_pvc(&cluster, "ext4-data", "blockvol", "Filesystem", "256Mi").await;

    let (first_node, written) = run_pod(
        &cluster,
        pod("writer", "ext4-data", WRITE, &nodes[0], false),
    )
    .await;
    assert_eq!(first_node, nodes[0]);
    assert_eq!(
        written.len(),
        64,
        "a sha256 in the termination message: {written:?}"
    );
    delete_pod(&cluster, "writer").await;

    let (second_node, read) = run_pod(
        &cluster,
        pod("reader", "ext4-data", READ, &first_node, true),
    )
    .await;
    assert_ne!(
        second_node, first_node,
        "the reader must run on another node"
    );
    assert_eq!(
        read, written,
        "the data read on {second_node} differs from what {first_node} wrote"
    );
    delete_pod(&cluster, "reader").await;

    // A raw block PVC: written and read back with direct IO through the device.
    create_pvc(&cluster, "raw", "blockvol", "Block", "128Mi").await;
    let (_, raw) = run_pod(
        &cluster,
        pod_with("raw-io", "raw", RAW_IO, &nodes[1], false, true),
    )
    .await;
    assert_eq!(
        raw.len(),
        64,
        "a sha256 in the termination message: {raw:?}"
    );
    delete_pod(&cluster, "raw-io").await;

    // Online expansion of a mounted xfs volume, seen by the pod as a larger filesystem.
    create_storage_class_xfs(&cluster).await;
    create_pvc(&cluster, "grow", XFS_CLASS, "Filesystem", "320Mi").await;
    let grow = pod("grow", "grow", GROW, &nodes[0], false);
    Api::<Pod>::namespaced(cluster.api().client(), NS)
        .create(&PostParams::default(), &grow)
        .await
        .expect("create pod");
    tokio::time::timeout(
        POD_TIMEOUT,
        await_condition(
            Api::<Pod>::namespaced(cluster.api().client(), NS),
            "grow",
            conditions::is_pod_running(),
        ),
    )
    .await
    .expect("the pod runs in time")
    .expect("watch");
    Api::<PersistentVolumeClaim>::namespaced(cluster.api().client(), NS)
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "640Mi"}}}})),
        )
        .await
        .expect("resize the PVC");
    let (_, sizes) = wait_pod_done(&cluster, "grow").await;
    let sizes: Vec<u64> = sizes
        .split_whitespace()
        .map(|v| v.parse().expect("sizes in KiB"))
        .collect();
    assert!(
        sizes.len() == 2 && sizes[0] < 400_000 && sizes[1] > 400_000,
        "the mounted filesystem did not grow past 400000 KiB: {sizes:?}"
    );
    delete_pod(&cluster, "grow").await;

    // IO through agent kills and a rolling upgrade of the chart.
    io_survives_agent_kills_and_a_helm_upgrade(&cluster, &nodes[0]).await;

    // A node drain: the Deployment's pod moves to another node and the volume follows.
    drain_moves_the_pod_and_the_volume_follows(&cluster).await;

    // Volumes go before the cluster: the PV's replicas are deleted by the operator.
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(cluster.api().client(), NS);
    for pvc in ["ext4-data", "raw", "grow", "checked", "moving"] {
        pvcs.delete(pvc, &DeleteParams::default())
            .await
            .expect("delete pvc");
    }

    if !cluster.is_owned() {
        // A cluster that stays up gets back to how it was.
        Api::<StorageClass>::all(cluster.api().client())
            .delete(XFS_CLASS, &DeleteParams::default())
            .await
            .expect("delete storage class");
        Api::<Namespace>::all(cluster.api().client())
            .delete(NS, &DeleteParams::default())
            .await
            .expect("delete namespace");
        return;
    }
    cluster.down().expect("hack/cluster.sh down");
    let after = HostTraces::read();
    let mut left = BTreeMap::new();
    left.insert("processes", after.processes.join("; "));
    left.insert("mounts", after.mounts.join("; "));
    left.insert("loop devices", after.loop_devices.join("; "));
    left.insert("cgroups", after.cgroups.join("; "));
    for (what, value) in &left {
        assert!(value.is_empty(), "down left {what}: {value}");
    }
    assert!(!after.cluster_dir, "down left the cluster dir");
    assert_eq!(
        after.sysctls, before.sysctls,
        "down did not restore the sysctls"
    );
    assert_eq!(
        after.host_dirs, before.host_dirs,
        "down left host directories"
    );
    assert_eq!(
        after.iptables_chains, before.iptables_chains,
        "down left iptables chains"
    );
}
