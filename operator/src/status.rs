//! Volume phase and conditions, aggregated from the replicas (Kubernetes condition
//! conventions: stable CamelCase reasons, a message a user can act on,
//! `observedGeneration`, and `lastTransitionTime` kept while a condition's status holds).

use std::collections::BTreeMap;

use api::volume::condition;
use api::{BlockVolumeStatus, MovePhase, PrimaryMove, ReplicaRole, ReplicaSummary, VolumePhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::model::ReplicaView;
use crate::recovery::VolumeState;
use crate::replacement::{is_rebuilding, unhealthy};

/// Why the volume cannot make progress, when that is the case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Not enough nodes to place replicas (message from placement).
    InsufficientNodes(String),
    /// The primary is gone and no in-sync member can take over.
    NoEligiblePrimary(String),
    /// The stored state names two primaries at one epoch.
    ConflictingPrimaries(String),
    /// The spec cannot be acted on (the API schema normally prevents this).
    InvalidSpec(String),
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    pub generation: Option<i64>,
    pub deleting: bool,
    pub attached_to: Option<&'a str>,
    pub desired_replicas: u8,
    pub state: &'a VolumeState,
    pub replicas: &'a [ReplicaView],
    pub blocked: Option<&'a Blocked>,
    pub size_bytes: Option<u64>,
    /// The primary move to record, if one is in progress.
    pub primary_move: Option<&'a PrimaryMove>,
    pub previous: Option<&'a BlockVolumeStatus>,
    pub now: Timestamp,
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// Stamps a new condition: keeps the previous `lastTransitionTime` when the status did
/// not change, else uses `now`.
pub fn stamp(
    mut c: Condition,
    previous: &[Condition],
    now: Timestamp,
    generation: Option<i64>,
) -> Condition {
    c.observed_generation = generation;
    c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
        Some(p) if p.status == c.status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    c
}

/// What the conditions and the phase are derived from: the replicas that are not being
/// deleted and how the primary and the in-sync members stand among them.
struct Health<'a> {
    epoch: u64,
    live: Vec<&'a ReplicaView>,
    primary: Option<&'a ReplicaView>,
    /// The primary's node is live and it reports serving at the epoch.
    primary_serving: bool,
    /// In-sync members whose node is live and that report healthy at the epoch.
    healthy_members: Vec<&'a str>,
    desired: usize,
    /// Replicas outside the in-sync set that are rebuilding or catching up.
    rebuilding: Vec<&'a str>,
}

impl<'a> Health<'a> {
    fn of(input: &StatusInput<'a>) -> Self {
        let st = input.state;
        let epoch = st.epoch;
        let live: Vec<&ReplicaView> = input.replicas.iter().filter(|r| !r.deleting).collect();
        let primary = st
            .primary
            .as_deref()
            .and_then(|p| live.iter().copied().find(|r| r.id == p));
        let primary_serving = primary.is_some_and(|p| p.node_live && p.healthy_at(epoch));
        let healthy_members: Vec<&str> = st
            .in_sync
            .members
            .iter()
            .filter(|m| {
                live.iter()
                    .any(|r| &r.id == *m && r.node_live && r.healthy_at(epoch))
            })
            .map(|m| m.as_str())
            .collect();
        let rebuilding: Vec<&str> = live
            .iter()
            .filter(|r| !st.in_sync.contains(&r.id) && is_rebuilding(r))
            .map(|r| r.id.as_str())
            .collect();
        Health {
            epoch,
            live,
            primary,
            primary_serving,
            healthy_members,
            desired: usize::from(input.desired_replicas),
            rebuilding,
        }
    }

    fn in_sync_count(&self) -> usize {
        self.healthy_members.len()
    }
}

