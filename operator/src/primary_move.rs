//! Planned primary moves (switchover): the primary goes to another member of the
//! committed in-sync set without waiting out a failover timeout and without losing an
//! acknowledged write.
//!
//! The move is a small state machine persisted in `status.primaryMove`, so an operator
//! that restarts mid-move resumes it rather than mistaking the primary-less epoch for a
//! failure:
//!
//! 1. `Requested`: recorded in the status only; no replica has changed.
//! 2. `Demoting`: the old primary is assigned `Replica` at epoch + 1. Its agent drains
//!    (a last replicated flush), stops acknowledging, persists the new epoch and reports
//!    `Replica` at it. Until then nobody is promoted, unless its agent's Lease expires,
//!    which turns the move into an ordinary failover.
//! 3. The target is promoted at that same epoch + 1 once it has flushed every entry the
//!    demoted primary reports durable. The old primary stays a committed member (it
//!    holds no entry the target lacks) and rejoins through the normal handshake.
//!
//! Guarantees: only a committed in-sync member is promoted; never two primaries at one
//! epoch (the old one held epoch E, the new one holds E + 1, and until the promotion no
//! replica is primary at E + 1); a move that cannot finish within the timeout ends by the
//! standard promotion rule (highest flushed committed member, which may be the old
//! primary again), never by guessing.

use api::{MovePhase, MoveReason, PrimaryMove, ReplicaRole, ReplicaState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::model::ReplicaView;
use crate::promotion::{PrimaryLease, PromotionDecision, choose_promotion};
use crate::recovery::VolumeState;

/// Bounds of a primary move.
#[derive(Clone, Debug)]
pub struct MoveSettings {
    /// A move not finished after this long, in milliseconds, is abandoned: before the
    /// demotion it is dropped; after it the standard promotion rule picks the primary.
    pub primary_move_timeout_ms: u64,
}

impl Default for MoveSettings {
    fn default() -> Self {
        MoveSettings {
            primary_move_timeout_ms: 30_000,
        }
    }
}

/// A node the primary should be on, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveRequest<'a> {
    pub node: &'a str,
    pub reason: MoveReason,
}

/// The move the volume asks for: the admin's annotation first, else data locality (the
/// attachment node when `spec.dataLocality` is `BestEffort`).
pub fn wanted_move<'a>(
    annotation: Option<&'a str>,
    locality: Option<api::DataLocality>,
    attached_to: Option<&'a str>,
) -> Option<MoveRequest<'a>> {
    if let Some(node) = annotation.map(str::trim).filter(|n| !n.is_empty()) {
        return Some(MoveRequest {
            node,
            reason: MoveReason::Requested,
        });
    }
    match (locality, attached_to) {
        (Some(api::DataLocality::BestEffort), Some(node)) => Some(MoveRequest {
            node,
            reason: MoveReason::DataLocality,
        }),
        _ => None,
    }
}

/// What the move state machine observes.
#[derive(Clone, Debug)]
pub struct MoveInput<'a> {
    /// The move recorded in the volume status, if any.
    pub current: Option<&'a PrimaryMove>,
    pub request: Option<MoveRequest<'a>>,
    /// Replication state recovered from the API (see [`crate::recovery`]).
    pub state: &'a VolumeState,
    pub replicas: &'a [ReplicaView],
    pub now: Timestamp,
    pub settings: &'a MoveSettings,
}

/// How a move ended when it ends in a promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveOutcome {
    /// The target took over.
    Completed,
    /// The move could not finish; the standard rule chose the primary. `deposed` is set
    /// when the old primary never confirmed its demotion (its agent is gone), so it
    /// leaves the committed set like any failed-over primary.
    Abandoned { why: String, deposed: bool },
}

/// The next step of a volume's primary move.
#[derive(Clone, Debug, PartialEq)]
pub enum MoveStep {
    /// No move is in progress or wanted (or the wanted one is already satisfied).
    Idle,
    /// A move is wanted but cannot start; the text says why.
    Rejected { reason: MoveReason, why: String },
    /// Record the move (status only; nothing else changes in this reconcile).
    Record(PrimaryMove),
    /// Assign the old primary `Replica` at `epoch` and record phase `Demoting`.
    Demote(PrimaryMove),
    /// Nothing to do until the agents report more.
    Wait { current: PrimaryMove, why: String },
    /// Promote `replica_id` at `epoch`; the move is over.
    Promote {
        replica_id: String,
        epoch: u64,
        outcome: MoveOutcome,
    },
    /// Forget the recorded move: it finished, was overtaken, or ends before any replica
    /// changed. The text says why.
    Clear { why: String },
}

