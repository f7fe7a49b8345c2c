//! Drives the [`ReplicaRuntime`] from the `BlockReplica`s labelled with this node: opens
//! and configures each assigned replica, reports its status (server-side apply as
//! `blockvol-agent`, status only), and on deletion deletes the disk data before removing
//! the `blockvol.io/disk` finalizer. Specs whose names would leave the data directory
//! are refused with a `Failed` status naming the field; the runtime never sees them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{BlockNode, BlockReplica, BlockReplicaStatus, ReplicaState};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::paths::replica_dir;
use super::runtime::{Assignment, Peer, ReplicaRuntime};
use super::{Error, Result};

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
}

impl<R: ReplicaRuntime> AgentContext<R> {
    pub fn new(client: Client, settings: ReplicaSettings, runtime: Arc<R>) -> Self {
        AgentContext {
            client,
            settings,
            runtime,
            promised: Mutex::new(BTreeMap::new()),
        }
    }

    /// Bytes assigned to this node's replicas (for `BlockNode` allocatable).
    pub fn promised_bytes(&self) -> u64 {
        self.promised.lock().map(|m| m.values().sum()).unwrap_or(0)
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

async fn report_failure(client: &Client, r: &BlockReplica, err: &Error) -> Result<()> {
    let mut status = r.status.clone().unwrap_or_default();
    status.state = ReplicaState::Failed;
    status.last_error = Some(err.to_string());
    status.observed_generation = r.metadata.generation;
    if r.status.as_ref() == Some(&status) {
        return Ok(());
    }
    write_status(client, &r.name_any(), &status).await
}

async fn peers(client: &Client, r: &BlockReplica) -> Result<Vec<Peer>> {
    if r.spec.peers.is_empty() {
        return Ok(vec![]);
    }
    let nodes: Api<BlockNode> = Api::all(client.clone());
    let mut out = Vec::with_capacity(r.spec.peers.len());
    for p in &r.spec.peers {
        let address = nodes
            .get_opt(&p.node)
            .await
            .map_err(Error::Kube)?
            .map(|n| n.spec.data_address);
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
        peers: peers(&ctx.client, &r).await?,
        in_sync_set: r.spec.in_sync_set.clone(),
        in_sync_set_generation: r.spec.in_sync_set_generation,
    };
    ctx.promise(&name, Some(r.spec.size_bytes));
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
    if r.status.as_ref() != Some(&status) {
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
    Controller::new(api, watcher::Config::default().labels(&selector))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "replica reconcile did not finish");
            }
        })
        .await;
}
