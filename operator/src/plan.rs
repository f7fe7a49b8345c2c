//! One reconcile of a `BlockVolume` as a pure function: from the observed volume,
//! replicas and nodes to the replica specs to apply, replicas to delete, the status and
//! the events. The controller performs the plan; tests run it without an API server.
//!
//! Write order matters and the plan encodes it: replica specs (a newly promoted primary
//! first) before the volume status, so an operator that stops half-way leaves the
//! replicas ahead of the status, which [`crate::recovery`] then trusts. One exception,
//! made by the controller ([`crate::controller::perform`]): a plan that assigns a new
//! primary first stores that claim (epoch and primary) in the volume status,
//! conditional on the volume's resourceVersion, which fences a second plan made from
//! the same view; recovery trusts the status's primary at its epoch as well.

use std::collections::{BTreeMap, BTreeSet};

use api::{BlockReplicaSpec, BlockVolumeSpec, BlockVolumeStatus, PeerAssignment, ReplicaRole};
use k8s_openapi::jiff::Timestamp;

use crate::drain::{DrainInput, DrainStep, evacuating_nodes};
use crate::expansion::{reached_size, replicas_to_expand};
use crate::in_sync::{InSyncChange, InSyncSet, next_in_sync_set};
use crate::model::ReplicaView;
use crate::placement::{InsufficientNodes, NodeCandidate, PlacementRequest, place, primary_among};
use crate::primary_move::{MoveInput, MoveOutcome, MoveRequest, MoveSettings, MoveStep};
use crate::promotion::{
    PrimaryLease, PrimaryStanding, PromotionDecision, choose_promotion, choose_repromotion,
    primary_standing,
};
use crate::recovery::recover_state;
use crate::replacement::{ReplacementSettings, nodes_at_rebuild_limit, replacements};
use crate::status::{Blocked, StatusInput, unhealthy_since, volume_status};

/// Stable Event reasons, one per kind of decision.
pub mod reason {
    pub const PLACED: &str = "Placed";
    pub const PROMOTED: &str = "Promoted";
    pub const IN_SYNC_SET_CHANGED: &str = "InSyncSetChanged";
    pub const REPLICA_FAILED: &str = "ReplicaFailed";
    pub const REBUILD_STARTED: &str = "RebuildStarted";
    pub const REBUILD_COMPLETED: &str = "RebuildCompleted";
    pub const EXPANDED: &str = "Expanded";
    pub const INSUFFICIENT_NODES: &str = "InsufficientNodes";
    pub const NO_ELIGIBLE_PRIMARY: &str = "NoEligiblePrimary";
    pub const CONFLICTING_PRIMARIES: &str = "ConflictingPrimaries";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const REPLICA_REMOVED: &str = "ReplicaRemoved";
    pub const MOVE_STARTED: &str = "PrimaryMoveStarted";
    pub const PRIMARY_DEMOTED: &str = "PrimaryDemoted";
    pub const PRIMARY_MOVED: &str = "PrimaryMoved";
    pub const MOVE_ABANDONED: &str = "PrimaryMoveAbandoned";
    pub const MOVE_REJECTED: &str = "PrimaryMoveRejected";
    pub const DRAIN_REPLICA_PLACED: &str = "DrainReplicaPlaced";
    pub const DRAIN_REPLICA_REMOVED: &str = "DrainReplicaRemoved";
    /// Phase changes, published by the controller when the status it writes moves the
    /// volume into `Degraded` or `Failed`, or back to `Ready` from either.
    pub const VOLUME_DEGRADED: &str = "VolumeDegraded";
    pub const VOLUME_FAILED: &str = "VolumeFailed";
    pub const VOLUME_RECOVERED: &str = "VolumeRecovered";
}

/// Longest volume name: it is a label value on every replica.
pub const MAX_VOLUME_NAME_LEN: usize = 63;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

fn normal(reason: &'static str, note: String) -> PlannedEvent {
    PlannedEvent {
        warning: false,
        reason,
        note,
    }
}

fn warning(reason: &'static str, note: String) -> PlannedEvent {
    PlannedEvent {
        warning: true,
        reason,
        note,
    }
}

/// What the controller observed for one volume.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub name: &'a str,
    pub generation: Option<i64>,
    pub spec: &'a BlockVolumeSpec,
    pub status: Option<&'a BlockVolumeStatus>,
    pub attached_to: Option<&'a str>,
    /// Where the primary should be, if somewhere in particular (see
    /// [`crate::primary_move::wanted_move`]).
    pub move_request: Option<MoveRequest<'a>>,
    /// Every `BlockReplica` of the volume, including those being deleted.
    pub replicas: &'a [ReplicaView],
    /// Every registered node, with free space net of replicas not yet accounted for.
    pub nodes: &'a [NodeCandidate],
    /// Rebuilding replicas per node, across all volumes.
    pub rebuilding_per_node: &'a BTreeMap<String, u32>,
    /// This volume may start draining (a drain slot is free or already its own); see
    /// [`crate::drain`]. A volume that has started continues regardless.
    pub drain_slot: bool,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Replica specs to apply (create or update), in this order.
    pub apply: Vec<BlockReplicaSpec>,
    /// Replicas to delete (after the applies).
    pub delete: Vec<String>,
    pub status: BlockVolumeStatus,
    pub events: Vec<PlannedEvent>,
    /// Where the volume's drain stands after this reconcile (`Idle` when no replica is
    /// on a draining node).
    pub drain: DrainStep,
}

/// The `BlockReplica` name (and ReplicaID) for a volume's replica on a node: a function
/// of both, so a repeated create after a lost response is idempotent instead of a
/// duplicate.
pub fn replica_name(volume: &str, node: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in node.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{volume}-{h:08x}")
}

fn new_view(volume: &str, node: &str, nodes: &[NodeCandidate]) -> ReplicaView {
    let id = replica_name(volume, node);
    ReplicaView {
        spec: BlockReplicaSpec {
            volume: volume.into(),
            replica_id: id.clone(),
            node: node.into(),
            role: ReplicaRole::Replica,
            epoch: 0,
            size_bytes: 0,
            block_size: 0,
            durability: Default::default(),
            peers: vec![],
            in_sync_set: vec![],
            in_sync_set_generation: 0,
            pvc: None,
        },
        id,
        status: None,
        deleting: false,
        node_live: nodes.iter().any(|n| n.name == node && n.live),
        node_registered: nodes.iter().any(|n| n.name == node),
    }
}

impl Observed<'_> {
    /// The status a plan writes for this volume: `state` and `replicas` as the plan
    /// leaves them.
    fn status_of(
        &self,
        state: &crate::recovery::VolumeState,
        replicas: &[ReplicaView],
        blocked: Option<&Blocked>,
        size_bytes: Option<u64>,
        primary_move: Option<&api::PrimaryMove>,
    ) -> BlockVolumeStatus {
        volume_status(&StatusInput {
            generation: self.generation,
            deleting: false,
            attached_to: self.attached_to,
            desired_replicas: self.spec.replicas,
            state,
            replicas,
            blocked,
            size_bytes,
            primary_move,
            previous: self.status,
            now: self.now,
        })
    }
}

/// `views` with each replica that `specs` names assigned its spec there.
fn with_specs(views: &[ReplicaView], specs: &[BlockReplicaSpec]) -> Vec<ReplicaView> {
    views
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(s) = specs.iter().find(|s| s.replica_id == r.id) {
                r.spec = s.clone();
            }
            r
        })
        .collect()
}

/// The plan of a volume that cannot be reconciled: its status says why, and so does a
/// warning Event with the `Ready` condition's reason.
fn status_only(obs: &Observed<'_>, blocked: Blocked) -> Box<Plan> {
    let event = warning(blocked.reason(), blocked.message().to_string());
    let state = crate::recovery::VolumeState {
        epoch: obs.status.map(|s| s.epoch).unwrap_or(0),
        primary: obs.status.and_then(|s| s.primary.clone()),
        in_sync: obs
            .status
            .map(|s| InSyncSet::new(s.in_sync_set.clone(), s.in_sync_set_generation))
            .unwrap_or_default(),
    };
    let status = obs.status_of(
        &state,
        obs.replicas,
        Some(&blocked),
        obs.status.and_then(|s| s.size_bytes),
        obs.status.and_then(|s| s.primary_move.as_ref()),
    );
    Box::new(Plan {
        apply: vec![],
        delete: vec![],
        status,
        events: vec![event],
        drain: DrainStep::Idle,
    })
}