fn find<'a>(replicas: &'a [ReplicaView], id: &str) -> Option<&'a ReplicaView> {
    replicas.iter().find(|r| r.id == id && !r.deleting)
}

/// Why `target` cannot take over from `primary` at `epoch`, if it cannot.
fn target_problem(
    state: &VolumeState,
    primary: &ReplicaView,
    target: &ReplicaView,
    epoch: u64,
) -> Option<String> {
    if !state.in_sync.contains(&target.id) {
        return Some(format!(
            "replica {} on node {} is not in the committed in-sync set",
            target.id,
            target.node()
        ));
    }
    if !target.node_live {
        return Some(format!(
            "the node agent of replica {} on node {} is not renewing its lease",
            target.id,
            target.node()
        ));
    }
    if !target.healthy_at(epoch) {
        return Some(format!(
            "replica {} on node {} reports {:?} at epoch {}, not InSync at epoch {epoch}",
            target.id,
            target.node(),
            target.state(),
            target.reported_epoch()
        ));
    }
    let counted = primary.status.as_ref().is_some_and(|s| {
        s.peers
            .iter()
            .any(|p| p.replica_id == target.id && p.state == ReplicaState::InSync)
            && !s.unreachable.contains(&target.id)
    });
    if !counted {
        return Some(format!(
            "primary {} does not report replica {} in sync",
            primary.id, target.id
        ));
    }
    None
}

fn expired(m: &PrimaryMove, now: Timestamp, settings: &MoveSettings) -> bool {
    let limit = SignedDuration::from_millis(
        i64::try_from(settings.primary_move_timeout_ms).unwrap_or(i64::MAX),
    );
    m.started_at.0.duration_until(now) >= limit
}

/// Starts a move when one is wanted and possible.
fn start(input: &MoveInput<'_>) -> MoveStep {
    let Some(req) = input.request else {
        return MoveStep::Idle;
    };
    let state = input.state;
    let Some(primary) = state
        .primary
        .as_deref()
        .and_then(|p| find(input.replicas, p))
    else {
        return MoveStep::Idle;
    };
    if primary.node() == req.node {
        return MoveStep::Idle;
    }
    let rejected = |why: String| MoveStep::Rejected {
        reason: req.reason,
        why,
    };
    if !primary.node_live || !primary.healthy_at(state.epoch) {
        return rejected(format!(
            "primary {} on node {} is not serving at epoch {}; a move waits for a healthy primary",
            primary.id,
            primary.node(),
            state.epoch
        ));
    }
    let Some(target) = input
        .replicas
        .iter()
        .find(|r| r.node() == req.node && !r.deleting)
    else {
        return rejected(format!(
            "node {} holds no replica of this volume; the primary can only move to a node with an in-sync replica",
            req.node
        ));
    };
    if let Some(why) = target_problem(state, primary, target, state.epoch) {
        return rejected(why);
    }
    MoveStep::Record(PrimaryMove {
        from: primary.id.clone(),
        to: target.id.clone(),
        to_node: target.node().to_string(),
        epoch: state.epoch.saturating_add(1),
        phase: MovePhase::Requested,
        reason: req.reason,
        started_at: Time(input.now),
    })
}

/// The standard promotion rule at the move's epoch, as the way out of a move that
/// cannot finish. `exclude` is the old primary when it never confirmed its demotion.
fn fall_back(input: &MoveInput<'_>, m: &PrimaryMove, exclude: &str, why: String) -> MoveStep {
    let base = m.epoch.saturating_sub(1);
    match choose_promotion(
        base,
        exclude,
        PrimaryLease::Expired,
        &input.state.in_sync.members,
        input.replicas,
    ) {
        PromotionDecision::Promote { replica_id, epoch } => MoveStep::Promote {
            replica_id,
            epoch,
            outcome: MoveOutcome::Abandoned {
                why,
                deposed: !exclude.is_empty(),
            },
        },
        PromotionDecision::NoEligibleMember { reason } => MoveStep::Wait {
            current: m.clone(),
            why: format!("{why}; {reason}"),
        },
        PromotionDecision::KeepPrimary => MoveStep::Wait {
            current: m.clone(),
            why,
        },
    }
}

