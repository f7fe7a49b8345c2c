//! Drives the [`ReplicaRuntime`] from the `BlockReplica`s labelled with this node: opens
//! and configures each assigned replica, reports its status (server-side apply as
//! `blockvol-agent`, status only), and on deletion deletes the disk data before removing
//! the `blockvol.io/disk` finalizer. Specs whose names would leave the data directory
//! are refused with a `Failed` status naming the field; the runtime never sees them.
//! Every status written carries the `Ready` and `Recovering` conditions derived from
//! the state ([`replica_conditions`]); a condition's transition time changes only when
//! its status does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::replica::replica_condition;
use api::{BlockNode, BlockReplica, BlockReplicaStatus, ReplicaState};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::paths::replica_dir;
use super::{Error, Result};
use crate::frontend::metered::VolumeClaims;
use crate::replicas::{Assignment, Peer, ReplicaRuntime};

#[derive(Clone, Debug)]
pub struct ReplicaSettings {
    pub node_name: String,
    pub data_dir: PathBuf,
    /// How often each replica's status is re-reported, in milliseconds.
    pub status_interval_ms: u64,
    /// Retry delay after a failed reconcile, in milliseconds.
    pub error_retry_ms: u64,
}

pub struct AgentContext<R> {
    pub client: Client,
    pub settings: ReplicaSettings,
    pub runtime: Arc<R>,
    promised: Mutex<BTreeMap<String, u64>>,
    /// Every `BlockNode`, fed by a watch while [`run_replicas`] runs (`None` otherwise):
    /// resolving the peers of each replica on every requeue costs the API server nothing.
    nodes: Mutex<Option<Store<BlockNode>>>,
    /// Where the claim of each local replica's volume is recorded for metric labels.
    claims: VolumeClaims,
}

impl<R: ReplicaRuntime> AgentContext<R> {
    pub fn new(client: Client, settings: ReplicaSettings, runtime: Arc<R>) -> Self {
        AgentContext {
            client,
            settings,
            runtime,
            promised: Mutex::new(BTreeMap::new()),
            nodes: Mutex::new(None),
            claims: VolumeClaims::default(),
        }
    }

    /// Records each replica's claim (`spec.pvc`) in `claims`, which labels its metrics.
    pub fn with_claims(mut self, claims: VolumeClaims) -> Self {
        self.claims = claims;
        self
    }

    /// Bytes assigned to this node's replicas (for `BlockNode` allocatable).
    pub fn promised_bytes(&self) -> u64 {
        self.promised.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Replicas hosted on this node (those assigned and not yet deleted).
    pub fn replica_count(&self) -> u32 {
        self.promised
            .lock()
            .map(|m| u32::try_from(m.len()).unwrap_or(u32::MAX))
            .unwrap_or(0)
    }

    fn nodes(&self) -> Option<Store<BlockNode>> {
        self.nodes.lock().ok().and_then(|n| n.clone())
    }

    fn set_nodes(&self, nodes: Option<Store<BlockNode>>) {
        if let Ok(mut n) = self.nodes.lock() {
            *n = nodes;
        }
    }

    fn promise(&self, replica: &str, bytes: Option<u64>) {
        if let Ok(mut m) = self.promised.lock() {
            match bytes {
                Some(b) => m.insert(replica.to_string(), b),
                None => m.remove(replica),
            };
        }
    }
}

/// The conditions of a replica whose status is `st`: `Ready` (a primary `Serving` or a
/// replica `InSync`) and `Recovering` (`CatchingUp` or `Rebuilding`), each with the
/// state as reason and the last error (or what the state means) as message. A
/// condition whose status is unchanged keeps its transition time from `previous`.
pub fn replica_conditions(
    st: &BlockReplicaStatus,
    previous: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let ready = matches!(st.state, ReplicaState::Serving | ReplicaState::InSync);
    let recovering = matches!(
        st.state,
        ReplicaState::CatchingUp | ReplicaState::Rebuilding
    );
    let reason = format!("{:?}", st.state);
    let message = st
        .last_error
        .clone()
        .unwrap_or_else(|| state_meaning(st.state).to_string());
    [
        (replica_condition::READY, ready),
        (replica_condition::RECOVERING, recovering),
    ]
    .into_iter()
    .map(|(type_, on)| {
        let status = if on { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.clone(),
            message: message.clone(),
            last_transition_time: since,
            observed_generation: generation,
        }
    })
    .collect()
}

fn state_meaning(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Pending => "the replica is not opened yet",
        ReplicaState::Disconnected => "not connected to its primary or peers",
        ReplicaState::Connecting => "connecting to its primary",
        ReplicaState::CatchingUp => "receiving the WAL entries it missed",
        ReplicaState::InSync => "holds every acknowledged write",
        ReplicaState::Degraded => "serving with fewer peers in sync than asked for",
        ReplicaState::NeedsRebuild => "too far behind to catch up; waits for a rebuild",
        ReplicaState::Rebuilding => "receiving a full copy from its primary",
        ReplicaState::Serving => "primary, serving IO",
        ReplicaState::Failed => "the agent cannot run this replica",
    }
}

