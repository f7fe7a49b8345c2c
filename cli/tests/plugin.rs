//! `kubectl-blockvol` against a real kube-apiserver (and kube-controller-manager, whose
//! PV controller binds claims): the test writes BlockVolume, BlockReplica, BlockNode,
//! Lease and Event objects the way the operator and agents would, runs the plugin binary
//! and checks what it prints and writes. One control plane for every command, to keep
//! the suite's start-up cost to one.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use api::{
    BlockNode, BlockNodeSpec, BlockReplica, BlockReplicaSpec, BlockVolume, BlockVolumeSpec,
    Durability, ReplicaRole,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Event, Namespace, ObjectReference, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use testkit::{ControlPlane, ControlPlaneOptions};

/// Bound on the PV controller binding the printed claim.
const BIND_TIMEOUT_MS: u64 = 60_000;
/// Bound on one line of `move-primary --wait` progress.
const LINE_TIMEOUT_MS: u64 = 30_000;

const VOLUME: &str = "vol-a";
const BV_NS: &str = "blockvol-system";

struct Plugin<'a> {
    cp: &'a ControlPlane,
    dir: &'a Path,
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Plugin<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-blockvol"));
        c.args(args)
            .env("KUBECONFIG", self.cp.kubeconfig())
            .env("BLOCKVOL_NAMESPACE", BV_NS)
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Outcome {
        let out = self
            .command(args)
            .output()
            .await
            .expect("running kubectl-blockvol");
        Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(o.ok, "{args:?} failed: {}", o.stderr);
        o.stdout
    }

    async fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(!o.ok, "{args:?} succeeded: {}", o.stdout);
        o.stderr
    }

    fn spawn(&self, args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl-blockvol");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        (child, lines)
    }
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_millis(LINE_TIMEOUT_MS), lines.next_line())
        .await
        .expect("a progress line in time")
        .expect("reading progress")
        .expect("the plugin ended early")
}

/// Cells of the table line that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first} in:\n{table}"))
}

fn status_patch(value: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(json!({ "status": value }))
}

/// Creates `obj` (a `kind`), then writes `status` as its agent or the operator would.
async fn create_with_status<K>(api: &Api<K>, kind: &str, obj: &K, status: serde_json::Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = kube::ResourceExt::name_any(obj);
    api.create(&PostParams::default(), obj)
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    api.patch_status(&name, &PatchParams::default(), &status_patch(status))
        .await
        .unwrap_or_else(|e| panic!("{kind} status: {e}"));
}

