//! The `BlockVolume` reconciler: observes a volume, its replicas, the nodes and their
//! agent Leases, runs [`crate::plan`], and performs the plan (replica specs and volume
//! status by server-side apply as `blockvol-operator`, Events, finalizer). Every step is
//! idempotent, so a retry or a restarted operator converges to the same objects.
//!
//! While leading, reconciles read from watch-fed caches ([`crate::cache`]), so the API
//! server's load does not grow with the number of volumes; a change of a replica or a
//! node agent Lease requeues only the volumes it concerns. A stale cache cannot do harm:
//! a node Lease that looks expired is read afresh before a decision rests on it (a stale
//! Lease would make a live primary look expired), and the volume is read afresh unless
//! the cached copy is the newest this process has seen (so a plan never starts from a
//! copy older than this operator's own last status write).
//!
//! Every write is conditional on the view the plan was made from ([`perform`]), so two
//! reconciles of one volume (overlapping leaders, a deposed leader's reconcile still in
//! flight) never both land a plan: the later one fails with [`Error::Conflict`] and is
//! recomputed.
//!
//! Placement honours the Kubernetes cordon (`Node.spec.unschedulable`), the storage
//! cordon and drain of each `BlockNode`, and the operator's storage node selector
//! (matched against the Node's labels merged with the `BlockNode`'s). While leading, a
//! second loop reports each drain's progress in `BlockNode.status.evacuation` and as
//! Events on the `BlockNode`.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{
    BlockNode, BlockReplica, BlockReplicaSpec, BlockVolume, BlockVolumeStatus, EvacuationStatus,
    PvcReference, ReplicaLag, VolumePhase,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::cache::{Cache, SeenVersions};
use crate::drain::DrainSettings;
use crate::leader::LeaseObserver;
use crate::metrics::Metrics;
use crate::model::ReplicaView;
use crate::placement::{NodeCandidate, StorageNodeSelector};
use crate::plan::{Cleanup, Observed, Plan, plan, plan_cleanup, reason};
use crate::primary_move::{MoveSettings, wanted_move};
use crate::replacement::{ReplacementSettings, counts_as_rebuilding};
use crate::{Error, Result};

/// Settings of the volume controller.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespace holding the node agents' Leases (one per node, named after it).
    pub node_lease_namespace: String,
    pub replacement: ReplacementSettings,
    pub moves: MoveSettings,
    /// Re-check every volume at least this often, in milliseconds.
    pub resync_interval_ms: u64,
    /// First retry after a failed reconcile, in milliseconds; doubles per failure.
    pub error_backoff_initial_ms: u64,
    /// Longest retry delay after failures, in milliseconds.
    pub error_backoff_max_ms: u64,
    /// How often to re-check a volume whose deletion waits (detach, replica removal), in
    /// milliseconds.
    pub deletion_poll_ms: u64,
    /// Concurrent reconciles.
    pub concurrency: u16,
    /// Reading the API server taking at least this long, in milliseconds, counts as a
    /// gap in this operator's view: node Leases it saw before may have missed renewals
    /// that could not reach the server, so their expiry counts from the end of it.
    pub api_gap_ms: u64,
    /// Only nodes matching this selector get replicas (empty: every node with an agent).
    pub storage_node_selector: StorageNodeSelector,
    pub drain: DrainSettings,
    /// How often drain progress is written to `BlockNode` status, in milliseconds.
    pub node_status_interval_ms: u64,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            node_lease_namespace: "blockvol-system".into(),
            replacement: ReplacementSettings::default(),
            moves: MoveSettings::default(),
            resync_interval_ms: 30_000,
            error_backoff_initial_ms: 500,
            error_backoff_max_ms: 60_000,
            deletion_poll_ms: 1_000,
            concurrency: 32,
            api_gap_ms: 2_000,
            storage_node_selector: StorageNodeSelector::default(),
            drain: DrainSettings::default(),
            node_status_interval_ms: 2_000,
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub settings: ControllerSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Node agent Leases as this process saw them change (see [`LeaseObserver`]).
    lease_observer: Arc<LeaseObserver>,
    /// The watch-fed caches while [`run`] keeps them fed; reads go to the API server
    /// otherwise.
    cache: std::sync::RwLock<Option<Cache>>,
    /// What this process last read or wrote of each volume and replica, against which
    /// cached copies are checked.
    seen: SeenVersions,
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Volumes this process let start a drain step, until their drain is over (see
    /// [`drain_slot`]); bounds `drain.drain_concurrency` across concurrent reconciles.
    drain_slots: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: ControllerSettings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: api::FIELD_MANAGER_OPERATOR.into(),
                instance,
            },
        );
        Context {
            client,
            settings,
            metrics,
            recorder,
            lease_observer: Arc::default(),
            cache: Default::default(),
            seen: SeenVersions::default(),
            failures: Default::default(),
            drain_slots: Default::default(),
        }
    }

    fn cache(&self) -> Option<Cache> {
        match self.cache.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_cache(&self, cache: Option<Cache>) {
        match self.cache.write() {
            Ok(mut c) => *c = cache,
            Err(p) => *p.into_inner() = cache,
        }
    }
}

/// Liveness of one node agent, from its Lease.
#[derive(Clone, Copy, Debug)]
pub struct NodeLease {
    live: bool,
    /// When the lease runs out unless renewed.
    expires: Option<Timestamp>,
}

fn node_leases(
    leases: &[Lease],
    now: Timestamp,
    observer: &LeaseObserver,
) -> BTreeMap<String, NodeLease> {
    leases
        .iter()
        .filter_map(|l| {
            let spec = l.spec.as_ref()?;
            let expires = spec.renew_time.as_ref().map(|t| {
                t.0 + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
                    spec.lease_duration_seconds.unwrap_or(0),
                ))
            });
            Some((
                l.name_any(),
                NodeLease {
                    live: !observer.expired_at(
                        &l.name_any(),
                        spec,
                        l.metadata.resource_version.as_deref().unwrap_or_default(),
                        now,
                        std::time::Instant::now(),
                    ),
                    expires,
                },
            ))
        })
        .collect()
}

fn view<N: Borrow<BlockNode>>(
    r: &BlockReplica,
    nodes: &[N],
    leases: &BTreeMap<String, NodeLease>,
) -> ReplicaView {
    ReplicaView {
        id: r.name_any(),
        spec: r.spec.clone(),
        status: r.status.clone(),
        deleting: r.metadata.deletion_timestamp.is_some(),
        node_live: leases.get(&r.spec.node).is_some_and(|l| l.live),
        node_registered: nodes
            .iter()
            .any(|n| n.borrow().metadata.name.as_deref() == Some(r.spec.node.as_str())),
    }
}

