//! Recovery of a volume's replication state (epoch, primary, committed in-sync set) from
//! everything stored in the API, so an operator that restarted — possibly in the middle
//! of a promotion or a set commit, possibly with the volume status lost — continues
//! from the highest committed state and never invents a second primary at one epoch.

use api::{BlockVolumeStatus, ReplicaRole};

use crate::in_sync::InSyncSet;
use crate::model::ReplicaView;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeState {
    pub epoch: u64,
    /// ReplicaID of the primary at `epoch`, if one is assigned.
    pub primary: Option<String>,
    pub in_sync: InSyncSet,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("replicas {ids:?} all claim to be primary at epoch {epoch}; refusing to guess")]
pub struct ConflictingPrimaries {
    pub epoch: u64,
    pub ids: Vec<String>,
}

/// Merges the volume status with the replica specs (written by the operator) and the
/// agents' reports.
///
/// The epoch is the highest any of them records. The primary is the replica assigned
/// `Primary` at that epoch; when the specs are ambiguous the agents' reported roles at
/// that epoch decide; when those are ambiguous too, it is an error. The in-sync set is
/// the one with the highest generation (volume status first on a tie, then the primary's
/// spec), because every commit writes the replicas before the volume status.
pub fn recover_state(
    status: Option<&BlockVolumeStatus>,
    replicas: &[ReplicaView],
) -> Result<VolumeState, ConflictingPrimaries> {
    let live: Vec<&ReplicaView> = replicas.iter().filter(|r| !r.deleting).collect();
    let epoch = status
        .map(|s| s.epoch)
        .into_iter()
        .chain(live.iter().map(|r| r.spec.epoch))
        .chain(live.iter().map(|r| r.reported_epoch()))
        .max()
        .unwrap_or(0);
    let spec_primaries: Vec<&ReplicaView> = live
        .iter()
        .copied()
        .filter(|r| r.spec.role == ReplicaRole::Primary && r.spec.epoch == epoch)
        .collect();
    let reported_primary = |r: &&ReplicaView| {
        r.reported_role() == Some(ReplicaRole::Primary) && r.reported_epoch() == epoch
    };
    let primary: Option<&ReplicaView> = match spec_primaries.as_slice() {
        [one] => Some(one),
        [] => {
            let from_status = status
                .filter(|s| s.epoch == epoch)
                .and_then(|s| s.primary.as_deref())
                .and_then(|p| live.iter().copied().find(|r| r.id == p));
            match from_status {
                Some(p) => Some(p),
                None => {
                    let reported: Vec<&ReplicaView> =
                        live.iter().copied().filter(reported_primary).collect();
                    match reported.as_slice() {
                        [one] => Some(one),
                        [] => None,
                        many => {
                            return Err(ConflictingPrimaries {
                                epoch,
                                ids: many.iter().map(|r| r.id.clone()).collect(),
                            });
                        }
                    }
                }
            }
        }
        many => {
            let reported: Vec<&ReplicaView> =
                many.iter().copied().filter(reported_primary).collect();
            match reported.as_slice() {
                [one] => Some(one),
                _ => {
                    return Err(ConflictingPrimaries {
                        epoch,
                        ids: many.iter().map(|r| r.id.clone()).collect(),
                    });
                }
            }
        }
    };
    let mut in_sync = status
        .map(|s| InSyncSet::new(s.in_sync_set.clone(), s.in_sync_set_generation))
        .unwrap_or_default();
    let specs = primary.into_iter().chain(
        live.iter()
            .copied()
            .filter(|r| Some(r.id.as_str()) != primary.map(|p| p.id.as_str())),
    );
    for r in specs {
        if r.spec.in_sync_set_generation > in_sync.generation {
            in_sync = InSyncSet::new(r.spec.in_sync_set.clone(), r.spec.in_sync_set_generation);
        }
    }
    Ok(VolumeState {
        epoch,
        primary: primary.map(|p| p.id.clone()),
        in_sync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::replica;
    use api::ReplicaState::*;

    fn status(epoch: u64, primary: &str, set: &[&str], generation: u64) -> BlockVolumeStatus {
        BlockVolumeStatus {
            epoch,
            primary: Some(primary.into()),
            in_sync_set: set.iter().map(|s| s.to_string()).collect(),
            in_sync_set_generation: generation,
            ..Default::default()
        }
    }

    fn want(epoch: u64, primary: Option<&str>, set: &[&str], generation: u64) -> VolumeState {
        VolumeState {
            epoch,
            primary: primary.map(String::from),
            in_sync: InSyncSet::new(set.iter().map(|s| s.to_string()).collect(), generation),
        }
    }

    #[test]
    fn recovery_table() {
        let cases: Vec<(
            &str,
            Option<BlockVolumeStatus>,
            Vec<ReplicaView>,
            VolumeState,
        )> = vec![
            (
                "status and specs agree",
                Some(status(2, "a", &["a", "b"], 5)),
                vec![
                    replica("a", "n1").primary().epoch(2).set(&["a", "b"], 5),
                    replica("b", "n2").epoch(2).set(&["a", "b"], 5),
                ],
                want(2, Some("a"), &["a", "b"], 5),
            ),
            (
                "status lost: everything comes from the replica specs",
                None,
                vec![
                    replica("a", "n1").epoch(3).set(&["a", "b", "c"], 9),
                    replica("b", "n2")
                        .primary()
                        .epoch(3)
                        .set(&["a", "b", "c"], 9),
                    replica("c", "n3").epoch(3).set(&["a", "b", "c"], 9),
                ],
                want(3, Some("b"), &["a", "b", "c"], 9),
            ),
            (
                "crash mid-promotion: new primary's spec written, status still old",
                Some(status(1, "a", &["a", "b"], 2)),
                vec![
                    replica("a", "n1").primary().epoch(1).set(&["a", "b"], 2),
                    replica("b", "n2").primary().epoch(2).set(&["b"], 3),
                ],
                want(2, Some("b"), &["b"], 3),
            ),
            (
                "crash mid-commit: replicas carry a newer set than the status",
                Some(status(1, "a", &["a", "b", "c"], 4)),
                vec![
                    replica("a", "n1").primary().epoch(1).set(&["a", "b"], 5),
                    replica("b", "n2").epoch(1).set(&["a", "b", "c"], 4),
                ],
                want(1, Some("a"), &["a", "b"], 5),
            ),
            (
                "equal epoch, two primary specs: the agent-reported role decides",
                Some(status(4, "a", &["a", "b"], 1)),
                vec![
                    replica("a", "n1").primary().epoch(4).reports(Serving, 4, 9),
                    replica("b", "n2")
                        .primary()
                        .epoch(4)
                        .reports(InSync, 4, 9)
                        .reports_role(ReplicaRole::Replica),
                ],
                want(4, Some("a"), &["a", "b"], 1),
            ),
            (
                "no primary spec at the epoch: reported role at that epoch",
                None,
                vec![
                    replica("a", "n1")
                        .epoch(2)
                        .reports(Serving, 2, 9)
                        .reports_role(ReplicaRole::Primary),
                    replica("b", "n2").epoch(2).reports(InSync, 2, 9),
                ],
                want(2, Some("a"), &[], 0),
            ),
            (
                "a reported role from an older epoch does not count",
                None,
                vec![
                    replica("a", "n1")
                        .epoch(2)
                        .reports(Serving, 1, 9)
                        .reports_role(ReplicaRole::Primary),
                    replica("b", "n2").epoch(2),
                ],
                want(2, None, &[], 0),
            ),
            (
                "deleting replicas are ignored",
                None,
                vec![
                    replica("a", "n1").primary().epoch(7).deleting(),
                    replica("b", "n2").primary().epoch(6),
                ],
                want(6, Some("b"), &[], 0),
            ),
            ("nothing at all", None, vec![], want(0, None, &[], 0)),
        ];
        for (name, st, replicas, w) in cases {
            assert_eq!(recover_state(st.as_ref(), &replicas), Ok(w), "case: {name}");
        }
    }

    #[test]
    fn two_primaries_at_one_epoch_without_a_tiebreak_is_an_error() {
        let replicas = vec![
            replica("a", "n1").primary().epoch(3),
            replica("b", "n2").primary().epoch(3),
        ];
        let err = recover_state(None, &replicas).unwrap_err();
        assert_eq!(err.epoch, 3);
        assert_eq!(err.ids, vec!["a", "b"]);
    }
}