/// One step of the move: see the module documentation for the protocol.
pub fn step(input: &MoveInput<'_>) -> MoveStep {
    let Some(m) = input.current else {
        return start(input);
    };
    let state = input.state;
    if state.epoch > m.epoch || (state.epoch == m.epoch && state.primary.is_some()) {
        return MoveStep::Clear {
            why: if state.primary.as_deref() == Some(m.to.as_str()) && state.epoch == m.epoch {
                format!("replica {} is primary at epoch {}", m.to, m.epoch)
            } else {
                format!(
                    "overtaken: epoch {} with primary {}",
                    state.epoch,
                    state.primary.as_deref().unwrap_or("(none)")
                )
            },
        };
    }
    match m.phase {
        MovePhase::Requested => requested(input, m),
        MovePhase::Demoting => demoting(input, m),
    }
}

/// The old primary is already assigned `Replica` at the move's epoch and nobody is
/// primary at it: the demotion was written, but the `Demoting` phase was not (the
/// operator stopped between the two writes, or this reconcile saw an older status).
fn demotion_written(input: &MoveInput<'_>, m: &PrimaryMove) -> bool {
    input.state.epoch == m.epoch
        && input.state.primary.is_none()
        && find(input.replicas, &m.from)
            .is_some_and(|f| f.spec.role == ReplicaRole::Replica && f.spec.epoch == m.epoch)
}

fn requested(input: &MoveInput<'_>, m: &PrimaryMove) -> MoveStep {
    let state = input.state;
    if demotion_written(input, m) {
        // Carry on from where the demotion stands; never fall through to "the primary
        // changed", which would leave the volume primary-less at the move's epoch.
        // Demote again (the same spec, idempotent) to record the phase while waiting.
        return match demoting(input, m) {
            MoveStep::Wait { current, .. } => MoveStep::Demote(PrimaryMove {
                phase: MovePhase::Demoting,
                ..current
            }),
            other => other,
        };
    }
    if state.epoch.saturating_add(1) != m.epoch || state.primary.as_deref() != Some(&m.from) {
        return MoveStep::Clear {
            why: format!(
                "the primary changed before the move began (epoch {}, primary {})",
                state.epoch,
                state.primary.as_deref().unwrap_or("(none)")
            ),
        };
    }
    if expired(m, input.now, input.settings) {
        return MoveStep::Clear {
            why: "the move did not begin within the move timeout".into(),
        };
    }
    let (Some(primary), Some(target)) =
        (find(input.replicas, &m.from), find(input.replicas, &m.to))
    else {
        return MoveStep::Clear {
            why: "the primary or the target replica is gone".into(),
        };
    };
    if !primary.node_live || !primary.healthy_at(state.epoch) {
        return MoveStep::Clear {
            why: format!("primary {} stopped serving before the move began", m.from),
        };
    }
    if let Some(why) = target_problem(state, primary, target, state.epoch) {
        return MoveStep::Clear { why };
    }
    MoveStep::Demote(PrimaryMove {
        phase: MovePhase::Demoting,
        ..m.clone()
    })
}

