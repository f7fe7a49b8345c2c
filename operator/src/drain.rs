//! Drain: moving every replica of a volume off nodes being evacuated
//! (`BlockNode.spec.evacuate`), one replica at a time, without the committed in-sync set
//! ever holding fewer members than it held before the drain began.
//!
//! Per volume, each reconcile takes one step of:
//! 1. a primary on a draining node is moved first, by the planned switchover of
//!    [`crate::primary_move`], to a committed, healthy member on a node that stays;
//! 2. when fewer than `spec.replicas` replicas sit on nodes that stay, one new replica is
//!    placed elsewhere (placement never picks a cordoned or draining node);
//! 3. it rebuilds and catches up, and the ordinary in-sync rule commits it to the set;
//! 4. only then is one replica on a draining node removed — leaving the set in the same
//!    commit, written before the replica is deleted — and only when the committed
//!    members that stay are at least `spec.replicas` (so a degraded volume waits).
//!
//! Guarantees: the committed in-sync set never shrinks below `min(spec.replicas,
//! its size when the step began)`; a replica on a draining node is removed only after
//! a replacement is committed; a primary is never removed (it is moved first). How many
//! volumes drain at once is bounded by the operator (`drain_concurrency`): a volume that
//! has not started may only take steps 1 and 2 when granted a slot.

use std::collections::BTreeSet;

use crate::model::ReplicaView;
use crate::placement::NodeCandidate;
use crate::recovery::VolumeState;

/// Bounds of draining.
#[derive(Clone, Debug)]
pub struct DrainSettings {
    /// Volumes moving a replica off draining nodes at the same time.
    pub drain_concurrency: u32,
}

impl Default for DrainSettings {
    fn default() -> Self {
        DrainSettings {
            drain_concurrency: 1,
        }
    }
}

/// Names of the nodes being drained.
pub fn evacuating_nodes(nodes: &[NodeCandidate]) -> BTreeSet<&str> {
    nodes
        .iter()
        .filter(|n| n.evacuating)
        .map(|n| n.name.as_str())
        .collect()
}

/// The next drain step of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainStep {
    /// No replica of the volume is on a draining node.
    Idle,
    /// Replicas are on draining nodes but another volume holds the drain slot.
    WaitForSlot { leaving: usize },
    /// Move the primary to the member on `to_node` (a committed member that stays).
    MovePrimary { to_node: String },
    /// Place one new replica on a node that stays.
    AddReplica,
    /// Wait for the new replica(s) to catch up and be committed; the text says what.
    WaitForCatchUp { why: String },
    /// Remove this replica (on a draining node); it leaves the committed set first.
    Remove { replica_id: String },
    /// No node can take the new replica (set by the plan when placement fails); the
    /// volume gives up its drain slot and tries again later.
    Blocked { why: String },
}

impl DrainStep {
    /// Whether the volume is past the slot check (it holds a drain slot).
    pub fn holds_slot(&self) -> bool {
        !matches!(
            self,
            DrainStep::Idle | DrainStep::WaitForSlot { .. } | DrainStep::Blocked { .. }
        )
    }
}

/// What one drain step looks at.
#[derive(Clone, Debug)]
pub struct DrainInput<'a> {
    pub state: &'a VolumeState,
    /// The volume's replicas (those being deleted are ignored).
    pub replicas: &'a [ReplicaView],
    pub desired: usize,
    pub evacuating: &'a BTreeSet<&'a str>,
    /// The volume already holds a drain slot (it has started), or may take one now.
    pub slot: bool,
}

/// A member that stays and could take over as primary: committed, on a live node,
/// reporting healthy at the volume's epoch.
fn committed_and_healthy(input: &DrainInput<'_>, r: &ReplicaView) -> bool {
    input.state.in_sync.contains(&r.id) && r.node_live && r.healthy_at(input.state.epoch)
}

/// Whether this volume has started a drain and so holds a slot regardless of the
/// concurrency bound: it has a replica on a draining node and either more replicas than
/// `spec.replicas` (a replacement is placed) or a primary move under way for a drain.
pub fn started(
    replicas: &[ReplicaView],
    desired: usize,
    evacuating: &BTreeSet<&str>,
    drain_move: bool,
) -> bool {
    let active: Vec<&ReplicaView> = replicas.iter().filter(|r| !r.deleting).collect();
    active.iter().any(|r| evacuating.contains(r.node())) && (active.len() > desired || drain_move)
}

