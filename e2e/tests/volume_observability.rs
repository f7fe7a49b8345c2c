//! What a user sees of a PVC's volume, with real agent processes, the operator process,
//! the CSI controller and the pinned csi-provisioner: the volume records its claim, the
//! agents label the volume's metrics with it, a replica's `status.lag` is 0 once idle
//! and grows with writes while its agent is stopped, and the volume's health Events
//! reach the claim.
//!
//! The daemons are the workspace binaries; build them first:
//! `cargo build -p node-agent -p operator -p csi --bins && cargo test -p e2e --test volume_observability`.

use std::path::PathBuf;
use std::time::Duration;

use api::{BlockReplica, BlockVolume, PvcReference, ReplicaRole, VolumePhase};
use e2e::cluster::{TestCluster, TestClusterOptions, wait_for};
use e2e::openmetrics;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use node_agent::frontend::nbd::client::Connection;
use node_agent::frontend::nbd::proto::CMD_WRITE;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const NS: &str = "default";
const CLAIM: &str = "data";
/// Bytes of each write batch.
const BATCH_BYTES: u64 = 1 << 20;
const WRITE_BYTES: u32 = 64 << 10;

async fn bound_pv(client: &Client) -> String {
    let scs: Api<StorageClass> = Api::all(client.clone());
    let sc = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "blockvol"},
        "provisioner": api::CSI_DRIVER_NAME,
        "parameters": {"replicas": "2", "durability": "syncAll"},
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }))
    .expect("StorageClass");
    scs.create(&PostParams::default(), &sc)
        .await
        .expect("create StorageClass");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let pvc = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "blockvol",
            "volumeMode": "Block",
            "resources": {"requests": {"storage": "32Mi"}},
        },
    }))
    .expect("PVC");
    pvcs.create(&PostParams::default(), &pvc)
        .await
        .expect("create PVC");
    wait_for("PVC bound", WAIT, || async {
        let p = pvcs.get(CLAIM).await.ok()?;
        let bound = p.status.as_ref()?.phase.as_deref() == Some("Bound");
        bound.then(|| p.spec?.volume_name).flatten()
    })
    .await
    .expect("PVC binds")
}

/// Writes `BATCH_BYTES` at `offset` through the primary's local export.
async fn write_batch(socket: PathBuf, volume: String, offset: u64) {
    tokio::task::spawn_blocking(move || {
        let mut c =
            Connection::connect(&socket, &volume, Duration::from_secs(30)).expect("connect");
        let data = vec![0xa5u8; WRITE_BYTES as usize];
        let mut off = offset;
        while off < offset + BATCH_BYTES {
            let errno = c
                .request(CMD_WRITE, 0, off, WRITE_BYTES, &data, None)
                .expect("write answered");
            assert_eq!(errno, 0, "write at {off}");
            off += u64::from(WRITE_BYTES);
        }
    })
    .await
    .expect("writer");
}

async fn replica(client: &Client, name: &str) -> BlockReplica {
    Api::<BlockReplica>::all(client.clone())
        .get(name)
        .await
        .expect("BlockReplica")
}