/// Free space per node: what the agent reports allocatable, minus replicas assigned to
/// the node that its agent has not yet accounted for (no reported size). A `BlockNode`
/// whose Kubernetes Node is missing (a test cluster, a node being replaced) is judged
/// by its own labels and cordon alone.
pub fn candidates(
    nodes: &[impl Borrow<BlockNode>],
    k8s_nodes: &[impl Borrow<Node>],
    loads: &BTreeMap<String, NodeLoad>,
    leases: &BTreeMap<String, NodeLease>,
    storage_nodes: &StorageNodeSelector,
) -> Vec<NodeCandidate> {
    nodes
        .iter()
        .map(Borrow::borrow)
        .map(|n: &BlockNode| {
            let k8s = k8s_nodes
                .iter()
                .map(Borrow::borrow)
                .find(|k: &&Node| k.metadata.name.as_deref() == Some(n.spec.node_name.as_str()));
            let name = n.name_any();
            let load = loads.get(&name).copied().unwrap_or_default();
            let mut labels = k8s.map(|k| k.labels().clone()).unwrap_or_default();
            labels.extend(n.labels().clone());
            labels.extend(n.spec.topology.clone());
            let k8s_cordoned = k8s
                .and_then(|k| k.spec.as_ref())
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            NodeCandidate {
                primaries: load.primaries,
                name: name.clone(),
                cordoned: k8s_cordoned || n.spec.storage_cordoned(),
                evacuating: n.spec.evacuate,
                storage_node: storage_nodes.matches(&labels),
                labels,
                free_bytes: n
                    .status
                    .as_ref()
                    .map(|s| s.allocatable_bytes)
                    .unwrap_or(0)
                    .saturating_sub(load.pending_bytes),
                live: leases.get(&name).is_some_and(|l| l.live),
            }
        })
        .collect()
}

/// What the replicas assigned to one node add up to, for placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Size of the replicas whose agent has not yet accounted for them (no reported
    /// size): space the node's reported allocatable does not yet subtract.
    pub pending_bytes: u64,
    /// Replicas assigned Primary, not being deleted.
    pub primaries: u32,
    /// Replicas being built or caught up (see [`counts_as_rebuilding`]).
    pub rebuilding: u32,
}

/// [`NodeLoad`] per node, in one pass over every replica.
pub fn node_loads(all_replicas: &[impl Borrow<BlockReplica>]) -> BTreeMap<String, NodeLoad> {
    let mut loads: BTreeMap<String, NodeLoad> = BTreeMap::new();
    for r in all_replicas.iter().map(Borrow::borrow) {
        let deleting = r.metadata.deletion_timestamp.is_some();
        let status = r.status.as_ref();
        let load = loads.entry(r.spec.node.clone()).or_default();
        if status.and_then(|s| s.size_bytes).is_none() {
            load.pending_bytes = load.pending_bytes.saturating_add(r.spec.size_bytes);
        }
        if r.spec.role == api::ReplicaRole::Primary && !deleting {
            load.primaries = load.primaries.saturating_add(1);
        }
        if counts_as_rebuilding(deleting, status.map(|s| s.state).unwrap_or_default()) {
            load.rebuilding = load.rebuilding.saturating_add(1);
        }
    }
    loads
}

fn now_seconds() -> Timestamp {
    // Stored times have second precision; computing with the same precision keeps an
    // unchanged status byte-identical, so it is not rewritten.
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

/// What one reconcile sees. The cluster-wide sets are shared with the caches, not
/// copied: a reconcile reads them, and copying every object for every reconcile made a
/// pass over all volumes cost O(volumes²).
struct Observation {
    all_replicas: Vec<Arc<BlockReplica>>,
    replicas: Vec<BlockReplica>,
    nodes: Vec<Arc<BlockNode>>,
    k8s_nodes: Vec<Arc<Node>>,
    volumes: Vec<Arc<BlockVolume>>,
    leases: BTreeMap<String, NodeLease>,
    now: Timestamp,
}

async fn observe(ctx: &Context, volume: &str) -> Result<Observation> {
    match ctx.cache() {
        Some(cache) => observe_cached(ctx, &cache, volume).await,
        None => observe_listed(ctx, volume).await,
    }
}

/// The nodes whose Lease decides about a volume with replicas `replicas`.
fn replica_nodes(replicas: &[BlockReplica]) -> Vec<String> {
    let mut nodes: Vec<String> = replicas.iter().map(|r| r.spec.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

fn owned<K: Clone>(objects: Vec<Arc<K>>) -> Vec<K> {
    objects.into_iter().map(|o| (*o).clone()).collect()
}

fn shared<K>(objects: Vec<K>) -> Vec<Arc<K>> {
    objects.into_iter().map(Arc::new).collect()
}

/// A read of the API server taking at least `api_gap_ms` counts as a gap in this
/// process's view of it (see [`LeaseObserver::api_gap`]).
fn slow_read(ctx: &Context, started: Instant) {
    if started.elapsed() >= Duration::from_millis(ctx.settings.api_gap_ms) {
        tracing::warn!(
            took_ms = started.elapsed().as_millis() as u64,
            "reading the API server was slow; node Lease expiry counts from now"
        );
        ctx.lease_observer.api_gap(std::time::Instant::now());
    }
}

/// The observation from the caches; only the Leases of this volume's nodes that the
/// cache shows expired (or lacks) are read from the API server.
async fn observe_cached(ctx: &Context, cache: &Cache, volume: &str) -> Result<Observation> {
    let started = Instant::now();
    let own = |r: &BlockReplica| {
        r.labels().get(api::LABEL_VOLUME).map(String::as_str) == Some(volume)
            && r.spec.volume == volume
    };
    let cached: Vec<BlockReplica> = owned(cache.volume_replicas(volume))
        .into_iter()
        .filter(|r| own(r))
        .collect();
    let replicas = if ctx.seen.replicas_current(volume, &cached) {
        cached
    } else {
        // The cache has not caught up with this process's own last writes.
        let fresh: Vec<BlockReplica> = Api::<BlockReplica>::all(ctx.client.clone())
            .list(&ListParams::default().labels(&format!("{}={volume}", api::LABEL_VOLUME)))
            .await
            .map_err(|e| {
                ctx.lease_observer.api_gap(std::time::Instant::now());
                Error::Kube(e)
            })?
            .items
            .into_iter()
            .filter(|r| own(r))
            .collect();
        ctx.seen.replicas_read(volume, &fresh, &cached);
        fresh
    };
    let now = now_seconds();
    let leases_api: Api<Lease> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.node_lease_namespace);
    let leases = cache
        .fresh_leases(
            &leases_api,
            |l| {
                !node_leases(std::slice::from_ref(l), now, &ctx.lease_observer)
                    .values()
                    .all(|l| l.live)
            },
            &replica_nodes(&replicas),
        )
        .await
        .map_err(|e| {
            ctx.lease_observer.api_gap(std::time::Instant::now());
            Error::Kube(e)
        })?;
    slow_read(ctx, started);
    Ok(Observation {
        all_replicas: cache.replicas.state(),
        replicas,
        nodes: cache.nodes.state(),
        k8s_nodes: cache.k8s_nodes.state(),
        volumes: cache.volumes.state(),
        leases: node_leases(&leases, now, &ctx.lease_observer),
        now,
    })
}

/// The observation listed from the API server (a reconcile outside [`run`]).
async fn observe_listed(ctx: &Context, volume: &str) -> Result<Observation> {
    let replicas_api: Api<BlockReplica> = Api::all(ctx.client.clone());
    let nodes_api: Api<BlockNode> = Api::all(ctx.client.clone());
    let leases_api: Api<Lease> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.node_lease_namespace);
    // A failed or slow LIST means this process did not see the API server for a while:
    // the Lease expiry clocks restart at its end (see `LeaseObserver::api_gap`).
    let started = std::time::Instant::now();
    let gap = |e: kube::Error| {
        ctx.lease_observer.api_gap(std::time::Instant::now());
        Error::Kube(e)
    };
    let all_replicas = replicas_api
        .list(&ListParams::default())
        .await
        .map_err(gap)?
        .items;
    let nodes = nodes_api
        .list(&ListParams::default())
        .await
        .map_err(gap)?
        .items;
    let leases = leases_api
        .list(&ListParams::default())
        .await
        .map_err(gap)?
        .items;
    let k8s_nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(gap)?
        .items;
    let volumes = Api::<BlockVolume>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(gap)?
        .items;
    slow_read(ctx, started);
    let now = now_seconds();
    let replicas = all_replicas
        .iter()
        .filter(|r| {
            r.labels().get(api::LABEL_VOLUME).map(String::as_str) == Some(volume)
                && r.spec.volume == volume
        })
        .cloned()
        .collect();
    Ok(Observation {
        all_replicas: shared(all_replicas),
        replicas,
        nodes: shared(nodes),
        k8s_nodes: shared(k8s_nodes),
        volumes: shared(volumes),
        leases: node_leases(&leases, now, &ctx.lease_observer),
        now,
    })
}

/// The admin's request to move the primary (see [`api::ANNOTATION_MOVE_PRIMARY_TO`]).
fn move_primary_to(vol: &BlockVolume) -> Option<&str> {
    vol.annotations()
        .get(api::ANNOTATION_MOVE_PRIMARY_TO)
        .map(String::as_str)
}

fn attached_to(vol: &BlockVolume) -> Option<&str> {
    vol.annotations()
        .get(api::ANNOTATION_ATTACHED_NODE)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// Event reasons also recorded on the volume's PersistentVolumeClaim, where application
/// owners look (`kubectl describe pvc`): what changes the volume's health or where it
/// runs. Routine bookkeeping (placement, in-sync set changes, rebuild starts, expansion,
/// move steps) stays on the `BlockVolume` only.
pub const PVC_EVENT_REASONS: [&str; 11] = [
    reason::PROMOTED,
    reason::PRIMARY_MOVED,
    reason::REPLICA_FAILED,
    reason::REBUILD_COMPLETED,
    reason::DRAIN_REPLICA_PLACED,
    reason::DRAIN_REPLICA_REMOVED,
    reason::NO_ELIGIBLE_PRIMARY,
    reason::INSUFFICIENT_NODES,
    reason::VOLUME_DEGRADED,
    reason::VOLUME_FAILED,
    reason::VOLUME_RECOVERED,
];

/// The Event a status write that moves a volume from phase `from` to `to` publishes:
/// entering `Degraded` or `Failed`, or `Ready` again after either.
pub fn phase_event(from: VolumePhase, to: VolumePhase) -> Option<(bool, &'static str, String)> {
    use VolumePhase::*;
    match (from, to) {
        (f, t) if f == t => None,
        (_, Degraded) => Some((
            true,
            reason::VOLUME_DEGRADED,
            "fewer replicas than asked for are in sync; the volume serves IO with less redundancy"
                .into(),
        )),
        (_, Failed) => Some((
            true,
            reason::VOLUME_FAILED,
            "the volume cannot serve IO; kubectl describe bv tells why".into(),
        )),
        (Degraded | Failed, Ready) => Some((
            false,
            reason::VOLUME_RECOVERED,
            "every replica asked for is in sync again".into(),
        )),
        _ => None,
    }
}

/// Publishes an Event on the volume and, for [`PVC_EVENT_REASONS`], on its claim.
async fn publish(ctx: &Context, vol: &BlockVolume, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &vol.object_ref(&())).await {
        tracing::warn!(volume = %vol.name_any(), reason, error = %e, "publishing event failed");
    }
    if let Some(pvc) = &vol.spec.pvc
        && PVC_EVENT_REASONS.contains(&reason)
    {
        publish_on_claim(ctx, vol, pvc, &ev).await;
    }
}

/// Records `ev` on the claim `pvc` too. The claim is read for its UID (`kubectl describe
/// pvc` selects Events by it); a claim that is gone, unreadable or refuses the Event
/// never fails the reconcile that published it.
async fn publish_on_claim(ctx: &Context, vol: &BlockVolume, pvc: &PvcReference, ev: &Event) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &pvc.namespace);
    let claim = match claims.get_opt(&pvc.name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::debug!(volume = %vol.name_any(), namespace = %pvc.namespace, claim = %pvc.name, "claim gone; event kept on the volume only");
            return;
        }
        Err(e) => {
            tracing::debug!(volume = %vol.name_any(), namespace = %pvc.namespace, claim = %pvc.name, error = %e, "reading the claim failed; event kept on the volume only");
            return;
        }
    };
    if let Err(e) = ctx.recorder.publish(ev, &claim.object_ref(&())).await {
        tracing::debug!(volume = %vol.name_any(), namespace = %pvc.namespace, claim = %pvc.name, error = %e, "publishing event on the claim failed");
    }
}