impl Blocked {
    /// The `Ready` condition's reason while the volume is blocked (also the reason of
    /// the warning Event the plan emits).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Blocked::InsufficientNodes(_) => "InsufficientNodes",
            Blocked::NoEligiblePrimary(_) => "NoEligiblePrimary",
            Blocked::ConflictingPrimaries(_) => "ConflictingPrimaries",
            Blocked::InvalidSpec(_) => "InvalidSpec",
        }
    }

    pub(crate) fn message(&self) -> &str {
        match self {
            Blocked::InsufficientNodes(m)
            | Blocked::NoEligiblePrimary(m)
            | Blocked::ConflictingPrimaries(m)
            | Blocked::InvalidSpec(m) => m,
        }
    }
}

/// The volume status the operator writes.
pub fn volume_status(input: &StatusInput<'_>) -> BlockVolumeStatus {
    let health = Health::of(input);
    let previous_conditions = input
        .previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [
        ready_condition(input, &health),
        degraded_condition(&health),
        rebuilding_condition(&health),
        attached_condition(input),
    ]
    .into_iter()
    .map(|c| stamp(c, previous_conditions, input.now, input.generation))
    .collect();
    let st = input.state;
    BlockVolumeStatus {
        phase: phase(input, &health),
        conditions,
        epoch: health.epoch,
        primary: health.primary.map(|p| p.id.clone()),
        primary_node: health.primary.map(|p| p.node().to_string()),
        in_sync_set: st.in_sync.members.clone(),
        in_sync_set_generation: st.in_sync.generation,
        in_sync_count: u32::try_from(st.in_sync.members.len()).unwrap_or(u32::MAX),
        replicas: replica_summaries(input, &health.live),
        attached_to: input.attached_to.map(String::from),
        size_bytes: input.size_bytes,
        observed_generation: input.generation,
        primary_move: input.primary_move.cloned(),
    }
}

/// `Ready`: the primary serves IO, or why it does not.
fn ready_condition(input: &StatusInput<'_>, h: &Health<'_>) -> Condition {
    let epoch = h.epoch;
    if input.deleting {
        return cond(
            condition::READY,
            false,
            "Deleting",
            "the volume is being deleted".into(),
        );
    }
    if let Some(b) = input.blocked {
        return cond(condition::READY, false, b.reason(), b.message().to_string());
    }
    if let Some(m) = input
        .primary_move
        .filter(|m| m.phase == MovePhase::Demoting)
    {
        return cond(
            condition::READY,
            false,
            "PrimaryMoving",
            format!(
                "primary {} is being demoted so that replica {} on node {} takes over at epoch {}; IO pauses until it does",
                m.from, m.to, m.to_node, m.epoch
            ),
        );
    }
    if h.primary_serving {
        let p = h
            .primary
            .map(|p| (p.id.as_str(), p.node()))
            .unwrap_or_default();
        return cond(
            condition::READY,
            true,
            "PrimaryServing",
            format!(
                "primary {} on node {} serves IO at epoch {epoch}; {} of {} replicas in sync",
                p.0,
                p.1,
                h.in_sync_count(),
                h.desired
            ),
        );
    }
    let msg = match h.primary {
        None => "no primary is assigned yet".to_string(),
        Some(p) if !p.node_live => format!(
            "the node agent of primary {} on node {} is not renewing its lease",
            p.id,
            p.node()
        ),
        Some(p) => format!(
            "waiting for primary {} on node {} to report serving at epoch {epoch}",
            p.id,
            p.node()
        ),
    };
    cond(condition::READY, false, "PrimaryNotReady", msg)
}

/// `Degraded`: fewer healthy in-sync members than `spec.replicas`, naming the others.
fn degraded_condition(h: &Health<'_>) -> Condition {
    let (in_sync_count, desired) = (h.in_sync_count(), h.desired);
    if in_sync_count >= desired {
        return cond(
            condition::DEGRADED,
            false,
            "AllReplicasInSync",
            format!("all {desired} replicas in sync"),
        );
    }
    let out: Vec<&str> = h
        .live
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| !h.healthy_members.contains(id))
        .collect();
    cond(
        condition::DEGRADED,
        true,
        "ReplicasNotInSync",
        format!(
            "{in_sync_count} of {desired} replicas in sync; not in sync: {}",
            if out.is_empty() {
                "(replicas not yet placed)".to_string()
            } else {
                out.join(", ")
            }
        ),
    )
}

