//! Replica replacement: a replica that stays unusable (its node agent gone, or it
//! reports `NeedsRebuild` / `Failed`) longer than a grace period is replaced by a new
//! replica on another node, which the primary then rebuilds. Never the primary and never
//! a committed in-sync member: those leave the set (or are promoted away) first.

use std::collections::BTreeMap;

use api::ReplicaState;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::in_sync::InSyncSet;
use crate::model::ReplicaView;

/// Why a replica is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unhealthy {
    /// Its node agent's Lease expired or its `BlockNode` is gone.
    NodeGone,
    NeedsRebuild,
    Failed,
}

impl Unhealthy {
    pub fn describe(self) -> &'static str {
        match self {
            Unhealthy::NodeGone => "its node agent is gone",
            Unhealthy::NeedsRebuild => "it needs a rebuild",
            Unhealthy::Failed => "its node agent reports it failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplacementSettings {
    /// How long a replica may report `NeedsRebuild` or `Failed` before it is replaced.
    pub replica_failure_grace_ms: u64,
    /// How long a node agent may be gone before its replicas are replaced.
    pub node_gone_grace_ms: u64,
    /// At most this many replicas rebuilding onto one node at once (all volumes).
    pub max_rebuilds_per_node: u32,
    /// How long an assigned primary whose live agent reports it `Failed` without acting
    /// as primary at the volume's epoch (it could not apply the assignment) keeps the
    /// role before another member is promoted.
    pub primary_failure_grace_ms: u64,
}

impl Default for ReplacementSettings {
    fn default() -> Self {
        ReplacementSettings {
            replica_failure_grace_ms: 60_000,
            node_gone_grace_ms: 300_000,
            max_rebuilds_per_node: 2,
            primary_failure_grace_ms: 30_000,
        }
    }
}

/// Why this replica is unusable now, if it is.
pub fn unhealthy(r: &ReplicaView) -> Option<Unhealthy> {
    if !r.node_live || !r.node_registered {
        return Some(Unhealthy::NodeGone);
    }
    match r.state() {
        ReplicaState::NeedsRebuild => Some(Unhealthy::NeedsRebuild),
        ReplicaState::Failed => Some(Unhealthy::Failed),
        _ => None,
    }
}

/// A replica that occupies a rebuild slot on its node: being filled from a primary.
pub fn is_rebuilding(r: &ReplicaView) -> bool {
    counts_as_rebuilding(r.deleting, r.state())
}

/// [`is_rebuilding`] from the two facts it rests on, for counting over many replicas
/// without building a view of each.
pub fn counts_as_rebuilding(deleting: bool, state: ReplicaState) -> bool {
    !deleting
        && matches!(
            state,
            ReplicaState::Pending | ReplicaState::Rebuilding | ReplicaState::CatchingUp
        )
}

/// Nodes that already run `max` rebuilds, from per-node counts of rebuilding replicas.
pub fn nodes_at_rebuild_limit(
    rebuilding_per_node: &BTreeMap<String, u32>,
    max: u32,
) -> Vec<String> {
    rebuilding_per_node
        .iter()
        .filter(|(_, n)| **n >= max)
        .map(|(node, _)| node.clone())
        .collect()
}

/// A replica to replace and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    pub replica_id: String,
    pub reason: Unhealthy,
}

