//! The engine-backed [`ReplicaRuntime`]: one engine volume file per local replica, a
//! primary driver (and its NBD export) for each local primary, and the node's data port
//! hosting every local non-primary replica. The epoch is persisted in the volume before
//! any role change acts, and a demoted primary is fenced (writes refused, export removed,
//! driver stopped) before it starts receiving as a replica. A volume reopened at the
//! epoch it is assigned to serve at as primary does not serve there (it may have lost
//! entries it issued at that epoch) and reports that it needs a new epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use api::{BlockReplicaStatus, PeerStatus, ReplicaRole, ReplicaState};
use engine::forward::{ForwardHandler, ForwardOutcome, ForwardSource};
use engine::net::{PrimaryHandle, ReceiverServer, Transport, spawn_primary};
use engine::replication::{
    self as repl, Endpoint, ForwardOp, ForwardStatus, Generation, PrimaryConfig, ReceiverConfig,
    ReplicaId, Report, VolumeId,
};
use engine::{CreateOptions, DurabilityMode, Epoch, Lsn, Volume, VolumeConfig};
use tokio::task::JoinHandle;

use crate::frontend::metered::NbdMetrics;
use crate::frontend::nbd::{BackendError, BlockBackend, ExportRegistry};
use crate::replicas::{Assignment, ReplicaRuntime, RuntimeError};

/// Name of the engine volume file inside a replica's directory.
pub const VOLUME_FILE_NAME: &str = "volume.img";

/// Settings of the engine runtime (units last).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// WAL size of newly created volumes, in bytes (capped to the volume size, floor 1 MiB).
    pub wal_size_bytes: u64,
    pub volume: VolumeConfig,
    pub primary: PrimaryConfig,
    pub receiver: ReceiverConfig,
    /// How long removing an NBD export waits for its connections to close.
    pub export_remove_wait_ms: u64,
    /// How long a demoted primary's last replicated flush may take, in milliseconds.
    /// The drain lets a planned primary move finish at once (the target then holds every
    /// entry); if it fails or times out the operator falls back to its promotion rule.
    pub demotion_drain_timeout_ms: u64,
    /// How long, in milliseconds, an answered heartbeat lets a primary serve without a
    /// fresh Lease: while every committed in-sync member answered one sent within this
    /// window, no other member can have been promoted (a promoted member waits this long
    /// after the last heartbeat it received before it serves). Keeps IO going through an
    /// API-server outage. Must exceed the heartbeat interval plus a round trip.
    pub member_proof_window_ms: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            wal_size_bytes: 64 << 20,
            volume: VolumeConfig::default(),
            primary: PrimaryConfig::default(),
            receiver: ReceiverConfig::default(),
            export_remove_wait_ms: 5_000,
            demotion_drain_timeout_ms: 5_000,
            member_proof_window_ms: 3_000,
        }
    }
}

/// Decides whether a local primary may serve IO right now on the strength of the
/// agent's Lease (once renewals stop, the operator may promote elsewhere, so this node
/// must stop acknowledging first). A primary also serves while its member proof is
/// fresh (see [`EngineSettings::member_proof_window_ms`]).
pub type IoFence = Arc<dyn Fn() -> bool + Send + Sync>;

/// What a running local primary keeps beside its driver.
struct Primary {
    handle: Arc<PrimaryHandle>,
    backend: Arc<ReplicatedBackend>,
    reports: JoinHandle<()>,
    seen: Arc<Mutex<ReportState>>,
    peers: Vec<repl::Peer>,
    generation: u64,
    in_sync_set: Vec<String>,
}

#[derive(Default)]
struct ReportState {
    unreachable: BTreeSet<String>,
    fenced_by: Option<u64>,
    local_disk_failed: bool,
    errors: BTreeMap<String, String>,
}

struct Local {
    vol: Arc<Volume>,
    path: PathBuf,
    applied: Option<Assignment>,
    primary: Option<Primary>,
    hosted: bool,
    last_error: Option<String>,
    /// Assigned primary at the epoch the volume was reopened at: it does not serve and
    /// reports [`api::PRIMARY_NEEDS_NEW_EPOCH_ERROR`] until the operator assigns a new
    /// epoch (see [`Volume::may_begin_primary_term`]).
    needs_new_epoch: bool,
}

/// The production [`ReplicaRuntime`].
pub struct EngineRuntime {
    settings: EngineSettings,
    receiver: Arc<ReceiverServer>,
    transport: Arc<Transport>,
    exports: ExportRegistry,
    fence: IoFence,
    replicas: tokio::sync::Mutex<BTreeMap<String, Local>>,
    /// Volume name → role of its local replica, readable without awaiting.
    roles: Mutex<BTreeMap<String, ReplicaRole>>,
    /// Counts NBD traffic of the exports this runtime publishes, when set.
    nbd_metrics: Option<NbdMetrics>,
    serving: LocalPrimaries,
    /// When this runtime started: heartbeats answered by an earlier agent process came
    /// before it.
    started: std::time::Instant,
}