/// `status` with its conditions derived against what `r` holds now.
fn with_conditions(r: &BlockReplica, mut status: BlockReplicaStatus) -> BlockReplicaStatus {
    let previous = r
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    status.conditions =
        replica_conditions(&status, previous, r.metadata.generation, Timestamp::now());
    status
}

async fn write_status(client: &Client, name: &str, status: &BlockReplicaStatus) -> Result<()> {
    let api: Api<BlockReplica> = Api::all(client.clone());
    let body = json!({
        "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
        "kind": "BlockReplica",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// The part of `r`'s stored status this agent writes: all but `lag`, which the operator
/// writes (under its own field manager, so the agent's writes never take it over).
fn written_by_agent(r: &BlockReplica) -> Option<BlockReplicaStatus> {
    r.status.clone().map(|mut s| {
        s.lag = None;
        s
    })
}

async fn report_failure(client: &Client, r: &BlockReplica, err: &Error) -> Result<()> {
    let mut status = written_by_agent(r).unwrap_or_default();
    status.state = ReplicaState::Failed;
    status.last_error = Some(err.to_string());
    status.observed_generation = r.metadata.generation;
    let status = with_conditions(r, status);
    if written_by_agent(r).as_ref() == Some(&status) {
        return Ok(());
    }
    write_status(client, &r.name_any(), &status).await
}

/// The peers of `r` with their data addresses, from the `BlockNode` cache; a node the
/// cache does not hold (no cache, not yet listed, or just registered) is read from the
/// API server, and a node that does not exist has no known address.
async fn peers(
    client: &Client,
    nodes: Option<&Store<BlockNode>>,
    r: &BlockReplica,
) -> Result<Vec<Peer>> {
    if r.spec.peers.is_empty() {
        return Ok(vec![]);
    }
    let api: Api<BlockNode> = Api::all(client.clone());
    let mut out = Vec::with_capacity(r.spec.peers.len());
    for p in &r.spec.peers {
        let address = match nodes.and_then(|n| n.get(&ObjectRef::new(&p.node))) {
            Some(n) => Some(n.spec.data_address.clone()),
            None => api
                .get_opt(&p.node)
                .await
                .map_err(Error::Kube)?
                .map(|n| n.spec.data_address),
        };
        out.push(Peer {
            replica_id: p.replica_id.clone(),
            node: p.node.clone(),
            address,
        });
    }
    Ok(out)
}

fn checked_dir<R>(ctx: &AgentContext<R>, r: &BlockReplica) -> Result<PathBuf> {
    if r.spec.replica_id != r.name_any() {
        return Err(Error::UnsafeName {
            replica: r.name_any(),
            field: "spec.replicaId",
            value: r.spec.replica_id.clone(),
            reason: "it differs from the object name",
        });
    }
    replica_dir(&ctx.settings.data_dir, &r.spec.volume, &r.spec.replica_id)
}

async fn apply<R: ReplicaRuntime>(r: Arc<BlockReplica>, ctx: &AgentContext<R>) -> Result<Action> {
    let name = r.name_any();
    if r.spec.node != ctx.settings.node_name {
        tracing::warn!(replica = %name, node = %r.spec.node, "labelled for this node but assigned elsewhere; ignored");
        return Ok(Action::await_change());
    }
    let dir = match checked_dir(ctx, &r) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(replica = %name, error = %e, "refusing replica");
            report_failure(&ctx.client, &r, &e).await?;
            return Ok(Action::await_change());
        }
    };
    let a = Assignment {
        volume: r.spec.volume.clone(),
        replica_id: r.spec.replica_id.clone(),
        dir,
        role: r.spec.role,
        epoch: r.spec.epoch,
        size_bytes: r.spec.size_bytes,
        block_size: r.spec.block_size,
        durability: r.spec.durability,
        peers: peers(&ctx.client, ctx.nodes().as_ref(), &r).await?,
        in_sync_set: r.spec.in_sync_set.clone(),
        in_sync_set_generation: r.spec.in_sync_set_generation,
    };
    ctx.promise(&name, Some(r.spec.size_bytes));
    // Before the runtime exports the volume: its NBD series take the labels then.
    ctx.claims.set(&r.spec.volume, r.spec.pvc.as_ref());
    let result = async {
        ctx.runtime.open(&a).await?;
        ctx.runtime.apply(&a).await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(replica = %name, volume = %a.volume, error = %e, "replica runtime failed");
        report_failure(&ctx.client, &r, &e).await?;
        return Err(e);
    }
    let mut status = ctx.runtime.status(&name).await.unwrap_or_default();
    status.observed_generation = r.metadata.generation;
    let status = with_conditions(&r, status);
    if written_by_agent(&r).as_ref() != Some(&status) {
        write_status(&ctx.client, &name, &status).await?;
    }
    Ok(Action::requeue(Duration::from_millis(
        ctx.settings.status_interval_ms,
    )))
}

async fn cleanup<R: ReplicaRuntime>(r: Arc<BlockReplica>, ctx: &AgentContext<R>) -> Result<Action> {
    let name = r.name_any();
    // A refused spec never reached the runtime: nothing to delete.
    if let Ok(dir) = checked_dir(ctx, &r) {
        ctx.runtime.close(&name).await?;
        ctx.runtime.delete(&name, &dir).await?;
    }
    ctx.promise(&name, None);
    ctx.claims.set(&r.spec.volume, None);
    tracing::info!(replica = %name, volume = %r.spec.volume, "replica data deleted");
    Ok(Action::await_change())
}

async fn reconcile<R: ReplicaRuntime>(
    r: Arc<BlockReplica>,
    ctx: Arc<AgentContext<R>>,
) -> Result<Action> {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    finalizer(&api, api::FINALIZER_REPLICA, r, |ev| async {
        match ev {
            Finalizer::Apply(r) => apply(r, &ctx).await,
            Finalizer::Cleanup(r) => cleanup(r, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn error_policy<R: ReplicaRuntime>(
    r: Arc<BlockReplica>,
    err: &Error,
    ctx: Arc<AgentContext<R>>,
) -> Action {
    tracing::warn!(replica = %r.name_any(), error = %err, "replica reconcile failed");
    Action::requeue(Duration::from_millis(ctx.settings.error_retry_ms))
}

/// Runs the replica loop for this node until `shutdown` resolves.
pub async fn run_replicas<R: ReplicaRuntime>(
    ctx: Arc<AgentContext<R>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    let selector = format!("{}={}", api::LABEL_NODE, ctx.settings.node_name);
    let (nodes, writer) = reflector::store();
    ctx.set_nodes(Some(nodes));
    let nodes_feed = watcher(
        Api::<BlockNode>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|ev| async move {
        if let Err(e) = ev {
            tracing::debug!(error = %e, "BlockNode watch failed; retrying");
        }
    });
    let replicas = Controller::new(api, watcher::Config::default().labels(&selector))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "replica reconcile did not finish");
            }
        });
    // The feed never ends; it stops with the replica loop.
    tokio::select! {
        () = replicas => {}
        () = nodes_feed => {}
    }
    ctx.set_nodes(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("timestamp")
    }

    fn find<'a>(c: &'a [Condition], type_: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == type_).expect("condition")
    }

    #[test]
    fn ready_and_recovering_follow_the_state_with_stable_transition_times() {
        let mut st = BlockReplicaStatus {
            state: ReplicaState::Rebuilding,
            ..Default::default()
        };
        let c0 = replica_conditions(&st, &[], Some(3), at(0));
        let ready = find(&c0, replica_condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Rebuilding")
        );
        assert_eq!(ready.observed_generation, Some(3));
        let recovering = find(&c0, replica_condition::RECOVERING);
        assert_eq!(recovering.status, "True");
        assert_eq!(recovering.message, "receiving a full copy from its primary");

        // Still rebuilding later: nothing moves, so the written status stays equal.
        let c1 = replica_conditions(&st, &c0, Some(3), at(60));
        assert_eq!(c1, c0);

        // In sync: Ready turns True now, Recovering turns False now.
        st.state = ReplicaState::InSync;
        let c2 = replica_conditions(&st, &c1, Some(3), at(120));
        let ready = find(&c2, replica_condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "InSync")
        );
        assert_eq!(ready.last_transition_time, Time(at(120)));
        let recovering = find(&c2, replica_condition::RECOVERING);
        assert_eq!(recovering.status, "False");
        assert_eq!(recovering.last_transition_time, Time(at(120)));

        // Failed: the last error is the message.
        st.state = ReplicaState::Failed;
        st.last_error = Some("disk gone".into());
        let c3 = replica_conditions(&st, &c2, Some(4), at(180));
        let ready = find(&c3, replica_condition::READY);
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", "Failed", "disk gone")
        );
        // Recovering stayed False since 120.
        assert_eq!(
            find(&c3, replica_condition::RECOVERING).last_transition_time,
            Time(at(120))
        );
    }

    #[test]
    fn a_serving_primary_is_ready() {
        let st = BlockReplicaStatus {
            state: ReplicaState::Serving,
            ..Default::default()
        };
        let c = replica_conditions(&st, &[], None, at(0));
        assert_eq!(find(&c, replica_condition::READY).status, "True");
        assert_eq!(find(&c, replica_condition::RECOVERING).status, "False");
    }
}
