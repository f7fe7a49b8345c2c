//! Promotion: which replica becomes primary when the primary serves no IO: its node
//! agent is gone, its disk failed, it cannot take its assignment, or it was reopened at
//! its epoch and needs a new one. Guarantees (docs/design.md invariant 3): only a member of the
//! committed in-sync set, only once the old primary serves nothing (its Lease expired, or
//! its live agent reports it serves nothing), the highest flushed LSN wins, epoch + 1.

use api::{ReplicaRole, ReplicaState};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::model::ReplicaView;

/// Liveness of the primary's node agent, from its Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryLease {
    /// Renewed within its duration: the primary may still be serving IO.
    Current,
    /// Not renewed within its duration (or missing), or its agent reports the primary
    /// fail-stopped on a disk error: the primary has stopped serving.
    Expired,
}

/// The primary's liveness as promotion sees it. A live agent whose primary reports
/// [`api::PRIMARY_DISK_FAILED_ERROR`] at the volume's current `epoch` counts as expired:
/// the engine refuses every read, write and flush of a volume after a failed fsync,
/// so the primary serves nothing, and waiting for a Lease that keeps being renewed
/// would leave the volume down for good. An older epoch's report proves nothing about
/// the current term.
pub fn primary_lease(primary: Option<&ReplicaView>, epoch: u64) -> PrimaryLease {
    match primary {
        Some(p) if p.node_live && !disk_failed_at(p, epoch) => PrimaryLease::Current,
        _ => PrimaryLease::Expired,
    }
}

fn disk_failed_at(p: &ReplicaView, epoch: u64) -> bool {
    failed_as_primary_at(p, epoch, api::PRIMARY_DISK_FAILED_ERROR)
}

fn failed_as_primary_at(p: &ReplicaView, epoch: u64, error: &str) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.state == ReplicaState::Failed
            && s.role == Some(ReplicaRole::Primary)
            && s.epoch == epoch
            && s.last_error.as_deref() == Some(error)
    })
}

/// The assigned primary as promotion sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryStanding {
    /// It may be serving IO: keep it.
    Serving,
    /// It serves no IO at the current epoch. `why` says why (for the event); with
    /// `candidate` its own copy is whole and it competes for the next epoch itself.
    Gone { why: String, candidate: bool },
}

/// Decides whether the assigned `primary` of a volume at `epoch` may still be serving.
///
/// - No primary, or its Lease expired: gone.
/// - It reports [`api::PRIMARY_DISK_FAILED_ERROR`] at `epoch`: gone (see [`primary_lease`]).
/// - It reports [`api::PRIMARY_NEEDS_NEW_EPOCH_ERROR`] at `epoch`: gone at once, and a
///   candidate itself. Its agent restarted (or its node lost power) and it refuses to
///   serve at an epoch it may already have issued LSNs at; it serves nothing, and every
///   entry it acknowledged is on every committed member and in its own durable log.
/// - It reports `Failed` without acting as primary at `epoch` (its agent could not apply
///   the assignment: persisting the epoch, opening the volume or exporting it failed),
///   continuously since `failing_since`, for at least `grace_ms`: gone. Such an agent
///   never started serving at `epoch` (it reports a role and epoch only after applying
///   them) and stops a primary of an older epoch that cannot move to `epoch`; the grace
///   lets a transient failure heal by the agent's own retries first.
pub fn primary_standing(
    primary: Option<&ReplicaView>,
    epoch: u64,
    failing_since: Option<Timestamp>,
    now: Timestamp,
    grace_ms: u64,
) -> PrimaryStanding {
    let Some(p) = primary else {
        return PrimaryStanding::Gone {
            why: "no primary is assigned".into(),
            candidate: false,
        };
    };
    if !p.node_live {
        return PrimaryStanding::Gone {
            why: format!(
                "the node agent of primary {} stopped renewing its lease",
                p.id
            ),
            candidate: false,
        };
    }
    if disk_failed_at(p, epoch) {
        return PrimaryStanding::Gone {
            why: format!("primary {} reports that its disk failed", p.id),
            candidate: false,
        };
    }
    if failed_as_primary_at(p, epoch, api::PRIMARY_NEEDS_NEW_EPOCH_ERROR) {
        return PrimaryStanding::Gone {
            why: format!(
                "primary {} was reopened at epoch {epoch} and serves only at a new epoch",
                p.id
            ),
            candidate: true,
        };
    }
    let not_taken = p.status.as_ref().is_some_and(|s| {
        s.state == ReplicaState::Failed && (s.role != Some(ReplicaRole::Primary) || s.epoch < epoch)
    });
    let grace = SignedDuration::from_millis(i64::try_from(grace_ms).unwrap_or(i64::MAX));
    if let Some(since) = failing_since.filter(|_| not_taken)
        && now.duration_since(since) >= grace
    {
        let error = p
            .status
            .as_ref()
            .and_then(|s| s.last_error.as_deref())
            .unwrap_or("no error given");
        return PrimaryStanding::Gone {
            why: format!(
                "primary {} could not take its assignment at epoch {epoch} for {grace_ms} ms ({error})",
                p.id
            ),
            candidate: false,
        };
    }
    PrimaryStanding::Serving
}