/// The plan while a move waits or demotes the old primary: no primary exists at the
/// move's epoch, so nothing else (placement, replacement, expansion) changes until the
/// move ends. `demote` carries the old primary's new assignment.
fn moving_plan(
    obs: &Observed<'_>,
    state: &crate::recovery::VolumeState,
    current: &api::PrimaryMove,
    demote: Option<BlockReplicaSpec>,
    events: Vec<PlannedEvent>,
) -> Plan {
    let views = with_specs(obs.replicas, demote.as_slice());
    let state = crate::recovery::VolumeState {
        epoch: state.epoch.max(current.epoch),
        primary: None,
        in_sync: state.in_sync.clone(),
    };
    let status = obs.status_of(
        &state,
        &views,
        None,
        obs.status.and_then(|s| s.size_bytes),
        Some(current),
    );
    Plan {
        apply: demote.into_iter().collect(),
        delete: vec![],
        status,
        events,
        // A move in progress: the volume keeps its drain slot if it had one.
        drain: DrainStep::WaitForCatchUp {
            why: "a primary move is in progress".into(),
        },
    }
}

/// The old primary's assignment during a move: a replica at the move's epoch, shipping
/// to nobody.
fn demoted_spec(obs: &Observed<'_>, m: &api::PrimaryMove) -> Option<BlockReplicaSpec> {
    let from = obs.replicas.iter().find(|r| r.id == m.from)?;
    Some(BlockReplicaSpec {
        role: ReplicaRole::Replica,
        epoch: from.spec.epoch.max(m.epoch),
        peers: vec![],
        ..from.spec.clone()
    })
}

/// A replica assigned `Replica` whose live agent still reports acting as primary.
fn unconfirmed_demotion(views: &[ReplicaView]) -> Option<&ReplicaView> {
    views.iter().find(|r| {
        !r.deleting
            && r.node_live
            && r.spec.role == ReplicaRole::Replica
            && r.reported_role() == Some(ReplicaRole::Primary)
    })
}

/// Plans one reconcile of a volume that is not being deleted. The steps run in this
/// order, each on the state the previous ones left: validate the spec and recover the
/// volume's state; then either place a new volume, or advance a primary move, keep or
/// promote the primary (committing in-sync set changes), replace unusable replicas,
/// fill up to `spec.replicas`, take a drain's next step and remove excess replicas;
/// finally the replica specs to write and the status.
pub fn plan(obs: &Observed<'_>, settings: &ReplacementSettings, moves: &MoveSettings) -> Plan {
    let (size, state) = match validated(obs) {
        Ok(v) => v,
        Err(blocked) => return *blocked,
    };
    let mut p = Planner::new(obs, settings, size, state);
    let initial = p.state.primary.is_none() && p.active() == 0;
    if initial {
        p.place_new_volume();
    } else if let Some(moving) = p.reconcile_existing(moves) {
        return moving;
    }
    p.mark_deleted();
    if !initial {
        p.expansion_event();
    }
    p.finish()
}

/// The size the spec asks for and the volume's recovered state, or the plan that only
/// reports why the volume cannot be reconciled.
fn validated(obs: &Observed<'_>) -> Result<(u64, crate::recovery::VolumeState), Box<Plan>> {
    if obs.name.len() > MAX_VOLUME_NAME_LEN {
        let m = format!(
            "volume name is {} characters; at most {MAX_VOLUME_NAME_LEN} fit the replicas' {} label",
            obs.name.len(),
            api::LABEL_VOLUME
        );
        return Err(status_only(obs, Blocked::InvalidSpec(m)));
    }
    let size = obs
        .spec
        .validate()
        .and_then(|()| obs.spec.size_bytes())
        .map_err(|e| status_only(obs, Blocked::InvalidSpec(e.to_string())))?;
    let state = recover_state(obs.status, obs.replicas)
        .map_err(|e| status_only(obs, Blocked::ConflictingPrimaries(e.to_string())))?;
    Ok((size, state))
}

/// The working state of one [`plan`]: what the steps decided so far.
struct Planner<'o, 'a> {
    obs: &'o Observed<'a>,
    settings: &'o ReplacementSettings,
    size: u64,
    desired: usize,
    state: crate::recovery::VolumeState,
    /// Every replica, the ones placed by this reconcile included.
    views: Vec<ReplicaView>,
    delete: Vec<String>,
    events: Vec<PlannedEvent>,
    blocked: Option<Blocked>,
    /// The replica this reconcile promoted: its assignment is written first.
    promoted: Option<String>,
    /// The primary move recorded in the status after this reconcile.
    recorded_move: Option<api::PrimaryMove>,
    evacuating: BTreeSet<&'a str>,
    drain: DrainStep,
    /// Rebuilding replicas per node, the ones this reconcile starts included.
    rebuilding: BTreeMap<String, u32>,
}

impl<'o, 'a> Planner<'o, 'a> {
    fn new(
        obs: &'o Observed<'a>,
        settings: &'o ReplacementSettings,
        size: u64,
        state: crate::recovery::VolumeState,
    ) -> Self {
        Planner {
            obs,
            settings,
            size,
            desired: usize::from(obs.spec.replicas),
            state,
            views: obs.replicas.to_vec(),
            delete: Vec::new(),
            events: Vec::new(),
            blocked: None,
            promoted: None,
            recorded_move: None,
            evacuating: evacuating_nodes(obs.nodes),
            drain: DrainStep::Idle,
            rebuilding: obs.rebuilding_per_node.clone(),
        }
    }

    /// Nodes for `count` new replicas, away from every node holding one already.
    fn placement(
        &self,
        count: usize,
        excluded: &[String],
    ) -> Result<Vec<String>, InsufficientNodes> {
        let existing: Vec<String> = self.views.iter().map(|r| r.node().to_string()).collect();
        place(
            self.obs.nodes,
            &PlacementRequest {
                count,
                size_bytes: self.size,
                node_selector: self.obs.spec.node_selector.as_ref(),
                topology_key: self.obs.spec.topology_key.as_deref(),
                existing_nodes: &existing,
                excluded_nodes: excluded,
            },
        )
    }

    /// Replicas neither being deleted nor deleted by this plan.
    fn active(&self) -> usize {
        self.views
            .iter()
            .filter(|r| !r.deleting && !self.delete.contains(&r.id))
            .count()
    }

    fn new_view(&self, node: &str) -> ReplicaView {
        new_view(self.obs.name, node, self.obs.nodes)
    }

    /// Nodes at their rebuild limit, counting the rebuilds in `rebuilding`.
    fn rebuild_limited(&self, rebuilding: &BTreeMap<String, u32>) -> Vec<String> {
        nodes_at_rebuild_limit(rebuilding, self.settings.max_rebuilds_per_node)
    }

    /// Commits `members` as the next in-sync set generation.
    fn commit_in_sync(&mut self, members: Vec<String>) {
        self.state.in_sync =
            InSyncSet::new(members, self.state.in_sync.generation.saturating_add(1));
    }

    /// A new volume: every replica placed at once, the first one primary at the next
    /// epoch.
    fn place_new_volume(&mut self) {
        match self.placement(self.desired, &[]) {
            Ok(chosen) => {
                let new: Vec<ReplicaView> = chosen.iter().map(|n| self.new_view(n)).collect();
                self.state.epoch = self.state.epoch.saturating_add(1);
                let primary_node = primary_among(self.obs.name, &chosen, self.obs.nodes);
                self.state.primary = new
                    .iter()
                    .find(|v| Some(v.node()) == primary_node.as_deref())
                    .or(new.first())
                    .map(|v| v.id.clone());
                // A fresh volume holds no acknowledged write, so every replica starts in
                // the committed set: none can have missed an ack.
                self.commit_in_sync(new.iter().map(|v| v.id.clone()).collect());
                self.events.push(normal(
                    reason::PLACED,
                    format!(
                        "placed {} replica(s) on node(s) {}; primary {} at epoch {}",
                        new.len(),
                        chosen.join(", "),
                        self.state.primary.as_deref().unwrap_or_default(),
                        self.state.epoch
                    ),
                ));
                self.views.extend(new);
            }
            Err(e) => {
                self.events
                    .push(warning(reason::INSUFFICIENT_NODES, e.to_string()));
                self.blocked = Some(Blocked::InsufficientNodes(e.to_string()));
            }
        }
    }

    /// Every step for a volume that exists. Returns the whole plan instead when a
    /// primary move holds everything else still.
    fn reconcile_existing(&mut self, moves: &MoveSettings) -> Option<Plan> {
        let pre_slot = self.drain_slot();
        self.drain = self.drain_step(pre_slot);
        let move_promotion = match self.advance_move(moves) {
            Ok(p) => p,
            Err(moving) => return Some(*moving),
        };
        self.settle_primary(move_promotion);
        self.replace_unusable();
        // The drain's add/remove step, from the state as this reconcile leaves it. Not
        // in a reconcile that promoted, started a move or replaced a replica: one change
        // at a time, each on a fresh observation.
        let settled =
            self.promoted.is_none() && self.recorded_move.is_none() && self.delete.is_empty();
        if settled {
            let post_slot = self.drain_slot();
            self.drain = self.drain_step(pre_slot || post_slot);
        }
        self.fill_up(settled);
        if settled {
            self.remove_drained();
        }
        self.remove_excess();
        None
    }

