//! `describe volume`: one volume's whole story on one screen: size and claim, the replica
//! topology with each replica's lag, the committed in-sync set and its generation, the
//! attachment, a primary move in flight, the conditions with one line of what to do for
//! each that is not healthy, and the recent Events. [`render`] is a pure function of
//! what was read, so the text is tested without a cluster.

use api::volume::condition;
use api::{BlockReplica, BlockVolume};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::cluster::event_time;
use crate::format::{Table, age, exact_quantity, human_bytes, lag_cell};
use crate::views::{Claim, primary_flushed, role_cell, size_spec};

/// What `describe volume` shows.
pub struct Described<'a> {
    pub volume: &'a BlockVolume,
    pub claim: &'a Claim,
    pub replicas: &'a [BlockReplica],
    pub events: &'a [Event],
    pub now: Timestamp,
}

/// Whether a condition says something is wrong: `Ready` not True, or `Degraded` /
/// `Rebuilding` True, or an attachment holding up a deletion.
pub fn is_unhealthy(c: &Condition) -> bool {
    match c.type_.as_str() {
        condition::READY => c.status != "True",
        condition::DEGRADED | condition::REBUILDING => c.status == "True",
        _ => c.reason == "DeletionWaitsForDetach",
    }
}

/// One line on what to do about an unhealthy condition, by its reason.
pub fn what_to_do(volume: &str, c: &Condition) -> String {
    match c.reason.as_str() {
        "PrimaryNotReady" => "wait: the primary's agent has not reported serving yet; if this \
                              lasts, check its node with `kubectl blockvol get nodes` (READY \
                              False means its Lease expired and a promotion follows) and the \
                              agent's log"
            .into(),
        "PrimaryMoving" => "wait: a planned primary move is demoting the old primary; IO \
                            resumes when the target takes over (normally under a second)"
            .into(),
        "NoEligiblePrimary" => "bring back a node named in the message (restart its agent): \
                                no other replica is known to hold every acknowledged write, \
                                so none is promoted"
            .into(),
        "InsufficientNodes" => "add nodes running a blockvol agent or free capacity on them, \
                                or relax spec.nodeSelector / lower spec.replicas; \
                                `kubectl blockvol get nodes` shows free space"
            .into(),
        "ConflictingPrimaries" => format!(
            "two replicas claim the primary role at one epoch and the operator will not guess: \
             inspect `kubectl get br -l blockvol.io/volume={volume} -o yaml` and keep a \
             `kubectl blockvol dump` for a bug report"
        ),
        "InvalidSpec" => format!("fix the field named in the message: `kubectl edit bv {volume}`"),
        "Deleting" => "wait: deletion waits for the volume to be detached and every replica's \
                       disk space to be freed"
            .into(),
        "ReplicasNotInSync" => format!(
            "acknowledged data is safe on the in-sync members; the others catch up, are \
             rebuilt, or are replaced after the grace: watch LAG in \
             `kubectl blockvol get replicas --volume {volume}`"
        ),
        "ReplicasRebuilding" => format!(
            "wait for the rebuild; LAG in `kubectl blockvol get replicas --volume {volume}` \
             shrinks as it proceeds"
        ),
        "DeletionWaitsForDetach" => "delete the pod that uses the volume (or its \
                                     VolumeAttachment) so the volume detaches"
            .into(),
        _ => format!("read the message; `kubectl describe bv {volume}` shows the Events"),
    }
}

