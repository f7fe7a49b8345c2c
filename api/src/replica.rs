//! `BlockReplica`: one replica's assignment. The spec is written by the operator only
//! (node, role, epoch, geometry, peers, committed in-sync set); the status by the node
//! agent only (state, LSNs, per-peer states). One writer per field, so no status fights.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::volume::Durability;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "blockvol.io",
    version = "v1alpha1",
    kind = "BlockReplica",
    shortname = "br",
    status = "BlockReplicaStatus",
    category = "blockvol",
    doc = "One replica of a BlockVolume: the operator's assignment (node, role, epoch, peers, committed in-sync set) and its node agent's report (state, LSNs, peers).",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".spec.epoch"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","description":"LSNs this replica's disk is behind its primary's head, as the primary last reported","jsonPath":".status.lag.lsn"}"#,
    printcolumn = r#"{"name":"Rebuild","type":"integer","description":"Percent of the rebuild's base copied","jsonPath":".status.rebuild.percent"}"#,
    printcolumn = r#"{"name":"Acting","type":"string","jsonPath":".status.role","priority":1}"#,
    printcolumn = r#"{"name":"Flushed","type":"integer","jsonPath":".status.flushedLsn","priority":1}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.lastError","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.replicaId == oldSelf.replicaId && self.volume == oldSelf.volume && self.node == oldSelf.node",
        "message": "spec.replicaId, spec.volume and spec.node are immutable: a replica never moves",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.epoch >= oldSelf.epoch",
        "message": "spec.epoch may only grow",
        "fieldPath": ".epoch",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct BlockReplicaSpec {
    /// Name of the owning `BlockVolume`.
    pub volume: String,
    /// Stable identity of this replica; never an address.
    pub replica_id: String,
    /// Node whose agent runs this replica.
    pub node: String,
    pub role: ReplicaRole,
    /// Replication epoch this assignment belongs to.
    pub epoch: u64,
    /// Volume size in bytes.
    pub size_bytes: u64,
    #[schemars(extend("enum" = [512, 4096]))]
    pub block_size: u32,
    #[serde(default)]
    pub durability: Durability,
    /// For a primary: the replicas it ships to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerAssignment>,
    /// For a primary: the committed in-sync set (ReplicaIDs, including itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_sync_set: Vec<String>,
    #[serde(default)]
    pub in_sync_set_generation: u64,
    /// The claim the volume serves (copied from the volume's `spec.pvc`), for the labels
    /// of the agent's per-volume metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<crate::volume::PvcReference>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplicaRole {
    Primary,
    #[default]
    Replica,
}

/// A peer a primary ships to. The address is resolved from the peer's `BlockNode`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAssignment {
    pub replica_id: String,
    pub node: String,
}

/// Replica states, as the replication protocol defines them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplicaState {
    #[default]
    Pending,
    Disconnected,
    Connecting,
    CatchingUp,
    InSync,
    Degraded,
    NeedsRebuild,
    Rebuilding,
    /// This replica is the primary and serving IO.
    Serving,
    /// The agent cannot run this replica (see `lastError`).
    Failed,
}

/// Observed state of one replica, written by its node agent only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockReplicaStatus {
    #[serde(default)]
    pub state: ReplicaState,
    /// Role the agent is acting in (may lag the spec during a change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ReplicaRole>,
    /// Highest epoch the agent has persisted for this replica.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub head_lsn: u64,
    #[serde(default)]
    pub received_lsn: u64,
    /// Highest LSN durable on this replica's disk.
    #[serde(default)]
    pub flushed_lsn: u64,
    #[serde(default)]
    pub checkpoint_lsn: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// For a primary: what it knows of each peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
    /// For a primary: committed members it cannot reach; flush acks are blocked until
    /// the operator commits an in-sync set without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// The in-sync set generation the agent is acting on.
    #[serde(default)]
    pub in_sync_set_generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// While this replica is being rebuilt: how far the copy of the primary's base image
    /// is (absent otherwise, and while the WAL tail after the base is replayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
    /// For a replica: how far it is behind its primary, copied by the operator from the
    /// primary's `peers` report (the one field of this status the operator writes: a
    /// stopped replica's agent cannot say how far behind it falls). Absent on the
    /// primary and while the primary does not report this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<ReplicaLag>,
}

/// How far a replica's disk is behind its primary.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLag {
    /// The primary's head LSN minus the replica's flushed LSN.
    pub lsn: u64,
    /// Bytes of the primary's WAL entries after the replica's flushed LSN; absent once
    /// those entries left the primary's WAL (the replica then needs a rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl ReplicaLag {
    /// The lag of a replica whose flushed LSN is `peer_flushed` behind a primary whose
    /// head is `head`, with `bytes` of WAL between them when the primary still holds it.
    pub fn behind(head: u64, peer_flushed: u64, bytes: Option<u64>) -> Self {
        let lsn = head.saturating_sub(peer_flushed);
        ReplicaLag {
            lsn,
            // Nothing missing is no bytes missing, whatever the WAL says.
            bytes: if lsn == 0 { Some(0) } else { bytes },
        }
    }
}

/// Progress of a replica's rebuild, as its receiver counts the base blocks installed.
/// Only blocks the primary holds data for are copied, so `bytesTotal` is the primary's
/// allocated size, not the volume size.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// `bytesDone` in whole percent of `bytesTotal` (100 when there is nothing to copy).
    pub percent: u8,
}

/// Condition types a `BlockReplica` reports (set by its node agent). Each condition's
/// `reason` is the replica's state (`Serving`, `InSync`, `CatchingUp`, ...).
pub mod replica_condition {
    /// True while the replica holds every acknowledged write and can serve its role:
    /// a primary `Serving`, a replica `InSync`.
    pub const READY: &str = "Ready";
    /// True while the replica is being caught up or rebuilt.
    pub const RECOVERING: &str = "Recovering";
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub replica_id: String,
    pub state: ReplicaState,
    #[serde(default)]
    pub flushed_lsn: u64,
    /// How far the peer is behind this primary's head, as the primary counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<ReplicaLag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_head_minus_peer_flushed_and_never_negative() {
        assert_eq!(
            ReplicaLag::behind(100, 70, Some(120)),
            ReplicaLag {
                lsn: 30,
                bytes: Some(120)
            }
        );
        // Caught up: zero bytes even when the WAL no longer holds the entries.
        assert_eq!(
            ReplicaLag::behind(100, 100, None),
            ReplicaLag {
                lsn: 0,
                bytes: Some(0)
            }
        );
        // A peer reporting more than the primary's head (just after a promotion).
        assert_eq!(ReplicaLag::behind(90, 100, None).lsn, 0);
        // Entries gone from the WAL: LSNs only.
        assert_eq!(ReplicaLag::behind(500, 10, None).bytes, None);
    }
}