/// One local replica's reported status and WAL usage, sampled for metrics.
#[derive(Clone, Debug)]
pub struct ReplicaSample {
    pub volume: String,
    pub replica_id: String,
    pub status: BlockReplicaStatus,
    pub wal_used_bytes: u64,
    pub wal_size_bytes: u64,
    /// Peer replica ID → WAL bytes after its flushed LSN, for peers whose missing
    /// entries are still in the WAL.
    pub peer_lag_bytes: BTreeMap<String, u64>,
    /// For a local primary: peer replica ID → bytes its catch-ups and rebuilds were
    /// sent since this primary term started here (peers never recovered are absent).
    pub peer_recovery_bytes: BTreeMap<String, repl::RecoveryBytes>,
    /// For a local primary: peer replica ID → progress of its rebuild's base copy, for
    /// peers being rebuilt.
    pub peer_rebuild_progress: BTreeMap<String, repl::RebuildProgress>,
}

/// The backends of this node's serving primaries by volume name: what forwarded IO from
/// other nodes executes on (the same backend the local NBD export uses, so the
/// durability gate, the epoch fence and the Lease fence all apply).
#[derive(Clone, Default)]
pub struct LocalPrimaries {
    map: Arc<Mutex<BTreeMap<String, Arc<ReplicatedBackend>>>>,
    /// Where volumes are attached; once set, only the attached node (or anyone, for a
    /// volume attached nowhere) may run IO here (see `frontend::forwarding::Attachments`).
    attachments: Arc<std::sync::OnceLock<Arc<crate::frontend::forwarding::Attachments>>>,
}

impl LocalPrimaries {
    /// Accepts forwarded IO, in process too, only from the node `view` says the volume
    /// is attached to. Set once, for every clone.
    pub fn fence_by_attachment(&self, view: Arc<crate::frontend::forwarding::Attachments>) {
        let _ = self.attachments.set(view);
    }

    fn set(&self, volume: &str, backend: Option<Arc<ReplicatedBackend>>) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match backend {
            Some(b) => m.insert(volume.to_string(), b),
            None => m.remove(volume),
        };
    }

    fn get(&self, volume: &str) -> Option<Arc<ReplicatedBackend>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(volume)
            .cloned()
    }
}

impl crate::frontend::forwarding::LocalExecutor for LocalPrimaries {
    /// A primary that is here but not writable (fenced, deposed) does not count: the
    /// forwarder then asks the data port, which answers with the routing status.
    fn serves(&self, volume: &str) -> bool {
        self.get(volume).is_some_and(|b| b.check_writable().is_ok())
    }
}

fn forward_status(e: &BackendError) -> ForwardStatus {
    match e {
        BackendError::Io(_) => ForwardStatus::Io,
        BackendError::NoSpace(_) => ForwardStatus::NoSpace,
        BackendError::Invalid(_) => ForwardStatus::Invalid,
        BackendError::ReadOnly(_) => ForwardStatus::ReadOnly,
    }
}

impl ForwardHandler for LocalPrimaries {
    fn handle(
        &self,
        from: &ForwardSource,
        volume: &VolumeId,
        epoch: Epoch,
        op: ForwardOp,
    ) -> ForwardOutcome {
        let Some(b) = self.get(volume.as_str()) else {
            return ForwardOutcome::failed(
                ForwardStatus::NotPrimary,
                format!("no primary of volume {volume} serves on this node"),
            );
        };
        let mine = b.vol.epoch();
        let refuse = |status, detail: String| ForwardOutcome {
            epoch: mine,
            ..ForwardOutcome::failed(status, detail)
        };
        if let Err(e) = b.check_writable() {
            return refuse(ForwardStatus::NotPrimary, e.to_string());
        }
        if epoch < mine {
            return refuse(
                ForwardStatus::StaleEpoch,
                format!("request epoch {} is older than {}", epoch.0, mine.0),
            );
        }
        if epoch > mine {
            return refuse(
                ForwardStatus::NotPrimary,
                format!(
                    "request epoch {} is newer than this primary's {}",
                    epoch.0, mine.0
                ),
            );
        }
        if let Some(view) = self.attachments.get() {
            match view.check(volume.as_str(), from.node(), from.attachment()) {
                crate::frontend::forwarding::AttachmentCheck::Allowed => {}
                crate::frontend::forwarding::AttachmentCheck::Fenced(detail) => {
                    tracing::warn!(volume = %volume, node = from.node(), %detail, "forwarded IO refused");
                    return refuse(ForwardStatus::Io, detail);
                }
                crate::frontend::forwarding::AttachmentCheck::Unknown(detail) => {
                    return refuse(ForwardStatus::NotPrimary, detail);
                }
            }
        }
        // Last check before the volume: a request whose connection the forwarder gave up
        // on (closed, or superseded by a newer one) never runs.
        let _running = match from.admit() {
            Ok(g) => g,
            Err(reason) => return refuse(ForwardStatus::Io, reason),
        };
        match crate::frontend::forwarding::execute_on(&*b, op) {
            Ok(payload) => ForwardOutcome::ok(mine, payload),
            // A failure because this primary was deposed meanwhile is a routing answer,
            // not a medium error: the forwarder retries on the new primary.
            Err(e) if b.check_writable().is_err() || b.vol.epoch() != mine => {
                refuse(ForwardStatus::NotPrimary, e.to_string())
            }
            Err(e) => refuse(forward_status(&e), e.to_string()),
        }
    }
}

