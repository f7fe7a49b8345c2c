//! `move-primary`: asks the operator for a planned primary switchover by setting the
//! `blockvol.io/move-primary-to` annotation (a standing request the operator acts on; it
//! never changes replicas itself), and optionally follows the move until the primary is
//! on the target node or the operator gives up.
//!
//! The wait ends with success when `status.primaryNode` is the target and no move is
//! recorded in `status.primaryMove`; with failure when a `PrimaryMoveRejected` or
//! `PrimaryMoveAbandoned` Event appears that was not there (or had a lower count) when
//! the wait began, which needs no clock agreement with the API server; or at the timeout.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use api::BlockVolume;
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// How often the wait re-reads the volume and its Events.
pub const MOVE_POLL_INTERVAL_MS: u64 = 250;

/// Event reasons that end a move without success.
const FAILURE_REASONS: [&str; 2] = ["PrimaryMoveRejected", "PrimaryMoveAbandoned"];

/// Field manager of the annotation patch.
const FIELD_MANAGER: &str = "kubectl-blockvol";

/// Where a move stands, as one progress line.
pub fn progress(v: &BlockVolume, target: &str) -> (bool, String) {
    let status = v.status.clone().unwrap_or_default();
    if let Some(m) = &status.primary_move {
        return (
            false,
            format!(
                "move {:?}: primary {} → {} on {} at epoch {}",
                m.phase, m.from, m.to, m.to_node, m.epoch
            ),
        );
    }
    match status.primary_node.as_deref() {
        Some(node) if node == target => (
            true,
            format!(
                "primary is on {node} (replica {}) at epoch {}",
                status.primary.as_deref().unwrap_or("?"),
                status.epoch
            ),
        ),
        Some(node) => (
            false,
            format!(
                "primary is on {node} at epoch {}; waiting for the operator",
                status.epoch
            ),
        ),
        None => (
            false,
            "the volume has no primary; waiting for the operator".into(),
        ),
    }
}

/// Identity and count of each Event, to tell new ones from those present before.
fn event_counts(events: &[Event]) -> BTreeMap<String, i32> {
    events
        .iter()
        .map(|e| {
            let count = e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1);
            (
                e.metadata.uid.clone().unwrap_or_else(|| e.name_any()),
                count,
            )
        })
        .collect()
}

/// The first failure Event that is new against `before`.
pub fn new_failure<'a>(before: &BTreeMap<String, i32>, now: &'a [Event]) -> Option<&'a Event> {
    let after = event_counts(now);
    now.iter().find(|e| {
        let reason = e.reason.as_deref().unwrap_or("");
        let key = e.metadata.uid.clone().unwrap_or_else(|| e.name_any());
        FAILURE_REASONS.contains(&reason) && before.get(&key) < after.get(&key)
    })
}

/// Sets the annotation and, with `wait`, follows the move up to `timeout`.
pub async fn run(
    cluster: &Cluster,
    volume: &str,
    node: &str,
    wait: Option<Duration>,
    out: &mut dyn Write,
) -> Result<()> {
    let v = cluster.volume(volume).await?;
    let replicas = cluster.replicas_of(volume).await?;
    if !replicas.iter().any(|r| r.spec.node == node) {
        let mut nodes: Vec<&str> = replicas.iter().map(|r| r.spec.node.as_str()).collect();
        nodes.sort_unstable();
        return Err(Error::NoReplicaOnNode {
            volume: volume.into(),
            node: node.into(),
            nodes: if nodes.is_empty() {
                "none yet".into()
            } else {
                nodes.join(", ")
            },
        });
    }
    let before = match wait {
        Some(_) => event_counts(&cluster.events_of("BlockVolume", volume).await?),
        None => BTreeMap::new(),
    };
    let patch = serde_json::json!({
        "metadata": {"annotations": {api::ANNOTATION_MOVE_PRIMARY_TO: node}}
    });
    cluster
        .volumes()
        .patch(
            volume,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| Error::kube(format!("annotating BlockVolume {volume}"), e))?;
    let already = v.status.as_ref().and_then(|s| s.primary_node.as_deref()) == Some(node);
    writeln!(
        out,
        "BlockVolume {volume}: {}={node} set{}",
        api::ANNOTATION_MOVE_PRIMARY_TO,
        if already {
            " (the primary is already there; the request keeps it there)"
        } else {
            ""
        }
    )
    .ok();
    let in_set = v
        .status
        .as_ref()
        .map_or(&[][..], |s| s.in_sync_set.as_slice());
    if let Some(r) = replicas
        .iter()
        .find(|r| r.spec.node == node && !in_set.contains(&r.spec.replica_id))
    {
        writeln!(
            out,
            "note: replica {} on {node} is not in the committed in-sync set yet; the operator \
             rejects the move (PrimaryMoveRejected) until it is, and the request stays set",
            r.spec.replica_id
        )
        .ok();
    }
    let Some(timeout) = wait else {
        writeln!(
            out,
            "follow it with `kubectl blockvol describe volume {volume}` or rerun with --wait"
        )
        .ok();
        return Ok(());
    };
    let mut shown = Progress::start();
    loop {
        let v = cluster.volume(volume).await?;
        let (done, line) = progress(&v, node);
        shown.show(out, line);
        if done {
            return Ok(());
        }
        let events = cluster.events_of("BlockVolume", volume).await?;
        if let Some(e) = new_failure(&before, &events) {
            return Err(Error::MoveFailed {
                volume: volume.into(),
                node: node.into(),
                outcome: format!(
                    "{} ({}); the annotation stays set: remove it with \
                     `kubectl annotate bv {volume} {}-`",
                    e.reason.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or(""),
                    api::ANNOTATION_MOVE_PRIMARY_TO
                ),
            });
        }
        if shown.elapsed() >= timeout {
            return Err(Error::MoveTimedOut {
                volume: volume.into(),
                node: node.into(),
                waited_s: timeout.as_secs(),
                last: shown.last(),
            });
        }
        tokio::time::sleep(Duration::from_millis(MOVE_POLL_INTERVAL_MS)).await;
    }
}

