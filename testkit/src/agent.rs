//! A node agent played by the test: a registered BlockNode with space, a Lease renewed
//! until the returned [`Task`] is dropped and, if asked, every replica placed on the node
//! reported healthy. Enough for the operator to place, commit and promote without a real
//! agent.

use std::collections::BTreeMap;
use std::time::Duration;

use api::{
    BlockNode, BlockNodeSpec, BlockNodeStatus, BlockReplica, BlockReplicaStatus, ReplicaRole,
    ReplicaState,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::task::Task;

/// Capacity (and allocatable space) every played node reports.
pub const NODE_CAPACITY_BYTES: u64 = 1 << 34;
/// Field manager of the played agent's Lease.
const LEASE_FIELD_MANAGER: &str = "test-agent";

/// What a played node agent registers and how often it renews its Lease.
#[derive(Debug, Clone)]
pub struct FakeAgent {
    pub node: String,
    /// Namespace of the node Leases.
    pub namespace: String,
    pub data_address: String,
    pub topology: BTreeMap<String, String>,
    pub lease_duration_s: i32,
    pub renew_interval_ms: u64,
    /// Report every replica on the node healthy (primary Serving, others InSync) on each
    /// renewal.
    pub report_replicas_healthy: bool,
}

impl FakeAgent {
    /// Node `node` with its Lease in `namespace`: data address `127.0.0.1:7400`, no
    /// topology, a 10 s Lease renewed every second, replicas left alone.
    pub fn new(node: &str, namespace: &str) -> FakeAgent {
        FakeAgent {
            node: node.into(),
            namespace: namespace.into(),
            data_address: "127.0.0.1:7400".into(),
            topology: BTreeMap::new(),
            lease_duration_s: 10,
            renew_interval_ms: 1_000,
            report_replicas_healthy: false,
        }
    }

    pub fn data_address(mut self, address: impl Into<String>) -> FakeAgent {
        self.data_address = address.into();
        self
    }

    /// Places the node in `zone` (`topology.kubernetes.io/zone`).
    pub fn zone(mut self, zone: &str) -> FakeAgent {
        self.topology
            .insert("topology.kubernetes.io/zone".into(), zone.into());
        self
    }

    pub fn lease(mut self, duration_s: i32, renew_interval_ms: u64) -> FakeAgent {
        self.lease_duration_s = duration_s;
        self.renew_interval_ms = renew_interval_ms;
        self
    }

    pub fn reporting_replicas_healthy(mut self) -> FakeAgent {
        self.report_replicas_healthy = true;
        self
    }

    /// Registers the BlockNode with its status, then renews the Lease (and reports the
    /// replicas) until the returned task is dropped. Panics if registration fails.
    pub async fn start(self, client: &Client) -> Task {
        let nodes: Api<BlockNode> = Api::all(client.clone());
        let node = BlockNode::new(
            &self.node,
            BlockNodeSpec {
                node_name: self.node.clone(),
                data_address: self.data_address.clone(),
                data_dir: "/var/lib/blockvol".into(),
                topology: self.topology.clone(),
                ..Default::default()
            },
        );
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("BlockNode");
        let status = BlockNodeStatus {
            capacity_bytes: NODE_CAPACITY_BYTES,
            allocatable_bytes: NODE_CAPACITY_BYTES,
            ..Default::default()
        };
        nodes
            .patch_status(
                &self.node,
                &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
                &Patch::Apply(
                    json!({"apiVersion": "blockvol.io/v1alpha1", "kind": "BlockNode", "status": status}),
                ),
            )
            .await
            .expect("BlockNode status");
        let leases: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let replicas: Api<BlockReplica> = Api::all(client.clone());
        Task::spawn(async move {
            let name = self.node;
            loop {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: Some(self.lease_duration_s),
                        renew_time: Some(MicroTime(Timestamp::now())),
                        ..Default::default()
                    }),
                };
                let _ = leases
                    .patch(
                        &name,
                        &PatchParams::apply(LEASE_FIELD_MANAGER).force(),
                        &Patch::Apply(&lease),
                    )
                    .await;
                if self.report_replicas_healthy {
                    report_healthy(&replicas, &name).await;
                }
                tokio::time::sleep(Duration::from_millis(self.renew_interval_ms)).await;
            }
        })
    }
}

/// Writes a healthy status for every replica placed on `node`; failures are retried on
/// the next renewal.
async fn report_healthy(replicas: &Api<BlockReplica>, node: &str) {
    let mine = ListParams::default().labels(&format!("{}={node}", api::LABEL_NODE));
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
}

/// The status a healthy agent reports for `r`: the primary Serving, the others InSync,
/// at the replica's epoch and size.
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