/// Grows `vol` to the size `a` assigns and says whether it grew; a smaller size is
/// refused, since a volume never shrinks under its data.
fn grow_to_assigned(vol: &Volume, a: &Assignment) -> Result<bool, RuntimeError> {
    let current = vol.size_bytes();
    if a.size_bytes < current {
        return Err(RuntimeError::Shrink {
            replica: a.replica_id.clone(),
            current,
            offered: a.size_bytes,
        });
    }
    if a.size_bytes == current {
        return Ok(false);
    }
    vol.expand(a.size_bytes)
        .map_err(|e| failed(&a.replica_id, format!("expand: {e}")))?;
    Ok(true)
}

fn failed(replica: &str, message: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed {
        replica: replica.to_string(),
        message: message.to_string(),
    }
}

fn map_state(s: repl::ReplicaState) -> ReplicaState {
    match s {
        repl::ReplicaState::Disconnected => ReplicaState::Disconnected,
        repl::ReplicaState::Connecting => ReplicaState::Connecting,
        repl::ReplicaState::CatchingUp => ReplicaState::CatchingUp,
        repl::ReplicaState::InSync => ReplicaState::InSync,
        repl::ReplicaState::Degraded => ReplicaState::Degraded,
        repl::ReplicaState::NeedsRebuild => ReplicaState::NeedsRebuild,
        repl::ReplicaState::Rebuilding => ReplicaState::Rebuilding,
    }
}

fn durability_mode(d: api::Durability) -> DurabilityMode {
    match d {
        api::Durability::SyncAll => DurabilityMode::SyncAll,
        api::Durability::Async => DurabilityMode::Async,
    }
}

fn repl_durability(d: api::Durability) -> repl::Durability {
    match d {
        api::Durability::SyncAll => repl::Durability::SyncAll,
        api::Durability::Async => repl::Durability::Async,
    }
}

impl EngineRuntime {
    pub fn new(
        settings: EngineSettings,
        receiver: Arc<ReceiverServer>,
        transport: Arc<Transport>,
        exports: ExportRegistry,
        fence: IoFence,
    ) -> Self {
        EngineRuntime {
            settings,
            receiver,
            transport,
            exports,
            fence,
            replicas: tokio::sync::Mutex::new(BTreeMap::new()),
            roles: Mutex::new(BTreeMap::new()),
            nbd_metrics: None,
            serving: LocalPrimaries::default(),
            started: std::time::Instant::now(),
        }
    }

    /// The executor of IO forwarded to this node's primaries (for the data port).
    pub fn local_primaries(&self) -> LocalPrimaries {
        self.serving.clone()
    }

    /// Counts the NBD traffic of every export published from now on.
    pub fn with_nbd_metrics(mut self, metrics: NbdMetrics) -> Self {
        self.nbd_metrics = Some(metrics);
        self
    }