/// Replicas unusable for longer than their grace. `unhealthy_since` holds when the
/// operator first saw each replica unusable (the previous volume status); a replica
/// seen unusable for the first time starts its clock now and is not replaced yet.
pub fn replacements(
    replicas: &[ReplicaView],
    primary: Option<&str>,
    in_sync: &InSyncSet,
    unhealthy_since: &BTreeMap<String, Timestamp>,
    now: Timestamp,
    settings: &ReplacementSettings,
) -> Vec<Replacement> {
    replicas
        .iter()
        .filter(|r| !r.deleting && Some(r.id.as_str()) != primary && !in_sync.contains(&r.id))
        .filter_map(|r| {
            let reason = unhealthy(r)?;
            let since = unhealthy_since.get(&r.id)?;
            let grace_ms = match reason {
                Unhealthy::NodeGone => settings.node_gone_grace_ms,
                Unhealthy::NeedsRebuild | Unhealthy::Failed => settings.replica_failure_grace_ms,
            };
            let grace = SignedDuration::from_millis(i64::try_from(grace_ms).unwrap_or(i64::MAX));
            let elapsed = now.duration_since(*since);
            (elapsed >= grace).then(|| Replacement {
                replica_id: r.id.clone(),
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::replica;
    use ReplicaState::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn replacement_table() {
        let settings = ReplacementSettings {
            replica_failure_grace_ms: 60_000,
            node_gone_grace_ms: 300_000,
            max_rebuilds_per_node: 1,
            ..ReplacementSettings::default()
        };
        let set = InSyncSet::new(vec!["p".into(), "m".into()], 3);
        // (case, replica, seen unhealthy since (secs before now), want replaced)
        let cases: Vec<(&str, ReplicaView, Option<i64>, Option<Unhealthy>)> = vec![
            (
                "needs rebuild past grace",
                replica("x", "n2").reports(NeedsRebuild, 1, 0),
                Some(61),
                Some(Unhealthy::NeedsRebuild),
            ),
            (
                "needs rebuild within grace",
                replica("x", "n2").reports(NeedsRebuild, 1, 0),
                Some(59),
                None,
            ),
            (
                "failed past grace",
                replica("x", "n2").reports(Failed, 1, 0),
                Some(60),
                Some(Unhealthy::Failed),
            ),
            (
                "first sighting starts the clock",
                replica("x", "n2").reports(Failed, 1, 0),
                None,
                None,
            ),
            (
                "node gone past grace",
                replica("x", "n2").reports(InSync, 1, 0).node_dead(),
                Some(301),
                Some(Unhealthy::NodeGone),
            ),
            (
                "node gone within its longer grace",
                replica("x", "n2").node_dead(),
                Some(120),
                None,
            ),
            (
                "BlockNode deleted counts as gone",
                replica("x", "n2").node_unregistered(),
                Some(400),
                Some(Unhealthy::NodeGone),
            ),
            (
                "healthy replica is kept whatever the clock says",
                replica("x", "n2").reports(CatchingUp, 1, 0),
                Some(9999),
                None,
            ),
            (
                "the primary is never replaced",
                replica("p", "n1").primary().reports(Failed, 1, 0),
                Some(9999),
                None,
            ),
            (
                "a committed member is never replaced",
                replica("m", "n3").reports(Failed, 1, 0),
                Some(9999),
                None,
            ),
            (
                "a replica being deleted is not replaced again",
                replica("x", "n2").reports(Failed, 1, 0).deleting(),
                Some(9999),
                None,
            ),
        ];
        for (name, r, since, want) in cases {
            let mut map = BTreeMap::new();
            if let Some(s) = since {
                map.insert(r.id.clone(), t(-s));
            }
            let got = replacements(
                std::slice::from_ref(&r),
                Some("p"),
                &set,
                &map,
                t(0),
                &settings,
            );
            let want: Vec<Replacement> = want
                .map(|reason| Replacement {
                    replica_id: r.id.clone(),
                    reason,
                })
                .into_iter()
                .collect();
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn rebuild_limit_counts_nodes_at_or_over_max() {
        let counts = BTreeMap::from([
            ("a".to_string(), 0u32),
            ("b".to_string(), 2),
            ("c".to_string(), 3),
            ("d".to_string(), 1),
        ]);
        assert_eq!(nodes_at_rebuild_limit(&counts, 2), vec!["b", "c"]);
        assert_eq!(nodes_at_rebuild_limit(&counts, 1), vec!["b", "c", "d"]);
        assert!(nodes_at_rebuild_limit(&BTreeMap::new(), 1).is_empty());
    }

    #[test]
    fn rebuilding_means_being_filled() {
        assert!(is_rebuilding(&replica("a", "n")));
        assert!(is_rebuilding(&replica("a", "n").reports(Rebuilding, 1, 0)));
        assert!(is_rebuilding(&replica("a", "n").reports(CatchingUp, 1, 0)));
        assert!(!is_rebuilding(&replica("a", "n").reports(InSync, 1, 0)));
        assert!(!is_rebuilding(&replica("a", "n").deleting()));
    }
}