async fn write_objects(cp: &ControlPlane) {
    let client = cp.client();
    for ns in [BV_NS, "apps"] {
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .expect("namespace");
    }
    let nodes: Api<BlockNode> = Api::all(client.clone());
    for (i, name) in ["node-1", "node-2", "node-3"].into_iter().enumerate() {
        let node = BlockNode::new(
            name,
            BlockNodeSpec {
                node_name: name.into(),
                data_address: format!("127.0.0.1:74{i:02}"),
                data_dir: "/var/lib/blockvol".into(),
                topology: Default::default(),
                ..Default::default()
            },
        );
        let status = json!({
            "capacityBytes": 100u64 << 30,
            "allocatableBytes": 90u64 << 30,
            "agentVersion": "0.1.0",
        });
        create_with_status(&nodes, "BlockNode", &node, status).await;
    }
    // node-1's agent renewed a moment ago; node-2's Lease expired an hour ago; node-3
    // has none.
    let leases: Api<Lease> = Api::namespaced(client.clone(), BV_NS);
    for (name, renewed) in [
        ("node-1", Timestamp::now()),
        ("node-2", Timestamp::now() - SignedDuration::from_hours(1)),
    ] {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.into()),
                lease_duration_seconds: Some(600),
                renew_time: Some(MicroTime(renewed)),
                ..Default::default()
            }),
        };
        leases
            .create(&PostParams::default(), &lease)
            .await
            .expect("Lease");
    }

    let volumes: Api<BlockVolume> = Api::all(client.clone());
    let since = Time(Timestamp::now() - SignedDuration::from_secs(60));
    create_with_status(
        &volumes,
        "BlockVolume",
        &BlockVolume::new(VOLUME, BlockVolumeSpec::with_size("1Gi")),
        json!({
            "phase": "Degraded",
            "epoch": 3,
            "primary": "vol-a-r1",
            "primaryNode": "node-1",
            "inSyncSet": ["vol-a-r1", "vol-a-r2"],
            "inSyncSetGeneration": 5,
            "inSyncCount": 2,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "PrimaryServing",
                 "message": "serving", "lastTransitionTime": since},
                {"type": "Degraded", "status": "True", "reason": "ReplicasNotInSync",
                 "message": "vol-a-r3 is not in sync", "lastTransitionTime": since},
            ],
        }),
    )
    .await;
    let replicas: Api<BlockReplica> = Api::all(client.clone());
    for (id, node, role, state, flushed) in [
        (
            "vol-a-r1",
            "node-1",
            ReplicaRole::Primary,
            "Serving",
            120u64,
        ),
        ("vol-a-r2", "node-2", ReplicaRole::Replica, "InSync", 117),
        ("vol-a-r3", "node-3", ReplicaRole::Replica, "Rebuilding", 40),
    ] {
        let mut r = BlockReplica::new(
            id,
            BlockReplicaSpec {
                pvc: None,
                volume: VOLUME.into(),
                replica_id: id.into(),
                node: node.into(),
                role,
                epoch: 3,
                size_bytes: 1 << 30,
                block_size: 4096,
                durability: Durability::SyncAll,
                peers: vec![],
                in_sync_set: vec![],
                in_sync_set_generation: 5,
            },
        );
        r.metadata.labels = Some(
            [
                (api::LABEL_VOLUME.to_string(), VOLUME.to_string()),
                (api::LABEL_NODE.to_string(), node.to_string()),
            ]
            .into(),
        );
        let status = json!({"state": state, "epoch": 3, "flushedLsn": flushed});
        create_with_status(&replicas, "BlockReplica", &r, status).await;
    }
    volume_event(
        cp,
        "rebuild-started",
        "Normal",
        "RebuildStarted",
        "rebuilding vol-a-r3 on node-3",
    )
    .await;
}