/// The text of `describe volume`.
pub fn render(d: &Described<'_>) -> String {
    let v = d.volume;
    let name = v.name_any();
    let status = v.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        out.push_str(&format!("{:<14}{value}\n", format!("{label}:")));
    };
    field("Name", name.clone());
    field(
        "Claim",
        match d.claim {
            Claim::Bound {
                namespace,
                name,
                pv,
            } => format!("{namespace}/{name} (PV {pv})"),
            Claim::None => "<none> (`kubectl blockvol pv VOLUME` prints a static PV and claim \
                            that use it)"
                .replace("VOLUME", &name),
            Claim::Unknown => "? (PersistentVolumes could not be read)".into(),
        },
    );
    field(
        "Size",
        match v.spec.size_bytes() {
            Ok(b) => format!(
                "{} ({b} bytes), block size {}",
                exact_quantity(b),
                v.spec.block_size
            ),
            Err(e) => format!("{} (unusable: {e})", size_spec(v)),
        },
    );
    if let Some(reached) = status.size_bytes
        && Ok(reached) != v.spec.size_bytes()
    {
        field("Size reached", human_bytes(reached));
    }
    field(
        "Replicas",
        format!(
            "{} desired, {} in sync, durability {}",
            v.spec.replicas,
            status.in_sync_count,
            v.spec.durability.as_str()
        ),
    );
    field("Phase", format!("{:?}", status.phase));
    field("Epoch", status.epoch.to_string());
    field(
        "Primary",
        match (&status.primary_node, &status.primary) {
            (Some(node), Some(id)) => format!("{node} (replica {id})"),
            (Some(node), None) => node.clone(),
            _ => "<none>".into(),
        },
    );
    let attached = status
        .attached_to
        .clone()
        .or_else(|| v.annotations().get(api::ANNOTATION_ATTACHED_NODE).cloned());
    let ro = v
        .annotations()
        .get(api::ANNOTATION_ATTACHED_READONLY)
        .map(String::as_str)
        == Some("true");
    field(
        "Attached",
        match attached {
            Some(node) if ro => format!("{node} (read-only)"),
            Some(node) => node,
            None => "<none>".into(),
        },
    );
    let node_of = |id: &str| {
        d.replicas
            .iter()
            .find(|r| r.spec.replica_id == id)
            .map(|r| format!("{id} on {}", r.spec.node))
            .unwrap_or_else(|| id.to_string())
    };
    field(
        "In-sync set",
        if status.in_sync_set.is_empty() {
            format!("<empty> (generation {})", status.in_sync_set_generation)
        } else {
            format!(
                "generation {}: {}",
                status.in_sync_set_generation,
                status
                    .in_sync_set
                    .iter()
                    .map(|id| node_of(id))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    );
    if let Some(target) = v.annotations().get(api::ANNOTATION_MOVE_PRIMARY_TO) {
        field(
            "Move request",
            format!("{}={target} (standing)", api::ANNOTATION_MOVE_PRIMARY_TO),
        );
    }
    if let Some(m) = &status.primary_move {
        field(
            "Primary move",
            format!(
                "{:?} to {} ({}), epoch {}, reason {:?}, started {} ago",
                m.phase,
                m.to_node,
                m.to,
                m.epoch,
                m.reason,
                age(m.started_at.0, d.now)
            ),
        );
    }

    out.push_str("\nReplicas:\n");
    let primary = primary_flushed(v, d.replicas.iter());
    let mut t = Table::new([
        "NODE",
        "ROLE",
        "STATE",
        "EPOCH",
        "FLUSHED-LSN",
        "LAG",
        "IN-SET",
        "REPLICA",
        "REBUILD",
    ]);
    let mut replicas: Vec<&BlockReplica> = d.replicas.iter().collect();
    replicas.sort_by(|a, b| {
        (a.spec.role != api::ReplicaRole::Primary, &a.spec.node)
            .cmp(&(b.spec.role != api::ReplicaRole::Primary, &b.spec.node))
    });
    let mut errors = Vec::new();
    for r in &replicas {
        let s = r.status.clone().unwrap_or_default();
        t.row([
            r.spec.node.clone(),
            role_cell(r),
            format!("{:?}", s.state),
            s.epoch.to_string(),
            s.flushed_lsn.to_string(),
            lag_cell(crate::views::replica_lag(r, primary)),
            if status.in_sync_set.contains(&r.spec.replica_id) {
                "yes"
            } else {
                "no"
            }
            .into(),
            r.spec.replica_id.clone(),
            s.rebuild
                .as_ref()
                .map_or_else(|| "-".to_string(), |p| format!("{}%", p.percent)),
        ]);
        if let Some(e) = &s.last_error {
            errors.push(format!("  {} on {}: {e}\n", r.spec.replica_id, r.spec.node));
        }
    }
    if t.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push_str(&t.render_indented(2));
    }
    if !errors.is_empty() {
        out.push_str("Replica errors:\n");
        errors.iter().for_each(|e| out.push_str(e));
    }

    out.push_str("\nConditions:\n");
    if status.conditions.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
        for c in &status.conditions {
            t.row([
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                age(c.last_transition_time.0, d.now),
                c.message.clone(),
            ]);
        }
        out.push_str(&t.render_indented(2));
        let todo: Vec<&Condition> = status
            .conditions
            .iter()
            .filter(|c| is_unhealthy(c))
            .collect();
        if !todo.is_empty() {
            out.push_str("What to do:\n");
            for c in todo {
                out.push_str(&format!(
                    "  {}={} ({}): {}\n",
                    c.type_,
                    c.status,
                    c.reason,
                    what_to_do(&name, c)
                ));
            }
        }
    }

    out.push_str("\nEvents:\n");
    if d.events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(["AGE", "TYPE", "REASON", "MESSAGE"]);
        for e in d.events {
            t.row([
                event_time(e).map_or_else(|| "-".into(), |t| age(t, d.now)),
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&t.render_indented(2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::tests::{now, snapshot, volume};
    use api::{MovePhase, MoveReason, PrimaryMove};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::SignedDuration;

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(now() - SignedDuration::from_secs(90)),
            observed_generation: None,
        }
    }

    #[test]
    fn describe_shows_topology_in_sync_set_attachment_conditions_and_events() {
        let snap = snapshot();
        let mut v = volume("vol-1", "10Gi");
        let st = v.status.as_mut().unwrap();
        st.conditions = vec![
            cond("Ready", "True", "PrimaryServing", "serving"),
            cond(
                "Degraded",
                "True",
                "ReplicasNotInSync",
                "vol-1-c is not in sync",
            ),
            cond("Rebuilding", "True", "ReplicasRebuilding", "vol-1-c"),
            cond("Attached", "True", "AttachedToNode", "node-2"),
        ];
        st.primary_move = Some(PrimaryMove {
            from: "vol-1-a".into(),
            to: "vol-1-b".into(),
            to_node: "node-2".into(),
            epoch: 4,
            phase: MovePhase::Demoting,
            reason: MoveReason::Requested,
            started_at: Time(now() - SignedDuration::from_secs(2)),
        });
        v.metadata.annotations = Some(
            [(
                api::ANNOTATION_MOVE_PRIMARY_TO.to_string(),
                "node-2".to_string(),
            )]
            .into(),
        );
        // The snapshot's rebuilding replica vol-1-c on node-3, which has also failed.
        let mut failed = snap.replicas[2].clone();
        failed.status.as_mut().unwrap().last_error = Some("disk full".into());
        failed.status.as_mut().unwrap().rebuild = Some(api::RebuildStatus {
            bytes_total: 4 << 20,
            bytes_done: 1 << 20,
            percent: 25,
        });
        let replicas = vec![snap.replicas[1].clone(), failed, snap.replicas[0].clone()];
        let events = vec![Event {
            metadata: ObjectMeta::default(),
            type_: Some("Normal".into()),
            reason: Some("RebuildStarted".into()),
            message: Some("rebuilding vol-1-c on node-3".into()),
            last_timestamp: Some(Time(now() - SignedDuration::from_secs(30))),
            ..Default::default()
        }];
        let claim = snap.claim_of("vol-1");
        let text = render(&Described {
            volume: &v,
            claim: &claim,
            replicas: &replicas,
            events: &events,
            now: now(),
        });
        for want in [
            "Claim:        apps/data (PV pv-data)",
            "Size:         10Gi (10737418240 bytes), block size 4096",
            "Replicas:     3 desired, 2 in sync, durability syncAll",
            "Primary:      node-1 (replica vol-1-a)",
            "Attached:     node-2",
            "In-sync set:  generation 5: vol-1-a on node-1, vol-1-b on node-2",
            "Move request: blockvol.io/move-primary-to=node-2 (standing)",
            "Primary move: Demoting to node-2 (vol-1-b), epoch 4, reason Requested, started 2s ago",
            "vol-1-c on node-3: disk full",
            "RebuildStarted",
            "30s",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // The primary is listed first, and each replica's lag is against it.
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| *l != "Replicas:")
            .skip(2)
            .take(3)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0][..6],
            ["node-1", "Primary", "Serving", "3", "120", "0"]
        );
        assert_eq!(
            rows[1][..7],
            ["node-2", "Replica", "InSync", "3", "117", "3", "yes"]
        );
        assert_eq!(
            rows[2][..7],
            ["node-3", "Replica", "Rebuilding", "3", "40", "80", "no"]
        );
        // Rebuild progress is the last column, shown only for the replica being rebuilt.
        assert_eq!(rows[2].last(), Some(&"25%"));
        assert_eq!(rows[0].last(), Some(&"-"));
        // One line of what to do per unhealthy condition, none for the healthy ones.
        let todo: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "What to do:")
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect();
        assert_eq!(todo.len(), 2, "{text}");
        assert!(
            todo[0].starts_with("  Degraded=True (ReplicasNotInSync): "),
            "{todo:?}"
        );
        assert!(
            todo[1].starts_with("  Rebuilding=True (ReplicasRebuilding): "),
            "{todo:?}"
        );
    }

    #[test]
    fn every_documented_unhealthy_reason_has_its_own_advice() {
        let generic = what_to_do("v", &cond("Ready", "False", "SomethingNew", ""));
        for reason in [
            "PrimaryNotReady",
            "PrimaryMoving",
            "NoEligiblePrimary",
            "InsufficientNodes",
            "ConflictingPrimaries",
            "InvalidSpec",
            "Deleting",
            "ReplicasNotInSync",
            "ReplicasRebuilding",
            "DeletionWaitsForDetach",
        ] {
            let advice = what_to_do("v", &cond("Ready", "False", reason, ""));
            assert_ne!(advice, generic, "{reason} falls back to the generic advice");
        }
    }

    #[test]
    fn healthy_conditions_need_no_advice() {
        assert!(!is_unhealthy(&cond("Ready", "True", "PrimaryServing", "")));
        assert!(!is_unhealthy(&cond(
            "Degraded",
            "False",
            "AllReplicasInSync",
            ""
        )));
        assert!(!is_unhealthy(&cond("Rebuilding", "False", "NoRebuild", "")));
        assert!(!is_unhealthy(&cond(
            "Attached",
            "True",
            "AttachedToNode",
            ""
        )));
        assert!(is_unhealthy(&cond("Ready", "False", "PrimaryNotReady", "")));
        assert!(is_unhealthy(&cond("Ready", "Unknown", "", "")));
        assert!(is_unhealthy(&cond(
            "Attached",
            "True",
            "DeletionWaitsForDetach",
            ""
        )));
    }

    #[test]
    fn an_unclaimed_volume_points_at_the_pv_command() {
        let v = volume("db-data", "1Gi");
        let text = render(&Described {
            volume: &v,
            claim: &Claim::None,
            replicas: &[],
            events: &[],
            now: now(),
        });
        assert!(text.contains("`kubectl blockvol pv db-data`"), "{text}");
        assert!(text.contains("Replicas:\n  <none>"), "{text}");
        assert!(text.contains("Events:\n  <none>"), "{text}");
    }
}
