//! Committed in-sync set transitions (docs/design.md invariant 2). The primary reports members
//! it cannot reach and peers it has counted for every ack since their first barrier; the
//! operator commits the new set with generation + 1. It never drops the last member and
//! never acts on a report from a stale primary or an older epoch.
//!
//! A peer the primary counts but the operator has not committed yet (it joined, then
//! dropped before its commit) blocks every flush just like a member. The primary may not
//! stop counting it on its own: the operator may be committing it at that very moment
//! from the primary's earlier in-sync report, and a committed member must never have
//! missed an ack. So the operator decides: an unreachable non-member reported at the
//! current generation gets a commit of the same members at generation + 1, which tells
//! the primary that this peer is not a member (it stops counting it unless it is back in
//! sync by then, in which case it reports it in sync again). Because that commit comes
//! from a report that names the peer unreachable, and an unreachable peer is never added,
//! the peer can only be committed later from a newer in-sync report - one the primary
//! sends only after a barrier that covers every ack so far.

use api::{ReplicaRole, ReplicaState};

use crate::model::ReplicaView;

/// A committed in-sync set and its generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InSyncSet {
    /// ReplicaIDs, sorted.
    pub members: Vec<String>,
    pub generation: u64,
}

impl InSyncSet {
    pub fn new(mut members: Vec<String>, generation: u64) -> Self {
        members.sort();
        members.dedup();
        InSyncSet {
            members,
            generation,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.members.iter().any(|m| m == id)
    }
}

/// A change to commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InSyncChange {
    pub set: InSyncSet,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// The next committed set, given the primary's latest report, or `None` when nothing
/// changes.
///
/// The report counts only when it comes from `primary` acting as primary at `epoch`.
/// Removals: committed members the primary lists as unreachable (never the primary
/// itself, and never the last member). Additions: replicas of this volume (not being
/// deleted) the primary reports `InSync` and does not also list as unreachable.
/// Otherwise, when the report was made at the committed generation and lists an
/// unreachable peer outside the set (one the primary counts), the same members are
/// committed at generation + 1 so the primary stops counting it.
pub fn next_in_sync_set(
    committed: &InSyncSet,
    epoch: u64,
    primary: &ReplicaView,
    replicas: &[ReplicaView],
) -> Option<InSyncChange> {
    let report = primary.status.as_ref()?;
    if report.epoch != epoch || report.role != Some(ReplicaRole::Primary) {
        return None;
    }
    let unreachable = |id: &str| report.unreachable.iter().any(|u| u == id);
    let mut removed: Vec<String> = committed
        .members
        .iter()
        .filter(|m| **m != primary.id && unreachable(m))
        .cloned()
        .collect();
    if removed.len() >= committed.members.len() {
        // Never commit an empty set: the last member holds every acknowledged write.
        removed.clear();
    }
    let added: Vec<String> = report
        .peers
        .iter()
        .filter(|p| p.state == ReplicaState::InSync && !unreachable(&p.replica_id))
        .filter(|p| !committed.contains(&p.replica_id))
        .filter(|p| replicas.iter().any(|r| r.id == p.replica_id && !r.deleting))
        .map(|p| p.replica_id.clone())
        .collect();
    if removed.is_empty() && added.is_empty() {
        let counted_outsider = report.in_sync_set_generation == committed.generation
            && report
                .unreachable
                .iter()
                .any(|u| *u != primary.id && !committed.contains(u));
        if !counted_outsider {
            return None;
        }
    }
    let members = committed
        .members
        .iter()
        .filter(|m| !removed.contains(m))
        .chain(added.iter())
        .cloned()
        .collect();
    let mut added = added;
    added.sort();
    added.dedup();
    Some(InSyncChange {
        set: InSyncSet::new(members, committed.generation.saturating_add(1)),
        added,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::replica;
    use ReplicaState::*;

    fn s(ids: &[&str], generation: u64) -> InSyncSet {
        InSyncSet::new(ids.iter().map(|s| s.to_string()).collect(), generation)
    }

    fn others() -> Vec<ReplicaView> {
        vec![replica("a", "n2"), replica("b", "n3"), replica("c", "n4")]
    }

    #[test]
    fn in_sync_transition_table() {
        let p = || {
            replica("p", "n1")
                .primary()
                .epoch(3)
                .reports(Serving, 3, 10)
        };
        type Want = Option<(Vec<&'static str>, u64)>;
        let cases: Vec<(&str, InSyncSet, ReplicaView, Want)> = vec![
            (
                "unreachable member is dropped, generation + 1",
                s(&["p", "a", "b"], 7),
                p().unreachable(&["a"]),
                Some((vec!["b", "p"], 8)),
            ),
            (
                "several unreachable members dropped in one commit",
                s(&["p", "a", "b"], 7),
                p().unreachable(&["a", "b"]),
                Some((vec!["p"], 8)),
            ),
            (
                "in-sync peer is added back, generation + 1",
                s(&["p", "b"], 8),
                p().peer("a", InSync).peer("b", InSync),
                Some((vec!["a", "b", "p"], 9)),
            ),
            (
                "catching-up peer is not added",
                s(&["p", "b"], 8),
                p().peer("a", CatchingUp),
                None,
            ),
            (
                "drop and add in one commit",
                s(&["p", "a"], 2),
                p().unreachable(&["a"]).peer("b", InSync),
                Some((vec!["b", "p"], 3)),
            ),
            (
                "a peer both in sync and unreachable is not added",
                s(&["p"], 2),
                p().unreachable(&["a"]).peer("a", InSync),
                None,
            ),
            (
                "a peer both in sync and unreachable at the current generation: recommitted, not added",
                s(&["p"], 2),
                p().reports_generation(2)
                    .unreachable(&["a"])
                    .peer("a", InSync),
                Some((vec!["p"], 3)),
            ),
            (
                "unreachable non-member (counted, never committed): same members, generation + 1",
                s(&["p", "a"], 2),
                p().reports_generation(2).unreachable(&["c"]),
                Some((vec!["a", "p"], 3)),
            ),
            (
                "unreachable non-member reported at an older generation: already uncounted",
                s(&["p", "a"], 3),
                p().reports_generation(2).unreachable(&["c"]),
                None,
            ),
            (
                "primary never drops itself",
                s(&["p", "a"], 2),
                p().unreachable(&["p"]),
                None,
            ),
            (
                "unknown peer id is never added",
                s(&["p"], 2),
                p().peer("zz", InSync),
                None,
            ),
            (
                "report from an older epoch is ignored",
                s(&["p", "a"], 2),
                replica("p", "n1")
                    .primary()
                    .epoch(3)
                    .reports(Serving, 2, 10)
                    .unreachable(&["a"]),
                None,
            ),
            (
                "report while still acting as replica is ignored",
                s(&["p", "a"], 2),
                replica("p", "n1")
                    .primary()
                    .epoch(3)
                    .reports(Serving, 3, 10)
                    .reports_role(ReplicaRole::Replica)
                    .unreachable(&["a"]),
                None,
            ),
            (
                "no report at all",
                s(&["p", "a"], 2),
                replica("p", "n1").primary().epoch(3),
                None,
            ),
        ];
        for (name, committed, primary, want) in cases {
            let got = next_in_sync_set(&committed, 3, &primary, &others())
                .map(|c| (c.set.members.clone(), c.set.generation));
            let want = want.map(|(m, g)| (m.into_iter().map(String::from).collect::<Vec<_>>(), g));
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn last_member_is_never_dropped() {
        // A set that (wrongly) lacks the primary: dropping its only member would leave
        // nothing that holds the acknowledged writes.
        let p = replica("p", "n1")
            .primary()
            .epoch(1)
            .reports(Serving, 1, 0)
            .unreachable(&["a"]);
        assert_eq!(next_in_sync_set(&s(&["a"], 4), 1, &p, &others()), None);
    }

    #[test]
    fn change_lists_added_and_removed() {
        let p = replica("p", "n1")
            .primary()
            .epoch(1)
            .reports(Serving, 1, 0)
            .unreachable(&["a"])
            .peer("c", InSync);
        let c = next_in_sync_set(&s(&["p", "a"], 1), 1, &p, &others()).unwrap();
        assert_eq!(c.added, vec!["c"]);
        assert_eq!(c.removed, vec!["a"]);
    }

    #[test]
    fn deleting_replica_is_not_added() {
        let p = replica("p", "n1")
            .primary()
            .epoch(1)
            .reports(Serving, 1, 0)
            .peer("a", InSync);
        let replicas = vec![replica("a", "n2").deleting()];
        assert_eq!(next_in_sync_set(&s(&["p"], 1), 1, &p, &replicas), None);
    }
}
