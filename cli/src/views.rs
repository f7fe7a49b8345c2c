//! The rows `kubectl blockvol get` prints, computed from a [`Snapshot`] of the cluster:
//! BlockVolumes joined with their replicas, the PersistentVolume that names them (for
//! the claim), and the agents' Leases (for node readiness). Pure functions of the
//! snapshot, so every column is tested without a cluster.
//!
//! Lag is the replica's `status.lag` (the primary's head LSN minus the replica's flushed
//! LSN, as the primary last reported it, so a stopped replica's lag still grows); for a
//! replica without one, the primary's flushed LSN minus the replica's, both as the
//! agents last reported them. It is 0 for the primary and unknown (`-`) when the volume
//! has no primary reporting.

use std::collections::BTreeMap;

use api::{BlockNode, BlockReplica, BlockVolume, ReplicaRole};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde::Serialize;

use crate::format::{Table, age, human_bytes, in_sync_cell, lag_cell, lag_lsn};

/// Everything the views are computed from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub volumes: Vec<BlockVolume>,
    pub replicas: Vec<BlockReplica>,
    pub nodes: Vec<BlockNode>,
    /// PersistentVolumes of the blockvol driver; `None` when they could not be read
    /// (RBAC), so the claim column shows `?` rather than a wrong blank.
    pub pvs: Option<Vec<PersistentVolume>>,
    /// The agents' Leases; `None` when they could not be read.
    pub leases: Option<Vec<Lease>>,
    pub now: Option<Timestamp>,
}

impl Snapshot {
    fn now(&self) -> Timestamp {
        self.now.unwrap_or_else(Timestamp::now)
    }

    /// The replicas of one volume, primaries first, then by node.
    pub fn replicas_of(&self, volume: &str) -> Vec<&BlockReplica> {
        let mut rs: Vec<&BlockReplica> = self
            .replicas
            .iter()
            .filter(|r| r.spec.volume == volume)
            .collect();
        rs.sort_by(|a, b| {
            (a.spec.role != ReplicaRole::Primary, &a.spec.node)
                .cmp(&(b.spec.role != ReplicaRole::Primary, &b.spec.node))
        });
        rs
    }

    /// The flushed LSN of the volume's current primary, as its agent reports it.
    pub fn primary_flushed(&self, volume: &BlockVolume) -> Option<u64> {
        primary_flushed(volume, self.replicas.iter())
    }

    /// `namespace/name` of the claim bound to the PV whose handle is this volume.
    pub fn claim_of(&self, volume: &str) -> Claim {
        match &self.pvs {
            None => Claim::Unknown,
            Some(pvs) => pvs
                .iter()
                .filter(|pv| pv_handle(pv) == Some(volume))
                .find_map(|pv| {
                    let c = pv.spec.as_ref()?.claim_ref.as_ref()?;
                    Some(Claim::Bound {
                        namespace: c.namespace.clone().unwrap_or_default(),
                        name: c.name.clone().unwrap_or_default(),
                        pv: pv.name_any(),
                    })
                })
                .unwrap_or(Claim::None),
        }
    }

    /// Whether the agent of `node` renewed its Lease within the Lease's duration.
    pub fn node_ready(&self, node: &str) -> Option<bool> {
        let leases = self.leases.as_ref()?;
        let Some(lease) = leases.iter().find(|l| l.name_any() == node) else {
            return Some(false);
        };
        Some(lease_fresh(lease, self.now()))
    }
}

/// The volume handle of a PV of the blockvol CSI driver.
pub fn pv_handle(pv: &PersistentVolume) -> Option<&str> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == api::CSI_DRIVER_NAME).then_some(csi.volume_handle.as_str())
}

/// Whether a Lease was renewed (or acquired) less than its duration ago.
pub fn lease_fresh(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed.0 + SignedDuration::from_secs(duration) > now
}

/// How many LSNs `r` is behind: its `status.lag` when the operator wrote one, else
/// `primary_flushed` (the primary's flushed LSN) minus its own flushed LSN.
pub fn replica_lag(r: &BlockReplica, primary_flushed: Option<u64>) -> Option<u64> {
    let status = r.status.as_ref();
    status
        .and_then(|s| s.lag.as_ref())
        .map(|l| l.lsn)
        .or_else(|| lag_lsn(primary_flushed, status.map_or(0, |s| s.flushed_lsn)))
}