    /// This volume may take or keep a drain slot.
    fn drain_slot(&self) -> bool {
        let drain_move = self
            .obs
            .status
            .and_then(|s| s.primary_move.as_ref())
            .is_some_and(|m| m.reason == api::MoveReason::Drain);
        self.obs.drain_slot
            || crate::drain::started(&self.views, self.desired, &self.evacuating, drain_move)
    }

    fn drain_step(&self, slot: bool) -> DrainStep {
        crate::drain::step(&DrainInput {
            state: &self.state,
            replicas: &self.views,
            desired: self.desired,
            evacuating: &self.evacuating,
            slot,
        })
    }

    /// Advances a primary move (a drain's, a request's or data locality's). `Ok` carries
    /// the replica the move promotes now, at its epoch; `Err` the plan of a move that
    /// waits or demotes the old primary.
    fn advance_move(&mut self, moves: &MoveSettings) -> Result<Option<(String, u64)>, Box<Plan>> {
        let obs = self.obs;
        // A drain moves the primary off its node first; a standing request (annotation,
        // data locality) for a draining node waits until the drain is over.
        let request = match &self.drain {
            DrainStep::MovePrimary { to_node } => Some(MoveRequest {
                node: to_node.as_str(),
                reason: api::MoveReason::Drain,
            }),
            DrainStep::Idle => obs.move_request,
            _ => obs
                .move_request
                .filter(|r| !self.evacuating.contains(r.node)),
        };
        let step = crate::primary_move::step(&MoveInput {
            current: obs.status.and_then(|s| s.primary_move.as_ref()),
            request,
            state: &self.state,
            replicas: &self.views,
            now: obs.now,
            settings: moves,
        });
        match step {
            MoveStep::Idle => {}
            MoveStep::Rejected {
                reason: why_kind,
                why,
            } => {
                // Data locality is best effort: only an explicit request is worth a
                // warning every time it cannot be honoured.
                if why_kind == api::MoveReason::Requested {
                    self.events.push(warning(
                        reason::MOVE_REJECTED,
                        format!("cannot move the primary: {why}"),
                    ));
                } else if why_kind == api::MoveReason::Drain {
                    tracing::info!(volume = obs.name, why = %why, "drain waits to move the primary");
                }
            }
            MoveStep::Record(m) => {
                self.events.push(normal(
                    reason::MOVE_STARTED,
                    format!(
                        "moving primary {} to replica {} on node {} at epoch {} ({:?})",
                        m.from, m.to, m.to_node, m.epoch, m.reason
                    ),
                ));
                self.recorded_move = Some(m);
            }
            MoveStep::Demote(m) => {
                let event = normal(
                    reason::PRIMARY_DEMOTED,
                    format!(
                        "demoting primary {} to a replica at epoch {}; replica {} takes over once it holds every flushed entry",
                        m.from, m.epoch, m.to
                    ),
                );
                let spec = demoted_spec(obs, &m);
                return Err(Box::new(moving_plan(
                    obs,
                    &self.state,
                    &m,
                    spec,
                    vec![event],
                )));
            }
            MoveStep::Wait { current, why } => {
                tracing::debug!(volume = obs.name, why = %why, "primary move waiting");
                return Err(Box::new(moving_plan(
                    obs,
                    &self.state,
                    &current,
                    None,
                    vec![],
                )));
            }
            MoveStep::Promote {
                replica_id,
                epoch,
                outcome,
            } => {
                self.move_promoted(&replica_id, epoch, outcome);
                return Ok(Some((replica_id, epoch)));
            }
            MoveStep::Clear { why } => {
                tracing::info!(volume = obs.name, why = %why, "primary move record cleared");
            }
        }
        Ok(None)
    }

    /// The events of a move that ends by promoting `replica_id`; an abandoned move whose
    /// old primary was deposed takes it out of the in-sync set.
    fn move_promoted(&mut self, replica_id: &str, epoch: u64, outcome: MoveOutcome) {
        let from = self
            .obs
            .status
            .and_then(|s| s.primary_move.as_ref())
            .map(|m| m.from.clone())
            .unwrap_or_default();
        let node = self.node_of(replica_id);
        match outcome {
            MoveOutcome::Completed => self.events.push(normal(
                reason::PRIMARY_MOVED,
                format!(
                    "replica {replica_id} on node {node} is primary at epoch {epoch}; {from} rejoins as a replica"
                ),
            )),
            MoveOutcome::Abandoned { why, deposed } => {
                self.events.push(warning(
                    reason::MOVE_ABANDONED,
                    format!(
                        "primary move abandoned: {why}; replica {replica_id} on node {node} is primary at epoch {epoch}"
                    ),
                ));
                if deposed
                    && self.state.in_sync.contains(&from)
                    && self.state.in_sync.members.len() > 1
                {
                    let members = self.in_sync_without(|m| *m == from);
                    self.commit_in_sync(members);
                }
            }
        }
    }