/// The lag each replica of a volume should show (`status.lag`): what the primary
/// `primary` (a ReplicaID) reports of it in `status.peers`, `None` for the primary
/// itself and for replicas it does not report. Returns only the replicas whose stored
/// lag differs.
pub fn lag_updates(
    replicas: &[BlockReplica],
    primary: Option<&str>,
) -> Vec<(String, Option<ReplicaLag>)> {
    let peers = replicas
        .iter()
        .find(|r| Some(r.spec.replica_id.as_str()) == primary)
        .and_then(|r| r.status.as_ref())
        .map(|s| s.peers.as_slice())
        .unwrap_or_default();
    replicas
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| {
            let want = peers
                .iter()
                .find(|p| p.replica_id == r.spec.replica_id)
                .and_then(|p| p.lag.clone());
            let have = r.status.as_ref().and_then(|s| s.lag.clone());
            (want != have).then(|| (r.name_any(), want))
        })
        .collect()
}

/// Writes `status.lag` of the volume's replicas as their primary reports it, under the
/// operator's field manager (the agent writes the rest of the status and never this
/// field). A failed write is logged: the next report retries it.
async fn report_lag(ctx: &Context, volume: &str, replicas: &[BlockReplica], primary: Option<&str>) {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    for (name, lag) in lag_updates(replicas, primary) {
        // Applying no `lag` gives the field up, which removes it.
        let status = match &lag {
            Some(l) => json!({ "lag": l }),
            None => json!({}),
        };
        let patch = json!({
            "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
            "kind": "BlockReplica",
            "status": status,
        });
        match api
            .patch_status(
                &name,
                &PatchParams::apply(api::FIELD_MANAGER_OPERATOR).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(stored) => ctx.seen.replica(volume, &name, stored.resource_version()),
            Err(e) => {
                tracing::debug!(volume, replica = %name, error = %e, "writing replica lag failed")
            }
        }
    }
}

/// Writes the volume status, conditional on the volume's resourceVersion; returns the
/// stored volume (unchanged when the status already was `status`).
async fn write_status(
    ctx: &Context,
    vol: &BlockVolume,
    status: &BlockVolumeStatus,
) -> Result<BlockVolume> {
    if vol.status.as_ref() == Some(status) {
        return Ok(vol.clone());
    }
    let api: Api<BlockVolume> = Api::all(ctx.client.clone());
    // The resourceVersion makes the write conditional: a status computed from an older
    // object (a second reconcile, a deposed leader) is refused with a conflict instead of
    // erasing what a newer write recorded, such as a primary move's phase.
    let patch = json!({
        "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
        "kind": "BlockVolume",
        "metadata": { "resourceVersion": vol.resource_version() },
        "status": status,
    });
    api.patch_status(
        &vol.name_any(),
        &PatchParams::apply(api::FIELD_MANAGER_OPERATOR).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| match e {
        kube::Error::Api(ae) if ae.code == 409 => Error::Conflict(format!(
            "volume {} changed while its status was computed; recomputing",
            vol.name_any()
        )),
        e => Error::Kube(e),
    })
    .inspect(|stored| ctx.seen.volume(stored))
}

