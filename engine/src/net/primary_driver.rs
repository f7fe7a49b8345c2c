//! The primary driver: runs one `PrimaryCore` per primary volume on a tokio task, over the
//! node's `Transport`, and performs the core's actions (dial, send, local fsync, flush
//! replies, reports).
//!
//! The append observer hands entries to the driver without blocking the writer; if its
//! queue is full the driver re-reads the missing entries from the WAL, in order. Entries
//! the WAL recycled before they were re-read are reported to the core
//! (`Input::AppendsLost`), which escalates every replica to a rebuild; a FLUSH is
//! requested at the volume's head, so it is never acknowledged for entries that were not
//! shipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::NetConfig;
use super::link::{Inbox, SharedLink, Transport};
use crate::replication::ConnId;
use crate::replication::plan::{RebuildProgress, RecoveryEvent};
use crate::replication::primary::{
    Action, FlushId, Input, Peer, PrimaryConfig, PrimaryCore, RecoveryBytes, ReplicaState, Report,
};
use crate::replication::storage::ReplicaLog;
use crate::replication::types::{Epoch, Generation, Lsn, ReplicaId, VolumeId, WalEntry};
use crate::replication::volume_log::VolumeLog;
use crate::storage::volume::Volume;

enum Cmd {
    Input(Input),
    Attach(ConnId, Arc<SharedLink>),
    Flush(oneshot::Sender<Result<Lsn, String>>),
    Snapshot(oneshot::Sender<PrimarySnapshot>),
}

/// What the driver reports when asked.
#[derive(Debug, Clone, Default)]
pub struct PrimarySnapshot {
    pub replicas: BTreeMap<ReplicaId, (ReplicaState, Lsn)>,
    pub holds: usize,
    pub retention_floor: Option<Lsn>,
    pub head: Lsn,
    pub acked_high: Lsn,
    pub fenced: Option<Epoch>,
    pub events: Vec<RecoveryEvent>,
    pub reports: Vec<Report>,
    /// Bytes each replica was sent by catch-ups and rebuilds since this primary started.
    pub recovery_bytes: BTreeMap<ReplicaId, RecoveryBytes>,
    /// Base-copy progress of each replica being rebuilt.
    pub rebuild_progress: BTreeMap<ReplicaId, RebuildProgress>,
}

/// Lets a flush skip the driver while the gate needs only the local fsync (no peers):
/// at RF1 a flush is then one group-committed fdatasync on the caller's thread instead
/// of a round trip through the driver task and the blocking pool.
///
/// Protocol (all SeqCst, so each side sees the other's write): a flusher checks `open`,
/// fsyncs, raises `acked`, and acknowledges only if `open` still holds; otherwise it
/// asks the driver. Before any input that could add a member the driver closes `open`
/// and feeds `acked` to the core (`Input::AckedLocally`), so a member is only granted
/// InSync once it holds everything acknowledged this way; after each step it reopens
/// `open` if `PrimaryCore::gate_is_local_only` holds.
#[derive(Default)]
struct LocalGate {
    open: AtomicBool,
    acked: AtomicU64,
}

/// The driver's latest member proof (see `PrimaryCore::member_proof_ms`), readable
/// without a round trip to the driver: IO checks it on every request.
struct MemberProof {
    start: Instant,
    /// Proof time in the driver's milliseconds plus one; 0 while there is none.
    at_ms_plus_one: AtomicU64,
}

impl MemberProof {
    fn publish(&self, proof_ms: Option<u64>) {
        self.at_ms_plus_one.store(
            proof_ms.map_or(0, |m| m.saturating_add(1)),
            Ordering::Release,
        );
    }

    fn age(&self) -> Option<Duration> {
        let v = self.at_ms_plus_one.load(Ordering::Acquire);
        let at = self.start + Duration::from_millis(v.checked_sub(1)?);
        Some(Instant::now().saturating_duration_since(at))
    }
}

/// Handle to a running primary driver.
pub struct PrimaryHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
    vol: Arc<Volume>,
    reports: tokio::sync::Mutex<mpsc::Receiver<Report>>,
    local_gate: Arc<LocalGate>,
    proof: Arc<MemberProof>,
}

impl PrimaryHandle {
    /// How old the member proof is: every committed in-sync member answered a heartbeat
    /// at this primary's epoch that was sent that long ago. `None` while some member has
    /// not answered (or the primary is fenced or failed). With no other committed
    /// member the proof is always fresh.
    pub fn member_proof_age(&self) -> Option<Duration> {
        self.proof.age()
    }