/// Chooses the next primary when the current one, `primary`, is a candidate itself (see
/// [`PrimaryStanding::Gone`]): the eligible member with the highest flushed LSN as in
/// [`choose_promotion`], but the primary competes too and wins ties, so an agent restart
/// costs one epoch and no move when no member is ahead of it.
pub fn choose_repromotion(
    epoch: u64,
    primary: &ReplicaView,
    in_sync_set: &[String],
    replicas: &[ReplicaView],
) -> PromotionDecision {
    let others = choose_promotion(
        epoch,
        &primary.id,
        PrimaryLease::Expired,
        in_sync_set,
        replicas,
    );
    let eligible = in_sync_set.contains(&primary.id) && primary.node_live && !primary.deleting;
    if !eligible {
        return others;
    }
    let keep = match &others {
        PromotionDecision::Promote { replica_id, .. } => replicas
            .iter()
            .find(|r| &r.id == replica_id)
            .is_none_or(|r| r.flushed_lsn() <= primary.flushed_lsn()),
        _ => true,
    };
    if keep {
        PromotionDecision::Promote {
            replica_id: primary.id.clone(),
            epoch: epoch.saturating_add(1),
        }
    } else {
        others
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromotionDecision {
    /// The primary's agent is alive; nothing to do.
    KeepPrimary,
    /// Promote `replica_id` at `epoch` (the current epoch + 1).
    Promote { replica_id: String, epoch: u64 },
    /// No member of the committed in-sync set can take over; the volume waits for the
    /// old primary (or a member) to come back. The text says why, for a condition.
    NoEligibleMember { reason: String },
}

/// Decides whether and whom to promote.
///
/// `in_sync_set` is the committed set; `replicas` are all replicas of the volume. A
/// member is eligible when it is not the old primary, not being deleted, its node agent
/// is live, and it does not report `Failed` or `NeedsRebuild`. Ties on flushed LSN go
/// to the smallest ReplicaID so the answer is stable across operator restarts.
pub fn choose_promotion(
    epoch: u64,
    primary: &str,
    primary_lease: PrimaryLease,
    in_sync_set: &[String],
    replicas: &[ReplicaView],
) -> PromotionDecision {
    if primary_lease == PrimaryLease::Current {
        return PromotionDecision::KeepPrimary;
    }
    let best = replicas
        .iter()
        .filter(|r| r.id != primary && in_sync_set.contains(&r.id))
        .filter(|r| !r.deleting && r.node_live)
        .filter(|r| !matches!(r.state(), ReplicaState::Failed | ReplicaState::NeedsRebuild))
        .max_by(|a, b| {
            a.flushed_lsn()
                .cmp(&b.flushed_lsn())
                .then_with(|| b.id.cmp(&a.id))
        });
    match best {
        Some(r) => PromotionDecision::Promote {
            replica_id: r.id.clone(),
            epoch: epoch.saturating_add(1),
        },
        None => {
            let others: Vec<&String> = in_sync_set.iter().filter(|m| *m != primary).collect();
            let reason = if others.is_empty() {
                format!(
                    "primary {primary} is the only member of the committed in-sync set; waiting for its node agent to return"
                )
            } else {
                format!(
                    "no member of the committed in-sync set ({}) has a live node agent and a usable copy; waiting for one to return",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            PromotionDecision::NoEligibleMember { reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::replica;
    use ReplicaState::*;

    fn set(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn promote(id: &str, epoch: u64) -> PromotionDecision {
        PromotionDecision::Promote {
            replica_id: id.into(),
            epoch,
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn promotion_table() {
        let p = || {
            replica("p", "n1")
                .primary()
                .reports(Serving, 4, 100)
                .node_dead()
        };
        let cases: Vec<(
            &str,
            PrimaryLease,
            Vec<&str>,
            Vec<ReplicaView>,
            Option<PromotionDecision>,
        )> = vec![
            (
                "lease current: never promote, even with better candidates",
                PrimaryLease::Current,
                vec!["p", "a"],
                vec![p(), replica("a", "n2").reports(InSync, 4, 500)],
                Some(PromotionDecision::KeepPrimary),
            ),
            (
                "promotion picks highest flushed in-sync member",
                PrimaryLease::Expired,
                vec!["p", "a", "b"],
                vec![
                    p(),
                    replica("a", "n2").reports(InSync, 4, 90),
                    replica("b", "n3").reports(InSync, 4, 95),
                ],
                Some(promote("b", 5)),
            ),
            (
                "a replica outside the committed set is never promoted, however far ahead",
                PrimaryLease::Expired,
                vec!["p", "a"],
                vec![
                    p(),
                    replica("a", "n2").reports(InSync, 4, 10),
                    replica("b", "n3").reports(InSync, 4, 999),
                ],
                Some(promote("a", 5)),
            ),
            (
                "members on dead nodes are skipped",
                PrimaryLease::Expired,
                vec!["p", "a", "b"],
                vec![
                    p(),
                    replica("a", "n2").reports(InSync, 4, 200).node_dead(),
                    replica("b", "n3").reports(InSync, 4, 100),
                ],
                Some(promote("b", 5)),
            ),
            (
                "failed and needs-rebuild members are skipped",
                PrimaryLease::Expired,
                vec!["p", "a", "b"],
                vec![
                    p(),
                    replica("a", "n2").reports(Failed, 4, 200),
                    replica("b", "n3").reports(NeedsRebuild, 4, 300),
                ],
                None,
            ),
            (
                "tie on flushed LSN goes to the smallest id",
                PrimaryLease::Expired,
                vec!["p", "b", "a"],
                vec![
                    p(),
                    replica("b", "n3").reports(InSync, 4, 7),
                    replica("a", "n2").reports(InSync, 4, 7),
                ],
                Some(promote("a", 5)),
            ),
            (
                "primary alone in the set: nobody can take over",
                PrimaryLease::Expired,
                vec!["p"],
                vec![p(), replica("a", "n2").reports(InSync, 4, 100)],
                None,
            ),
            (
                "a member being deleted is not promoted",
                PrimaryLease::Expired,
                vec!["p", "a"],
                vec![p(), replica("a", "n2").reports(InSync, 4, 100).deleting()],
                None,
            ),
        ];
        for (name, lease, in_sync, replicas, want) in cases {
            let got = choose_promotion(4, "p", lease, &set(&in_sync), &replicas);
            match want {
                Some(w) => assert_eq!(got, w, "case: {name}"),
                None => assert!(
                    matches!(got, PromotionDecision::NoEligibleMember { .. }),
                    "case: {name}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn no_eligible_member_reason_names_the_situation() {
        let r = [replica("p", "n1").primary()];
        let PromotionDecision::NoEligibleMember { reason } =
            choose_promotion(1, "p", PrimaryLease::Expired, &set(&["p"]), &r)
        else {
            panic!("expected no member");
        };
        assert!(reason.contains("only member"), "{reason}");
    }

    #[test]
    fn promoted_member_always_in_set_and_never_behind_another_eligible_member() {
        // Exhaustive over 3 candidates × flushed {0,1,2} × in-set × live.
        let lsns = [0u64, 1, 2];
        for mask in 0..(1u32 << 9) {
            let mut replicas = vec![replica("p", "n0").primary()];
            let mut in_set = vec!["p".to_string()];
            for i in 0..3u32 {
                let id = format!("r{i}");
                let bits = (mask >> (i * 3)) & 0b111;
                let mut r = replica(&id, &format!("n{}", i + 1)).reports(
                    InSync,
                    1,
                    lsns[(bits & 0b11) as usize % 3],
                );
                if bits & 0b100 == 0 {
                    in_set.push(id.clone());
                }
                if (mask >> i) & 1 == 1 {
                    r = r.node_dead();
                }
                replicas.push(r);
            }
            match choose_promotion(1, "p", PrimaryLease::Expired, &in_set, &replicas) {
                PromotionDecision::Promote { replica_id, epoch } => {
                    assert_eq!(epoch, 2);
                    assert!(in_set.contains(&replica_id));
                    let chosen = replicas.iter().find(|r| r.id == replica_id).unwrap();
                    assert!(chosen.node_live && chosen.id != "p");
                    for r in &replicas {
                        if r.id != "p" && r.node_live && in_set.contains(&r.id) {
                            assert!(r.flushed_lsn() <= chosen.flushed_lsn());
                        }
                    }
                }
                PromotionDecision::NoEligibleMember { .. } => {
                    assert!(
                        !replicas
                            .iter()
                            .any(|r| r.id != "p" && r.node_live && in_set.contains(&r.id))
                    );
                }
                PromotionDecision::KeepPrimary => panic!("lease expired"),
            }
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn primary_standing_table() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let grace_ms = 30_000;
        let at = |ms: i64| t0 + SignedDuration::from_millis(ms);
        let persist_failed = || {
            replica("b", "n2")
                .primary()
                .epoch(5)
                .reports(Failed, 4, 100)
                .reports_role(ReplicaRole::Replica)
                .reports_error("replica runtime: replica b failed: persist epoch 5: I/O error")
        };
        // (case, primary, failing since (ms before now), want: None = serving,
        // Some(candidate) = gone)
        let cases: Vec<(&str, Option<ReplicaView>, Option<i64>, Option<bool>)> = vec![
            ("no primary", None, None, Some(false)),
            (
                "lease expired",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Serving, 5, 9)
                        .node_dead(),
                ),
                None,
                Some(false),
            ),
            (
                "serving",
                Some(replica("b", "n2").primary().reports(Serving, 5, 9)),
                None,
                None,
            ),
            (
                "disk failed at the current epoch",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Failed, 5, 9)
                        .reports_error(api::PRIMARY_DISK_FAILED_ERROR),
                ),
                None,
                Some(false),
            ),
            (
                "reopened at the current epoch: gone at once, and a candidate",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Failed, 5, 9)
                        .reports_error(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR),
                ),
                None,
                Some(true),
            ),
            (
                "reopened at an older epoch proves nothing about this one",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Failed, 4, 9)
                        .reports_error(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR),
                ),
                None,
                None,
            ),
            (
                "promoted, could not persist the epoch, within the grace",
                Some(persist_failed()),
                Some(grace_ms - 1),
                None,
            ),
            (
                "promoted, could not persist the epoch, for the grace",
                Some(persist_failed()),
                Some(grace_ms),
                Some(false),
            ),
            (
                "promoted, could not persist the epoch, no clock yet",
                Some(persist_failed()),
                None,
                None,
            ),
            (
                "re-asserted primary stuck at the older epoch, for the grace",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Failed, 4, 9)
                        .reports_error("persist epoch 5: I/O error"),
                ),
                Some(grace_ms),
                Some(false),
            ),
            (
                "failed as primary at the current epoch for another reason (fenced)",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(Failed, 5, 9)
                        .reports_error("fenced: a peer knows the newer epoch 6"),
                ),
                Some(grace_ms),
                None,
            ),
            (
                "a replica role reported without a failure (still applying)",
                Some(
                    replica("b", "n2")
                        .primary()
                        .reports(InSync, 4, 9)
                        .reports_role(ReplicaRole::Replica),
                ),
                Some(grace_ms),
                None,
            ),
        ];
        for (name, primary, since_ms, want) in cases {
            let now = at(grace_ms * 2);
            let since = since_ms.map(|ms| now - SignedDuration::from_millis(ms));
            let got = primary_standing(primary.as_ref(), 5, since, now, grace_ms as u64);
            let got = match got {
                PrimaryStanding::Serving => None,
                PrimaryStanding::Gone { candidate, .. } => Some(candidate),
            };
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn a_reopened_primary_competes_for_the_next_epoch_and_wins_ties() {
        let reopened = |flushed| {
            replica("p", "n1")
                .primary()
                .reports(Failed, 4, flushed)
                .reports_error(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR)
        };
        let members = set(&["p", "a", "b"]);
        let views = |p: ReplicaView, a: u64| {
            vec![
                p,
                replica("a", "n2").reports(InSync, 4, a),
                replica("b", "n3").reports(InSync, 4, 50),
            ]
        };
        let v = views(reopened(100), 100);
        assert_eq!(
            choose_repromotion(4, &v[0], &members, &v),
            promote("p", 5),
            "a tie keeps the primary where it is"
        );
        let v = views(reopened(100), 120);
        assert_eq!(
            choose_repromotion(4, &v[0], &members, &v),
            promote("a", 5),
            "a member ahead takes over"
        );
        let v = views(reopened(100), 120);
        assert_eq!(
            choose_repromotion(4, &v[0], &set(&["p"]), &v),
            promote("p", 5),
            "alone in the set"
        );
        let v = views(reopened(100), 10);
        assert_eq!(
            choose_repromotion(4, &v[0], &set(&["a", "b"]), &v),
            promote("b", 5),
            "never a primary outside the committed set"
        );
    }

    #[test]
    fn a_live_primary_whose_disk_failed_is_promoted_away() {
        let failed = |epoch| {
            replica("p", "n1")
                .primary()
                .reports(Failed, epoch, 100)
                .reports_error(api::PRIMARY_DISK_FAILED_ERROR)
        };
        assert_eq!(primary_lease(Some(&failed(4)), 4), PrimaryLease::Expired);
        assert_eq!(
            primary_lease(Some(&failed(4).node_dead()), 4),
            PrimaryLease::Expired
        );
        assert_eq!(primary_lease(None, 4), PrimaryLease::Expired);
        // The report of an older term, another failure, or a healthy primary: the
        // Lease alone decides.
        assert_eq!(primary_lease(Some(&failed(3)), 4), PrimaryLease::Current);
        let fenced = replica("p", "n1")
            .primary()
            .reports(Failed, 4, 100)
            .reports_error("fenced: a peer knows the newer epoch 5");
        assert_eq!(primary_lease(Some(&fenced), 4), PrimaryLease::Current);
        let serving = replica("p", "n1").primary().reports(Serving, 4, 100);
        assert_eq!(primary_lease(Some(&serving), 4), PrimaryLease::Current);
        // A replica (not the primary) reporting the text proves nothing about IO.
        let as_replica = replica("p", "n1")
            .reports(Failed, 4, 100)
            .reports_error(api::PRIMARY_DISK_FAILED_ERROR);
        assert_eq!(primary_lease(Some(&as_replica), 4), PrimaryLease::Current);

        let views = vec![failed(4), replica("a", "n2").reports(InSync, 4, 100)];
        let lease = primary_lease(views.first(), 4);
        assert_eq!(
            choose_promotion(4, "p", lease, &set(&["p", "a"]), &views),
            promote("a", 5)
        );
    }
}