/// `Rebuilding`: replicas outside the in-sync set that rebuild or catch up.
fn rebuilding_condition(h: &Health<'_>) -> Condition {
    if h.rebuilding.is_empty() {
        cond(
            condition::REBUILDING,
            false,
            "NoRebuild",
            "no replica is being rebuilt".into(),
        )
    } else {
        cond(
            condition::REBUILDING,
            true,
            "ReplicasRebuilding",
            format!("rebuilding or catching up: {}", h.rebuilding.join(", ")),
        )
    }
}

/// `Attached`: the node the volume is attached to, and whether deletion waits for it.
fn attached_condition(input: &StatusInput<'_>) -> Condition {
    match (input.attached_to, input.deleting) {
        (Some(n), true) => cond(
            condition::ATTACHED,
            true,
            "DeletionWaitsForDetach",
            format!("attached to node {n}; the volume is deleted once it is detached"),
        ),
        (Some(n), false) => cond(
            condition::ATTACHED,
            true,
            "AttachedToNode",
            format!("attached to node {n}"),
        ),
        (None, _) => cond(
            condition::ATTACHED,
            false,
            "NotAttached",
            "not attached to any node".into(),
        ),
    }
}

fn phase(input: &StatusInput<'_>, h: &Health<'_>) -> VolumePhase {
    if input.deleting {
        return VolumePhase::Deleting;
    }
    let previous_phase = input.previous.map(|p| p.phase).unwrap_or_default();
    match input.blocked {
        Some(Blocked::InsufficientNodes(_)) if h.primary.is_none() => VolumePhase::Pending,
        Some(
            Blocked::NoEligiblePrimary(_)
            | Blocked::ConflictingPrimaries(_)
            | Blocked::InvalidSpec(_),
        ) => VolumePhase::Failed,
        // A planned switchover is a pause, not a failure: keep the phase.
        _ if input
            .primary_move
            .is_some_and(|m| m.phase == MovePhase::Demoting) =>
        {
            previous_phase
        }
        _ if h.primary_serving && h.in_sync_count() >= h.desired => VolumePhase::Ready,
        _ if h.primary_serving => VolumePhase::Degraded,
        _ if matches!(
            previous_phase,
            VolumePhase::Ready | VolumePhase::Degraded | VolumePhase::Failed
        ) =>
        {
            VolumePhase::Degraded
        }
        _ => VolumePhase::Creating,
    }
}