fn demoting(input: &MoveInput<'_>, m: &PrimaryMove) -> MoveStep {
    let from = find(input.replicas, &m.from);
    let fenced = from.is_some_and(|f| {
        f.reported_role() == Some(ReplicaRole::Replica) && f.reported_epoch() >= m.epoch
    });
    let from_gone = from.is_none_or(|f| !f.node_live);
    let timed_out = expired(m, input.now, input.settings);
    if !fenced {
        if from_gone {
            return fall_back(
                input,
                m,
                &m.from,
                format!(
                    "the node agent of primary {} stopped renewing its lease before it confirmed its demotion",
                    m.from
                ),
            );
        }
        if timed_out {
            // It may still be serving at the old epoch: the only safe primary at the new
            // epoch is itself.
            return MoveStep::Promote {
                replica_id: m.from.clone(),
                epoch: m.epoch,
                outcome: MoveOutcome::Abandoned {
                    why: format!(
                        "primary {} did not confirm its demotion within the move timeout",
                        m.from
                    ),
                    deposed: false,
                },
            };
        }
        return MoveStep::Wait {
            current: m.clone(),
            why: format!(
                "waiting for primary {} to report its demotion at epoch {}",
                m.from, m.epoch
            ),
        };
    }
    // The old primary acknowledges nothing any more: its flushed LSN is final.
    let from_flushed = from.map(|f| f.flushed_lsn()).unwrap_or(0);
    let target = find(input.replicas, &m.to)
        .filter(|t| state_usable(t) && t.node_live && input.state.in_sync.contains(&t.id));
    let Some(target) = target else {
        return fall_back(
            input,
            m,
            "",
            format!("target replica {} can no longer take over", m.to),
        );
    };
    if target.flushed_lsn() >= from_flushed {
        return MoveStep::Promote {
            replica_id: target.id.clone(),
            epoch: m.epoch,
            outcome: MoveOutcome::Completed,
        };
    }
    if timed_out {
        return fall_back(
            input,
            m,
            "",
            format!(
                "target replica {} reached flushed LSN {} of {from_flushed} within the move timeout",
                m.to,
                target.flushed_lsn()
            ),
        );
    }
    MoveStep::Wait {
        current: m.clone(),
        why: format!(
            "waiting for replica {} to flush up to LSN {from_flushed} (at {})",
            m.to,
            target.flushed_lsn()
        ),
    }
}

