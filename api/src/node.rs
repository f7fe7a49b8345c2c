//! `BlockNode`: one per node agent. The agent writes both spec (what it was started
//! with) and status (what it measures); liveness is a `coordination.k8s.io` Lease named
//! after the node in the agent's namespace, renewed by the agent (the kubelet pattern).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "blockvol.io",
    version = "v1alpha1",
    kind = "BlockNode",
    shortname = "bn",
    status = "BlockNodeStatus",
    category = "blockvol",
    doc = "One blockvol node agent: where its replicas live and how to reach it (written by the agent); liveness is the agent's Lease, named after the node.",
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.capacityBytes"}"#,
    printcolumn = r#"{"name":"Allocatable","type":"integer","jsonPath":".status.allocatableBytes"}"#,
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
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockNodeStatus {
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Capacity not yet promised to replicas.
    #[serde(default)]
    pub allocatable_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub path: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
}