/// One summary per replica not being deleted, sorted by ReplicaID. An unhealthy
/// replica keeps the `unhealthySince` of the previous status, so its grace runs from
/// when it first became unhealthy.
fn replica_summaries(input: &StatusInput<'_>, live: &[&ReplicaView]) -> Vec<ReplicaSummary> {
    let previous_since: BTreeMap<&str, &Time> = input
        .previous
        .map(|p| {
            p.replicas
                .iter()
                .filter_map(|s| {
                    s.unhealthy_since
                        .as_ref()
                        .map(|t| (s.replica_id.as_str(), t))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut replicas: Vec<ReplicaSummary> = live
        .iter()
        .map(|r| ReplicaSummary {
            replica_id: r.id.clone(),
            node: r.node().to_string(),
            role: match r.spec.role {
                ReplicaRole::Primary => "Primary",
                ReplicaRole::Replica => "Replica",
            }
            .into(),
            state: format!("{:?}", r.state()),
            flushed_lsn: r.flushed_lsn(),
            unhealthy_since: unhealthy(r).map(|_| {
                previous_since
                    .get(r.id.as_str())
                    .map(|t| (*t).clone())
                    .unwrap_or(Time(input.now))
            }),
        })
        .collect();
    replicas.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
    replicas
}

/// The previous status's `unhealthySince` per replica, for [`crate::replacement`].
pub fn unhealthy_since(previous: Option<&BlockVolumeStatus>) -> BTreeMap<String, Timestamp> {
    previous
        .map(|p| {
            p.replicas
                .iter()
                .filter_map(|s| {
                    s.unhealthy_since
                        .as_ref()
                        .map(|t| (s.replica_id.clone(), t.0))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_sync::InSyncSet;
    use crate::model::test_support::replica;
    use api::ReplicaState::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn state(primary: Option<&str>, set: &[&str]) -> VolumeState {
        VolumeState {
            epoch: 1,
            primary: primary.map(String::from),
            in_sync: InSyncSet::new(set.iter().map(|s| s.to_string()).collect(), 1),
        }
    }

    fn input<'a>(st: &'a VolumeState, replicas: &'a [ReplicaView]) -> StatusInput<'a> {
        StatusInput {
            generation: Some(3),
            deleting: false,
            attached_to: None,
            desired_replicas: 3,
            state: st,
            replicas,
            blocked: None,
            size_bytes: None,
            primary_move: None,
            previous: None,
            now: t(0),
        }
    }

    fn get<'a>(s: &'a BlockVolumeStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn healthy3() -> Vec<ReplicaView> {
        vec![
            replica("a", "n1").primary().reports(Serving, 1, 5),
            replica("b", "n2").reports(InSync, 1, 5),
            replica("c", "n3").reports(InSync, 1, 5),
        ]
    }

    #[test]
    fn phase_and_condition_table() {
        let full = state(Some("a"), &["a", "b", "c"]);
        let two = state(Some("a"), &["a", "b"]);
        let none = state(None, &[]);
        let mut rebuilding = healthy3();
        rebuilding[2] = replica("c", "n3").reports(Rebuilding, 1, 0);
        let mut primary_dead = healthy3();
        primary_dead[0] = primary_dead[0].clone().node_dead();
        let mut stale_epoch = healthy3();
        stale_epoch[0] = replica("a", "n1").primary().reports(Serving, 0, 5);
        let insufficient = Blocked::InsufficientNodes("need 3".into());
        let no_primary = Blocked::NoEligiblePrimary("nobody".into());
        // (case, state, replicas, blocked, deleting, attached, phase, [ready, degraded, rebuilding, attached] (status, reason))
        type Row<'a> = (
            &'a str,
            &'a VolumeState,
            Vec<ReplicaView>,
            Option<&'a Blocked>,
            bool,
            Option<&'a str>,
            VolumePhase,
            [(&'a str, &'a str); 4],
        );
        let rows: Vec<Row> = vec![
            (
                "all in sync",
                &full,
                healthy3(),
                None,
                false,
                None,
                VolumePhase::Ready,
                [
                    ("True", "PrimaryServing"),
                    ("False", "AllReplicasInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "one member dropped",
                &two,
                healthy3(),
                None,
                false,
                None,
                VolumePhase::Degraded,
                [
                    ("True", "PrimaryServing"),
                    ("True", "ReplicasNotInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "replica rebuilding outside the set",
                &two,
                rebuilding,
                None,
                false,
                Some("n9"),
                VolumePhase::Degraded,
                [
                    ("True", "PrimaryServing"),
                    ("True", "ReplicasNotInSync"),
                    ("True", "ReplicasRebuilding"),
                    ("True", "AttachedToNode"),
                ],
            ),
            (
                "nothing reported yet",
                &full,
                vec![
                    replica("a", "n1").primary(),
                    replica("b", "n2"),
                    replica("c", "n3"),
                ],
                None,
                false,
                None,
                VolumePhase::Creating,
                [
                    ("False", "PrimaryNotReady"),
                    ("True", "ReplicasNotInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "primary serving at an older epoch is not ready",
                &full,
                stale_epoch,
                None,
                false,
                None,
                VolumePhase::Creating,
                [
                    ("False", "PrimaryNotReady"),
                    ("True", "ReplicasNotInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "primary's agent gone",
                &full,
                primary_dead,
                None,
                false,
                None,
                VolumePhase::Creating,
                [
                    ("False", "PrimaryNotReady"),
                    ("True", "ReplicasNotInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "not enough nodes",
                &none,
                vec![],
                Some(&insufficient),
                false,
                None,
                VolumePhase::Pending,
                [
                    ("False", "InsufficientNodes"),
                    ("True", "ReplicasNotInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "no eligible primary",
                &full,
                healthy3(),
                Some(&no_primary),
                false,
                None,
                VolumePhase::Failed,
                [
                    ("False", "NoEligiblePrimary"),
                    ("False", "AllReplicasInSync"),
                    ("False", "NoRebuild"),
                    ("False", "NotAttached"),
                ],
            ),
            (
                "deleting while attached",
                &full,
                healthy3(),
                None,
                true,
                Some("n9"),
                VolumePhase::Deleting,
                [
                    ("False", "Deleting"),
                    ("False", "AllReplicasInSync"),
                    ("False", "NoRebuild"),
                    ("True", "DeletionWaitsForDetach"),
                ],
            ),
        ];
        for (name, st, replicas, blocked, deleting, attached, phase, want) in rows {
            let mut i = input(st, &replicas);
            i.blocked = blocked;
            i.deleting = deleting;
            i.attached_to = attached;
            let s = volume_status(&i);
            assert_eq!(s.phase, phase, "case: {name}");
            for (ty, (status, reason)) in [
                condition::READY,
                condition::DEGRADED,
                condition::REBUILDING,
                condition::ATTACHED,
            ]
            .into_iter()
            .zip(want)
            {
                let c = get(&s, ty);
                assert_eq!(
                    (c.status.as_str(), c.reason.as_str()),
                    (status, reason),
                    "case: {name}, condition {ty}"
                );
                assert_eq!(c.observed_generation, Some(3));
                assert!(!c.message.is_empty());
            }
            assert_eq!(s.observed_generation, Some(3));
        }
    }

    #[test]
    fn last_transition_time_is_kept_while_status_holds_and_moves_on_change() {
        let full = state(Some("a"), &["a", "b", "c"]);
        let replicas = healthy3();
        let first = volume_status(&input(&full, &replicas));
        assert_eq!(
            get(&first, condition::READY).last_transition_time,
            Time(t(0))
        );

        let mut later = input(&full, &replicas);
        later.now = t(100);
        later.previous = Some(&first);
        let second = volume_status(&later);
        assert_eq!(
            get(&second, condition::READY).last_transition_time,
            Time(t(0))
        );
        assert_eq!(second, first, "unchanged inputs give an identical status");

        let mut dead = replicas.clone();
        dead[0] = dead[0].clone().node_dead();
        let mut changed = input(&full, &dead);
        changed.now = t(200);
        changed.previous = Some(&second);
        let third = volume_status(&changed);
        assert_eq!(
            get(&third, condition::READY).last_transition_time,
            Time(t(200))
        );
        assert_eq!(
            get(&third, condition::ATTACHED).last_transition_time,
            Time(t(0))
        );
        assert_eq!(
            third.phase,
            VolumePhase::Degraded,
            "a volume that was ready and lost its primary is degraded"
        );
    }

    #[test]
    fn unhealthy_since_is_recorded_once_and_kept() {
        let full = state(Some("a"), &["a", "b"]);
        let replicas = vec![
            replica("a", "n1").primary().reports(Serving, 1, 5),
            replica("b", "n2").reports(InSync, 1, 5),
            replica("c", "n3").reports(NeedsRebuild, 1, 5),
        ];
        let first = volume_status(&input(&full, &replicas));
        let c = first.replicas.iter().find(|r| r.replica_id == "c").unwrap();
        assert_eq!(c.unhealthy_since, Some(Time(t(0))));
        assert!(
            first
                .replicas
                .iter()
                .filter(|r| r.replica_id != "c")
                .all(|r| r.unhealthy_since.is_none())
        );
        let mut later = input(&full, &replicas);
        later.now = t(50);
        later.previous = Some(&first);
        let second = volume_status(&later);
        assert_eq!(unhealthy_since(Some(&second)).get("c"), Some(&t(0)));
    }
}
