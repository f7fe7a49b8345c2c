//! `cordon`, `uncordon` and `drain`: take a node out of blockvol's placement for
//! maintenance. They write only the admin's fields of the `BlockNode` (`spec.cordoned`,
//! `spec.evacuate`, by merge patch under their own field manager), which the node agent
//! never touches; the operator does the moving. `drain --wait` follows
//! `status.evacuation` until no replica is left on the node.

use std::io::Write;
use std::time::Duration;

use api::{BlockNode, EvacuationStatus};
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::Cluster;
use crate::error::{Error, Result, is_not_found};
use crate::progress::Progress;

/// Field manager of the `BlockNode` patches.
const FIELD_MANAGER: &str = "kubectl-blockvol";
/// How often `drain --wait` re-reads the node.
pub const DRAIN_POLL_INTERVAL_MS: u64 = 500;

/// What a maintenance command sets on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Maintenance {
    /// No new replica on the node; existing ones stay.
    Cordon,
    /// Back in placement; a drain in progress stops (replicas already moved stay moved).
    Uncordon,
    /// Cordon and move every replica off.
    Drain,
}

impl Maintenance {
    /// The merge patch of the `BlockNode` spec.
    pub fn patch(self) -> serde_json::Value {
        let (cordoned, evacuate) = match self {
            Maintenance::Cordon => (true, None),
            Maintenance::Uncordon => (false, Some(false)),
            Maintenance::Drain => (true, Some(true)),
        };
        let mut spec = serde_json::json!({ "cordoned": cordoned });
        if let Some(e) = evacuate {
            spec["evacuate"] = serde_json::json!(e);
        }
        serde_json::json!({ "spec": spec })
    }

    fn done(self) -> &'static str {
        match self {
            Maintenance::Cordon => "cordoned: no new replica is placed on it; replicas there stay",
            Maintenance::Uncordon => "uncordoned: new replicas may be placed on it again",
            Maintenance::Drain => "draining: the operator moves its replicas to other nodes",
        }
    }
}

/// One progress line of a drain, and whether it is complete.
pub fn drain_progress(e: Option<&EvacuationStatus>) -> (bool, String) {
    match e {
        None => (
            false,
            "waiting for the operator to report the drain".to_string(),
        ),
        Some(e) if e.complete => (true, "drained: no replica is left on the node".to_string()),
        Some(e) => (
            false,
            format!(
                "{} replica(s) left (volumes {})",
                e.replicas_left,
                e.volumes_left.join(", ")
            ),
        ),
    }
}

/// Applies `what` to `node` and, for a drain with `wait`, follows it up to the timeout.
pub async fn run(
    cluster: &Cluster,
    node: &str,
    what: Maintenance,
    wait: Option<Duration>,
    out: &mut dyn Write,
) -> Result<()> {
    let api: Api<BlockNode> = Api::all(cluster.client.clone());
    api.patch(
        node,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&what.patch()),
    )
    .await
    .map_err(|e| {
        if is_not_found(&e) {
            Error::NodeNotFound { name: node.into() }
        } else {
            Error::kube(format!("patching BlockNode {node}"), e)
        }
    })?;
    writeln!(out, "BlockNode {node} {}", what.done()).ok();
    let (Maintenance::Drain, Some(timeout)) = (what, wait) else {
        if what == Maintenance::Drain {
            writeln!(
                out,
                "follow it with `kubectl get bn {node}` (column Left) or rerun with --wait"
            )
            .ok();
        }
        return Ok(());
    };
    let mut progress = Progress::start();
    loop {
        let n = api
            .get(node)
            .await
            .map_err(|e| Error::kube(format!("reading BlockNode {node}"), e))?;
        let (done, line) = drain_progress(n.status.as_ref().and_then(|s| s.evacuation.as_ref()));
        progress.show(out, line);
        if done {
            return Ok(());
        }
        if progress.elapsed() >= timeout {
            return Err(Error::DrainTimedOut {
                node: node.into(),
                waited_s: timeout.as_secs(),
                last: progress.last(),
            });
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_INTERVAL_MS)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_writes_only_the_admins_fields() {
        assert_eq!(
            Maintenance::Cordon.patch(),
            serde_json::json!({"spec": {"cordoned": true}})
        );
        assert_eq!(
            Maintenance::Drain.patch(),
            serde_json::json!({"spec": {"cordoned": true, "evacuate": true}})
        );
        assert_eq!(
            Maintenance::Uncordon.patch(),
            serde_json::json!({"spec": {"cordoned": false, "evacuate": false}})
        );
    }

    #[test]
    fn drain_progress_reads_the_evacuation_status() {
        assert!(!drain_progress(None).0);
        let left = EvacuationStatus {
            replicas_left: 2,
            volumes_left: vec!["a".into(), "b".into()],
            complete: false,
        };
        assert_eq!(
            drain_progress(Some(&left)),
            (false, "2 replica(s) left (volumes a, b)".into())
        );
        let done = EvacuationStatus {
            complete: true,
            ..Default::default()
        };
        assert!(drain_progress(Some(&done)).0);
    }
}