fn state_usable(r: &ReplicaView) -> bool {
    !matches!(r.state(), ReplicaState::Failed | ReplicaState::NeedsRebuild)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_sync::InSyncSet;
    use crate::model::test_support::replica;
    use ReplicaState::*;

    const T0: i64 = 1_800_000_000;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(T0 + secs).unwrap()
    }

    fn state(epoch: u64, primary: Option<&str>) -> VolumeState {
        VolumeState {
            epoch,
            primary: primary.map(String::from),
            in_sync: InSyncSet::new(vec!["p".into(), "a".into(), "b".into()], 1),
        }
    }

    fn mv(phase: MovePhase) -> PrimaryMove {
        PrimaryMove {
            from: "p".into(),
            to: "a".into(),
            to_node: "n2".into(),
            epoch: 5,
            phase,
            reason: MoveReason::Requested,
            started_at: Time(at(0)),
        }
    }

    /// Steady state at epoch 4: p primary on n1, a (n2) and b (n3) in sync.
    fn healthy() -> Vec<ReplicaView> {
        vec![
            replica("p", "n1")
                .primary()
                .epoch(4)
                .reports(Serving, 4, 100)
                .peer("a", InSync)
                .peer("b", InSync),
            replica("a", "n2").epoch(4).reports(InSync, 4, 100),
            replica("b", "n3").epoch(4).reports(InSync, 4, 100),
        ]
    }

    /// During the demotion: p assigned Replica at 5; `p_reports` says whether its agent
    /// confirmed; a and b still at 4.
    fn demoting_views(p_reports: bool, p_flushed: u64, a_flushed: u64) -> Vec<ReplicaView> {
        let mut p = replica("p", "n1").epoch(5).reports(Serving, 4, p_flushed);
        p.status.as_mut().unwrap().role = Some(ReplicaRole::Primary);
        if p_reports {
            p = p
                .reports(InSync, 5, p_flushed)
                .reports_role(ReplicaRole::Replica);
        }
        vec![
            p,
            replica("a", "n2").epoch(4).reports(InSync, 4, a_flushed),
            replica("b", "n3").epoch(4).reports(InSync, 4, 90),
        ]
    }

    fn to_node(node: &str) -> Option<MoveRequest<'_>> {
        Some(MoveRequest {
            node,
            reason: MoveReason::Requested,
        })
    }

    fn promote(id: &str, outcome: MoveOutcome) -> MoveStep {
        MoveStep::Promote {
            replica_id: id.into(),
            epoch: 5,
            outcome,
        }
    }

    fn kind(s: &MoveStep) -> String {
        match s {
            MoveStep::Idle => "Idle".into(),
            MoveStep::Rejected { .. } => "Rejected".into(),
            MoveStep::Record(m) => format!("Record {}->{} @{}", m.from, m.to, m.epoch),
            MoveStep::Demote(m) => format!("Demote {} @{}", m.from, m.epoch),
            MoveStep::Wait { .. } => "Wait".into(),
            MoveStep::Promote {
                replica_id,
                epoch,
                outcome,
            } => format!(
                "Promote {replica_id} @{epoch} {}",
                match outcome {
                    MoveOutcome::Completed => "completed".to_string(),
                    MoveOutcome::Abandoned { deposed, .. } =>
                        format!("abandoned deposed={deposed}"),
                }
            ),
            MoveStep::Clear { .. } => "Clear".into(),
        }
    }

    struct Case {
        name: &'static str,
        current: Option<PrimaryMove>,
        request: Option<MoveRequest<'static>>,
        state: VolumeState,
        replicas: Vec<ReplicaView>,
        now: i64,
        want: &'static str,
    }

    #[test]
    fn move_state_machine_table() {
        let mut not_counted = healthy();
        not_counted[0] = replica("p", "n1")
            .primary()
            .epoch(4)
            .reports(Serving, 4, 100)
            .peer("a", CatchingUp)
            .peer("b", InSync);
        let mut target_stale = healthy();
        target_stale[1] = replica("a", "n2").epoch(4).reports(InSync, 3, 100);
        let mut outside_set = state(4, Some("p"));
        outside_set.in_sync = InSyncSet::new(vec!["p".into(), "b".into()], 2);
        let mut primary_dead = healthy();
        primary_dead[0] = primary_dead[0].clone().node_dead();
        let mut from_dead = demoting_views(false, 100, 100);
        from_dead[0] = from_dead[0].clone().node_dead();
        let mut target_dead = demoting_views(true, 100, 100);
        target_dead[1] = target_dead[1].clone().node_dead();
        let mut promoted = demoting_views(true, 100, 100);
        promoted[1] = replica("a", "n2").primary().epoch(5);
        let cases = vec![
            Case {
                name: "nothing wanted",
                current: None,
                request: None,
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 0,
                want: "Idle",
            },
            Case {
                name: "primary already on the wanted node",
                current: None,
                request: to_node("n1"),
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 0,
                want: "Idle",
            },
            Case {
                name: "a healthy committed member on the wanted node: record at epoch + 1",
                current: None,
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 0,
                want: "Record p->a @5",
            },
            Case {
                name: "no replica on the wanted node",
                current: None,
                request: to_node("n9"),
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 0,
                want: "Rejected",
            },
            Case {
                name: "target outside the committed set",
                current: None,
                request: to_node("n2"),
                state: outside_set,
                replicas: healthy(),
                now: 0,
                want: "Rejected",
            },
            Case {
                name: "target not counted in sync by the primary",
                current: None,
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: not_counted,
                now: 0,
                want: "Rejected",
            },
            Case {
                name: "target reports an older epoch",
                current: None,
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: target_stale,
                now: 0,
                want: "Rejected",
            },
            Case {
                name: "primary's agent gone: failover's business, not a move",
                current: None,
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: primary_dead.clone(),
                now: 0,
                want: "Rejected",
            },
            Case {
                name: "recorded and still valid: demote the old primary",
                current: Some(mv(MovePhase::Requested)),
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 1,
                want: "Demote p @5",
            },
            Case {
                name: "recorded, primary died before demotion: drop the move",
                current: Some(mv(MovePhase::Requested)),
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: primary_dead,
                now: 1,
                want: "Clear",
            },
            Case {
                name: "recorded too long ago: drop the move",
                current: Some(mv(MovePhase::Requested)),
                request: to_node("n2"),
                state: state(4, Some("p")),
                replicas: healthy(),
                now: 31,
                want: "Clear",
            },
            Case {
                name: "demotion not confirmed yet: wait, promote nobody",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: demoting_views(false, 100, 100),
                now: 1,
                want: "Wait",
            },
            Case {
                name: "demoted, target has every flushed entry: promote the target",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: demoting_views(true, 100, 100),
                now: 1,
                want: "Promote a @5 completed",
            },
            Case {
                name: "demoted, target behind: wait for it",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: demoting_views(true, 120, 100),
                now: 1,
                want: "Wait",
            },
            Case {
                name: "demoted, target still behind at the timeout: highest flushed wins",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: demoting_views(true, 120, 100),
                now: 31,
                want: "Promote p @5 abandoned deposed=false",
            },
            Case {
                name: "demotion never confirmed by the timeout: the old primary keeps it",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: demoting_views(false, 100, 100),
                now: 31,
                want: "Promote p @5 abandoned deposed=false",
            },
            Case {
                name: "old primary's agent died mid-demotion: standard failover without it",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: from_dead,
                now: 1,
                want: "Promote a @5 abandoned deposed=true",
            },
            Case {
                name: "target's agent died after the demotion: highest flushed member",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, None),
                replicas: target_dead,
                now: 1,
                want: "Promote p @5 abandoned deposed=false",
            },
            Case {
                name: "target's promotion written, status not yet: the move is over",
                current: Some(mv(MovePhase::Demoting)),
                request: to_node("n2"),
                state: state(5, Some("a")),
                replicas: promoted,
                now: 1,
                want: "Clear",
            },
            Case {
                name: "demotion written but the status still says Requested: keep demoting",
                current: Some(mv(MovePhase::Requested)),
                request: None,
                state: state(5, None),
                replicas: demoting_views(false, 100, 100),
                now: 1,
                want: "Demote p @5",
            },
            Case {
                name: "demotion written and confirmed, status still Requested: promote the target",
                current: Some(mv(MovePhase::Requested)),
                request: None,
                state: state(5, None),
                replicas: demoting_views(true, 100, 100),
                now: 1,
                want: "Promote a @5 completed",
            },
            Case {
                name: "a failover overtook the recorded move",
                current: Some(mv(MovePhase::Requested)),
                request: to_node("n2"),
                state: state(6, Some("b")),
                replicas: healthy(),
                now: 1,
                want: "Clear",
            },
        ];
        let settings = MoveSettings::default();
        for c in &cases {
            let got = step(&MoveInput {
                current: c.current.as_ref(),
                request: c.request,
                state: &c.state,
                replicas: &c.replicas,
                now: at(c.now),
                settings: &settings,
            });
            assert_eq!(kind(&got), c.want, "{}: {got:?}", c.name);
        }
    }

    #[test]
    fn promotion_by_a_move_is_never_at_the_old_epoch() {
        let settings = MoveSettings::default();
        let st = state(5, None);
        for (confirmed, p_flushed, a_flushed, now) in [
            (true, 100, 100, 1),
            (true, 120, 100, 31),
            (false, 100, 100, 31),
        ] {
            let views = demoting_views(confirmed, p_flushed, a_flushed);
            let got = step(&MoveInput {
                current: Some(&mv(MovePhase::Demoting)),
                request: None,
                state: &st,
                replicas: &views,
                now: at(now),
                settings: &settings,
            });
            match got {
                MoveStep::Promote { epoch, .. } => assert_eq!(epoch, 5),
                other => panic!("expected a promotion, got {other:?}"),
            }
        }
        assert_eq!(
            step(&MoveInput {
                current: Some(&mv(MovePhase::Demoting)),
                request: None,
                state: &st,
                replicas: &demoting_views(true, 100, 100),
                now: at(1),
                settings: &settings,
            }),
            promote("a", MoveOutcome::Completed)
        );
    }

    #[test]
    fn annotation_wins_over_locality_and_locality_needs_best_effort() {
        use api::DataLocality::*;
        assert_eq!(
            wanted_move(Some("n3"), Some(BestEffort), Some("n2")),
            to_node("n3")
        );
        assert_eq!(
            wanted_move(None, Some(BestEffort), Some("n2")),
            Some(MoveRequest {
                node: "n2",
                reason: MoveReason::DataLocality
            })
        );
        assert_eq!(wanted_move(None, Some(Disabled), Some("n2")), None);
        assert_eq!(wanted_move(None, None, Some("n2")), None);
        assert_eq!(wanted_move(Some("  "), Some(BestEffort), None), None);
    }
}