/// The flushed LSN of the volume's current primary among `replicas`: the replica the
/// volume status names as primary, else the `Primary` of the highest epoch.
pub fn primary_flushed<'a>(
    volume: &BlockVolume,
    replicas: impl Iterator<Item = &'a BlockReplica>,
) -> Option<u64> {
    let name = volume.name_any();
    let named = volume.status.as_ref().and_then(|s| s.primary.as_deref());
    let mut best: Option<&BlockReplica> = None;
    for r in replicas.filter(|r| r.spec.volume == name) {
        if named == Some(r.spec.replica_id.as_str()) {
            return r.status.as_ref().map(|s| s.flushed_lsn);
        }
        if named.is_none()
            && r.spec.role == ReplicaRole::Primary
            && best.is_none_or(|b| b.spec.epoch < r.spec.epoch)
        {
            best = Some(r);
        }
    }
    best.and_then(|r| r.status.as_ref().map(|s| s.flushed_lsn))
}

/// Who claims a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Bound {
        namespace: String,
        name: String,
        pv: String,
    },
    /// No PV of the driver names the volume (e.g. a `kubectl apply`'d BlockVolume).
    None,
    /// PVs could not be read.
    Unknown,
}

impl Claim {
    pub fn cell(&self) -> String {
        match self {
            Claim::Bound {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
            Claim::None => "<none>".into(),
            Claim::Unknown => "?".into(),
        }
    }

    fn value(&self) -> Option<String> {
        matches!(self, Claim::Bound { .. }).then(|| self.cell())
    }
}

/// One line of `get volumes`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRow {
    pub name: String,
    pub size: String,
    pub size_bytes: Option<u64>,
    pub replicas: u8,
    pub in_sync: u32,
    pub phase: String,
    pub primary_node: Option<String>,
    pub attached_to: Option<String>,
    /// `namespace/name` of the bound claim.
    pub pvc: Option<String>,
    pub durability: String,
    pub epoch: u64,
    /// Largest lag of any replica behind the primary, in LSNs.
    pub max_lag_lsn: Option<u64>,
    pub age: String,
}

/// One line of `get replicas`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRow {
    pub name: String,
    pub volume: String,
    pub replica_id: String,
    pub node: String,
    pub role: String,
    pub state: String,
    pub epoch: u64,
    pub flushed_lsn: u64,
    pub lag_lsn: Option<u64>,
    /// Whether the replica is in the volume's committed in-sync set.
    pub in_sync_set: bool,
    pub last_error: Option<String>,
    pub age: String,
}

/// One line of `get nodes`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    /// The agent's Lease is fresh; `None` when Leases could not be read.
    pub ready: Option<bool>,
    pub address: String,
    pub capacity_bytes: u64,
    /// Capacity not yet promised to replicas (bounded by the filesystem's free space).
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub replicas: usize,
    pub primaries: usize,
    /// The admin's storage state: `Draining` / `Drained` (`spec.evacuate`), `Cordoned`
    /// (`spec.cordoned`), or `-`.
    pub maintenance: String,
    pub version: Option<String>,
    pub age: String,
}

/// The storage maintenance state of a node, one word.
pub fn maintenance_state(n: &api::BlockNode) -> &'static str {
    let complete = n
        .status
        .as_ref()
        .and_then(|s| s.evacuation.as_ref())
        .is_some_and(|e| e.complete);
    match (n.spec.evacuate, n.spec.cordoned) {
        (true, _) if complete => "Drained",
        (true, _) => "Draining",
        (false, true) => "Cordoned",
        (false, false) => "-",
    }
}

fn created_age(meta: &kube::api::ObjectMeta, now: Timestamp) -> String {
    meta.creation_timestamp
        .as_ref()
        .map_or_else(|| "-".into(), |t| age(t.0, now))
}

