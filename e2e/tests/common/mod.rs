//! Shared by the tests that run the operator reconciler in process next to the CSI
//! controller: bounded waits, abort-on-drop tasks, and node agents played by the test
//! (BlockNode, renewed Lease, every replica on the node reported healthy).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use api::{
    BlockNode, BlockNodeSpec, BlockNodeStatus, BlockReplica, BlockReplicaStatus, ReplicaRole,
    ReplicaState,
};
use e2e::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator::replacement::ReplacementSettings;
use operator::{Context, ControllerSettings, LeaderElector, LeaderSettings, Metrics};
use serde_json::json;
use tokio::task::JoinHandle;

pub const NS: &str = "blockvol-system";
/// Longest any single expectation may take.
pub const WAIT_TIMEOUT_MS: u64 = 60_000;
const POLL_MS: u64 = 100;
/// Lease duration the simulated node agents use.
const NODE_LEASE_S: i32 = 10;
const LEASE_RENEW_MS: u64 = 1_000;
pub const MIB: i64 = 1 << 20;

pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
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
pub struct Task(pub JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A simulated node agent: a BlockNode with space and a Lease renewed until dropped,
/// plus every replica placed on it reported healthy (primary Serving, others InSync).
pub async fn agent(client: &Client, name: &str) -> Task {
    let nodes: Api<BlockNode> = Api::all(client.clone());
    let node = BlockNode::new(
        name,
        BlockNodeSpec {
            node_name: name.into(),
            data_address: "127.0.0.1:7400".into(),
            data_dir: "/var/lib/blockvol".into(),
            topology: BTreeMap::new(),
            ..Default::default()
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

pub fn healthy(r: &BlockReplica) -> BlockReplicaStatus {
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
pub fn operator(client: &Client) -> Task {
    let settings = ControllerSettings {
        node_lease_namespace: NS.into(),
        replacement: ReplacementSettings {
            replica_failure_grace_ms: 600_000,
            node_gone_grace_ms: 600_000,
            max_rebuilds_per_node: 2,
            ..ReplacementSettings::default()
        },
        resync_interval_ms: 1_000,
        error_backoff_initial_ms: 100,
        error_backoff_max_ms: 2_000,
        deletion_poll_ms: 200,
        concurrency: 2,
        moves: Default::default(),
        ..Default::default()
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

/// A control plane with the CRDs and the release namespace.
pub async fn start(opts: ControlPlaneOptions) -> ControlPlane {
    let cp = ControlPlane::start(opts)
        .await
        .expect("control plane starts");
    cp.apply_crds(&e2e::crds_dir()).await.expect("CRDs apply");
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(cp.client())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    cp
}