    /// Group-committed flush: resolves with the acked LSN, or the reason it failed.
    pub async fn flush(&self) -> Result<Lsn, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .map_err(|_| "replication driver stopped".to_string())?;
        rx.await
            .map_err(|_| "replication driver stopped".to_string())?
    }

    /// Blocking flush for a primary whose gate is local-only (no peers, nothing
    /// committed): fsyncs the volume on the calling thread. `None` means the driver must
    /// decide (peers exist, the gate changed meanwhile, or the fsync failed and the
    /// driver must see the failure); call [`PrimaryHandle::flush`] then. Never call it
    /// on a runtime worker: it blocks for an fdatasync.
    pub fn try_flush_local(&self) -> Option<Lsn> {
        let g = &self.local_gate;
        if !g.open.load(Ordering::SeqCst) {
            return None;
        }
        let lsn = self.vol.flush().ok()?;
        g.acked.fetch_max(lsn.0, Ordering::SeqCst);
        g.open.load(Ordering::SeqCst).then_some(lsn)
    }

    pub fn assign_peers(&self, peers: Vec<Peer>) {
        let _ = self.tx.send(Cmd::Input(Input::PeersAssigned(peers)));
    }

    pub fn commit_in_sync_set(&self, generation: Generation, members: Vec<ReplicaId>) {
        let _ = self.tx.send(Cmd::Input(Input::InSyncSetCommitted {
            generation,
            members,
        }));
    }

    pub fn request_rebuild(&self, id: ReplicaId) {
        let _ = self.tx.send(Cmd::Input(Input::RebuildRequested(id)));
    }

    /// The control plane re-asserted this primary at a newer epoch (persists it first).
    pub fn change_epoch(&self, e: Epoch) -> Result<(), String> {
        self.vol.set_epoch(e).map_err(|x| x.to_string())?;
        let _ = self.tx.send(Cmd::Input(Input::EpochChanged(e)));
        Ok(())
    }

    /// Next report for the control plane (state changes, unreachable or in-sync members,
    /// NeedsRebuild, fencing). `None` once the driver stopped.
    pub async fn next_report(&self) -> Option<Report> {
        self.reports.lock().await.recv().await
    }

    pub async fn snapshot(&self) -> Option<PrimarySnapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Snapshot(tx)).ok()?;
        rx.await.ok()
    }

    /// Stops the driver and lets go of the volume.
    pub fn stop(self) {
        self.halt();
    }

    /// Stops the driver now, also while other holders of the handle (connections still
    /// draining on a removed export) keep it: nothing is shipped or retained on the
    /// volume's behalf after this.
    pub fn halt(&self) {
        self.vol.set_append_observer(None);
        self.task.abort();
    }
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Driver {
    /// The term ends with the driver: the WAL it held for lagging peers is free again.
    /// This runs after its last step, so no floor set by a step outlives the term.
    fn drop(&mut self) {
        self.log.release_retention_floor();
    }
}

struct Driver {
    core: PrimaryCore,
    log: VolumeLog,
    cfg: NetConfig,
    start: Instant,
    tx: mpsc::UnboundedSender<Cmd>,
    conns: HashMap<ConnId, Arc<SharedLink>>,
    transport: Arc<Transport>,
    volume: VolumeId,
    flushes: HashMap<FlushId, oneshot::Sender<Result<Lsn, String>>>,
    next_flush: u64,
    events: VecDeque<RecoveryEvent>,
    reports: VecDeque<Report>,
    report_tx: mpsc::Sender<Report>,
    overflow: Arc<AtomicBool>,
    local_gate: Arc<LocalGate>,
    proof: Arc<MemberProof>,
}

