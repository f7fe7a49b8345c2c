//! The CSI controller and the operator agree on one attachment record: a volume
//! published by ControllerPublishVolume shows up in the operator's
//! `status.attachedTo` and Attached condition, and neither DeleteVolume nor a direct
//! delete of the BlockVolume removes it until it is unpublished. Real kube-apiserver,
//! operator reconciler in process, the test plays three node agents.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use api::{
    BlockNode, BlockNodeSpec, BlockNodeStatus, BlockReplica, BlockReplicaStatus, BlockVolume,
    ReplicaRole, ReplicaState, VolumePhase,
};
use csi::controller::{ControllerService, ControllerSettings as CsiSettings};
use csi::csi_proto::controller_server::Controller;
use csi::csi_proto::volume_capability::access_mode::Mode;
use csi::csi_proto::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::csi_proto::*;
use e2e::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator::replacement::ReplacementSettings;
use operator::{Context, ControllerSettings, LeaderElector, LeaderSettings, Metrics};
use serde_json::json;
use tokio::task::JoinHandle;
use tonic::{Code, Request};

const NS: &str = "blockvol-system";
/// Longest any single expectation may take.
const WAIT_TIMEOUT_MS: u64 = 60_000;
const POLL_MS: u64 = 100;
/// Lease duration the simulated node agents use.
const NODE_LEASE_S: i32 = 10;
const LEASE_RENEW_MS: u64 = 1_000;
const MIB: i64 = 1 << 20;

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_TIMEOUT_MS);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT_TIMEOUT_MS} ms waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// Aborts its task when dropped, so a failing test leaves nothing running.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A simulated node agent: a BlockNode with space and a Lease renewed until dropped,
/// plus every replica placed on it reported healthy (primary Serving, others InSync).
async fn agent(client: &Client, name: &str) -> Task {
    let nodes: Api<BlockNode> = Api::all(client.clone());
    let node = BlockNode::new(
        name,
        BlockNodeSpec {
            node_name: name.into(),
            data_address: "127.0.0.1:7400".into(),
            data_dir: "/var/lib/blockvol".into(),
            topology: BTreeMap::new(),
        },
    );
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("BlockNode");
    let status = BlockNodeStatus {
        capacity_bytes: 1 << 34,
        allocatable_bytes: 1 << 34,
        ..Default::default()
    };
    nodes
        .patch_status(
            name,
            &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
            &Patch::Apply(
                json!({"apiVersion": "blockvol.io/v1alpha1", "kind": "BlockNode", "status": status}),
            ),
        )
        .await
        .expect("BlockNode status");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let replicas: Api<BlockReplica> = Api::all(client.clone());
    let name = name.to_string();
    Task(tokio::spawn(async move {
        loop {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(NODE_LEASE_S),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..Default::default()
                }),
            };
            let _ = leases
                .patch(
                    &name,
                    &PatchParams::apply("test-agent").force(),
                    &Patch::Apply(&lease),
                )
                .await;
            let mine = ListParams::default().labels(&format!("{}={name}", api::LABEL_NODE));
            if let Ok(list) = replicas.list(&mine).await {
                for r in list.items {
                    let _ = replicas
                        .patch_status(
                            &r.name_any(),
                            &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
                            &Patch::Apply(json!({
                                "apiVersion": "blockvol.io/v1alpha1", "kind": "BlockReplica",
                                "status": healthy(&r),
                            })),
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(LEASE_RENEW_MS)).await;
        }
    }))
}

fn healthy(r: &BlockReplica) -> BlockReplicaStatus {
    let primary = r.spec.role == ReplicaRole::Primary;
    BlockReplicaStatus {
        state: if primary {
            ReplicaState::Serving
        } else {
            ReplicaState::InSync
        },
        role: Some(r.spec.role),
        epoch: r.spec.epoch,
        flushed_lsn: 1,
        size_bytes: Some(r.spec.size_bytes),
        ..Default::default()
    }
}

/// The operator reconciler in this process, stopped when dropped.
fn operator(client: &Client) -> Task {
    let settings = ControllerSettings {
        node_lease_namespace: NS.into(),
        replacement: ReplacementSettings {
            replica_failure_grace_ms: 600_000,
            node_gone_grace_ms: 600_000,
            max_rebuilds_per_node: 2,
        },
        resync_interval_ms: 1_000,
        error_backoff_initial_ms: 100,
        error_backoff_max_ms: 2_000,
        deletion_poll_ms: 200,
        concurrency: 2,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        Arc::new(Metrics::default()),
        Some("op".into()),
    ));
    let elector = LeaderElector::new(
        Api::namespaced(client.clone(), NS),
        LeaderSettings {
            lease_name: "blockvol-operator".into(),
            identity: "op".into(),
            lease_duration_s: 15,
            renew_interval_ms: 1_000,
        },
    );
    Task(tokio::spawn(async move {
        if let Err(e) = operator::run(ctx, elector, std::future::pending()).await {
            panic!("operator stopped: {e}");
        }
    }))
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn attached_condition(v: &BlockVolume) -> Option<(String, String)> {
    v.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Attached")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reports_and_guards_a_csi_published_attachment() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    cp.apply_crds(&e2e::crds_dir()).await.expect("CRDs apply");
    let client = cp.client();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let mut agents = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        agents.push(agent(&client, n).await);
    }
    let _op = operator(&client);
    let csi = ControllerService::new(
        client.clone(),
        CsiSettings {
            create_ready_timeout_ms: WAIT_TIMEOUT_MS,
            ..CsiSettings::default()
        },
    );
    let vols: Api<BlockVolume> = Api::all(client.clone());

    // CreateVolume returns only once the operator made the volume Ready.
    let created = csi
        .create_volume(Request::new(CreateVolumeRequest {
            name: "pvc-attach".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: [("replicas", "3"), ("durability", "syncAll")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }))
        .await
        .expect("CreateVolume")
        .into_inner();
    let id = created.volume.expect("volume").volume_id;
    let v = vols.get(&id).await.expect("BlockVolume");
    assert_eq!(
        v.status.as_ref().map(|s| s.phase),
        Some(VolumePhase::Ready),
        "{:?}",
        v.status
    );
    assert_eq!(v.status.as_ref().and_then(|s| s.attached_to.clone()), None);

    csi.controller_publish_volume(Request::new(ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }))
    .await
    .expect("ControllerPublishVolume");
    let v = wait_for("operator mirrors the attachment", || async {
        vols.get(&id)
            .await
            .ok()
            .filter(|v| v.status.as_ref().and_then(|s| s.attached_to.as_deref()) == Some("node-b"))
    })
    .await;
    assert_eq!(
        attached_condition(&v).map(|c| c.0),
        Some("True".to_string()),
        "{:?}",
        v.status
    );

    // DeleteVolume refuses; a direct delete leaves the object and its replicas alone.
    let err = csi
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("DeleteVolume while attached");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    vols.delete(&id, &DeleteParams::default())
        .await
        .expect("delete request");
    wait_for("deletion waits for detach", || async {
        vols.get(&id)
            .await
            .ok()
            .filter(|v| attached_condition(v).is_some_and(|c| c.1 == "DeletionWaitsForDetach"))
    })
    .await;
    let replicas = Api::<BlockReplica>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={id}", api::LABEL_VOLUME)))
        .await
        .expect("list replicas");
    assert_eq!(replicas.items.len(), 3, "nothing deleted while attached");

    // Unpublish: the operator finishes the deletion.
    csi.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        ..Default::default()
    }))
    .await
    .expect("ControllerUnpublishVolume");
    wait_for("volume gone after detach", || async {
        vols.get_opt(&id)
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
}
