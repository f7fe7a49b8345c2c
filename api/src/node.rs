//! `BlockNode`: one per node agent. The agent writes both spec (what it was started
//! with) and status (what it measures); liveness is a `coordination.k8s.io` Lease named
//! after the node in the agent's namespace, renewed by the agent (the kubelet pattern).
//!
//! Two spec fields belong to the cluster admin instead (set by `kubectl blockvol
//! cordon|drain`): `cordoned` keeps new replicas off the node, `evacuate` asks the
//! operator to move every replica off it. The agent's server-side apply never names
//! them, so it never resets them; the operator reports a drain in `status.evacuation`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blockvol.io",
    version = "v1alpha1",
    kind = "BlockNode",
    shortname = "bn",
    status = "BlockNodeStatus",
    category = "blockvol",
    doc = "One blockvol node agent: where its replicas live and how to reach it (written by the agent); liveness is the agent's Lease, named after the node.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Free","type":"string","jsonPath":".status.free"}"#,
    printcolumn = r#"{"name":"Cordoned","type":"boolean","jsonPath":".spec.cordoned"}"#,
    printcolumn = r#"{"name":"Evacuate","type":"boolean","jsonPath":".spec.evacuate"}"#,
    printcolumn = r#"{"name":"Left","type":"integer","jsonPath":".status.evacuation.replicasLeft"}"#,
    printcolumn = r#"{"name":"CapacityBytes","type":"integer","jsonPath":".status.capacityBytes","priority":1}"#,
    printcolumn = r#"{"name":"AllocatableBytes","type":"integer","jsonPath":".status.allocatableBytes","priority":1}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.dataAddress","priority":1}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.agentVersion","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BlockNodeSpec {
    /// The Kubernetes node this agent runs on.
    pub node_name: String,
    /// Replication data port, canonical `ip:port` (never a wildcard or `:port`).
    #[schemars(regex(pattern = r"^[0-9a-fA-F.:\[\]]+:[0-9]{1,5}$"))]
    pub data_address: String,
    /// Directory holding this node's replicas.
    pub data_dir: String,
    /// Topology labels copied from the Node (zone, hostname) for placement.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub topology: std::collections::BTreeMap<String, String>,
    /// Storage cordon, set by the cluster admin: no new replica is placed on this node;
    /// replicas already here stay and keep serving. Independent of the Kubernetes cordon
    /// (`Node.spec.unschedulable`), which the operator honours as well.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cordoned: bool,
    /// Drain, set by the cluster admin: the operator moves every replica off this node
    /// (a new replica elsewhere catches up and joins the in-sync set before the one here
    /// is removed; a primary here is first moved by a planned switchover). Implies
    /// `cordoned`. Progress is in `status.evacuation`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub evacuate: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl BlockNodeSpec {
    /// No new replica may be placed here (storage cordon or drain).
    pub fn storage_cordoned(&self) -> bool {
        self.cordoned || self.evacuate
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockNodeStatus {
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Capacity not yet promised to replicas.
    #[serde(default)]
    pub allocatable_bytes: u64,
    /// `capacityBytes` for people, in binary units (`20Gi`, `1.5Ti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// `allocatableBytes` for people, in binary units: the space new replicas can still
    /// get here (rounded down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<String>,
    /// Replicas hosted on this node, as the agent counts them.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
    /// `Ready` (the agent is registered, its Lease is renewing and its data directory
    /// is usable) and `DiskPressure` (little free space left), written by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Progress of a drain (`spec.evacuate`), written by the operator only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<EvacuationStatus>,
}

/// Where a drain of the node stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationStatus {
    /// `BlockReplica` objects still assigned to this node (including those being
    /// deleted, whose disk space the agent has not freed yet).
    pub replicas_left: u32,
    /// Volumes that still have a replica here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes_left: Vec<String>,
    /// True once no replica is left: the node may be taken down.
    #[serde(default)]
    pub complete: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub path: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
}