    /// The status of every applied local replica plus its WAL usage, as one scrape
    /// sees it (each replica is sampled on its own, not all at one instant).
    pub async fn samples(&self) -> Vec<ReplicaSample> {
        type Listed = (String, String, Arc<Volume>, Option<Arc<PrimaryHandle>>);
        let listed: Vec<Listed> = {
            let m = self.replicas.lock().await;
            m.iter()
                .filter_map(|(id, l)| {
                    let a = l.applied.as_ref()?;
                    let primary = l.primary.as_ref().map(|p| p.handle.clone());
                    Some((id.clone(), a.volume.clone(), l.vol.clone(), primary))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(listed.len());
        for (replica_id, volume, vol, primary) in listed {
            let Some(status) = self.status(&replica_id).await else {
                continue;
            };
            let snap = match primary {
                Some(h) => h.snapshot().await,
                None => None,
            };
            let (peer_recovery_bytes, peer_rebuild_progress) = snap
                .map(|snap| {
                    let named = |id: repl::ReplicaId| id.as_str().to_string();
                    (
                        snap.recovery_bytes
                            .into_iter()
                            .map(|(id, b)| (named(id), b))
                            .collect(),
                        snap.rebuild_progress
                            .into_iter()
                            .map(|(id, p)| (named(id), p))
                            .collect(),
                    )
                })
                .unwrap_or_default();
            let stats = vol.stats();
            let peer_lag_bytes = status
                .peers
                .iter()
                .filter_map(|p| {
                    let bytes = vol.wal_bytes_after(Lsn(p.flushed_lsn))?;
                    Some((p.replica_id.clone(), bytes))
                })
                .collect();
            out.push(ReplicaSample {
                volume,
                replica_id,
                status,
                wal_used_bytes: stats.wal_used_bytes,
                wal_size_bytes: stats.wal_size_bytes,
                peer_lag_bytes,
                peer_recovery_bytes,
                peer_rebuild_progress,
            });
        }
        out
    }

    /// Fences every local primary that `assigned` (replica ID → role and epoch, read
    /// afresh from the API server) no longer names primary at the epoch it serves; the
    /// fence holds until an assignment at the newer epoch is applied (a demotion stops
    /// the primary anyway). Returns how many were fenced. Called after a Lease lapse,
    /// before IO resumes.
    pub async fn fence_unassigned_primaries(
        &self,
        assigned: &BTreeMap<String, (ReplicaRole, u64)>,
    ) -> usize {
        let m = self.replicas.lock().await;
        let mut fenced = 0;
        for (id, l) in m.iter() {
            let Some(p) = l.primary.as_ref() else {
                continue;
            };
            let serving = l.vol.epoch().0;
            let wanted = match assigned.get(id) {
                Some((ReplicaRole::Primary, e)) if *e == serving => continue,
                Some((ReplicaRole::Primary, e)) => (*e).max(serving.saturating_add(1)),
                _ => u64::MAX,
            };
            p.backend.min_epoch.fetch_max(wanted, Ordering::AcqRel);
            tracing::warn!(replica = %id, epoch = serving, "primary no longer assigned at its epoch; fenced");
            fenced += 1;
        }
        fenced
    }

    /// The NBD exports this runtime publishes (one per local primary, named after the
    /// volume).
    pub fn exports(&self) -> &ExportRegistry {
        &self.exports
    }

    /// Role of the local replica of `volume`, if this node has one (applied).
    pub fn local_role(&self, volume: &str) -> Option<ReplicaRole> {
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(volume)
            .copied()
    }

    fn set_role(&self, volume: &str, role: Option<ReplicaRole>) {
        let mut m = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        match role {
            Some(r) => m.insert(volume.to_string(), r),
            None => m.remove(volume),
        };
    }

    /// Stops every local replica (shutdown): exports removed, drivers stopped, volumes
    /// closed. Data stays.
    pub async fn close_all(&self) {
        let ids: Vec<String> = self.replicas.lock().await.keys().cloned().collect();
        for id in ids {
            let _ = self.close(&id).await;
        }
    }

    fn open_volume(&self, a: &Assignment) -> Result<(Volume, PathBuf), RuntimeError> {
        let path = a.dir.join(VOLUME_FILE_NAME);
        let id = &a.replica_id;
        if path.exists() {
            let v = Volume::open_file(&path, self.settings.volume.clone())
                .map_err(|e| failed(id, format!("open {}: {e}", path.display())))?;
            return Ok((v, path));
        }
        std::fs::create_dir_all(&a.dir)
            .map_err(|e| failed(id, format!("create {}: {e}", a.dir.display())))?;
        let opts = CreateOptions {
            size_bytes: a.size_bytes,
            block_size: a.block_size,
            wal_size_bytes: self.settings.wal_size_bytes.min(a.size_bytes).max(1 << 20),
            durability: durability_mode(a.durability),
            epoch: Epoch(0),
        };
        // Create under a temporary name and rename, so a crash never leaves a
        // half-initialised file under the real name.
        let tmp = a.dir.join(format!("{VOLUME_FILE_NAME}.creating"));
        let _ = std::fs::remove_file(&tmp);
        let v = Volume::create_file(&tmp, opts, self.settings.volume.clone())
            .map_err(|e| failed(id, format!("create {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| failed(id, format!("rename to {}: {e}", path.display())))?;
        if let Ok(d) = std::fs::File::open(&a.dir) {
            let _ = d.sync_all();
        }
        tracing::info!(replica = %id, path = %path.display(), size_bytes = a.size_bytes, "volume created");
        Ok((v, path))
    }

    fn engine_peers(a: &Assignment) -> Vec<repl::Peer> {
        a.peers
            .iter()
            .filter_map(|p| {
                let addr = p.address.as_deref()?;
                let id = ReplicaId::new(p.replica_id.clone()).ok()?;
                match Endpoint::parse(addr) {
                    Ok(endpoint) => Some(repl::Peer { id, endpoint }),
                    Err(e) => {
                        tracing::warn!(peer = %p.replica_id, address = %addr, error = %e, "peer address unusable");
                        None
                    }
                }
            })
            .collect()
    }

    fn ids(a: &Assignment) -> Result<(VolumeId, ReplicaId), RuntimeError> {
        let v = VolumeId::new(a.volume.clone()).map_err(|e| failed(&a.replica_id, e))?;
        let r = ReplicaId::new(a.replica_id.clone()).map_err(|e| failed(&a.replica_id, e))?;
        Ok((v, r))
    }

    /// Before a demotion: refuses new IO, then ships and flushes (at the old epoch) what
    /// the primary already holds, so its replicas end with every entry it has. Bounded by
    /// `demotion_drain_timeout_ms`; a failure only means the operator waits for the
    /// target to catch up or falls back to its promotion rule. Acknowledges nothing new:
    /// the export's FLUSH path is fenced first.
    async fn drain_primary(&self, volume: &str, l: &mut Local) {
        let Some(p) = l.primary.as_ref() else { return };
        p.backend.fenced.store(true, Ordering::Release);
        let wait = std::time::Duration::from_millis(self.settings.demotion_drain_timeout_ms);
        match tokio::time::timeout(wait, p.handle.flush()).await {
            Ok(Ok(lsn)) => tracing::info!(volume, lsn = lsn.0, "demoted primary drained"),
            Ok(Err(e)) => tracing::warn!(volume, error = %e, "demoted primary could not drain"),
            Err(_) => tracing::warn!(
                volume,
                timeout_ms = self.settings.demotion_drain_timeout_ms,
                "demoted primary drain timed out"
            ),
        }
    }

    /// Fences and stops a local primary: writes fail from now on, the export goes away,
    /// the driver stops and the volume's append observer is removed.
    async fn stop_primary(&self, volume: &str, l: &mut Local) {
        let Some(p) = l.primary.take() else { return };
        p.backend.fenced.store(true, Ordering::Release);
        self.serving.set(volume, None);
        if let Err(e) = self
            .exports
            .remove(volume, self.settings.export_remove_wait_ms)
            .await
        {
            tracing::warn!(volume, error = %e, "NBD export removal");
        }
        p.reports.abort();
        l.vol.set_append_observer(None);
        // Connections of the removed export may still hold the handle: the driver stops
        // now. The WAL it held for lagging peers was the term's; as a replica a floor left
        // behind would pin the WAL until it fills (the driver releases it too when it is
        // dropped, after any step still running).
        p.handle.halt();
        drop(p.handle);
        l.vol.release_retention_floor();
        tracing::info!(volume, "primary stopped");
    }

    fn proof_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.settings.member_proof_window_ms)
    }

    fn start_primary(
        &self,
        a: &Assignment,
        l: &mut Local,
        serve_after: std::time::Instant,
    ) -> Result<(), RuntimeError> {
        let (vid, rid) = Self::ids(a)?;
        let members = a
            .in_sync_set
            .iter()
            .filter_map(|m| ReplicaId::new(m.clone()).ok())
            .collect();
        let peers = Self::engine_peers(a);
        let pcfg = PrimaryConfig {
            durability: repl_durability(a.durability),
            ..self.settings.primary.clone()
        };
        let handle = Arc::new(spawn_primary(
            l.vol.clone(),
            vid,
            rid,
            pcfg,
            Generation(a.in_sync_set_generation),
            members,
            peers.clone(),
            self.transport.clone(),
        ));
        let seen = Arc::new(Mutex::new(ReportState::default()));
        let min_epoch = Arc::new(AtomicU64::new(0));
        let reports = {
            let handle = handle.clone();
            let seen = seen.clone();
            let min_epoch = min_epoch.clone();
            let volume = a.volume.clone();
            tokio::spawn(async move {
                while let Some(r) = handle.next_report().await {
                    tracing::info!(volume = %volume, report = ?r, "replication report");
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Report::MemberUnreachable { replica, .. } => {
                            s.unreachable.insert(replica.as_str().to_string());
                        }
                        Report::MemberInSync { replica, .. } => {
                            s.unreachable.remove(replica.as_str());
                            s.errors.remove(replica.as_str());
                        }
                        Report::StateChanged { .. } => {}
                        Report::NeedsRebuild { replica, reason } => {
                            s.errors.insert(replica.as_str().to_string(), reason);
                            // The API has no separate rebuild request: the operator keeps
                            // an assigned peer in the primary's spec exactly while it wants
                            // that replica to exist, so the primary rebuilds it right away
                            // (the operator still replaces it if it stays unhealthy).
                            handle.request_rebuild(replica);
                        }
                        Report::Fenced { observed } => {
                            // A peer holds a newer epoch: another primary may serve now.
                            // Reads stop too, and the forwarding path answers NotPrimary.
                            min_epoch.fetch_max(observed.0, Ordering::AcqRel);
                            s.fenced_by = Some(observed.0);
                        }
                        Report::LocalDiskFailed => s.local_disk_failed = true,
                    }
                }
            })
        };
        let backend = Arc::new(ReplicatedBackend {
            vol: l.vol.clone(),
            handle: handle.clone(),
            rt: tokio::runtime::Handle::current(),
            fenced: AtomicBool::new(false),
            fence: self.fence.clone(),
            min_epoch,
            proof_window: self.proof_window(),
            serve_after,
        });
        if serve_after > std::time::Instant::now() {
            tracing::info!(volume = %a.volume, epoch = a.epoch, wait_ms = serve_after.saturating_duration_since(std::time::Instant::now()).as_millis() as u64, "promoted primary waits out the previous primary's member proof");
        }
        // A stale export of this volume (an earlier primary term) must not survive.
        if self.exports.get(&a.volume).is_some() {
            tracing::warn!(volume = %a.volume, "replacing a stale NBD export");
        }
        let exported: Arc<dyn BlockBackend> = match &self.nbd_metrics {
            Some(m) => m.wrap(&a.volume, &a.replica_id, a.role, backend.clone()),
            None => backend.clone(),
        };
        if let Err(e) = self.exports.add(&a.volume, exported) {
            // Nothing was served: stop the driver again (the report task holds its
            // handle), or it would keep shipping whatever the volume appends later.
            reports.abort();
            l.vol.set_append_observer(None);
            return Err(failed(&a.replica_id, format!("NBD export: {e}")));
        }
        self.serving.set(&a.volume, Some(backend.clone()));
        tracing::info!(volume = %a.volume, replica = %a.replica_id, epoch = a.epoch, peers = peers.len(), "primary started");
        l.primary = Some(Primary {
            handle,
            backend,
            reports,
            seen,
            peers,
            generation: a.in_sync_set_generation,
            in_sync_set: a.in_sync_set.clone(),
        });
        Ok(())
    }
}

impl ReplicaRuntime for EngineRuntime {
    async fn open(&self, a: &Assignment) -> Result<(), RuntimeError> {
        let mut m = self.replicas.lock().await;
        if let Some(l) = m.get(&a.replica_id) {
            if grow_to_assigned(&l.vol, a)? {
                tracing::info!(replica = %a.replica_id, size_bytes = a.size_bytes, "volume grown");
            }
            return Ok(());
        }
        let (vol, path) = self.open_volume(a)?;
        grow_to_assigned(&vol, a)?;
        m.insert(
            a.replica_id.clone(),
            Local {
                vol: Arc::new(vol),
                path,
                applied: None,
                primary: None,
                hosted: false,
                last_error: None,
                needs_new_epoch: false,
            },
        );
        Ok(())
    }

    async fn apply(&self, a: &Assignment) -> Result<(), RuntimeError> {
        let mut m = self.replicas.lock().await;
        let l = m
            .get_mut(&a.replica_id)
            .ok_or_else(|| RuntimeError::NotOpen(a.replica_id.clone()))?;
        let persisted = l.vol.epoch().0;
        if a.epoch < persisted {
            return Err(RuntimeError::StaleEpoch {
                replica: a.replica_id.clone(),
                offered: a.epoch,
                persisted,
            });
        }
        if l.applied.as_ref() == Some(a) {
            return Ok(());
        }
        let (vid, _) = Self::ids(a)?;
        // Demotion first: a primary that is no longer primary stops acknowledging writes
        // before anything else changes.
        if a.role != ReplicaRole::Primary {
            self.drain_primary(&a.volume, l).await;
            self.stop_primary(&a.volume, l).await;
        }
        // This replica was the primary at the persisted epoch (it may be waiting for a
        // new one after a restart): no other primary's member proof can be outstanding.
        let primary_here_before = l.needs_new_epoch
            || l.applied
                .as_ref()
                .is_some_and(|p| p.role == ReplicaRole::Primary && p.epoch == persisted);
        // Persist the epoch before acting on the role.
        if let Err(e) = l.vol.set_epoch(Epoch(a.epoch)) {
            // A running primary that cannot record its new epoch stops serving at the
            // old one too: the operator promotes another member once this failure has
            // lasted its grace, and by then nothing may be acknowledged here.
            self.stop_primary(&a.volume, l).await;
            return Err(failed(
                &a.replica_id,
                format!("persist epoch {}: {e}", a.epoch),
            ));
        }
        l.needs_new_epoch = false;
        match a.role {
            ReplicaRole::Primary => {
                // A promotion (a newer epoch over an earlier one held by another
                // primary) waits until the old primary's member proof, which may rest on
                // heartbeats this replica answered, has run out. Heartbeats answered by
                // an earlier agent process came before this runtime started.
                let last_answer = if l.hosted {
                    self.receiver.last_heartbeat(&vid)
                } else {
                    None
                };
                let serve_after = if persisted > 0 && a.epoch > persisted && !primary_here_before {
                    last_answer.unwrap_or(self.started) + self.proof_window()
                } else {
                    std::time::Instant::now()
                };
                if l.hosted {
                    self.receiver.unhost(&vid);
                    l.hosted = false;
                }
                match &mut l.primary {
                    Some(p) => {
                        if a.epoch > persisted {
                            p.handle
                                .change_epoch(Epoch(a.epoch))
                                .map_err(|e| failed(&a.replica_id, e))?;
                        }
                        let peers = Self::engine_peers(a);
                        if peers != p.peers {
                            p.handle.assign_peers(peers.clone());
                            p.peers = peers;
                        }
                        if a.in_sync_set_generation != p.generation
                            || a.in_sync_set != p.in_sync_set
                        {
                            let members = a
                                .in_sync_set
                                .iter()
                                .filter_map(|m| ReplicaId::new(m.clone()).ok())
                                .collect();
                            p.handle
                                .commit_in_sync_set(Generation(a.in_sync_set_generation), members);
                            p.generation = a.in_sync_set_generation;
                            p.in_sync_set = a.in_sync_set.clone();
                            let mut s = p.seen.lock().unwrap_or_else(|e| e.into_inner());
                            s.unreachable.retain(|u| a.in_sync_set.contains(u));
                        }
                    }
                    // Reopened at this epoch (an agent restart, a power loss): the
                    // volume may have lost entries it issued and shipped at this epoch,
                    // and serving now would issue their LSNs again with other data. It
                    // waits for a new epoch instead, which the operator assigns at once
                    // on seeing the report (to this replica or a member that is ahead).
                    None if !l.vol.may_begin_primary_term(Epoch(a.epoch)) => {
                        tracing::warn!(volume = %a.volume, replica = %a.replica_id, epoch = a.epoch,
                            "not serving as primary at the epoch the volume was reopened at; waiting for a new epoch");
                        l.needs_new_epoch = true;
                    }
                    None => {
                        if let Err(e) = self.start_primary(a, l, serve_after) {
                            l.last_error = Some(e.to_string());
                            return Err(e);
                        }
                    }
                }
            }
            ReplicaRole::Replica => {
                if !l.hosted {
                    self.receiver
                        .host(vid, l.vol.clone(), self.settings.receiver);
                    l.hosted = true;
                    tracing::info!(volume = %a.volume, replica = %a.replica_id, epoch = a.epoch, "receiving as replica");
                }
            }
        }
        l.last_error = None;
        l.applied = Some(a.clone());
        self.set_role(&a.volume, Some(a.role));
        Ok(())
    }

    async fn status(&self, replica_id: &str) -> Option<BlockReplicaStatus> {
        let (vol, a, snapshot, seen, backend, last_error, needs_new_epoch) = {
            let m = self.replicas.lock().await;
            let l = m.get(replica_id)?;
            let a = l.applied.clone()?;
            let p = l.primary.as_ref();
            (
                l.vol.clone(),
                a,
                p.map(|p| p.handle.clone()),
                p.map(|p| p.seen.clone()),
                p.map(|p| p.backend.clone()),
                l.last_error.clone(),
                l.needs_new_epoch,
            )
        };
        let mut st = BlockReplicaStatus {
            role: Some(a.role),
            epoch: vol.epoch().0,
            head_lsn: vol.head_lsn().0,
            received_lsn: vol.head_lsn().0,
            flushed_lsn: vol.durable_lsn().0,
            checkpoint_lsn: vol.checkpoint_lsn().0,
            size_bytes: Some(vol.size_bytes()),
            in_sync_set_generation: a.in_sync_set_generation,
            last_error,
            ..Default::default()
        };
        match (a.role, snapshot, seen) {
            (ReplicaRole::Primary, Some(h), Some(seen)) => {
                let snap = h.snapshot().await;
                let s = seen.lock().unwrap_or_else(|e| e.into_inner());
                st.state = ReplicaState::Serving;
                if let Some(e) = s.fenced_by {
                    st.state = ReplicaState::Failed;
                    st.last_error = Some(format!("fenced: a peer knows the newer epoch {e}"));
                } else if s.local_disk_failed || vol.failure().is_some() {
                    // Also when no flush has met the failure yet (the background flusher
                    // did): the volume refuses all IO either way, so say so and let the
                    // operator promote another member.
                    st.state = ReplicaState::Failed;
                    st.last_error = Some(api::PRIMARY_DISK_FAILED_ERROR.into());
                } else if let Some(Err(e)) = backend.as_ref().map(|b| b.check_writable()) {
                    // Fenced (no Lease and no member proof, or deposed), or a promoted
                    // primary still waiting out its predecessor's proof: not serving.
                    st.state = ReplicaState::Disconnected;
                    st.last_error = Some(e.to_string());
                }
                if let Some(snap) = snap {
                    st.peers = snap
                        .replicas
                        .iter()
                        .map(|(id, (state, flushed))| PeerStatus {
                            replica_id: id.as_str().to_string(),
                            state: map_state(*state),
                            flushed_lsn: flushed.0,
                            // The WAL knows each entry's position: bytes cost one lookup.
                            lag: Some(api::ReplicaLag::behind(
                                st.head_lsn,
                                flushed.0,
                                vol.wal_bytes_after(*flushed),
                            )),
                            last_error: s.errors.get(id.as_str()).cloned(),
                        })
                        .collect();
                }
                st.unreachable = s.unreachable.iter().cloned().collect();
            }
            (ReplicaRole::Primary, _, _) => {
                st.state = ReplicaState::Failed;
                if needs_new_epoch {
                    st.last_error = Some(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR.into());
                }
            }
            (ReplicaRole::Replica, _, _) => {
                st.state = ReplicaState::InSync;
                // A replica whose disk refused an append or fsync accepts nothing more
                // until reopened; saying so lets the operator drop or replace it.
                let receiver_failure = Self::ids(&a)
                    .ok()
                    .and_then(|(vid, _)| self.receiver.storage_failure(&vid));
                if let Some(reason) = receiver_failure.or_else(|| vol.failure()) {
                    st.state = ReplicaState::Failed;
                    st.last_error = Some(format!("replica storage failed: {reason}"));
                }
                // The receiver learns the base's size from the primary's rebuild start
                // and counts what it installed; written with the rest of this status, so
                // at most once per status interval and only when it moved.
                st.rebuild = Self::ids(&a)
                    .ok()
                    .and_then(|(vid, _)| self.receiver.rebuild_progress(&vid))
                    .map(|p| api::RebuildStatus {
                        bytes_total: p.bytes_total,
                        bytes_done: p.bytes_done,
                        percent: p.percent(),
                    });
            }
        }
        Some(st)
    }

    async fn close(&self, replica_id: &str) -> Result<(), RuntimeError> {
        let mut m = self.replicas.lock().await;
        let Some(mut l) = m.remove(replica_id) else {
            return Ok(());
        };
        if let Some(a) = l.applied.clone() {
            self.set_role(&a.volume, None);
            self.stop_primary(&a.volume, &mut l).await;
            if l.hosted
                && let Ok((vid, _)) = Self::ids(&a)
            {
                self.receiver.unhost(&vid);
            }
        }
        tracing::info!(replica = replica_id, path = %l.path.display(), "replica closed");
        Ok(())
    }

    async fn delete(&self, replica_id: &str, dir: &Path) -> Result<(), RuntimeError> {
        self.close(replica_id).await?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(replica_id, format!("remove {}: {e}", dir.display()))),
        }
        if let Some(parent) = dir.parent() {
            // The volume directory goes when its last replica does; not empty is fine.
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }
}

/// The NBD backend of a local primary: reads from the local volume, writes append to it
/// (and so reach the replication driver through the append observer), and FLUSH is the
/// replication durability gate (local fsync plus every committed in-sync member).
pub struct ReplicatedBackend {
    vol: Arc<Volume>,
    handle: Arc<PrimaryHandle>,
    rt: tokio::runtime::Handle,
    fenced: AtomicBool,
    fence: IoFence,
    /// The lowest epoch at which this primary may serve: raised when a peer reports a
    /// newer epoch or the API server assigns one (or `u64::MAX` when it no longer
    /// names this replica primary). The primary is fenced until an assignment at that
    /// epoch has been applied, so a deposed primary never serves a read after it could
    /// have learnt of its demotion.
    min_epoch: Arc<AtomicU64>,
    proof_window: std::time::Duration,
    /// A promoted primary serves from this moment on: the previous primary's member
    /// proof may rest on heartbeats this replica answered until then.
    serve_after: std::time::Instant,
}

impl ReplicatedBackend {
    fn check_writable(&self) -> Result<(), BackendError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(BackendError::Io(
                "this replica is no longer the primary".into(),
            ));
        }
        let wanted = self.min_epoch.load(Ordering::Acquire);
        let mine = self.vol.epoch().0;
        if mine < wanted {
            return Err(BackendError::Io(if wanted == u64::MAX {
                format!("this replica is no longer assigned primary (it serves epoch {mine})")
            } else {
                format!("epoch {wanted} exists; this primary at epoch {mine} is fenced")
            }));
        }
        if !self.has_proof() {
            return Err(BackendError::Io(
                "the node's Lease is not fresh and not every in-sync member answered a recent heartbeat; IO is fenced".into(),
            ));
        }
        let now = std::time::Instant::now();
        if now < self.serve_after {
            return Err(BackendError::Io(format!(
                "promoted primary waits {} ms more for the previous primary's member proof to run out",
                self.serve_after.duration_since(now).as_millis()
            )));
        }
        Ok(())
    }