/// Starts the primary driver for `vol` (at `epoch`, already persisted) and attaches the
/// volume's append observer to it.
#[allow(clippy::too_many_arguments)]
pub fn spawn_primary(
    vol: Arc<Volume>,
    volume: VolumeId,
    self_id: ReplicaId,
    pcfg: PrimaryConfig,
    generation: Generation,
    committed: Vec<ReplicaId>,
    peers: Vec<Peer>,
    transport: Arc<Transport>,
) -> PrimaryHandle {
    let cfg = transport.cfg().clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let (report_tx, report_rx) = mpsc::channel::<Report>(cfg.events_kept_max.max(1));
    let (atx, mut arx) = mpsc::channel::<WalEntry>(cfg.append_queue_entries_max.max(1));
    let overflow = Arc::new(AtomicBool::new(false));
    let ov = overflow.clone();
    vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
        if atx.try_send(e.clone()).is_err() {
            ov.store(true, Ordering::Release);
        }
    })));
    let pcfg = pcfg.fit_to_wal(vol.stats().wal_size_bytes);
    let log = VolumeLog::new(vol.clone());
    let epoch = vol.epoch();
    let core = PrimaryCore::new(
        volume.clone(),
        self_id,
        epoch,
        pcfg,
        generation,
        committed,
        &log,
    );
    let local_gate = Arc::new(LocalGate::default());
    let start = Instant::now();
    let proof = Arc::new(MemberProof {
        start,
        at_ms_plus_one: AtomicU64::new(0),
    });
    let mut d = Driver {
        core,
        log,
        cfg,
        start,
        tx: tx.clone(),
        conns: HashMap::new(),
        transport,
        volume,
        flushes: HashMap::new(),
        next_flush: 0,
        events: VecDeque::new(),
        reports: VecDeque::new(),
        report_tx,
        overflow,
        local_gate: local_gate.clone(),
        proof: proof.clone(),
    };
    let task = tokio::spawn(async move {
        d.step(Input::PeersAssigned(peers));
        let mut iv = tokio::time::interval(Duration::from_millis(d.cfg.tick_interval_ms.max(1)));
        loop {
            tokio::select! {
                biased;
                e = arx.recv() => match e {
                    Some(e) => d.step(Input::Appended(e)),
                    None => break,
                },
                c = rx.recv() => match c {
                    Some(c) => d.on_cmd(c),
                    None => break,
                },
                _ = iv.tick() => {
                    d.resync();
                    d.step(Input::Tick);
                }
            }
        }
    });
    PrimaryHandle {
        tx,
        task,
        vol,
        reports: tokio::sync::Mutex::new(report_rx),
        local_gate,
        proof,
    }
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Feeds entries the observer could not queue, re-read from the WAL in order. Entries
    /// already recycled are reported as lost (the core escalates every replica and
    /// resumes after them); any other read error is retried at the next tick.
    fn resync(&mut self) {
        if !self.overflow.swap(false, Ordering::AcqRel) && self.log.head_lsn() <= self.core.head() {
            return;
        }
        loop {
            let head = self.core.head();
            let from = head.next();
            if from > self.log.head_lsn() {
                break;
            }
            match self.log.scan_from(from, 1024) {
                Ok(batch) if !batch.is_empty() => {
                    for e in batch {
                        self.step(Input::Appended(e));
                    }
                }
                Ok(_) => break,
                Err(crate::replication::Error::Recycled { retained_start, .. }) => {
                    self.step(Input::AppendsLost {
                        resume_after: Lsn(retained_start.0.saturating_sub(1)),
                    });
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, %from, error = %e, "re-reading appended entries failed; retrying");
                    break;
                }
            }
            if self.core.head() <= head {
                // Fenced, failed, or nothing moved: stop rather than spin.
                break;
            }
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Input(i) => self.step(i),
            Cmd::Attach(conn, link) => {
                self.conns.insert(conn, link);
            }
            Cmd::Flush(reply) => {
                self.resync();
                self.next_flush += 1;
                let id = FlushId(self.next_flush);
                self.flushes.insert(id, reply);
                self.step(Input::FlushRequested(id));
            }
            Cmd::Snapshot(reply) => {
                let mut snap = PrimarySnapshot {
                    holds: self.core.pinner().len(),
                    retention_floor: self.core.retention_floor(),
                    head: self.core.head(),
                    acked_high: self.core.acked_high(),
                    fenced: self.core.fenced(),
                    events: self.events.iter().cloned().collect(),
                    reports: self.reports.iter().cloned().collect(),
                    recovery_bytes: self.core.recovery_bytes().clone(),
                    rebuild_progress: self.core.rebuild_progress(),
                    ..PrimarySnapshot::default()
                };
                for (id, st, fl) in self.core.replicas() {
                    snap.replicas.insert(id, (st, fl));
                }
                let _ = reply.send(snap);
            }
        }
    }

    fn step(&mut self, input: Input) {
        // Appends, local fsync results and flush requests cannot add a member; every
        // other input might, so it first closes the local gate and absorbs its acks
        // (see `LocalGate`).
        if !matches!(
            input,
            Input::Appended(_) | Input::LocalFsyncDone { .. } | Input::FlushRequested(_)
        ) {
            self.local_gate.open.store(false, Ordering::SeqCst);
            let acked = Lsn(self.local_gate.acked.load(Ordering::SeqCst));
            if acked > self.core.acked_high() {
                self.step_core(Input::AckedLocally { lsn: acked });
            }
        }
        self.step_core(input);
        let local_only = self.core.gate_is_local_only();
        self.local_gate.open.store(local_only, Ordering::SeqCst);
        self.proof.publish(self.core.member_proof_ms());
    }

    fn step_core(&mut self, input: Input) {
        let now = self.now_ms();
        // These inputs only queue sends and update counters: no log read, no sync. They
        // run inline; `block_in_place` would hand this worker's queue to another thread
        // on every append.
        let actions = if matches!(
            input,
            Input::Appended(_)
                | Input::FlushRequested(_)
                | Input::LocalFsyncDone { .. }
                | Input::AckedLocally { .. }
        ) {
            self.core.step(now, input, &mut self.log)
        } else {
            tokio::task::block_in_place(|| self.core.step(now, input, &mut self.log))
        };
        // Before any reply goes out: a flush acknowledged by this step is checked
        // against the proof this step established (a commit that left the primary alone
        // in its set), not the one before it.
        self.proof.publish(self.core.member_proof_ms());
        for e in self.core.take_events() {
            if self.events.len() >= self.cfg.events_kept_max {
                self.events.pop_front();
            }
            self.events.push_back(e);
        }
        for a in actions {
            self.act(a);
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Connect {
                conn,
                endpoint,
                replica,
            } => {
                let transport = self.transport.clone();
                let tx = self.tx.clone();
                let volume = self.volume.clone();
                tokio::spawn(async move {
                    match transport.link(endpoint.addr()).await {
                        Ok(link) if link.subscribe(volume, conn, inbox(tx.clone())) => {
                            let _ = tx.send(Cmd::Attach(conn, link));
                            let _ = tx.send(Cmd::Input(Input::Connected(conn)));
                        }
                        Ok(_) => {
                            let _ = tx.send(Cmd::Input(Input::ConnectFailed(conn)));
                        }
                        Err(e) => {
                            tracing::warn!(%replica, %endpoint, error = %e, "replica connection failed");
                            let _ = tx.send(Cmd::Input(Input::ConnectFailed(conn)));
                        }
                    }
                });
            }
            Action::Send { conn, msg } => {
                if let Some(link) = self.conns.get(&conn)
                    && !link.send(msg)
                {
                    // A full or dead link ends every session on it; each hears ConnectionLost.
                    link.fail();
                    self.close(conn);
                    let _ = self.tx.send(Cmd::Input(Input::ConnectionLost(conn)));
                }
            }
            Action::Close { conn, reason } => {
                tracing::debug!(conn = conn.0, %reason, "closing replica connection");
                self.close(conn);
            }
            Action::LocalFsync { .. } => {
                let vol = self.log.volume().clone();
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let input = match vol.flush() {
                        Ok(d) => Input::LocalFsyncDone { durable: d },
                        Err(e) => {
                            tracing::error!(error = %e, "local flush failed");
                            Input::LocalFsyncFailed
                        }
                    };
                    let _ = tx.send(Cmd::Input(input));
                });
            }
            Action::FlushAcked { id, lsn } => {
                if let Some(r) = self.flushes.remove(&id) {
                    let _ = r.send(Ok(lsn));
                }
            }
            Action::FlushFailed { id, reason } => {
                if let Some(r) = self.flushes.remove(&id) {
                    let _ = r.send(Err(reason));
                }
            }
            Action::Report(r) => {
                tracing::info!(report = ?r, "replication report");
                if self.reports.len() >= self.cfg.events_kept_max {
                    self.reports.pop_front();
                }
                self.reports.push_back(r.clone());
                if self.report_tx.try_send(r).is_err() {
                    tracing::debug!(
                        "report queue full or unread; dropping a report (status stays in snapshots)"
                    );
                }
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(link) = self.conns.remove(&conn) {
            link.unsubscribe(&self.volume, conn);
        }
    }
}

/// The inbox a link delivers a session's inputs to: this driver's command queue, so they
/// stay in order with the driver's own commands.
fn inbox(tx: mpsc::UnboundedSender<Cmd>) -> Inbox {
    Box::new(move |input| {
        let _ = tx.send(Cmd::Input(input));
    })
}