/// One step of the drain: see the module documentation.
pub fn step(input: &DrainInput<'_>) -> DrainStep {
    let active: Vec<&ReplicaView> = input.replicas.iter().filter(|r| !r.deleting).collect();
    let (leaving, staying): (Vec<&ReplicaView>, Vec<&ReplicaView>) = active
        .iter()
        .partition(|r| input.evacuating.contains(r.node()));
    if leaving.is_empty() {
        return DrainStep::Idle;
    }
    if !input.slot {
        return DrainStep::WaitForSlot {
            leaving: leaving.len(),
        };
    }
    let primary = input.state.primary.as_deref();
    let primary_leaving = leaving.iter().any(|r| Some(r.id.as_str()) == primary);
    let committed_staying: Vec<&&ReplicaView> = staying
        .iter()
        .filter(|r| committed_and_healthy(input, r))
        .collect();
    if primary_leaving {
        // Highest flushed first, then name: the member with the least to catch up.
        if let Some(to) = committed_staying
            .iter()
            .max_by_key(|r| (r.flushed_lsn(), std::cmp::Reverse(r.id.clone())))
        {
            return DrainStep::MovePrimary {
                to_node: to.node().to_string(),
            };
        }
    }
    if staying.len() < input.desired {
        if active.len() > input.desired {
            // The replacement is placed but has not reached its node's report yet, or
            // another staying replica is missing: wait rather than add a second one.
            return DrainStep::WaitForCatchUp {
                why: format!(
                    "{} of {} replica(s) on nodes that stay; waiting for the new replica",
                    staying.len(),
                    input.desired
                ),
            };
        }
        return DrainStep::AddReplica;
    }
    if committed_staying.len() < input.desired {
        return DrainStep::WaitForCatchUp {
            why: format!(
                "{} of {} replica(s) on nodes that stay are committed in-sync members; waiting for the new replica to catch up",
                committed_staying.len(),
                input.desired
            ),
        };
    }
    match leaving.iter().find(|r| Some(r.id.as_str()) != primary) {
        Some(victim) => DrainStep::Remove {
            replica_id: victim.id.clone(),
        },
        // Only the primary is left on draining nodes and no member can take over yet
        // (the move above found none): wait for one to report healthy.
        None => DrainStep::WaitForCatchUp {
            why: "the primary is on a draining node; waiting for a healthy committed member to move it to".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_sync::InSyncSet;
    use crate::model::test_support::replica;
    use api::ReplicaState::*;

    fn state(primary: &str, members: &[&str]) -> VolumeState {
        VolumeState {
            epoch: 2,
            primary: Some(primary.into()),
            in_sync: InSyncSet::new(members.iter().map(|m| m.to_string()).collect(), 5),
        }
    }

    fn healthy(id: &str, node: &str) -> ReplicaView {
        replica(id, node).epoch(2).reports(InSync, 2, 100)
    }

    fn run(
        st: &VolumeState,
        replicas: &[ReplicaView],
        desired: usize,
        draining: &[&str],
        slot: bool,
    ) -> DrainStep {
        let evacuating: BTreeSet<&str> = draining.iter().copied().collect();
        step(&DrainInput {
            state: st,
            replicas,
            desired,
            evacuating: &evacuating,
            slot,
        })
    }

    #[test]
    fn drain_planning_table() {
        let p = |id: &str, node: &str| {
            replica(id, node)
                .primary()
                .epoch(2)
                .reports(Serving, 2, 100)
        };
        struct Case {
            name: &'static str,
            state: VolumeState,
            replicas: Vec<ReplicaView>,
            desired: usize,
            slot: bool,
            want: DrainStep,
        }
        let cases = vec![
            Case {
                name: "nothing on the draining node",
                state: state("a", &["a", "b"]),
                replicas: vec![p("a", "n1"), healthy("b", "n2")],
                desired: 2,
                slot: false,
                want: DrainStep::Idle,
            },
            Case {
                name: "no slot: wait for the volume ahead",
                state: state("a", &["a", "b", "c"]),
                replicas: vec![p("a", "n1"), healthy("b", "n2"), healthy("c", "nx")],
                desired: 3,
                slot: false,
                want: DrainStep::WaitForSlot { leaving: 1 },
            },
            Case {
                name: "a replica on the draining node: add one elsewhere first",
                state: state("a", &["a", "b", "c"]),
                replicas: vec![p("a", "n1"), healthy("b", "n2"), healthy("c", "nx")],
                desired: 3,
                slot: true,
                want: DrainStep::AddReplica,
            },
            Case {
                name: "the replacement is placed but not committed: wait",
                state: state("a", &["a", "b", "c"]),
                replicas: vec![
                    p("a", "n1"),
                    healthy("b", "n2"),
                    healthy("c", "nx"),
                    replica("d", "n4").epoch(2).reports(Rebuilding, 2, 10),
                ],
                desired: 3,
                slot: true,
                want: DrainStep::WaitForCatchUp {
                    why: "2 of 3 replica(s) on nodes that stay are committed in-sync members; waiting for the new replica to catch up".into(),
                },
            },
            Case {
                name: "in sync but not yet committed: still wait",
                state: state("a", &["a", "b", "c"]),
                replicas: vec![
                    p("a", "n1"),
                    healthy("b", "n2"),
                    healthy("c", "nx"),
                    healthy("d", "n4"),
                ],
                desired: 3,
                slot: true,
                want: DrainStep::WaitForCatchUp {
                    why: "2 of 3 replica(s) on nodes that stay are committed in-sync members; waiting for the new replica to catch up".into(),
                },
            },
            Case {
                name: "the replacement is committed: remove the old replica",
                state: state("a", &["a", "b", "c", "d"]),
                replicas: vec![
                    p("a", "n1"),
                    healthy("b", "n2"),
                    healthy("c", "nx"),
                    healthy("d", "n4"),
                ],
                desired: 3,
                slot: true,
                want: DrainStep::Remove {
                    replica_id: "c".into(),
                },
            },
            Case {
                name: "the primary on the draining node moves first",
                state: state("a", &["a", "b", "c"]),
                replicas: vec![p("a", "nx"), healthy("b", "n2"), healthy("c", "n3")],
                desired: 3,
                slot: true,
                want: DrainStep::MovePrimary {
                    to_node: "n2".into(),
                },
            },
            Case {
                name: "the primary never moves to an uncommitted or unhealthy member",
                state: state("a", &["a", "b"]),
                replicas: vec![
                    p("a", "nx"),
                    replica("b", "n2").epoch(2).reports(NeedsRebuild, 2, 1),
                    healthy("c", "n3"),
                ],
                desired: 3,
                slot: true,
                want: DrainStep::AddReplica,
            },
            Case {
                name: "single replica: add, and the primary moves once the new one is committed",
                state: state("a", &["a", "d"]),
                replicas: vec![p("a", "nx"), healthy("d", "n4")],
                desired: 1,
                slot: true,
                want: DrainStep::MovePrimary {
                    to_node: "n4".into(),
                },
            },
            Case {
                name: "single replica: the first step adds the replacement",
                state: state("a", &["a"]),
                replicas: vec![p("a", "nx")],
                desired: 1,
                slot: true,
                want: DrainStep::AddReplica,
            },
            Case {
                name: "a degraded volume waits instead of dropping below spec.replicas",
                state: state("a", &["a", "c"]),
                replicas: vec![
                    p("a", "n1"),
                    replica("b", "n2").epoch(2).reports(Failed, 2, 1),
                    healthy("c", "nx"),
                    replica("d", "n4").epoch(2),
                ],
                desired: 3,
                slot: true,
                want: DrainStep::WaitForCatchUp {
                    why: "1 of 3 replica(s) on nodes that stay are committed in-sync members; waiting for the new replica to catch up".into(),
                },
            },
            Case {
                name: "a replica being deleted is already gone",
                state: state("a", &["a", "b"]),
                replicas: vec![p("a", "n1"), healthy("b", "n2"), healthy("c", "nx").deleting()],
                desired: 2,
                slot: false,
                want: DrainStep::Idle,
            },
        ];
        for c in cases {
            let got = run(&c.state, &c.replicas, c.desired, &["nx"], c.slot);
            assert_eq!(got, c.want, "case: {}", c.name);
        }
    }

    #[test]
    fn remove_never_drops_the_committed_set_below_spec_replicas() {
        // Exhaustive over small shapes: whenever the step removes a replica, the
        // committed healthy members left are at least spec.replicas and the victim is
        // not the primary.
        let nodes = ["n1", "n2", "n3", "nx", "ny"];
        for desired in 1..=3usize {
            for mask in 0u32..(1 << 10) {
                let mut replicas = Vec::new();
                let mut members = Vec::new();
                for (i, node) in nodes.iter().enumerate() {
                    let present = mask & (1 << (2 * i)) != 0;
                    let committed = mask & (1 << (2 * i + 1)) != 0;
                    if !present {
                        continue;
                    }
                    let id = format!("r{i}");
                    replicas.push(if committed {
                        healthy(&id, node)
                    } else {
                        replica(&id, node).epoch(2).reports(Rebuilding, 2, 1)
                    });
                    if committed {
                        members.push(id);
                    }
                }
                let Some(primary) = members.first().cloned() else {
                    continue;
                };
                let st = VolumeState {
                    epoch: 2,
                    primary: Some(primary.clone()),
                    in_sync: InSyncSet::new(members.clone(), 3),
                };
                if let DrainStep::Remove { replica_id } =
                    run(&st, &replicas, desired, &["nx", "ny"], true)
                {
                    assert_ne!(replica_id, primary);
                    let left = members.iter().filter(|m| **m != replica_id).count();
                    assert!(
                        left >= desired.min(members.len()),
                        "mask {mask:b} desired {desired}: {left} left"
                    );
                    assert!(left >= desired, "mask {mask:b}");
                }
            }
        }
    }
}