    /// The node of replica `id`, empty when it is unknown.
    fn node_of(&self, id: &str) -> String {
        self.views
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.node().to_string())
            .unwrap_or_default()
    }

    /// The in-sync members for which `leaves` is false.
    fn in_sync_without(&self, leaves: impl Fn(&String) -> bool) -> Vec<String> {
        self.state
            .in_sync
            .members
            .iter()
            .filter(|m| !leaves(m))
            .cloned()
            .collect()
    }

    /// Keeps the primary (committing the next in-sync set it earned) or promotes
    /// another member. `move_promotion` is the replica a move just promoted.
    fn settle_primary(&mut self, move_promotion: Option<(String, u64)>) {
        let obs = self.obs;
        let primary_id = self.state.primary.clone().unwrap_or_default();
        let primary_view = self
            .views
            .iter()
            .find(|r| r.id == primary_id && !r.deleting);
        let since = unhealthy_since(obs.status);
        let standing = primary_standing(
            primary_view,
            self.state.epoch,
            since.get(&primary_id).copied(),
            obs.now,
            self.settings.primary_failure_grace_ms,
        );
        let lease = match standing {
            PrimaryStanding::Serving => PrimaryLease::Current,
            PrimaryStanding::Gone { .. } => PrimaryLease::Expired,
        };
        let decision = match move_promotion {
            Some((replica_id, epoch)) => {
                self.state.epoch = epoch;
                self.state.primary = Some(replica_id.clone());
                self.promoted = Some(replica_id);
                // Already promoted: the rest of this reconcile runs as KeepPrimary.
                PromotionDecision::KeepPrimary
            }
            None if self.recorded_move.is_some() => PromotionDecision::KeepPrimary,
            // No primary is assigned at the current epoch, yet a live replica still
            // reports serving as one (a demotion whose move record was lost): promoting
            // now could leave it acknowledging, so wait for its demotion report or for
            // its Lease to expire.
            None if self.state.primary.is_none() && unconfirmed_demotion(&self.views).is_some() => {
                let r = unconfirmed_demotion(&self.views)
                    .map(|r| r.id.clone())
                    .unwrap_or_default();
                tracing::info!(volume = obs.name, replica = %r, "waiting for a demoted primary to confirm");
                PromotionDecision::KeepPrimary
            }
            None => match (&standing, primary_view) {
                (
                    PrimaryStanding::Gone {
                        candidate: true, ..
                    },
                    Some(p),
                ) => choose_repromotion(
                    self.state.epoch,
                    p,
                    &self.state.in_sync.members,
                    &self.views,
                ),
                _ => choose_promotion(
                    self.state.epoch,
                    &primary_id,
                    lease,
                    &self.state.in_sync.members,
                    &self.views,
                ),
            },
        };
        match decision {
            PromotionDecision::KeepPrimary => {
                let change = primary_view.and_then(|p| {
                    next_in_sync_set(&self.state.in_sync, self.state.epoch, p, &self.views)
                });
                if let Some(change) = change {
                    self.commit_in_sync_change(change, &primary_id);
                }
            }
            PromotionDecision::Promote { replica_id, epoch } => {
                let why = match &standing {
                    PrimaryStanding::Gone { why, .. } => why.clone(),
                    PrimaryStanding::Serving => "the primary serves no IO".to_string(),
                };
                self.promote(&primary_id, replica_id, epoch, &why);
            }
            PromotionDecision::NoEligibleMember { reason: why } => {
                self.events
                    .push(warning(reason::NO_ELIGIBLE_PRIMARY, why.clone()));
                self.blocked = Some(Blocked::NoEligiblePrimary(why));
            }
        }
    }

    /// Commits the in-sync set the primary `primary_id` earned, with its events.
    fn commit_in_sync_change(&mut self, change: InSyncChange, primary_id: &str) {
        let mut note = format!("committed in-sync set generation {}", change.set.generation);
        if !change.removed.is_empty() {
            note += &format!(
                "; removed {} (unreachable from primary {primary_id})",
                change.removed.join(", ")
            );
        }
        if !change.added.is_empty() {
            note += &format!(
                "; added {} (in sync with primary {primary_id})",
                change.added.join(", ")
            );
        }
        self.events.push(normal(reason::IN_SYNC_SET_CHANGED, note));
        for id in &change.added {
            self.events.push(normal(
                reason::REBUILD_COMPLETED,
                format!("replica {id} caught up and joined the in-sync set"),
            ));
        }
        self.state.in_sync = change.set;
    }

    /// Promotes `replica_id` at `epoch` in place of `deposed`, which `why` says is gone.
    fn promote(&mut self, deposed: &str, replica_id: String, epoch: u64, why: &str) {
        let flushed = self
            .views
            .iter()
            .find(|r| r.id == replica_id)
            .map(|r| r.flushed_lsn())
            .unwrap_or(0);
        let node = self.node_of(&replica_id);
        self.events.push(normal(
            reason::PROMOTED,
            format!(
                "promoted replica {replica_id} on node {node} (flushed LSN {flushed}) to primary at epoch {epoch}; {why}"
            ),
        ));
        // The deposed primary is fenced by the new epoch; it leaves the set now so the
        // new primary need not wait for it. A primary promoted again at the new epoch
        // stays.
        let members = self.in_sync_without(|m| *m == deposed && *m != replica_id);
        if members.len() != self.state.in_sync.members.len() {
            self.events.push(normal(
                reason::IN_SYNC_SET_CHANGED,
                format!(
                    "committed in-sync set generation {}; removed deposed primary {deposed}",
                    self.state.in_sync.generation.saturating_add(1)
                ),
            ));
            self.commit_in_sync(members);
        }
        self.state.epoch = epoch;
        self.state.primary = Some(replica_id.clone());
        self.promoted = Some(replica_id);
    }

    /// Replaces replicas unusable past their grace, within each node's rebuild limit.
    fn replace_unusable(&mut self) {
        let obs = self.obs;
        let since = unhealthy_since(obs.status);
        for rep in replacements(
            &self.views,
            self.state.primary.as_deref(),
            &self.state.in_sync,
            &since,
            obs.now,
            self.settings,
        ) {
            let Some(old) = self.views.iter().find(|r| r.id == rep.replica_id).cloned() else {
                continue;
            };
            let excluded = self.rebuild_limited(&self.rebuilding);
            match self.placement(1, &excluded) {
                Ok(chosen) => {
                    for node in chosen {
                        let v = self.new_view(&node);
                        self.events.push(warning(
                            reason::REPLICA_FAILED,
                            format!(
                                "replica {} on node {} is replaced: {} for longer than the grace period",
                                old.id,
                                old.node(),
                                rep.reason.describe()
                            ),
                        ));
                        self.events.push(normal(
                            reason::REBUILD_STARTED,
                            format!("new replica {} on node {node} replaces {}", v.id, old.id),
                        ));
                        *self.rebuilding.entry(node).or_default() += 1;
                        self.views.push(v);
                        self.delete.push(old.id.clone());
                    }
                }
                Err(e) => self.events.push(warning(
                    reason::INSUFFICIENT_NODES,
                    format!(
                        "cannot replace replica {} ({}): {e}",
                        old.id,
                        rep.reason.describe()
                    ),
                )),
            }
        }
    }

    /// Places replicas up to `spec.replicas`, and one more for a drain that adds one.
    fn fill_up(&mut self, settled: bool) {
        let mut missing = self.desired.saturating_sub(self.active());
        if settled && self.drain == DrainStep::AddReplica {
            missing = missing.max(1);
        }
        if missing == 0 || self.state.primary.is_none() {
            return;
        }
        let excluded = self.rebuild_limited(&self.rebuilding);
        match self.placement(missing, &excluded) {
            Ok(chosen) if self.drain == DrainStep::AddReplica => {
                let leaving: Vec<&str> = self
                    .views
                    .iter()
                    .filter(|r| !r.deleting && self.evacuating.contains(r.node()))
                    .map(|r| r.id.as_str())
                    .collect();
                let event = normal(
                    reason::DRAIN_REPLICA_PLACED,
                    format!(
                        "draining: placed new replica(s) on node(s) {}; replica(s) {} on draining node(s) are removed once it is committed to the in-sync set",
                        chosen.join(", "),
                        leaving.join(", ")
                    ),
                );
                self.events.push(event);
                let new: Vec<ReplicaView> = chosen.iter().map(|n| self.new_view(n)).collect();
                self.views.extend(new);
            }
            Ok(chosen) => {
                self.events.push(normal(
                    reason::PLACED,
                    format!(
                        "placed {} new replica(s) on node(s) {}",
                        chosen.len(),
                        chosen.join(", ")
                    ),
                ));
                let new: Vec<ReplicaView> = chosen.iter().map(|n| self.new_view(n)).collect();
                self.views.extend(new);
            }
            Err(e) => {
                if self.drain == DrainStep::AddReplica {
                    // Nowhere to move to: give the drain slot to a volume that can.
                    self.drain = DrainStep::Blocked {
                        why: format!("draining: no node can take a new replica: {e}"),
                    };
                }
                self.events
                    .push(warning(reason::INSUFFICIENT_NODES, e.to_string()))
            }
        }
    }

    /// A drain's replacement is committed: the replica on the draining node leaves the
    /// set in the same commit, written (with the primary's assignment) before the
    /// replica is deleted.
    fn remove_drained(&mut self) {
        let DrainStep::Remove { replica_id } = &self.drain else {
            return;
        };
        let replica_id = replica_id.clone();
        let node = self.node_of(&replica_id);
        if self.state.in_sync.contains(&replica_id) {
            let members = self.in_sync_without(|m| *m == replica_id);
            self.commit_in_sync(members);
            self.events.push(normal(
                reason::IN_SYNC_SET_CHANGED,
                format!(
                    "committed in-sync set generation {}; removed {replica_id} (its node {node} is draining)",
                    self.state.in_sync.generation
                ),
            ));
        }
        self.events.push(normal(
            reason::DRAIN_REPLICA_REMOVED,
            format!(
                "draining: removing replica {replica_id} from node {node}; its replacement is committed to the in-sync set"
            ),
        ));
        self.delete.push(replica_id);
    }

    /// spec.replicas went down: remove the least useful non-primary replicas. A
    /// committed member leaves the set in the same commit, written (with the primary's
    /// assignment) before the replica is deleted. This waits for a drain to finish: the
    /// drain keeps one extra replica while it moves one.
    fn remove_excess(&mut self) {
        let desired = self.desired;
        let excess = self.active().saturating_sub(desired);
        if excess == 0 || self.state.primary.is_none() || self.drain != DrainStep::Idle {
            return;
        }
        let mut victims: Vec<&ReplicaView> = self
            .views
            .iter()
            .filter(|r| !r.deleting && !self.delete.contains(&r.id))
            .filter(|r| Some(r.id.as_str()) != self.state.primary.as_deref())
            .collect();
        victims.sort_by_key(|r| {
            (
                self.state.in_sync.contains(&r.id),
                crate::replacement::unhealthy(r).is_none(),
                r.flushed_lsn(),
                r.id.clone(),
            )
        });
        let victims: Vec<String> = victims
            .into_iter()
            .take(excess)
            .map(|r| r.id.clone())
            .collect();
        let members = self.in_sync_without(|m| victims.contains(m));
        if members.len() != self.state.in_sync.members.len() && !members.is_empty() {
            self.commit_in_sync(members);
            self.events.push(normal(
                reason::IN_SYNC_SET_CHANGED,
                format!(
                    "committed in-sync set generation {}; removed {} (spec.replicas is {desired})",
                    self.state.in_sync.generation,
                    victims.join(", ")
                ),
            ));
        }
        for v in victims {
            self.events.push(normal(
                reason::REPLICA_REMOVED,
                format!("removing replica {v}: spec.replicas is {desired}"),
            ));
            self.delete.push(v);
        }
    }

    fn mark_deleted(&mut self) {
        for v in self.views.iter_mut() {
            if self.delete.contains(&v.id) {
                v.deleting = true;
            }
        }
    }

    /// The event of replicas that exist and grow to the spec's size.
    fn expansion_event(&mut self) {
        let grow = replicas_to_expand(self.size, &self.views);
        let existing: Vec<&str> = grow
            .iter()
            .filter(|id| self.obs.replicas.iter().any(|r| &r.id == *id))
            .map(|s| s.as_str())
            .collect();
        if !existing.is_empty() {
            self.events.push(normal(
                reason::EXPANDED,
                format!(
                    "expanding replica(s) {} to {} bytes",
                    existing.join(", "),
                    self.size
                ),
            ));
        }
    }

    /// The desired spec of every kept replica that differs from its current one, a
    /// promoted primary's first: if the operator stops after it, recovery finds the new
    /// primary at the new epoch.
    fn replica_specs(&self) -> Vec<BlockReplicaSpec> {
        let Some(primary) = self.state.primary.as_deref() else {
            return vec![];
        };
        let obs = self.obs;
        let kept: Vec<&ReplicaView> = self.views.iter().filter(|r| !r.deleting).collect();
        let mut apply = Vec::new();
        for r in &kept {
            let is_primary = primary == r.id.as_str();
            let mut peers: Vec<PeerAssignment> = if is_primary {
                kept.iter()
                    .filter(|o| o.id != r.id)
                    .map(|o| PeerAssignment {
                        replica_id: o.id.clone(),
                        node: o.node().to_string(),
                    })
                    .collect()
            } else {
                vec![]
            };
            peers.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
            let want = BlockReplicaSpec {
                volume: obs.name.to_string(),
                replica_id: r.id.clone(),
                node: r.node().to_string(),
                role: if is_primary {
                    ReplicaRole::Primary
                } else {
                    ReplicaRole::Replica
                },
                epoch: self.state.epoch.max(r.spec.epoch),
                size_bytes: self.size.max(r.spec.size_bytes),
                block_size: obs.spec.block_size,
                durability: obs.spec.durability,
                peers,
                in_sync_set: self.state.in_sync.members.clone(),
                in_sync_set_generation: self.state.in_sync.generation,
                pvc: obs.spec.pvc.clone(),
            };
            if want != r.spec {
                apply.push(want);
            }
        }
        apply.sort_by_key(|s| {
            (
                Some(&s.replica_id) != self.promoted.as_ref(),
                s.role != ReplicaRole::Primary,
                s.replica_id.clone(),
            )
        });
        apply
    }

    /// The plan: the specs to write and the status they lead to.
    fn finish(self) -> Plan {
        let obs = self.obs;
        let apply = self.replica_specs();
        let status_views = with_specs(&self.views, &apply);
        let status = obs.status_of(
            &self.state,
            &status_views,
            self.blocked.as_ref(),
            reached_size(&status_views),
            self.recorded_move.as_ref(),
        );
        Plan {
            apply,
            delete: self.delete,
            status,
            events: self.events,
            drain: self.drain,
        }
    }
}