/// Creates or updates a replica's spec, provided the replica is as the plan saw it
/// (`observed`; `None`: it did not exist). A plan made from an older view of the replica
/// (a concurrent reconcile, a deposed leader's in-flight reconcile) is refused with a
/// conflict instead of overwriting a newer assignment.
///
/// "As the plan saw it" compares the spec only: the node agent rewrites the status
/// every few seconds, and that must not refuse the operator's writes. The replica is
/// read afresh and the write carries that read's resourceVersion, so a spec written in
/// between still fails the write.
async fn apply_replica(
    ctx: &Context,
    vol: &BlockVolume,
    spec: &BlockReplicaSpec,
    observed: Option<&BlockReplica>,
) -> Result<()> {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    let owner = vol
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingField("metadata.uid"))?;
    let stale = || {
        Error::Conflict(format!(
            "replica {} changed while the plan was computed; recomputing",
            spec.replica_id
        ))
    };
    let fresh = api.get_opt(&spec.replica_id).await.map_err(Error::Kube)?;
    let version = match (observed, &fresh) {
        (None, None) => None,
        (Some(seen), Some(now)) if seen.spec == now.spec => now.resource_version(),
        _ => return Err(stale()),
    };
    let mut metadata = json!({
        "name": spec.replica_id,
        "labels": {
            api::LABEL_VOLUME: spec.volume,
            api::LABEL_NODE: spec.node,
            api::LABEL_MANAGED_BY: api::FIELD_MANAGER_OPERATOR,
        },
        "ownerReferences": [owner],
    });
    if let Some(rv) = version {
        metadata["resourceVersion"] = json!(rv);
    }
    let patch = json!({
        "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
        "kind": "BlockReplica",
        "metadata": metadata,
        "spec": spec,
    });
    let stored = api
        .patch(
            &spec.replica_id,
            &PatchParams::apply(api::FIELD_MANAGER_OPERATOR).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(ae) if ae.code == 409 => stale(),
            e => Error::Kube(e),
        })?;
    ctx.seen
        .replica(&spec.volume, &spec.replica_id, stored.resource_version());
    Ok(())
}