/// Parses a timeout such as `60s`, `2m`, `1500ms` or `90` (seconds).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 60s, 2m or 1500ms"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("{s:?} has an unknown unit: use ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::tests::{now, volume};
    use api::{MovePhase, MoveReason, PrimaryMove};
    use k8s_openapi::api::core::v1::EventSeries;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn event(uid: &str, reason: &str, count: Option<i32>) -> Event {
        Event {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            count,
            ..Default::default()
        }
    }

    #[test]
    fn progress_follows_the_recorded_move_until_the_primary_is_on_the_target() {
        let mut v = volume("v", "1Gi");
        assert_eq!(
            progress(&v, "node-2"),
            (
                false,
                "primary is on node-1 at epoch 3; waiting for the operator".into()
            )
        );
        v.status.as_mut().unwrap().primary_move = Some(PrimaryMove {
            from: "v-a".into(),
            to: "v-b".into(),
            to_node: "node-2".into(),
            epoch: 4,
            phase: MovePhase::Demoting,
            reason: MoveReason::Requested,
            started_at: Time(now()),
        });
        let (done, line) = progress(&v, "node-2");
        assert!(!done);
        assert_eq!(
            line,
            "move Demoting: primary v-a → v-b on node-2 at epoch 4"
        );
        let st = v.status.as_mut().unwrap();
        st.primary_move = None;
        st.primary_node = Some("node-2".into());
        st.primary = Some("v-b".into());
        st.epoch = 4;
        assert_eq!(
            progress(&v, "node-2"),
            (true, "primary is on node-2 (replica v-b) at epoch 4".into())
        );
    }

    #[test]
    fn only_failures_that_happen_during_the_wait_end_it() {
        let old = vec![event("1", "PrimaryMoveAbandoned", Some(1))];
        let before = event_counts(&old);
        // The same old Event, unchanged: not a failure of this move.
        assert!(new_failure(&before, &old).is_none());
        // Other reasons never end the wait.
        let moved = [old[0].clone(), event("2", "PrimaryMoveStarted", None)];
        assert!(new_failure(&before, &moved).is_none());
        // The old Event seen again (its count grows) or a new rejection: failure.
        let again = [event("1", "PrimaryMoveAbandoned", Some(2))];
        assert_eq!(
            new_failure(&before, &again).unwrap().reason.as_deref(),
            Some("PrimaryMoveAbandoned")
        );
        let rejected = [old[0].clone(), event("3", "PrimaryMoveRejected", None)];
        assert_eq!(
            new_failure(&before, &rejected).unwrap().reason.as_deref(),
            Some("PrimaryMoveRejected")
        );
        // An events.k8s.io series counts too.
        let mut series = event("1", "PrimaryMoveAbandoned", Some(1));
        series.series = Some(EventSeries {
            count: Some(3),
            ..Default::default()
        });
        assert!(new_failure(&before, &[series]).is_some());
    }

    #[test]
    fn timeouts_parse_with_units() {
        assert_eq!(parse_timeout("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_timeout("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("5d").is_err());
    }
}