/// What deleting a volume takes right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// The volume is attached; nothing is deleted until it is detached.
    WaitForDetach { node: String },
    /// Delete these replicas (those not already being deleted) and strip the agent's
    /// finalizer from those whose node is gone for good (no `BlockNode`: no agent will
    /// ever free that disk); then wait for all of them to disappear.
    DeleteReplicas {
        delete: Vec<String>,
        orphaned: Vec<String>,
    },
    /// No replica is left: the volume's finalizer can go.
    Done,
}

pub fn plan_cleanup(replicas: &[ReplicaView], attached_to: Option<&str>) -> Cleanup {
    if let Some(node) = attached_to {
        return Cleanup::WaitForDetach {
            node: node.to_string(),
        };
    }
    if replicas.is_empty() {
        return Cleanup::Done;
    }
    Cleanup::DeleteReplicas {
        delete: replicas
            .iter()
            .filter(|r| !r.deleting)
            .map(|r| r.id.clone())
            .collect(),
        orphaned: replicas
            .iter()
            .filter(|r| !r.node_registered)
            .map(|r| r.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ZONE_LABEL;
    use api::ReplicaState::*;
    use api::VolumePhase;
    use k8s_openapi::jiff::SignedDuration;

    const GI: u64 = 1 << 30;

    fn nodes(n: usize) -> Vec<NodeCandidate> {
        (1..=n)
            .map(|i| NodeCandidate {
                labels: BTreeMap::from([(ZONE_LABEL.to_string(), format!("z{i}"))]),
                ..NodeCandidate::new(format!("n{i}"), 10 * GI)
            })
            .collect()
    }

    /// A tiny in-memory API: applies plans the way the controller does.
    struct World {
        spec: BlockVolumeSpec,
        status: Option<BlockVolumeStatus>,
        replicas: Vec<ReplicaView>,
        nodes: Vec<NodeCandidate>,
        now: Timestamp,
        events: Vec<PlannedEvent>,
        move_to: Option<String>,
        drain_slot: bool,
    }

    impl World {
        fn new(n: usize) -> Self {
            World {
                spec: BlockVolumeSpec::with_size("1Gi"),
                status: None,
                replicas: vec![],
                nodes: nodes(n),
                now: Timestamp::from_second(1_800_000_000).unwrap(),
                events: vec![],
                move_to: None,
                drain_slot: true,
            }
        }

        fn plan(&self) -> Plan {
            let rebuilding = BTreeMap::new();
            plan(
                &Observed {
                    name: "vol",
                    generation: Some(1),
                    spec: &self.spec,
                    status: self.status.as_ref(),
                    attached_to: None,
                    move_request: self.move_to.as_deref().map(|node| MoveRequest {
                        node,
                        reason: api::MoveReason::Requested,
                    }),
                    replicas: &self.replicas,
                    nodes: &self.nodes,
                    rebuilding_per_node: &rebuilding,
                    drain_slot: self.drain_slot,
                    now: self.now,
                },
                &ReplacementSettings::default(),
                &MoveSettings::default(),
            )
        }

        /// A volume placed on `n` nodes whose replicas all report healthy: Ready.
        fn ready(n: usize) -> Self {
            let mut w = World::new(n);
            w.step();
            w.all_report_healthy(10);
            w.step();
            w
        }

        fn step(&mut self) -> Plan {
            let p = self.plan();
            for s in &p.apply {
                match self.replicas.iter_mut().find(|r| r.id == s.replica_id) {
                    Some(r) => r.spec = s.clone(),
                    None => {
                        let live = self.nodes.iter().any(|n| n.name == s.node && n.live);
                        self.replicas.push(ReplicaView {
                            id: s.replica_id.clone(),
                            spec: s.clone(),
                            status: None,
                            deleting: false,
                            node_live: live,
                            node_registered: true,
                        });
                    }
                }
            }
            self.replicas.retain(|r| !p.delete.contains(&r.id));
            self.status = Some(p.status.clone());
            self.events.extend(p.events.clone());
            p
        }

        /// Every replica reports healthy at its assigned epoch.
        fn all_report_healthy(&mut self, flushed: u64) {
            for r in &mut self.replicas {
                let st = r.status.get_or_insert_with(Default::default);
                st.epoch = r.spec.epoch;
                st.role = Some(r.spec.role);
                st.state = if r.spec.role == ReplicaRole::Primary {
                    Serving
                } else {
                    InSync
                };
                st.flushed_lsn = flushed;
                st.size_bytes = Some(r.spec.size_bytes);
            }
        }

        fn primary(&self) -> &ReplicaView {
            let id = self.status.as_ref().unwrap().primary.clone().unwrap();
            self.replicas.iter().find(|r| r.id == id).unwrap()
        }

        fn kill_node(&mut self, node: &str) {
            for n in &mut self.nodes {
                if n.name == node {
                    n.live = false;
                }
            }
            for r in &mut self.replicas {
                if r.node() == node {
                    r.node_live = false;
                }
            }
        }

        fn reasons(&self) -> Vec<&'static str> {
            self.events.iter().map(|e| e.reason).collect()
        }
    }

    #[test]
    fn new_volume_is_placed_on_distinct_nodes_with_primary_at_epoch_one() {
        let mut w = World::new(4);
        let p = w.step();
        assert_eq!(p.apply.len(), 3);
        assert_eq!(
            p.apply[0].role,
            ReplicaRole::Primary,
            "primary written first"
        );
        let nodes: std::collections::BTreeSet<_> = p.apply.iter().map(|s| s.node.clone()).collect();
        assert_eq!(nodes.len(), 3);
        for s in &p.apply {
            assert_eq!(
                (
                    s.epoch,
                    s.size_bytes,
                    s.in_sync_set.len(),
                    s.in_sync_set_generation
                ),
                (1, GI, 3, 1)
            );
        }
        assert_eq!(p.apply[0].peers.len(), 2);
        assert_eq!(p.status.epoch, 1);
        assert_eq!(p.status.phase, VolumePhase::Creating);
        assert_eq!(w.reasons(), vec![reason::PLACED]);
    }

    #[test]
    fn a_volume_that_cannot_be_reconciled_only_reports_why_with_the_ready_reason() {
        let mut w = World::new(3);
        w.spec = BlockVolumeSpec::with_size("a lot");
        let p = w.step();
        assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:?}");
        assert_eq!(p.status.phase, VolumePhase::Failed);
        let e = &p.events[..];
        assert!(
            e.len() == 1 && e[0].warning && e[0].reason == reason::INVALID_SPEC,
            "{e:?}"
        );
        let ready = &p.status.conditions[0];
        assert_eq!(
            (ready.reason.as_str(), &ready.message),
            (reason::INVALID_SPEC, &e[0].note)
        );

        let mut w = World::new(3);
        w.step();
        let second = w
            .replicas
            .iter_mut()
            .find(|r| r.spec.role == ReplicaRole::Replica)
            .unwrap();
        second.spec.role = ReplicaRole::Primary;
        w.status = None;
        let p = w.step();
        assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:?}");
        assert_eq!(p.status.phase, VolumePhase::Failed);
        assert!(
            p.events.len() == 1 && p.events[0].reason == reason::CONFLICTING_PRIMARIES,
            "{:?}",
            p.events
        );
        assert_eq!(p.status.conditions[0].reason, reason::CONFLICTING_PRIMARIES);
    }

    #[test]
    fn reconcile_is_idempotent_once_converged() {
        let mut w = World::new(3);
        w.step();
        w.all_report_healthy(10);
        let p = w.step();
        assert_eq!(p.status.phase, VolumePhase::Ready);
        assert_eq!(p.status.in_sync_count, 3);
        let again = w.step();
        assert!(
            again.apply.is_empty() && again.delete.is_empty() && again.events.is_empty(),
            "{again:?}"
        );
        assert_eq!(again.status, p.status);
    }

    #[test]
    fn lost_status_never_duplicates_replicas() {
        let mut w = World::new(5);
        w.step();
        w.all_report_healthy(10);
        w.status = None;
        let p = w.step();
        assert!(p.apply.is_empty(), "{:?}", p.apply);
        assert_eq!(w.replicas.len(), 3);
        assert_eq!((p.status.epoch, p.status.in_sync_count), (1, 3));
        assert!(p.status.primary.is_some());
    }

    #[test]
    fn too_few_nodes_leaves_the_volume_pending_with_counts() {
        let mut w = World::new(2);
        let p = w.step();
        assert!(p.apply.is_empty());
        assert_eq!(p.status.phase, VolumePhase::Pending);
        let e = &p.events[0];
        assert!(e.warning && e.reason == reason::INSUFFICIENT_NODES);
        assert!(
            e.note.contains("need 3") && e.note.contains("only 2"),
            "{}",
            e.note
        );
    }

    #[test]
    fn unreachable_member_is_dropped_then_added_back() {
        let mut w = World::ready(3);
        let pid = w.primary().id.clone();
        let other = w.replicas.iter().find(|r| r.id != pid).unwrap().id.clone();
        let prim = w.replicas.iter_mut().find(|r| r.id == pid).unwrap();
        prim.status.as_mut().unwrap().unreachable = vec![other.clone()];
        let p = w.step();
        assert_eq!(
            (p.status.in_sync_set_generation, p.status.in_sync_count),
            (2, 2)
        );
        assert!(!p.status.in_sync_set.contains(&other));
        assert!(p.apply.iter().all(|s| s.in_sync_set_generation == 2));
        assert_eq!(p.status.phase, VolumePhase::Degraded);
        let prim = w.replicas.iter_mut().find(|r| r.id == pid).unwrap();
        let st = prim.status.as_mut().unwrap();
        st.unreachable.clear();
        st.peers = vec![api::PeerStatus {
            lag: None,
            replica_id: other.clone(),
            state: InSync,
            flushed_lsn: 10,
            last_error: None,
        }];
        let p = w.step();
        assert_eq!(
            (p.status.in_sync_set_generation, p.status.in_sync_count),
            (3, 3)
        );
        assert!(w.reasons().contains(&reason::REBUILD_COMPLETED));
    }

    #[test]
    fn expired_primary_lease_promotes_highest_flushed_member_at_next_epoch() {
        let mut w = World::ready(3);
        let old = w.primary().clone();
        let others: Vec<String> = w
            .replicas
            .iter()
            .filter(|r| r.id != old.id)
            .map(|r| r.id.clone())
            .collect();
        w.replicas
            .iter_mut()
            .find(|r| r.id == others[1])
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .flushed_lsn = 12;
        w.kill_node(old.node());
        let p = w.step();
        assert_eq!(p.apply[0].replica_id, others[1], "new primary's spec first");
        assert_eq!(
            (p.apply[0].role, p.apply[0].epoch),
            (ReplicaRole::Primary, 2)
        );
        assert_eq!(p.status.primary.as_ref(), Some(&others[1]));
        assert_eq!(p.status.epoch, 2);
        assert!(!p.status.in_sync_set.contains(&old.id));
        let old_spec = p.apply.iter().find(|s| s.replica_id == old.id).unwrap();
        assert_eq!((old_spec.role, old_spec.epoch), (ReplicaRole::Replica, 2));
        assert!(w.reasons().contains(&reason::PROMOTED));
        // Re-running does not promote again.
        let again = w.step();
        assert_eq!(again.status.epoch, 2);
    }

    #[test]
    fn needs_rebuild_replica_is_replaced_on_another_node_after_grace() {
        let mut w = World::ready(4);
        let pid = w.primary().id.clone();
        let bad = w.replicas.iter().find(|r| r.id != pid).unwrap().clone();
        w.replicas
            .iter_mut()
            .find(|r| r.id == pid)
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .unreachable = vec![bad.id.clone()];
        w.replicas
            .iter_mut()
            .find(|r| r.id == bad.id)
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .state = NeedsRebuild;
        let p = w.step();
        assert!(p.delete.is_empty(), "grace starts now");
        w.now += SignedDuration::from_secs(61);
        let p = w.step();
        assert_eq!(p.delete, vec![bad.id.clone()]);
        let new = p
            .apply
            .iter()
            .find(|s| {
                !w.replicas
                    .iter()
                    .any(|r| r.id == s.replica_id && r.status.is_some())
            })
            .unwrap();
        assert_ne!(new.node, bad.spec.node);
        assert_eq!(w.replicas.len(), 3);
        let r = w.reasons();
        assert!(
            r.contains(&reason::REPLICA_FAILED) && r.contains(&reason::REBUILD_STARTED),
            "{r:?}"
        );
        let prim = w.replicas.iter().find(|r| r.id == pid).unwrap();
        assert_eq!(prim.spec.peers.len(), 2);
        assert!(prim.spec.peers.iter().all(|p| p.replica_id != bad.id));
    }

    #[test]
    fn growing_the_size_expands_every_replica() {
        let mut w = World::ready(3);
        w.spec.size =
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("2Gi".into());
        let p = w.step();
        assert_eq!(p.apply.len(), 3);
        assert!(p.apply.iter().all(|s| s.size_bytes == 2 * GI));
        assert_eq!(p.status.size_bytes, Some(GI), "replicas have not grown yet");
        assert!(w.reasons().contains(&reason::EXPANDED));
        w.all_report_healthy(10);
        assert_eq!(w.step().status.size_bytes, Some(2 * GI));
    }

    #[test]
    fn lowering_replicas_removes_non_primary_members_after_committing_the_smaller_set() {
        let mut w = World::ready(3);
        let pid = w.primary().id.clone();
        w.spec.replicas = 1;
        let p = w.step();
        assert_eq!(p.delete.len(), 2);
        assert!(!p.delete.contains(&pid), "the primary stays");
        assert_eq!(p.status.in_sync_set, vec![pid.clone()]);
        assert_eq!(p.status.in_sync_set_generation, 2);
        let prim = p.apply.iter().find(|s| s.replica_id == pid).unwrap();
        assert_eq!((prim.in_sync_set.len(), prim.peers.len()), (1, 0));
        assert_eq!(w.replicas.len(), 1);
        assert_eq!(p.status.phase, VolumePhase::Ready);
        assert!(w.step().delete.is_empty(), "nothing more to remove");
    }

    #[test]
    fn cleanup_waits_for_detach_then_deletes_and_frees_orphans() {
        let mut a = crate::model::test_support::replica("a", "n1");
        a.node_registered = false;
        let b = crate::model::test_support::replica("b", "n2").deleting();
        assert_eq!(
            plan_cleanup(&[a.clone(), b.clone()], Some("n7")),
            Cleanup::WaitForDetach { node: "n7".into() }
        );
        assert_eq!(
            plan_cleanup(&[a, b], None),
            Cleanup::DeleteReplicas {
                delete: vec!["a".into()],
                orphaned: vec!["a".into()]
            }
        );
        assert_eq!(plan_cleanup(&[], None), Cleanup::Done);
    }

    /// Converged RF3 volume whose primary reports both peers in sync.
    fn converged() -> World {
        let mut w = World::ready(3);
        let pid = w.primary().id.clone();
        let others: Vec<String> = w
            .replicas
            .iter()
            .filter(|r| r.id != pid)
            .map(|r| r.id.clone())
            .collect();
        let prim = w.replicas.iter_mut().find(|r| r.id == pid).unwrap();
        prim.status.as_mut().unwrap().peers = others
            .iter()
            .map(|id| api::PeerStatus {
                lag: None,
                replica_id: id.clone(),
                state: InSync,
                flushed_lsn: 10,
                last_error: None,
            })
            .collect();
        w
    }

    fn primaries_at(w: &World, epoch: u64) -> usize {
        w.replicas
            .iter()
            .filter(|r| r.spec.role == ReplicaRole::Primary && r.spec.epoch == epoch)
            .count()
    }

    /// Every agent reports healthy at its assignment and the primary counts every other
    /// replica in sync: an instant catch-up.
    fn agents_catch_up(w: &mut World, flushed: u64) {
        w.all_report_healthy(flushed);
        let Some(pid) = w.status.as_ref().and_then(|s| s.primary.clone()) else {
            return;
        };
        let others: Vec<String> = w
            .replicas
            .iter()
            .filter(|r| r.id != pid)
            .map(|r| r.id.clone())
            .collect();
        if let Some(p) = w.replicas.iter_mut().find(|r| r.id == pid) {
            p.status.get_or_insert_with(Default::default).peers = others
                .iter()
                .map(|id| api::PeerStatus {
                    lag: None,
                    replica_id: id.clone(),
                    state: InSync,
                    flushed_lsn: flushed,
                    last_error: None,
                })
                .collect();
        }
    }

    /// Places the volume and lets every replica catch up and join the in-sync set.
    fn settle(w: &mut World) {
        w.step();
        agents_catch_up(w, 10);
        w.step();
        agents_catch_up(w, 10);
        w.step();
    }

    /// The node of some replica that is not the primary.
    fn a_replica_node(w: &World) -> String {
        w.replicas
            .iter()
            .find(|r| r.spec.role == ReplicaRole::Replica)
            .unwrap()
            .node()
            .to_string()
    }

    fn drain(w: &mut World, node: &str) {
        for n in &mut w.nodes {
            if n.name == node {
                (n.evacuating, n.cordoned) = (true, true);
            }
        }
    }

    #[test]
    fn draining_the_primarys_node_moves_every_replica_off_without_shrinking_the_set() {
        let mut w = World::new(5);
        w.spec.replicas = 3;
        settle(&mut w);
        let victim_node = w.primary().node().to_string();
        drain(&mut w, &victim_node);
        let mut max_total = 0;
        for i in 0..40 {
            agents_catch_up(&mut w, 10 + i);
            let p = w.step();
            assert!(
                p.status.in_sync_set.len() >= 3,
                "step {i}: committed set {:?} below spec.replicas",
                p.status.in_sync_set
            );
            assert!(
                p.apply.iter().all(|s| s.node != victim_node
                    || s.role == ReplicaRole::Replica
                    || w.status
                        .as_ref()
                        .is_some_and(|st| st.primary_node.as_deref() == Some(&victim_node))),
                "no new primary on the draining node"
            );
            assert!(
                !p.apply.iter().any(|s| s.node == victim_node
                    && !w
                        .replicas
                        .iter()
                        .any(|r| r.id == s.replica_id && r.node() == victim_node)),
                "never a new replica on the draining node"
            );
            max_total = max_total.max(w.replicas.len());
            if p.drain == DrainStep::Idle && w.replicas.iter().all(|r| r.node() != victim_node) {
                break;
            }
        }
        assert!(
            w.replicas.iter().all(|r| r.node() != victim_node),
            "drained: {:?}",
            w.replicas.iter().map(|r| r.node()).collect::<Vec<_>>()
        );
        agents_catch_up(&mut w, 100);
        let p = w.step();
        assert_eq!(w.replicas.len(), 3);
        assert_eq!(p.status.in_sync_set.len(), 3);
        assert_ne!(p.status.primary_node.as_deref(), Some(victim_node.as_str()));
        assert_eq!(max_total, 4, "one extra replica at a time");
        let r = w.reasons();
        for want in [
            reason::MOVE_STARTED,
            reason::PRIMARY_MOVED,
            reason::DRAIN_REPLICA_PLACED,
            reason::DRAIN_REPLICA_REMOVED,
        ] {
            assert!(r.contains(&want), "{want} missing from {r:?}");
        }
        assert_eq!(w.step().drain, DrainStep::Idle, "nothing more to do");
    }

    #[test]
    fn a_drain_with_nowhere_to_go_gives_up_its_slot_and_keeps_every_replica() {
        let mut w = World::new(3);
        settle(&mut w);
        let node = a_replica_node(&w);
        drain(&mut w, &node);
        let p = w.step();
        assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:?}");
        assert!(
            matches!(&p.drain, DrainStep::Blocked { why } if why.contains("no node can take")),
            "{:?}",
            p.drain
        );
        assert!(!p.drain.holds_slot());
        assert!(
            p.events
                .iter()
                .any(|e| e.reason == reason::INSUFFICIENT_NODES)
        );
        assert_eq!(p.status.in_sync_set.len(), 3);
    }

    #[test]
    fn calling_a_drain_off_removes_the_uncommitted_replacement_and_keeps_the_set() {
        let mut w = World::new(4);
        settle(&mut w);
        let node = a_replica_node(&w);
        let before: Vec<String> = w.replicas.iter().map(|r| r.id.clone()).collect();
        drain(&mut w, &node);
        w.step();
        let new = w
            .replicas
            .iter()
            .find(|r| !before.contains(&r.id))
            .expect("a replacement was placed")
            .id
            .clone();
        // Called off before the replacement caught up.
        for n in &mut w.nodes {
            (n.evacuating, n.cordoned) = (false, false);
        }
        let p = w.step();
        assert_eq!(p.drain, DrainStep::Idle);
        assert_eq!(p.delete, vec![new], "the uncommitted replacement goes");
        assert_eq!(p.status.in_sync_set.len(), 3);
        assert!(
            w.replicas.iter().any(|r| r.node() == node),
            "the old replica stays"
        );
    }

    #[test]
    fn a_drain_without_a_slot_changes_nothing() {
        let mut w = World::new(5);
        settle(&mut w);
        let node = a_replica_node(&w);
        drain(&mut w, &node);
        w.drain_slot = false;
        agents_catch_up(&mut w, 11);
        let p = w.step();
        assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:?}");
        assert_eq!(p.drain, DrainStep::WaitForSlot { leaving: 1 });
        w.drain_slot = true;
        let before: Vec<String> = w.replicas.iter().map(|r| r.id.clone()).collect();
        let p = w.step();
        let new: Vec<&BlockReplicaSpec> = p
            .apply
            .iter()
            .filter(|s| !before.contains(&s.replica_id))
            .collect();
        assert_eq!(new.len(), 1, "one new replica: {:?}", p.apply);
        assert_ne!(new[0].node, node, "never on the draining node");
        assert!(
            p.apply
                .iter()
                .any(|s| s.role == ReplicaRole::Primary && s.peers.len() == 3)
        );
        assert!(
            p.delete.is_empty(),
            "nothing removed before the replacement is committed"
        );
    }

    #[test]
    fn planned_move_demotes_first_then_promotes_the_target_at_epoch_plus_one() {
        let mut w = converged();
        let old = w.primary().clone();
        let target = w.replicas.iter().find(|r| r.id != old.id).unwrap().clone();
        w.move_to = Some(target.node().to_string());

        // 1. Recorded in the status only.
        let p = w.step();
        assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:?}");
        let m = p.status.primary_move.clone().expect("move recorded");
        assert_eq!(
            (m.phase, m.epoch, m.to.as_str()),
            (api::MovePhase::Requested, 2, target.id.as_str())
        );
        assert_eq!(p.status.primary.as_deref(), Some(old.id.as_str()));

        // 2. The old primary alone is reassigned: a replica at epoch 2; nobody is primary.
        let p = w.step();
        assert_eq!(p.apply.len(), 1, "{:?}", p.apply);
        assert_eq!(p.apply[0].replica_id, old.id);
        assert_eq!(
            (p.apply[0].role, p.apply[0].epoch),
            (ReplicaRole::Replica, 2)
        );
        assert_eq!(p.status.primary, None);
        assert_eq!(
            p.status.primary_move.as_ref().unwrap().phase,
            api::MovePhase::Demoting
        );
        assert_eq!(primaries_at(&w, 2), 0);

        // Until the old primary's agent confirms the demotion, nothing is promoted, also
        // by an operator that lost everything but the stored objects.
        for _ in 0..3 {
            let p = w.step();
            assert!(p.apply.is_empty(), "{:?}", p.apply);
            assert_eq!(p.status.primary, None);
        }

        // 3. The agent reports the demotion (flushed 12, after its last drain); the target
        // has flushed less: still wait. Once the target has everything: promote it.
        let r = w.replicas.iter_mut().find(|r| r.id == old.id).unwrap();
        let st = r.status.as_mut().unwrap();
        (st.role, st.epoch, st.state, st.flushed_lsn) = (Some(ReplicaRole::Replica), 2, InSync, 12);
        assert!(w.step().apply.is_empty());
        w.replicas
            .iter_mut()
            .find(|r| r.id == target.id)
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .flushed_lsn = 12;
        let p = w.step();
        assert_eq!(
            p.apply[0].replica_id, target.id,
            "new primary written first"
        );
        assert_eq!(
            (p.apply[0].role, p.apply[0].epoch),
            (ReplicaRole::Primary, 2)
        );
        assert_eq!(p.status.primary.as_deref(), Some(target.id.as_str()));
        assert_eq!(p.status.epoch, 2);
        assert_eq!(p.status.primary_move, None);
        assert!(
            p.status.in_sync_set.contains(&old.id),
            "the demoted primary stays a member"
        );
        assert_eq!(primaries_at(&w, 2), 1);
        assert_eq!(primaries_at(&w, 1), 0);
        let r = w.reasons();
        for want in [
            reason::MOVE_STARTED,
            reason::PRIMARY_DEMOTED,
            reason::PRIMARY_MOVED,
        ] {
            assert!(r.contains(&want), "{r:?}");
        }

        // The annotation is now satisfied: nothing more happens.
        w.all_report_healthy(12);
        let again = w.step();
        assert_eq!(again.status.epoch, 2);
        assert_eq!(again.status.primary_move, None);
    }

    #[test]
    fn lost_status_mid_move_never_promotes_while_the_demoted_primary_may_serve() {
        let mut w = converged();
        let old = w.primary().clone();
        let target = w.replicas.iter().find(|r| r.id != old.id).unwrap().clone();
        w.move_to = Some(target.node().to_string());
        w.step();
        w.step();
        // The status (and the move record with it) is lost; the annotation is gone too.
        w.status = None;
        w.move_to = None;
        for _ in 0..2 {
            let p = w.step();
            assert_eq!(p.status.primary, None, "{:?}", p.events);
            assert_eq!(primaries_at(&w, 2), 0);
        }
        // Its agent confirms the demotion: the standard rule may now promote.
        let r = w.replicas.iter_mut().find(|r| r.id == old.id).unwrap();
        let st = r.status.as_mut().unwrap();
        (st.role, st.epoch, st.state) = (Some(ReplicaRole::Replica), 2, InSync);
        let p = w.step();
        assert!(p.status.primary.is_some());
        assert_eq!(primaries_at(&w, p.status.epoch), 1);
    }

    fn report(w: &mut World, id: &str, f: impl FnOnce(&mut api::BlockReplicaStatus)) {
        let r = w.replicas.iter_mut().find(|r| r.id == id).unwrap();
        f(r.status.get_or_insert_with(Default::default));
    }

    #[test]
    fn primary_reopened_at_its_epoch_is_promoted_again_at_the_next_epoch() {
        let mut w = converged();
        let old = w.primary().clone();
        // Its agent restarted: the volume was reopened at epoch 1 and refuses to serve
        // there. Its node is live (the new agent renews the Lease).
        report(&mut w, &old.id, |st| {
            (st.state, st.role, st.epoch) = (Failed, Some(ReplicaRole::Primary), 1);
            st.last_error = Some(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR.into());
        });
        let p = w.step();
        assert_eq!(p.status.primary.as_deref(), Some(old.id.as_str()));
        assert_eq!(p.status.epoch, 2);
        assert_eq!(p.apply[0].replica_id, old.id, "new primary's spec first");
        assert_eq!(
            (p.apply[0].role, p.apply[0].epoch),
            (ReplicaRole::Primary, 2)
        );
        assert!(p.status.in_sync_set.contains(&old.id), "it stays a member");
        assert_eq!(primaries_at(&w, 2), 1);
        assert!(w.reasons().contains(&reason::PROMOTED));
        // Serving at epoch 2: nothing more happens.
        w.all_report_healthy(10);
        let again = w.step();
        assert_eq!(
            (again.status.epoch, again.status.primary.as_deref()),
            (2, Some(old.id.as_str()))
        );
    }

    #[test]
    fn a_member_ahead_of_a_reopened_primary_takes_over_at_the_next_epoch() {
        let mut w = converged();
        let old = w.primary().clone();
        let ahead = w
            .replicas
            .iter()
            .find(|r| r.id != old.id)
            .unwrap()
            .id
            .clone();
        // Power loss: the primary kept less than a replica had already fsynced.
        report(&mut w, &old.id, |st| {
            (st.state, st.role, st.epoch, st.flushed_lsn) =
                (Failed, Some(ReplicaRole::Primary), 1, 5);
            st.last_error = Some(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR.into());
        });
        report(&mut w, &ahead, |st| st.flushed_lsn = 12);
        let p = w.step();
        assert_eq!(p.status.primary.as_deref(), Some(ahead.as_str()));
        assert_eq!(p.status.epoch, 2);
        assert!(!p.status.in_sync_set.contains(&old.id));
        let old_spec = p.apply.iter().find(|s| s.replica_id == old.id).unwrap();
        assert_eq!((old_spec.role, old_spec.epoch), (ReplicaRole::Replica, 2));
    }

    #[test]
    fn promoted_primary_that_cannot_take_its_assignment_is_promoted_away_after_the_grace() {
        let mut w = converged();
        let old = w.primary().clone();
        w.kill_node(old.node());
        let p = w.step();
        let b = p.status.primary.clone().expect("promoted");
        assert_eq!(p.status.epoch, 2);
        let c = w
            .replicas
            .iter()
            .find(|r| r.id != old.id && r.id != b)
            .unwrap()
            .id
            .clone();
        // B's agent cannot persist epoch 2: it reports its last role and epoch, Failed.
        report(&mut w, &b, |st| {
            (st.state, st.role, st.epoch) = (Failed, Some(ReplicaRole::Replica), 1);
            st.last_error = Some(format!(
                "replica runtime: replica {b} failed: persist epoch 2: I/O error"
            ));
        });
        let grace = ReplacementSettings::default().primary_failure_grace_ms;
        let p = w.step();
        assert_eq!(
            (p.status.primary.as_deref(), p.status.epoch),
            (Some(b.as_str()), 2),
            "a failure just seen gets its grace"
        );
        w.now += SignedDuration::from_millis(i64::try_from(grace).unwrap() - 1);
        let p = w.step();
        assert_eq!(
            (p.status.primary.as_deref(), p.status.epoch),
            (Some(b.as_str()), 2),
            "not before the grace"
        );
        w.now += SignedDuration::from_millis(1);
        let p = w.step();
        assert_eq!(
            (p.status.primary.as_deref(), p.status.epoch),
            (Some(c.as_str()), 3)
        );
        assert_eq!(p.apply[0].replica_id, c, "new primary's spec first");
        let e = w
            .events
            .iter()
            .rfind(|e| e.reason == reason::PROMOTED)
            .unwrap();
        assert!(
            e.note.contains("could not take its assignment"),
            "{}",
            e.note
        );
        assert!(!p.status.in_sync_set.contains(&b));
        assert_eq!(primaries_at(&w, 3), 1);
    }

    #[test]
    fn move_request_to_a_node_without_an_in_sync_replica_is_rejected_with_a_warning() {
        let mut w = converged();
        w.move_to = Some("n9".into());
        let p = w.step();
        assert!(p.apply.is_empty() && p.status.primary_move.is_none());
        let e = p
            .events
            .iter()
            .find(|e| e.reason == reason::MOVE_REJECTED)
            .expect("warning");
        assert!(e.warning && e.note.contains("n9"), "{}", e.note);
    }

    #[test]
    fn replica_names_are_stable_per_node_and_distinct_across_nodes() {
        assert_eq!(replica_name("v", "n1"), replica_name("v", "n1"));
        assert_ne!(replica_name("v", "n1"), replica_name("v", "n2"));
        assert!(replica_name("v", "n1").starts_with("v-"));
    }
}