pub fn volume_rows(snap: &Snapshot) -> Vec<VolumeRow> {
    let now = snap.now();
    let mut rows: Vec<VolumeRow> = snap
        .volumes
        .iter()
        .map(|v| {
            let name = v.name_any();
            let status = v.status.clone().unwrap_or_default();
            let size_bytes = v.spec.size_bytes().ok();
            let primary = snap.primary_flushed(v);
            let max_lag = snap
                .replicas_of(&name)
                .iter()
                .filter_map(|r| replica_lag(r, primary))
                .max();
            VolumeRow {
                size: size_bytes.map_or_else(|| size_spec(v), human_bytes),
                size_bytes,
                replicas: v.spec.replicas,
                in_sync: status.in_sync_count,
                phase: format!("{:?}", status.phase),
                primary_node: status.primary_node.clone(),
                attached_to: status
                    .attached_to
                    .clone()
                    .or_else(|| v.annotations().get(api::ANNOTATION_ATTACHED_NODE).cloned()),
                pvc: snap.claim_of(&name).value(),
                durability: v.spec.durability.as_str().into(),
                epoch: status.epoch,
                max_lag_lsn: max_lag,
                age: created_age(&v.metadata, now),
                name,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// `spec.size` as written, for a size that does not parse.
pub fn size_spec(v: &BlockVolume) -> String {
    match &v.spec.size {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
    }
}

pub fn replica_rows(snap: &Snapshot, volume: Option<&str>) -> Vec<ReplicaRow> {
    let now = snap.now();
    let volumes: BTreeMap<String, &BlockVolume> =
        snap.volumes.iter().map(|v| (v.name_any(), v)).collect();
    let mut rows: Vec<ReplicaRow> = snap
        .replicas
        .iter()
        .filter(|r| volume.is_none_or(|v| r.spec.volume == v))
        .map(|r| {
            let status = r.status.clone().unwrap_or_default();
            let vol = volumes.get(&r.spec.volume);
            let primary = vol.and_then(|v| snap.primary_flushed(v));
            let in_set = vol
                .and_then(|v| v.status.as_ref())
                .is_some_and(|s| s.in_sync_set.contains(&r.spec.replica_id));
            ReplicaRow {
                name: r.name_any(),
                volume: r.spec.volume.clone(),
                replica_id: r.spec.replica_id.clone(),
                node: r.spec.node.clone(),
                role: role_cell(r),
                state: format!("{:?}", status.state),
                epoch: status.epoch,
                flushed_lsn: status.flushed_lsn,
                lag_lsn: replica_lag(r, primary),
                in_sync_set: in_set,
                last_error: status.last_error.clone(),
                age: created_age(&r.metadata, now),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.volume, a.role != "Primary", &a.node).cmp(&(&b.volume, b.role != "Primary", &b.node))
    });
    rows
}

/// The assigned role, and the acting one when the agent has not caught up with it
/// (`Replica→Primary` while a promotion is being carried out).
pub fn role_cell(r: &BlockReplica) -> String {
    let assigned = role_name(r.spec.role);
    match r.status.as_ref().and_then(|s| s.role) {
        Some(acting) if acting != r.spec.role => format!("{}→{assigned}", role_name(acting)),
        _ => assigned.into(),
    }
}

fn role_name(role: ReplicaRole) -> &'static str {
    match role {
        ReplicaRole::Primary => "Primary",
        ReplicaRole::Replica => "Replica",
    }
}

pub fn node_rows(snap: &Snapshot) -> Vec<NodeRow> {
    let now = snap.now();
    let mut rows: Vec<NodeRow> = snap
        .nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let status = n.status.clone().unwrap_or_default();
            let on_node = snap.replicas.iter().filter(|r| r.spec.node == name);
            NodeRow {
                ready: snap.node_ready(&name),
                address: n.spec.data_address.clone(),
                capacity_bytes: status.capacity_bytes,
                free_bytes: status.allocatable_bytes,
                used_bytes: status
                    .capacity_bytes
                    .saturating_sub(status.allocatable_bytes),
                replicas: on_node.clone().count(),
                primaries: on_node
                    .filter(|r| r.spec.role == ReplicaRole::Primary)
                    .count(),
                maintenance: maintenance_state(n).into(),
                version: status.agent_version.clone(),
                age: created_age(&n.metadata, now),
                name,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "<none>".into())
}

/// The `get volumes` table; `wide` adds durability, epoch and the largest lag.
pub fn volume_table(rows: &[VolumeRow], wide: bool) -> Table {
    let mut header = vec![
        "NAME", "SIZE", "REPLICAS", "IN-SYNC", "PHASE", "PRIMARY", "ATTACHED", "PVC",
    ];
    if wide {
        header.extend(["DURABILITY", "EPOCH", "MAX-LAG"]);
    }
    header.push("AGE");
    let mut t = Table::new(header);
    for r in rows {
        let mut cells = vec![
            r.name.clone(),
            r.size.clone(),
            r.replicas.to_string(),
            in_sync_cell(r.in_sync, r.replicas),
            r.phase.clone(),
            opt(&r.primary_node),
            opt(&r.attached_to),
            r.pvc.clone().unwrap_or_else(|| "<none>".into()),
        ];
        if wide {
            cells.extend([
                r.durability.clone(),
                r.epoch.to_string(),
                lag_cell(r.max_lag_lsn),
            ]);
        }
        cells.push(r.age.clone());
        t.row(cells);
    }
    t
}

/// The `get replicas` table; `wide` adds the replica ID, flushed LSN and last error.
pub fn replica_table(rows: &[ReplicaRow], wide: bool) -> Table {
    let mut header = vec![
        "NAME", "VOLUME", "NODE", "ROLE", "STATE", "EPOCH", "LAG", "IN-SET",
    ];
    if wide {
        header.extend(["REPLICA-ID", "FLUSHED-LSN", "LAST-ERROR"]);
    }
    header.push("AGE");
    let mut t = Table::new(header);
    for r in rows {
        let mut cells = vec![
            r.name.clone(),
            r.volume.clone(),
            r.node.clone(),
            r.role.clone(),
            r.state.clone(),
            r.epoch.to_string(),
            lag_cell(r.lag_lsn),
            if r.in_sync_set { "yes" } else { "no" }.into(),
        ];
        if wide {
            cells.extend([
                r.replica_id.clone(),
                r.flushed_lsn.to_string(),
                opt(&r.last_error),
            ]);
        }
        cells.push(r.age.clone());
        t.row(cells);
    }
    t
}

/// The `get nodes` table; `wide` adds the address and agent version.
pub fn node_table(rows: &[NodeRow], wide: bool) -> Table {
    let mut header = vec![
        "NAME",
        "READY",
        "CAPACITY",
        "FREE",
        "USED",
        "REPLICAS",
        "PRIMARIES",
        "MAINTENANCE",
    ];
    if wide {
        header.extend(["ADDRESS", "VERSION"]);
    }
    header.push("AGE");
    let mut t = Table::new(header);
    for r in rows {
        let mut cells = vec![
            r.name.clone(),
            match r.ready {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            }
            .into(),
            human_bytes(r.capacity_bytes),
            human_bytes(r.free_bytes),
            human_bytes(r.used_bytes),
            r.replicas.to_string(),
            r.primaries.to_string(),
            r.maintenance.clone(),
        ];
        if wide {
            cells.extend([r.address.clone(), opt(&r.version)]);
        }
        cells.push(r.age.clone());
        t.row(cells);
    }
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use api::{
        BlockNodeSpec, BlockNodeStatus, BlockReplicaSpec, BlockReplicaStatus, BlockVolumeSpec,
        BlockVolumeStatus, Durability, ReplicaState, VolumePhase,
    };
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, ObjectReference, PersistentVolumeSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    pub fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    pub fn volume(name: &str, size: &str) -> BlockVolume {
        let mut v = BlockVolume::new(name, BlockVolumeSpec::with_size(size));
        v.metadata.creation_timestamp = Some(Time(now() - SignedDuration::from_secs(300)));
        v.status = Some(BlockVolumeStatus {
            phase: VolumePhase::Degraded,
            epoch: 3,
            primary: Some(format!("{name}-a")),
            primary_node: Some("node-1".into()),
            in_sync_set: vec![format!("{name}-a"), format!("{name}-b")],
            in_sync_set_generation: 5,
            in_sync_count: 2,
            attached_to: Some("node-2".into()),
            ..Default::default()
        });
        v
    }

    pub fn replica(
        volume: &str,
        id: &str,
        node: &str,
        role: ReplicaRole,
        state: ReplicaState,
        flushed: u64,
    ) -> BlockReplica {
        let mut r = BlockReplica::new(
            &format!("{volume}-{id}"),
            BlockReplicaSpec {
                pvc: None,
                volume: volume.into(),
                replica_id: format!("{volume}-{id}"),
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
        r.status = Some(BlockReplicaStatus {
            state,
            epoch: 3,
            flushed_lsn: flushed,
            ..Default::default()
        });
        r
    }

    pub fn snapshot() -> Snapshot {
        let pv = PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some("pv-data".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: api::CSI_DRIVER_NAME.into(),
                    volume_handle: "vol-1".into(),
                    ..Default::default()
                }),
                claim_ref: Some(ObjectReference {
                    namespace: Some("apps".into()),
                    name: Some("data".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let lease = |node: &str, secs_ago: i64| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(node.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(now() - SignedDuration::from_secs(secs_ago))),
                lease_duration_seconds: Some(10),
                ..Default::default()
            }),
        };
        let node = |name: &str, cap: u64, free: u64| {
            let mut n = BlockNode::new(
                name,
                BlockNodeSpec {
                    node_name: name.into(),
                    data_address: "127.0.0.1:7000".into(),
                    data_dir: "/var/lib/blockvol".into(),
                    topology: Default::default(),
                    ..Default::default()
                },
            );
            n.status = Some(BlockNodeStatus {
                capacity_bytes: cap,
                allocatable_bytes: free,
                agent_version: Some("0.1.0".into()),
                ..Default::default()
            });
            n
        };
        Snapshot {
            volumes: vec![volume("vol-1", "10Gi"), volume("vol-2", "1536")],
            replicas: vec![
                replica(
                    "vol-1",
                    "a",
                    "node-1",
                    ReplicaRole::Primary,
                    ReplicaState::Serving,
                    120,
                ),
                replica(
                    "vol-1",
                    "b",
                    "node-2",
                    ReplicaRole::Replica,
                    ReplicaState::InSync,
                    117,
                ),
                replica(
                    "vol-1",
                    "c",
                    "node-3",
                    ReplicaRole::Replica,
                    ReplicaState::Rebuilding,
                    40,
                ),
            ],
            nodes: vec![
                node("node-1", 100 << 30, 90 << 30),
                node("node-2", 1 << 40, 1 << 40),
            ],
            pvs: Some(vec![pv]),
            leases: Some(vec![lease("node-1", 3)]),
            now: Some(now()),
        }
    }

    #[test]
    fn volume_rows_join_size_claim_attachment_and_worst_lag() {
        let rows = volume_rows(&snapshot());
        let v1 = &rows[0];
        assert_eq!(v1.name, "vol-1");
        assert_eq!(v1.size, "10Gi");
        assert_eq!(v1.pvc.as_deref(), Some("apps/data"));
        assert_eq!(v1.attached_to.as_deref(), Some("node-2"));
        assert_eq!(v1.max_lag_lsn, Some(80));
        assert_eq!(v1.age, "5m");
        // A volume with no replicas reporting has no lag to show, and no claim.
        let v2 = &rows[1];
        assert_eq!(v2.size, "1.5Ki");
        assert_eq!(v2.pvc, None);
        assert_eq!(v2.max_lag_lsn, None);
    }

    #[test]
    fn replica_lag_is_measured_against_the_named_primary() {
        let rows = replica_rows(&snapshot(), Some("vol-1"));
        let lags: Vec<_> = rows
            .iter()
            .map(|r| (r.node.as_str(), r.lag_lsn, r.in_sync_set))
            .collect();
        assert_eq!(
            lags,
            [
                ("node-1", Some(0), true),
                ("node-2", Some(3), true),
                ("node-3", Some(80), false)
            ]
        );
    }

    #[test]
    fn the_lag_the_primary_reports_wins_over_the_replica_own_report() {
        let mut snap = snapshot();
        // node-3's agent is stopped: its own flushed LSN is stale, the primary's count
        // of what it misses is not.
        let r = snap
            .replicas
            .iter_mut()
            .find(|r| r.spec.node == "node-3")
            .unwrap();
        r.status.as_mut().unwrap().lag = Some(api::ReplicaLag {
            lsn: 250,
            bytes: Some(1 << 20),
        });
        let rows = replica_rows(&snap, Some("vol-1"));
        let lag = rows.iter().find(|r| r.node == "node-3").unwrap().lag_lsn;
        assert_eq!(lag, Some(250));
        let vols = volume_rows(&snap);
        assert_eq!(vols[0].max_lag_lsn, Some(250));
    }

    #[test]
    fn without_a_named_primary_the_highest_epoch_primary_is_the_reference() {
        let mut snap = snapshot();
        snap.volumes[0].status.as_mut().unwrap().primary = None;
        snap.replicas.push({
            let mut old = replica(
                "vol-1",
                "old",
                "node-4",
                ReplicaRole::Primary,
                ReplicaState::Failed,
                500,
            );
            old.spec.epoch = 1;
            old
        });
        assert_eq!(snap.primary_flushed(&snap.volumes[0]), Some(120));
    }

    #[test]
    fn a_role_change_in_flight_shows_both_roles() {
        let mut r = replica("v", "a", "n", ReplicaRole::Primary, ReplicaState::InSync, 0);
        r.status.as_mut().unwrap().role = Some(ReplicaRole::Replica);
        assert_eq!(role_cell(&r), "Replica→Primary");
        r.status.as_mut().unwrap().role = Some(ReplicaRole::Primary);
        assert_eq!(role_cell(&r), "Primary");
    }

    #[test]
    fn node_rows_count_replicas_and_read_readiness_from_the_lease() {
        let rows = node_rows(&snapshot());
        let n1 = &rows[0];
        assert_eq!(n1.ready, Some(true));
        assert_eq!((n1.replicas, n1.primaries), (1, 1));
        assert_eq!(n1.used_bytes, 10 << 30);
        // No Lease at all: not ready.
        assert_eq!(rows[1].ready, Some(false));
        let mut snap = snapshot();
        snap.leases = None;
        assert_eq!(node_rows(&snap)[0].ready, None);
    }

    #[test]
    fn an_expired_lease_is_not_ready() {
        let mut snap = snapshot();
        let spec = snap.leases.as_mut().unwrap()[0].spec.as_mut().unwrap();
        spec.renew_time = Some(MicroTime(now() - SignedDuration::from_secs(11)));
        assert_eq!(snap.node_ready("node-1"), Some(false));
    }

    #[test]
    fn unreadable_pvs_show_a_question_mark_not_a_blank() {
        let mut snap = snapshot();
        snap.pvs = None;
        assert_eq!(snap.claim_of("vol-1"), Claim::Unknown);
        assert_eq!(snap.claim_of("vol-1").cell(), "?");
        assert_eq!(volume_rows(&snap)[0].pvc, None);
    }

    #[test]
    fn a_size_that_does_not_parse_is_shown_as_written() {
        let mut snap = snapshot();
        snap.volumes[1].spec.size = IntOrString::String("ten gigs".into());
        assert_eq!(volume_rows(&snap)[1].size, "ten gigs");
    }

    #[test]
    fn tables_render_human_columns() {
        let snap = snapshot();
        let text = volume_table(&volume_rows(&snap), false).render();
        let line = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "vol-1",
                "10Gi",
                "3",
                "2/3",
                "Degraded",
                "node-1",
                "node-2",
                "apps/data",
                "5m"
            ]
        );
        let wide = volume_table(&volume_rows(&snap), true).render();
        assert!(wide.lines().next().unwrap().contains("MAX-LAG"), "{wide}");
        let nodes = node_table(&node_rows(&snap), false).render();
        let n1: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            n1,
            [
                "node-1", "True", "100Gi", "90Gi", "10Gi", "1", "1", "-", "-"
            ]
        );
        let reps = replica_table(&replica_rows(&snap, None), true).render();
        assert!(reps.contains("vol-1-c"), "{reps}");
    }
}