async fn delete_replica(ctx: &Context, volume: &str, name: &str) -> Result<()> {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(deleted) => {
            // Left: the deletion waits for the agent's finalizer, so the replica stays,
            // changed; right: it is gone.
            let version = deleted.left().and_then(|r| r.resource_version());
            ctx.seen.replica(volume, name, version);
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Removes the node agent's finalizer from a replica whose node is gone for good.
async fn release_orphan(ctx: &Context, r: &BlockReplica) -> Result<()> {
    let api: Api<BlockReplica> = Api::all(ctx.client.clone());
    let keep: Vec<&String> = r
        .finalizers()
        .iter()
        .filter(|f| *f != api::FINALIZER_REPLICA)
        .collect();
    if keep.len() == r.finalizers().len() {
        return Ok(());
    }
    let patch = json!({"metadata": {"finalizers": keep, "resourceVersion": r.resource_version()}});
    match api
        .patch(
            &r.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(stored) => {
            ctx.seen
                .replica(&r.spec.volume, &r.name_any(), stored.resource_version());
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// One reconcile's view of a volume and the plan made from it, not yet performed (see
/// [`prepare`] and [`perform`]).
pub struct Prepared {
    /// The volume as read at the start of the reconcile.
    volume: BlockVolume,
    obs: Observation,
    plan: Plan,
}

impl Prepared {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn volume(&self) -> &BlockVolume {
        &self.volume
    }
}

/// Reads a volume, its replicas, the nodes and their Leases fresh from the API server
/// and plans the volume's next step (`None`: no such volume).
pub async fn prepare(ctx: &Context, name: &str) -> Result<Option<Prepared>> {
    prepare_from(ctx, name, None).await
}

/// [`prepare`], starting from `cached` when it is the newest version of the volume this
/// process has seen.
async fn prepare_from(
    ctx: &Context,
    name: &str,
    cached: Option<&BlockVolume>,
) -> Result<Option<Prepared>> {
    // A cached copy may predate this operator's own last status write, and a plan made
    // from it would undo that write: unless it is the newest version this process read
    // or wrote, decide from the stored object.
    let vol = match cached.filter(|v| ctx.seen.volume_is_newest(v)) {
        Some(v) => v.clone(),
        None => {
            let api: Api<BlockVolume> = Api::all(ctx.client.clone());
            let Some(vol) = api.get_opt(name).await.map_err(Error::Kube)? else {
                return Ok(None);
            };
            ctx.seen.volume(&vol);
            vol
        }
    };
    let obs = observe(ctx, name).await?;
    let views: Vec<ReplicaView> = obs
        .replicas
        .iter()
        .map(|r| view(r, &obs.nodes, &obs.leases))
        .collect();
    let loads = node_loads(&obs.all_replicas);
    let nodes = candidates(
        &obs.nodes,
        &obs.k8s_nodes,
        &loads,
        &obs.leases,
        &ctx.settings.storage_node_selector,
    );
    let drain_slot = drain_slot(ctx, name, &obs, &nodes);
    let rebuilding: BTreeMap<String, u32> = loads
        .iter()
        .filter(|(_, l)| l.rebuilding > 0)
        .map(|(node, l)| (node.clone(), l.rebuilding))
        .collect();
    let p: Plan = plan(
        &Observed {
            name,
            generation: vol.metadata.generation,
            spec: &vol.spec,
            status: vol.status.as_ref(),
            attached_to: attached_to(&vol),
            move_request: wanted_move(
                move_primary_to(&vol),
                vol.spec.data_locality,
                attached_to(&vol),
            ),
            replicas: &views,
            nodes: &nodes,
            rebuilding_per_node: &rebuilding,
            drain_slot,
            now: obs.now,
        },
        &ctx.settings.replacement,
        &ctx.settings.moves,
    );
    if !p.drain.holds_slot()
        && let Ok(mut slots) = ctx.drain_slots.lock()
    {
        slots.remove(name);
    }
    Ok(Some(Prepared {
        volume: vol,
        obs,
        plan: p,
    }))
}

/// Whether a plan assigns a primary that the stored volume status does not record at
/// that epoch (a promotion, a move's promotion, the first placement).
fn claims_primary(stored: Option<&BlockVolumeStatus>, planned: &BlockVolumeStatus) -> bool {
    planned.primary.is_some()
        && stored.is_none_or(|s| s.epoch != planned.epoch || s.primary != planned.primary)
}

/// Performs a prepared plan: the replica specs, the deletions, the volume status, the
/// Events.
///
/// # Guarantees
/// - Every write is conditional on the resourceVersion the plan was made from: the
///   volume's for its status, each replica's for its spec. A plan computed from a view
///   that another writer has since changed fails with [`Error::Conflict`] at its first
///   write that meets the change, and the reconcile is recomputed from a fresh view.
/// - A plan that assigns a primary at an epoch (a promotion) first records that
///   assignment in the volume status, conditional on the volume's resourceVersion, and
///   only then writes any replica spec. The volume is the one object every writer of
///   the volume's epoch writes, so of two plans made from the same view (two leaders
///   overlapping, a deposed leader's reconcile still in flight) exactly one gets its
///   claim stored; the other writes nothing and, recomputed, sees the stored claim,
///   which [`crate::recovery`] takes as the primary at that epoch. Hence no two
///   replicas are ever assigned Primary at one epoch.
///
/// # Assumptions
/// - Every writer of replica specs and volume status goes through this function.
pub async fn perform(ctx: &Context, prepared: &Prepared) -> Result<()> {
    let p = &prepared.plan;
    let mut vol = prepared.volume.clone();
    let name = vol.name_any();
    if claims_primary(vol.status.as_ref(), &p.status) {
        vol = write_status(ctx, &vol, &p.status).await?;
    }
    for spec in &p.apply {
        let observed = prepared
            .obs
            .replicas
            .iter()
            .find(|r| r.name_any() == spec.replica_id);
        apply_replica(ctx, &vol, spec, observed).await?;
    }
    for d in &p.delete {
        delete_replica(ctx, &name, d).await?;
    }
    let before = (prepared.volume.status.as_ref())
        .map(|s| s.phase)
        .unwrap_or_default();
    vol = write_status(ctx, &vol, &p.status).await?;
    for e in &p.events {
        tracing::info!(volume = %name, reason = e.reason, note = %e.note, "event");
        publish(ctx, &vol, e.warning, e.reason, e.note.clone()).await;
    }
    if let Some((warning, reason, note)) = phase_event(before, p.status.phase) {
        tracing::info!(volume = %name, reason, note = %note, "event");
        publish(ctx, &vol, warning, reason, note).await;
    }
    report_lag(
        ctx,
        &name,
        &prepared.obs.replicas,
        p.status.primary.as_deref(),
    )
    .await;
    ctx.metrics.set_volume(&name, vol.spec.replicas, &p.status);
    Ok(())
}

async fn apply_volume(cached: Arc<BlockVolume>, ctx: &Context) -> Result<Action> {
    let Some(prepared) = prepare_from(ctx, &cached.name_any(), Some(&cached)).await? else {
        return Ok(Action::await_change());
    };
    perform(ctx, &prepared).await?;
    let (p, obs) = (&prepared.plan, &prepared.obs);

    // Come back when the primary's lease would run out: expiry makes no watch event.
    let mut after = Duration::from_millis(ctx.settings.resync_interval_ms);
    let primary_node = p.status.primary_node.as_deref();
    if let Some(expires) = primary_node
        .and_then(|n| obs.leases.get(n))
        .filter(|l| l.live)
        .and_then(|l| l.expires)
    {
        let until = obs.now.duration_until(expires);
        let until = Duration::try_from(until).unwrap_or_default() + Duration::from_millis(500);
        after = after.min(until);
    }
    // A move in progress waits on agent reports (which trigger reconciles) and on its
    // timeout (which does not); so does a drain waiting for a slot another volume frees.
    if p.status.primary_move.is_some() || p.drain != crate::drain::DrainStep::Idle {
        after = after.min(Duration::from_millis(1_000));
    }
    // Pending grace clocks need a look when they run out.
    if p.status
        .replicas
        .iter()
        .any(|r| r.unhealthy_since.is_some())
    {
        let grace = ctx
            .settings
            .replacement
            .replica_failure_grace_ms
            .min(ctx.settings.replacement.node_gone_grace_ms)
            .min(ctx.settings.replacement.primary_failure_grace_ms);
        after = after.min(Duration::from_millis(grace.max(1_000)));
    }
    Ok(Action::requeue(after))
}

/// Whether volume `name` may take a drain step: it already holds a slot (reserved by
/// this process, or started before, as its replicas show), or fewer than
/// `drain_concurrency` other volumes hold one. A granted slot is reserved here, under
/// the lock, so concurrent reconciles cannot both take the last one; it is released
/// when the volume's plan no longer holds it.
fn drain_slot(ctx: &Context, name: &str, obs: &Observation, nodes: &[NodeCandidate]) -> bool {
    let evacuating = crate::drain::evacuating_nodes(nodes);
    if evacuating.is_empty() {
        return false;
    }
    let mut by_volume: BTreeMap<&str, Vec<&BlockReplica>> = BTreeMap::new();
    for r in &obs.all_replicas {
        by_volume.entry(r.spec.volume.as_str()).or_default().push(r);
    }
    let mut holders: std::collections::BTreeSet<String> = obs
        .volumes
        .iter()
        .filter(|v| {
            let views: Vec<ReplicaView> = by_volume
                .get(v.name_any().as_str())
                .into_iter()
                .flatten()
                .map(|r| view(r, &obs.nodes, &obs.leases))
                .collect();
            let drain_move = v
                .status
                .as_ref()
                .and_then(|s| s.primary_move.as_ref())
                .is_some_and(|m| m.reason == api::MoveReason::Drain);
            crate::drain::started(
                &views,
                usize::from(v.spec.replicas),
                &evacuating,
                drain_move,
            )
        })
        .map(|v| v.name_any())
        .collect();
    let Ok(mut slots) = ctx.drain_slots.lock() else {
        return false;
    };
    // Reservations of volumes that no longer exist are dropped.
    slots.retain(|s| obs.volumes.iter().any(|v| v.name_any() == *s));
    holders.extend(slots.iter().cloned());
    if holders.contains(name) {
        slots.insert(name.to_string());
        return true;
    }
    let limit = usize::try_from(ctx.settings.drain.drain_concurrency).unwrap_or(usize::MAX);
    if holders.len() < limit {
        slots.insert(name.to_string());
        return true;
    }
    false
}

/// Event reasons on a `BlockNode`.
pub mod node_reason {
    pub const DRAIN_STARTED: &str = "DrainStarted";
    pub const DRAIN_PROGRESS: &str = "DrainProgress";
    pub const DRAIN_COMPLETED: &str = "DrainCompleted";
}

/// Drain progress of one node from the replicas assigned to it.
pub fn evacuation_status(
    node: &str,
    all_replicas: &[impl Borrow<BlockReplica>],
) -> EvacuationStatus {
    let here: Vec<&BlockReplica> = all_replicas
        .iter()
        .map(Borrow::borrow)
        .filter(|r: &&BlockReplica| r.spec.node == node)
        .collect();
    let mut volumes: Vec<String> = here.iter().map(|r| r.spec.volume.clone()).collect();
    volumes.sort();
    volumes.dedup();
    EvacuationStatus {
        replicas_left: u32::try_from(here.len()).unwrap_or(u32::MAX),
        complete: here.is_empty(),
        volumes_left: volumes,
    }
}

/// The Events a change of a node's drain status publishes, in order. A drain that
/// starts and completes between two reports publishes both DrainStarted and
/// DrainCompleted, so every drain that starts is seen to end.
pub fn drain_events(
    previous: Option<&EvacuationStatus>,
    next: Option<&EvacuationStatus>,
) -> Vec<(&'static str, String)> {
    let mut events = Vec::new();
    let Some(e) = next else {
        return events;
    };
    match previous {
        None => events.push((
            node_reason::DRAIN_STARTED,
            format!(
                "draining: {} replica(s) of {} volume(s) to move off this node",
                e.replicas_left,
                e.volumes_left.len()
            ),
        )),
        Some(p) if !e.complete && p.replicas_left != e.replicas_left => events.push((
            node_reason::DRAIN_PROGRESS,
            format!(
                "draining: {} replica(s) left (volumes {})",
                e.replicas_left,
                e.volumes_left.join(", ")
            ),
        )),
        Some(_) => {}
    }
    if e.complete && !previous.is_some_and(|p| p.complete) {
        events.push((
            node_reason::DRAIN_COMPLETED,
            "drained: no replica is left on this node".to_string(),
        ));
    }
    events
}

/// Writes `status.evacuation` of every draining `BlockNode` (and clears it once the
/// drain is called off), publishing an Event when a drain starts, when its count of
/// replicas left changes, and when it completes.
///
/// `written` holds what this loop last wrote per node: the cache may not show that
/// write yet, and comparing with the cached status would repeat its Events.
async fn report_drains(
    ctx: &Context,
    cache: &Cache,
    written: &mut BTreeMap<String, Option<EvacuationStatus>>,
) -> Result<()> {
    let nodes_api: Api<BlockNode> = Api::all(ctx.client.clone());
    let nodes = cache.nodes.state();
    if !nodes
        .iter()
        .any(|n| n.spec.evacuate || n.status.as_ref().is_some_and(|s| s.evacuation.is_some()))
    {
        return Ok(());
    }
    let replicas = cache.replicas.state();
    for n in &nodes {
        let name = n.name_any();
        let previous = match written.get(&name) {
            Some(w) => w.clone(),
            None => n.status.as_ref().and_then(|s| s.evacuation.clone()),
        };
        let next = n.spec.evacuate.then(|| evacuation_status(&name, &replicas));
        if previous == next {
            continue;
        }
        let patch = json!({
            "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
            "kind": "BlockNode",
            "status": { "evacuation": next },
        });
        nodes_api
            .patch_status(
                &name,
                &PatchParams::apply(api::FIELD_MANAGER_OPERATOR).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(Error::Kube)?;
        written.insert(name.clone(), next.clone());
        for (reason, note) in drain_events(previous.as_ref(), next.as_ref()) {
            tracing::info!(node = %name, reason, note = %note, "event");
            let ev = Event {
                type_: EventType::Normal,
                reason: reason.into(),
                note: Some(note),
                action: reason.into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &n.object_ref(&())).await {
                tracing::warn!(node = %name, reason, error = %e, "publishing event failed");
            }
        }
    }
    Ok(())
}

/// What of a `BlockNode` the volumes' plans depend on. Agents rewrite their node's
/// status as its disks fill and empty; such a change concerns only the volumes still
/// being placed (free space), not every volume (a reconcile of all of them on each
/// node report made idle cost grow with the square of the volume count).
#[derive(Clone, PartialEq)]
struct NodeFacts {
    /// Everything but free space: a change reconciles every volume.
    placement: String,
    /// Free space: a change reconciles the volumes still being placed.
    allocatable_bytes: u64,
}

impl NodeFacts {
    fn of(n: &BlockNode) -> Self {
        let conditions: Vec<(&str, &str)> = n
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        let placement = serde_json::to_string(&(
            n.labels(),
            &n.spec,
            conditions,
            n.status.as_ref().map(|s| s.capacity_bytes),
            n.metadata.deletion_timestamp.is_some(),
        ))
        .unwrap_or_default();
        NodeFacts {
            placement,
            allocatable_bytes: n.status.as_ref().map_or(0, |s| s.allocatable_bytes),
        }
    }
}

/// Whether a volume may still place a replica (it is not Ready with all of its
/// replicas): free space on a node concerns only such volumes.
fn volume_needs_placement(v: &BlockVolume) -> bool {
    v.metadata.deletion_timestamp.is_none()
        && v.status.as_ref().is_none_or(|s| {
            s.phase != VolumePhase::Ready || s.in_sync_count < u32::from(v.spec.replicas)
        })
}

/// Runs [`report_drains`] every `node_status_interval_ms` until dropped.
async fn drain_reporter(ctx: Arc<Context>, cache: Cache) {
    let every = Duration::from_millis(ctx.settings.node_status_interval_ms.max(100));
    let mut written = BTreeMap::new();
    loop {
        if let Err(e) = report_drains(&ctx, &cache, &mut written).await {
            tracing::warn!(error = %e, "reporting drain progress failed");
        }
        tokio::time::sleep(every).await;
    }
}

async fn cleanup_volume(vol: Arc<BlockVolume>, ctx: &Context) -> Result<Action> {
    let name = vol.name_any();
    let obs = observe(ctx, &name).await?;
    let views: Vec<ReplicaView> = obs
        .replicas
        .iter()
        .map(|r| view(r, &obs.nodes, &obs.leases))
        .collect();
    let cleanup = plan_cleanup(&views, attached_to(&vol));
    let state = crate::recovery::recover_state(vol.status.as_ref(), &views).unwrap_or_default();
    let status = crate::status::volume_status(&crate::status::StatusInput {
        generation: vol.metadata.generation,
        deleting: true,
        attached_to: attached_to(&vol),
        desired_replicas: vol.spec.replicas,
        state: &state,
        replicas: &views,
        blocked: None,
        size_bytes: vol.status.as_ref().and_then(|s| s.size_bytes),
        primary_move: None,
        previous: vol.status.as_ref(),
        now: obs.now,
    });
    match cleanup {
        Cleanup::WaitForDetach { node } => {
            write_status(ctx, &vol, &status).await?;
            ctx.metrics.set_phase(&name, Some(status.phase));
            Err(Error::Waiting(format!(
                "volume is attached to node {node}; deleted once detached"
            )))
        }
        Cleanup::DeleteReplicas { delete, orphaned } => {
            write_status(ctx, &vol, &status).await?;
            ctx.metrics.set_phase(&name, Some(status.phase));
            for d in &delete {
                delete_replica(ctx, &name, d).await?;
            }
            for o in &orphaned {
                if let Some(r) = obs.replicas.iter().find(|r| &r.name_any() == o) {
                    release_orphan(ctx, r).await?;
                }
            }
            Err(Error::Waiting(format!(
                "waiting for {} replica(s) to be removed",
                views.len()
            )))
        }
        Cleanup::Done => {
            ctx.metrics.set_phase(&name, None);
            ctx.seen.forget_volume(&name);
            tracing::info!(volume = %name, "all replicas removed; releasing the volume");
            Ok(Action::await_change())
        }
    }
}

/// Reconciles one volume (the `Controller` entry point).
pub async fn reconcile(vol: Arc<BlockVolume>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let name = vol.name_any();
    let api: Api<BlockVolume> = Api::all(ctx.client.clone());
    let result = finalizer(&api, api::FINALIZER_VOLUME, vol, |ev| async {
        match ev {
            Finalizer::Apply(v) => apply_volume(v, &ctx).await,
            Finalizer::Cleanup(v) => cleanup_volume(v, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let secs = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => {
            ctx.metrics.reconciled("ok", secs);
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&name);
            }
        }
        Err(e) => {
            ctx.metrics.reconciled("error", secs);
            ctx.metrics.reconcile_failed(e.metric_label());
        }
    }
    result
}

/// Requeues a failed reconcile: waiting states poll at a fixed pace; real failures back
/// off exponentially per volume.
pub fn error_policy(vol: Arc<BlockVolume>, err: &Error, ctx: Arc<Context>) -> Action {
    let name = vol.name_any();
    if err.is_waiting() {
        tracing::debug!(volume = %name, reason = %err, "waiting");
        return Action::requeue(Duration::from_millis(ctx.settings.deletion_poll_ms));
    }
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(name.clone()).or_default();
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = ctx
        .settings
        .error_backoff_initial_ms
        .saturating_mul(1u64 << n.saturating_sub(1).min(20))
        .min(ctx.settings.error_backoff_max_ms);
    tracing::warn!(volume = %name, error = %err, failures = n, retry_ms = delay, "reconcile failed");
    Action::requeue(Duration::from_millis(delay))
}

/// Runs the volume controller until `shutdown` resolves.
///
/// Reconciles start once the caches hold a first complete listing, and read from them
/// until this returns. A change of a replica requeues its volume; of a node agent Lease,
/// the volumes with a replica on that node (every volume when the Lease is new, as a new
/// node may take replicas); of a `BlockNode`, every volume (placement may change). Every
/// volume is also requeued at least every `resync_interval_ms` as a safety net.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (cache, feeds) = Cache::start(
        &client,
        &ctx.settings.node_lease_namespace,
        ctx.lease_observer.clone(),
    );
    let controller = async {
        cache.ready().await;
        ctx.set_cache(Some(cache.clone()));
        run_controller(ctx.clone(), cache.clone(), shutdown).await;
    };
    // The feeds never end; they stop with the controller.
    tokio::select! {
        () = controller => {}
        () = feeds => {}
    }
    ctx.set_cache(None);
}

async fn run_controller(
    ctx: Arc<Context>,
    cache: Cache,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let volumes: Api<BlockVolume> = Api::all(client.clone());
    let replicas: Api<BlockReplica> = Api::all(client.clone());
    let nodes: Api<BlockNode> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ctx.settings.node_lease_namespace);
    let controller = Controller::new(volumes, watcher::Config::default().any_semantic());
    let store = controller.store();
    let all_volumes = move || -> Vec<ObjectRef<BlockVolume>> {
        store
            .state()
            .iter()
            .map(|v| ObjectRef::from_obj(&**v))
            .collect()
    };
    let for_nodes = all_volumes.clone();
    let volume_store = controller.store();
    let node_cache = cache.clone();
    let node_seen = std::sync::Mutex::new(BTreeMap::<String, NodeFacts>::new());
    let node_mapper = move |n: BlockNode| {
        let facts = NodeFacts::of(&n);
        let previous = node_seen
            .lock()
            .map(|mut m| m.insert(n.name_any(), facts.clone()))
            .unwrap_or(None);
        // A deletion arrives as the last version of the object, which may equal the one
        // seen before; the cache's own watch has usually dropped it by then. If not, the
        // periodic resync brings the volumes round.
        let gone = node_cache.nodes.get(&ObjectRef::from_obj(&n)).is_none();
        match previous {
            Some(p) if p == facts && !gone => Vec::new(),
            Some(p) if p.placement == facts.placement && !gone => volume_store
                .state_filter(volume_needs_placement)
                .iter()
                .map(|v| ObjectRef::from_obj(&**v))
                .collect(),
            // A new node, or one whose labels, cordon, drain or readiness changed.
            _ => for_nodes(),
        }
    };
    // Lease renewals change only renewTime; react to new holders and new Leases, and
    // let the per-volume requeue (timed to the primary's lease expiry) catch expiries.
    let seen = std::sync::Mutex::new(BTreeMap::<String, u64>::new());
    let lease_cache = cache.clone();
    let lease_mapper = move |l: Lease| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let spec = l.spec.as_ref();
        spec.and_then(|s| s.holder_identity.clone()).hash(&mut h);
        spec.and_then(|s| s.lease_transitions).hash(&mut h);
        spec.and_then(|s| s.lease_duration_seconds).hash(&mut h);
        let previous = seen
            .lock()
            .map(|mut m| m.insert(l.name_any(), h.finish()))
            .unwrap_or(None);
        match previous {
            // A node new to this process may take replicas of any volume.
            None => all_volumes(),
            Some(p) if p != h.finish() => lease_cache
                .volumes_on(&l.name_any())
                .into_iter()
                .map(|v| ObjectRef::new(&v))
                .collect(),
            Some(_) => Vec::new(),
        }
    };
    let settings = &ctx.settings;
    let reporter = drain_reporter(ctx.clone(), cache);
    let controller = controller
        .with_config(kube::runtime::Config::default().concurrency(settings.concurrency))
        .owns(replicas, watcher::Config::default().any_semantic())
        .watches(
            nodes,
            watcher::Config::default().any_semantic(),
            node_mapper,
        )
        .watches(
            leases,
            watcher::Config::default().any_semantic(),
            lease_mapper,
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(volume = %obj.name, "reconciled"),
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                    tracing::debug!(volume = %obj.name, error = %e, "reconcile did not finish")
                }
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        });
    // The reporter never ends; it stops with the controller.
    tokio::select! {
        () = controller => {}
        () = reporter => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::BlockNodeSpec;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn block_node(name: &str, cordoned: bool, evacuate: bool) -> BlockNode {
        let mut n = BlockNode::new(
            name,
            BlockNodeSpec {
                node_name: name.into(),
                data_address: "127.0.0.1:7400".into(),
                data_dir: "/d".into(),
                cordoned,
                evacuate,
                ..Default::default()
            },
        );
        n.status = Some(api::BlockNodeStatus {
            allocatable_bytes: 1 << 30,
            ..Default::default()
        });
        n
    }

    #[test]
    fn node_loads_count_unaccounted_bytes_live_primaries_and_rebuilds_per_node() {
        let replica = |name: &str, node: &str, role, state, size: Option<u64>, deleting| {
            let mut spec = crate::model::test_support::replica(name, node).spec;
            spec.role = role;
            spec.size_bytes = 100;
            let mut r = BlockReplica::new(name, spec);
            r.status = Some(api::BlockReplicaStatus {
                state,
                size_bytes: size,
                ..Default::default()
            });
            if deleting {
                r.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
                );
            }
            r
        };
        use api::{ReplicaRole::*, ReplicaState::*};
        let replicas = [
            replica("a", "n1", Primary, InSync, Some(100), false),
            replica("b", "n1", Replica, Rebuilding, None, false),
            replica("c", "n1", Primary, InSync, None, true),
            replica("d", "n2", Replica, CatchingUp, Some(100), false),
            replica("e", "n2", Replica, Pending, None, true),
        ];
        let loads = node_loads(&replicas);
        let load = |n: &str| loads.get(n).copied().unwrap_or_default();
        assert_eq!(
            load("n1"),
            NodeLoad {
                pending_bytes: 200,
                primaries: 1,
                rebuilding: 1
            }
        );
        assert_eq!(
            load("n2"),
            NodeLoad {
                pending_bytes: 100,
                primaries: 0,
                rebuilding: 1
            }
        );
        assert_eq!(load("n3"), NodeLoad::default());
    }

    #[test]
    fn a_node_report_of_free_space_only_concerns_volumes_still_being_placed() {
        let base = block_node("n1", false, false);
        let facts = NodeFacts::of(&base);
        let mut fuller = base.clone();
        if let Some(s) = fuller.status.as_mut() {
            s.allocatable_bytes -= 1 << 20;
            s.disks.push(api::node::DiskStatus {
                path: "/d".into(),
                capacity_bytes: 1 << 30,
                available_bytes: 1 << 29,
            });
        }
        let f = NodeFacts::of(&fuller);
        assert!(f != facts && f.placement == facts.placement);
        let mut cordoned = base.clone();
        cordoned.spec.cordoned = true;
        assert!(NodeFacts::of(&cordoned).placement != facts.placement);
        let mut labelled = base.clone();
        labelled.labels_mut().insert("zone".into(), "b".into());
        assert!(NodeFacts::of(&labelled).placement != facts.placement);

        let mut v = BlockVolume::new("v", api::BlockVolumeSpec::with_size("1Gi"));
        v.spec.replicas = 3;
        assert!(volume_needs_placement(&v), "no status yet");
        v.status = Some(BlockVolumeStatus {
            phase: VolumePhase::Ready,
            in_sync_count: 3,
            ..Default::default()
        });
        assert!(!volume_needs_placement(&v));
        v.status.as_mut().unwrap().in_sync_count = 2;
        assert!(volume_needs_placement(&v));
        v.status.as_mut().unwrap().phase = VolumePhase::Degraded;
        assert!(volume_needs_placement(&v));
    }

    fn evac(replicas_left: u32) -> EvacuationStatus {
        EvacuationStatus {
            replicas_left,
            complete: replicas_left == 0,
            volumes_left: (0..replicas_left).map(|i| format!("v{i}")).collect(),
        }
    }

    fn reasons(
        previous: Option<EvacuationStatus>,
        next: Option<EvacuationStatus>,
    ) -> Vec<&'static str> {
        drain_events(previous.as_ref(), next.as_ref())
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    fn lag_replica(id: &str, peers: Vec<api::PeerStatus>, lag: Option<ReplicaLag>) -> BlockReplica {
        let mut r = BlockReplica::new(
            id,
            BlockReplicaSpec {
                volume: "v".into(),
                replica_id: id.into(),
                node: format!("node-{id}"),
                role: api::ReplicaRole::Replica,
                epoch: 1,
                size_bytes: 4096,
                block_size: 4096,
                durability: Default::default(),
                peers: vec![],
                in_sync_set: vec![],
                in_sync_set_generation: 0,
                pvc: None,
            },
        );
        r.status = Some(api::BlockReplicaStatus {
            peers,
            lag,
            ..Default::default()
        });
        r
    }

    #[test]
    fn replica_lag_follows_the_primary_report_and_is_written_only_when_it_changes() {
        let lag = |lsn, bytes| ReplicaLag {
            lsn,
            bytes: Some(bytes),
        };
        let peer = |id: &str, l: Option<ReplicaLag>| api::PeerStatus {
            replica_id: id.into(),
            lag: l,
            ..Default::default()
        };
        let replicas = vec![
            lag_replica(
                "p",
                vec![peer("a", Some(lag(0, 0))), peer("b", Some(lag(7, 700)))],
                None,
            ),
            // Unchanged: not written again.
            lag_replica("a", vec![], Some(lag(0, 0))),
            lag_replica("b", vec![], Some(lag(3, 300))),
            // Not reported by the primary (just placed): its old lag goes.
            lag_replica("c", vec![], Some(lag(1, 100))),
        ];
        assert_eq!(
            lag_updates(&replicas, Some("p")),
            vec![
                ("b".to_string(), Some(lag(7, 700))),
                ("c".to_string(), None)
            ]
        );
        // No primary: nobody knows any lag.
        assert_eq!(
            lag_updates(&replicas, None),
            vec![
                ("a".to_string(), None),
                ("b".to_string(), None),
                ("c".to_string(), None)
            ]
        );
    }

    #[test]
    fn phase_changes_into_and_out_of_trouble_make_events() {
        use VolumePhase::*;
        let r = |from, to| phase_event(from, to).map(|(w, reason, _)| (w, reason));
        assert_eq!(r(Ready, Degraded), Some((true, reason::VOLUME_DEGRADED)));
        assert_eq!(r(Degraded, Failed), Some((true, reason::VOLUME_FAILED)));
        assert_eq!(r(Degraded, Ready), Some((false, reason::VOLUME_RECOVERED)));
        assert_eq!(r(Failed, Ready), Some((false, reason::VOLUME_RECOVERED)));
        for (from, to) in [
            (Creating, Ready),
            (Ready, Ready),
            (Degraded, Degraded),
            (Ready, Deleting),
        ] {
            assert_eq!(r(from, to), None, "{from:?} → {to:?}");
        }
        for reason in [
            reason::VOLUME_DEGRADED,
            reason::VOLUME_FAILED,
            reason::VOLUME_RECOVERED,
        ] {
            assert!(PVC_EVENT_REASONS.contains(&reason));
        }
    }

    #[test]
    fn every_drain_that_starts_is_seen_to_complete() {
        use node_reason::*;
        // Started and done between two reports: both Events, in order.
        assert_eq!(
            reasons(None, Some(evac(0))),
            [DRAIN_STARTED, DRAIN_COMPLETED]
        );
        assert_eq!(reasons(None, Some(evac(2))), [DRAIN_STARTED]);
        assert_eq!(reasons(Some(evac(2)), Some(evac(1))), [DRAIN_PROGRESS]);
        assert_eq!(reasons(Some(evac(2)), Some(evac(0))), [DRAIN_COMPLETED]);
        // Nothing new: no Event, and a completed drain is announced once.
        assert!(reasons(Some(evac(1)), Some(evac(1))).is_empty());
        assert!(reasons(Some(evac(0)), Some(evac(0))).is_empty());
        // A drain called off publishes nothing.
        assert!(reasons(Some(evac(1)), None).is_empty());
        // A completed drain that finds a replica again reports progress, then completes again.
        assert_eq!(reasons(Some(evac(0)), Some(evac(1))), [DRAIN_PROGRESS]);
        assert_eq!(reasons(Some(evac(1)), Some(evac(0))), [DRAIN_COMPLETED]);
    }

    fn k8s_node(name: &str, unschedulable: bool, labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.spec = Some(NodeSpec {
            unschedulable: Some(unschedulable),
            ..Default::default()
        });
        n
    }

    #[test]
    fn candidates_honour_kubernetes_cordon_storage_cordon_drain_and_storage_selector() {
        let bns = vec![
            block_node("plain", false, false),
            block_node("k8s-cordoned", false, false),
            block_node("storage-cordoned", true, false),
            block_node("draining", false, true),
            block_node("control-plane", false, false),
            block_node("no-node-object", false, false),
        ];
        let nodes = vec![
            k8s_node("plain", false, &[("disk", "ssd")]),
            k8s_node("k8s-cordoned", true, &[]),
            k8s_node("storage-cordoned", false, &[]),
            k8s_node("draining", false, &[]),
            k8s_node(
                "control-plane",
                false,
                &[("node-role.kubernetes.io/control-plane", "")],
            ),
        ];
        let leases: BTreeMap<String, NodeLease> = bns
            .iter()
            .map(|n| {
                (
                    n.name_any(),
                    NodeLease {
                        live: true,
                        expires: None,
                    },
                )
            })
            .collect();
        let sel: StorageNodeSelector = "!node-role.kubernetes.io/control-plane".parse().unwrap();
        let c = candidates(&bns, &nodes, &BTreeMap::new(), &leases, &sel);
        let get = |n: &str| c.iter().find(|c| c.name == n).unwrap();
        let flags = |n: &str| {
            let c = get(n);
            (c.cordoned, c.evacuating, c.storage_node)
        };
        assert_eq!(flags("plain"), (false, false, true));
        assert_eq!(flags("k8s-cordoned"), (true, false, true));
        assert_eq!(flags("storage-cordoned"), (true, false, true));
        assert_eq!(flags("draining"), (true, true, true));
        assert_eq!(flags("control-plane"), (false, false, false));
        assert_eq!(flags("no-node-object"), (false, false, true));
        assert_eq!(
            get("plain").labels.get("disk").map(String::as_str),
            Some("ssd"),
            "Node labels reach spec.nodeSelector matching"
        );
        let placed = crate::placement::place(
            &c,
            &crate::placement::PlacementRequest {
                count: 2,
                size_bytes: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(placed, vec!["no-node-object", "plain"]);
    }
}