/// Waits until replica `name` reports a lag that `ok` accepts; returns it in LSNs.
async fn lag_where(client: &Client, name: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    wait_for(what, WAIT, || async {
        let lag = replica(client, name).await.status?.lag?.lsn;
        ok(lag).then_some(lag)
    })
    .await
    .expect(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_volume_is_labelled_lag_is_reported_and_events_reach_the_claim() {
    let mut options = TestClusterOptions::nodes(2);
    options.controller_manager = true;
    options.agent.metrics = true;
    let mut cluster = TestCluster::start(options).await.expect("cluster starts");
    cluster.start_csi().await.expect("CSI driver starts");
    let client = cluster.client.clone();

    let pv = bound_pv(&client).await;
    let handle = Api::<PersistentVolume>::all(client.clone())
        .get(&pv)
        .await
        .expect("PV")
        .spec
        .and_then(|s| s.csi)
        .map(|c| c.volume_handle)
        .expect("CSI PV");
    let vols: Api<BlockVolume> = Api::all(client.clone());
    let bv = wait_for("volume Ready with 2 in sync", WAIT, || async {
        vols.get(&handle).await.ok().filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count == 2)
        })
    })
    .await
    .expect("volume in sync");
    // The provisioner's metadata is recorded on the volume.
    assert_eq!(
        bv.spec.pvc,
        Some(PvcReference {
            name: CLAIM.into(),
            namespace: NS.into()
        })
    );

    let replicas = cluster.replicas(&handle).await;
    let primary = replicas
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Primary)
        .expect("a primary")
        .clone();
    let secondary = replicas
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Replica)
        .expect("a replica")
        .clone();
    assert_eq!(
        primary.spec.pvc, bv.spec.pvc,
        "the claim reaches the replicas"
    );

    // Every agent labels the volume's series with the claim.
    for r in [&primary, &secondary] {
        let agent = cluster.agent(&r.spec.node).expect("agent");
        let (code, body) = agent.http_get("/metrics").await.expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        let e = openmetrics::parse(&body).unwrap_or_else(|err| panic!("{err}\n{body}"));
        let flushed = e
            .value(
                "blockvol_agent_replica_flushed_lsn",
                &[
                    ("volume", handle.as_str()),
                    ("replica", r.spec.replica_id.as_str()),
                    ("pvc", CLAIM),
                    ("pvc_namespace", NS),
                ],
            )
            .expect("unambiguous");
        assert!(
            flushed.is_some(),
            "no labelled series on {}\n{body}",
            r.spec.node
        );
    }

    // Written to and then idle: the in-sync replica is 0 behind.
    let socket = cluster
        .agent(&primary.spec.node)
        .expect("primary agent")
        .nbd_socket
        .clone();
    write_batch(socket.clone(), handle.clone(), 0).await;
    lag_where(
        &client,
        &secondary.name_any(),
        "in-sync replica lag 0 once idle",
        |l| l == 0,
    )
    .await;
    assert_eq!(
        replica(&client, &secondary.name_any())
            .await
            .status
            .and_then(|s| s.lag)
            .and_then(|l| l.bytes),
        Some(0)
    );
    assert!(
        replica(&client, &primary.name_any())
            .await
            .status
            .is_some_and(|s| s.lag.is_none()),
        "the primary shows no lag of its own"
    );

    // The replica's agent stops: its lag grows with every write.
    cluster
        .agent(&secondary.spec.node)
        .expect("replica agent")
        .kill();
    write_batch(socket.clone(), handle.clone(), BATCH_BYTES).await;
    let first = lag_where(
        &client,
        &secondary.name_any(),
        "stopped replica falls behind",
        |l| l > 0,
    )
    .await;
    write_batch(socket, handle.clone(), 2 * BATCH_BYTES).await;
    lag_where(
        &client,
        &secondary.name_any(),
        "stopped replica's lag grows with writes",
        |l| l > first,
    )
    .await;

    // The volume loses a replica: the claim's Events say so, under the claim's UID
    // (what `kubectl describe pvc` selects by).
    let uid = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .get(CLAIM)
        .await
        .expect("PVC")
        .uid()
        .expect("PVC uid");
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let reasons = wait_for("VolumeDegraded on the claim", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let on_claim: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("PersistentVolumeClaim")
                        && r.name.as_deref() == Some(CLAIM)
                        && r.uid.as_deref() == Some(uid.as_str())
                })
            })
            .filter_map(|e| e.reason)
            .collect();
        on_claim
            .iter()
            .any(|r| r == "VolumeDegraded")
            .then_some(on_claim)
    })
    .await
    .expect("Event on the claim");
    // Routine bookkeeping stays on the volume.
    assert!(!reasons.iter().any(|r| r == "Placed"), "{reasons:?}");
}