/// An Event about the volume, as the operator's recorder leaves it (cluster-scoped
/// objects' Events live in `default`).
async fn volume_event(cp: &ControlPlane, name: &str, type_: &str, reason: &str, message: &str) {
    let now = Time(Timestamp::now());
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("blockvol.io/v1alpha1".into()),
            kind: Some("BlockVolume".into()),
            name: Some(VOLUME.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    Api::<Event>::namespaced(cp.client(), "default")
        .create(&PostParams::default(), &event)
        .await
        .expect("Event");
}

#[tokio::test]
async fn plugin_reads_and_steers_blockvol_objects_on_a_real_api_server() {
    let cp = ControlPlane::from_env(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = Plugin {
        cp: &cp,
        dir: dir.path(),
    };
    if !cp.is_external() {
        let err = plugin.fails(&["get", "volumes"]).await;
        assert!(
            err.contains(
                "listing BlockVolumes: the blockvol CRDs are not installed in this cluster"
            ),
            "{err}"
        );
    }
    cp.apply_crds(&testkit::crds_dir())
        .await
        .unwrap_or_else(|e| panic!("applying CRDs: {e}"));
    write_objects(&cp).await;

    // get: human sizes, in-sync n/m, readiness from the Leases, per-replica lag.
    let volumes = plugin.ok(&["get", "volumes"]).await;
    assert_eq!(
        row(&volumes, VOLUME)[..8],
        [
            VOLUME, "1Gi", "3", "2/3", "Degraded", "node-1", "<none>", "<none>"
        ],
        "{volumes}"
    );
    let nodes = plugin.ok(&["get", "bn"]).await;
    assert_eq!(
        row(&nodes, "node-1")[..7],
        ["node-1", "True", "100Gi", "90Gi", "10Gi", "1", "1"]
    );
    assert_eq!(row(&nodes, "node-2")[1], "False", "{nodes}");
    assert_eq!(row(&nodes, "node-3")[1], "False", "{nodes}");
    let json: serde_json::Value = serde_json::from_str(
        &plugin
            .ok(&["get", "replicas", "--volume", VOLUME, "-o", "json"])
            .await,
    )
    .expect("-o json is JSON");
    let lags: Vec<(&str, u64)> = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| (r["node"].as_str().unwrap(), r["lagLsn"].as_u64().unwrap()))
        .collect();
    assert_eq!(lags, [("node-1", 0), ("node-2", 3), ("node-3", 80)]);
    let yaml = plugin.ok(&["get", "volumes", "-o", "yaml"]).await;
    assert!(yaml.contains("sizeBytes: 1073741824"), "{yaml}");
    let err = plugin.fails(&["get", "replicas", "--volume", "nope"]).await;
    assert!(
        err.contains("BlockVolume nope not found; `kubectl get bv` lists volumes"),
        "{err}"
    );

    // pv: the printed PV and claim are accepted, and the PV controller binds them.
    let manifest = plugin
        .ok(&["pv", VOLUME, "-n", "apps", "--claim", "data"])
        .await;
    let file = dir.path().join("pv.yaml");
    std::fs::write(&file, &manifest).expect("writing the manifest");
    cp.kubectl(["apply", "-f", file.to_str().expect("utf-8 path")])
        .await
        .unwrap_or_else(|e| panic!("applying\n{manifest}\n: {e}"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cp.client(), "apps");
    tokio::time::timeout(
        Duration::from_millis(BIND_TIMEOUT_MS),
        await_condition(claims, "data", |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.status.as_ref()?.phase.as_deref()) == Some("Bound")
        }),
    )
    .await
    .expect("the claim binds in time")
    .expect("watching the claim");
    let volumes = plugin.ok(&["get", "volumes"]).await;
    assert_eq!(row(&volumes, VOLUME)[7], "apps/data", "{volumes}");

    // describe, by claim: topology, in-sync set, Events, what to do.
    let text = plugin.ok(&["describe", "volume", "apps/data"]).await;
    for want in [
        "Claim:        apps/data (PV vol-a)",
        "In-sync set:  generation 5: vol-a-r1 on node-1, vol-a-r2 on node-2",
        "RebuildStarted",
        "rebuilding vol-a-r3 on node-3",
        "Degraded=True (ReplicasNotInSync): ",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert_eq!(
        row(&text, "node-3")[..7],
        ["node-3", "Replica", "Rebuilding", "3", "40", "80", "no"]
    );
    let same = plugin
        .ok(&["describe", "volume", "data", "--namespace", "apps"])
        .await;
    assert!(same.starts_with("Name:         vol-a\n"), "{same}");
    let err = plugin.fails(&["describe", "volume", "nope"]).await;
    assert!(
        err.contains("no BlockVolume nope, and no PersistentVolumeClaim nope in namespace default"),
        "{err}"
    );

    // move-primary: refused for a node without a replica; otherwise the annotation is set.
    let err = plugin
        .fails(&["move-primary", VOLUME, "--to", "node-9"])
        .await;
    assert!(
        err.contains("BlockVolume vol-a has no replica on node node-9 (replicas are on: node-1, node-2, node-3)"),
        "{err}"
    );
    let volumes_api: Api<BlockVolume> = Api::all(cp.client());
    let annotation = |v: &BlockVolume| {
        v.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(api::ANNOTATION_MOVE_PRIMARY_TO).cloned())
    };
    assert_eq!(annotation(&volumes_api.get(VOLUME).await.unwrap()), None);
    let said = plugin.ok(&["move-primary", VOLUME, "--to", "node-3"]).await;
    assert!(
        said.contains("note: replica vol-a-r3 on node-3 is not in the committed in-sync set yet"),
        "{said}"
    );
    assert_eq!(
        annotation(&volumes_api.get(VOLUME).await.unwrap()).as_deref(),
        Some("node-3")
    );

    // --wait follows status.primaryMove to the end the operator writes.
    let (mut child, mut lines) = plugin.spawn(&[
        "move-primary",
        VOLUME,
        "--to",
        "node-2",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(
        next_line(&mut lines)
            .await
            .contains("blockvol.io/move-primary-to=node-2 set")
    );
    assert!(
        next_line(&mut lines)
            .await
            .contains("primary is on node-1 at epoch 3")
    );
    let started = Time(Timestamp::now());
    volumes_api
        .patch_status(
            VOLUME,
            &PatchParams::default(),
            &status_patch(json!({"primaryMove": {
                "from": "vol-a-r1", "to": "vol-a-r2", "toNode": "node-2", "epoch": 4,
                "phase": "Demoting", "reason": "Requested", "startedAt": started,
            }})),
        )
        .await
        .expect("recording the move");
    assert!(
        next_line(&mut lines)
            .await
            .contains("move Demoting: primary vol-a-r1 → vol-a-r2")
    );
    volumes_api
        .patch_status(
            VOLUME,
            &PatchParams::default(),
            &status_patch(json!({"primaryMove": null, "primary": "vol-a-r2",
                                 "primaryNode": "node-2", "epoch": 4})),
        )
        .await
        .expect("finishing the move");
    assert!(
        next_line(&mut lines)
            .await
            .contains("primary is on node-2 (replica vol-a-r2) at epoch 4")
    );
    let status = child.wait().await.expect("waiting for the plugin");
    assert!(status.success(), "{status}");

    // --wait ends with the operator's refusal, not at the timeout.
    let (child, mut lines) = plugin.spawn(&[
        "move-primary",
        VOLUME,
        "--to",
        "node-3",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(
        next_line(&mut lines)
            .await
            .contains("move-primary-to=node-3 set")
    );
    volume_event(
        &cp,
        "move-abandoned",
        "Warning",
        "PrimaryMoveAbandoned",
        "vol-a-r3 did not catch up",
    )
    .await;
    let out = tokio::time::timeout(
        Duration::from_millis(LINE_TIMEOUT_MS),
        child.wait_with_output(),
    )
    .await
    .expect("the plugin ends in time")
    .expect("waiting for the plugin");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the primary move of BlockVolume vol-a to node-3 was PrimaryMoveAbandoned (vol-a-r3 did not catch up)"),
        "{err}"
    );

    // dump: a relative --out lands in the working directory with every object.
    std::fs::create_dir(dir.path().join("out")).expect("mkdir");
    let said = plugin.ok(&["dump", "--out", "out/support.tar.gz"]).await;
    let bundle = dir.path().join("out/support.tar.gz");
    assert!(
        said.contains(&format!("wrote {}", bundle.display())),
        "{said}"
    );
    let listed = Command::new("tar")
        .arg("-tzf")
        .arg(&bundle)
        .output()
        .await
        .expect("tar");
    let files = testkit::stdout_lines(&listed, "tar -tzf");
    for want in [
        "support/blockvolumes/vol-a.yaml",
        "support/blockreplicas/vol-a-r1.yaml",
        "support/blockreplicas/vol-a-r3.yaml",
        "support/blocknodes/node-2.yaml",
        "support/events/BlockVolume.yaml",
        "support/leases/node-1.yaml",
        "support/persistentvolumes/vol-a.yaml",
        "support/summary.txt",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "{want} missing from {files:?}"
        );
    }
    assert!(
        !files.iter().any(|f| f.ends_with("errors.txt")),
        "{files:?}"
    );
    let extracted = Command::new("tar")
        .arg("-xzf")
        .arg(&bundle)
        .arg("-C")
        .arg(dir.path())
        .output()
        .await
        .expect("tar");
    assert!(extracted.status.success());
    let events = std::fs::read_to_string(dir.path().join("support/events/BlockVolume.yaml"))
        .expect("events file");
    assert!(
        events.contains("PrimaryMoveAbandoned") && events.contains("RebuildStarted"),
        "{events}"
    );
    let stored: BlockVolume = serde_norway::from_str(
        &std::fs::read_to_string(dir.path().join("support/blockvolumes/vol-a.yaml")).unwrap(),
    )
    .expect("the bundled volume parses as a BlockVolume");
    assert_eq!(
        stored.status.unwrap().primary_node.as_deref(),
        Some("node-2")
    );

    cordon_and_drain_survive_agent_registration(&cp, &plugin).await;
}

/// `cordon`, `drain [--wait]` and `uncordon` write only the admin's BlockNode fields: a
/// node agent re-registering (server-side apply of its spec, as the agent does) keeps
/// them, and `drain --wait` follows `status.evacuation` until the node is empty.
async fn cordon_and_drain_survive_agent_registration(cp: &ControlPlane, plugin: &Plugin<'_>) {
    let nodes: Api<BlockNode> = Api::all(cp.client());
    let register = || async {
        let spec = BlockNodeSpec {
            node_name: "node-2".into(),
            data_address: "127.0.0.1:7401".into(),
            data_dir: "/var/lib/blockvol".into(),
            ..Default::default()
        };
        nodes
            .patch(
                "node-2",
                &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
                &Patch::Apply(json!({
                    "apiVersion": "blockvol.io/v1alpha1",
                    "kind": "BlockNode",
                    "metadata": {"name": "node-2"},
                    "spec": spec,
                })),
            )
            .await
            .expect("agent registration");
    };
    let flags = || async {
        let n = nodes.get("node-2").await.expect("BlockNode");
        (n.spec.cordoned, n.spec.evacuate)
    };
    register().await;
    let err = plugin.fails(&["cordon", "no-such-node"]).await;
    assert!(err.contains("BlockNode no-such-node not found"), "{err}");

    // (command, what it says, (cordoned, evacuate) after a re-registration, the column)
    for (command, said, kept, column) in [
        ("cordon", "cordoned", (true, false), "Cordoned"),
        ("drain", "draining", (true, true), "Draining"),
    ] {
        let out = plugin.ok(&[command, "node-2"]).await;
        assert!(out.contains(said), "{out}");
        register().await;
        assert_eq!(flags().await, kept, "re-registration kept the {command}");
        let table = plugin.ok(&["get", "bn"]).await;
        assert_eq!(row(&table, "node-2")[7], column, "{table}");
    }

    // The operator's report, then `drain --wait` following it to the end.
    let report_left = |left: u32| {
        let evacuation = json!({"evacuation": {
            "replicasLeft": left,
            "volumesLeft": if left > 0 { vec![VOLUME] } else { vec![] },
            "complete": left == 0,
        }});
        let nodes = &nodes;
        async move {
            nodes
                .patch_status("node-2", &PatchParams::default(), &status_patch(evacuation))
                .await
                .expect("evacuation status");
        }
    };
    report_left(2).await;
    let (mut child, mut lines) = plugin.spawn(&["drain", "node-2", "--wait", "--timeout", "60s"]);
    assert!(next_line(&mut lines).await.contains("draining"));
    let line = next_line(&mut lines).await;
    assert!(line.contains("2 replica(s) left (volumes vol-a)"), "{line}");
    report_left(0).await;
    let line = next_line(&mut lines).await;
    assert!(line.contains("drained: no replica is left"), "{line}");
    let status = tokio::time::timeout(Duration::from_millis(LINE_TIMEOUT_MS), child.wait())
        .await
        .expect("drain --wait ends once drained")
        .expect("waiting for the plugin");
    assert!(status.success());

    let out = plugin.ok(&["uncordon", "node-2"]).await;
    assert!(out.contains("uncordoned"), "{out}");
    assert_eq!(flags().await, (false, false));
    let n = nodes.get("node-2").await.expect("BlockNode");
    assert_eq!(
        n.spec.data_address, "127.0.0.1:7401",
        "the agent's fields untouched"
    );
}