    /// A fresh Lease renewal, or a fresh member proof (docs/design.md invariant 3).
    fn has_proof(&self) -> bool {
        (self.fence)()
            || self
                .handle
                .member_proof_age()
                .is_some_and(|age| age < self.proof_window)
    }
}

impl BlockBackend for ReplicatedBackend {
    fn size_bytes(&self) -> u64 {
        self.vol.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check_writable()?;
        BlockBackend::read(&*self.vol, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.check_writable()?;
        BlockBackend::write(&*self.vol, offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)?;
        self.flush()
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        if let Err(e) = self.check_writable() {
            return Some(Err(e));
        }
        BlockBackend::try_write(&*self.vol, offset, data)
    }
    fn runs_inline(&self) -> bool {
        true
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.check_writable()?;
        // Called on the NBD server's blocking pool or in `block_in_place`, never plainly
        // on a runtime worker. Without peers the local fsync is the whole gate and runs
        // right here.
        if self.handle.try_flush_local().is_none() {
            self.rt
                .block_on(self.handle.flush())
                .map(drop)
                .map_err(|e| BackendError::Io(format!("replicated flush: {e}")))?;
        }
        // A flush can wait for members longer than the Lease lasts. Once the Lease has
        // run out another member may be primary, so an ack now would come from a
        // deposed primary: check the fence again before acknowledging.
        self.check_writable()
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.check_writable()?;
        BlockBackend::trim(&*self.vol, offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.check_writable()?;
        BlockBackend::write_zeroes(&*self.vol, offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}
