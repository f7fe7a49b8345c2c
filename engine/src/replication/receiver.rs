//! Replica side of the protocol, sans-IO: applies entries strictly in LSN order (gap →
//! refuse and report, duplicate → skip), persists the highest epoch seen before acting on it
//! and refuses lower ones (so a stale primary's barriers fail), answers the reconnect
//! handshake, and answers a barrier only after everything up to its LSN is received and
//! fsynced, with a flushed LSN that never moves backwards within a session. An entry or
//! base block beyond the replica's size (an expansion it has not applied yet) is refused
//! with `BeyondSize` and leaves the replica healthy; other storage errors fail it.
//! A refused truncation ends the session on its connection: nothing the primary
//! pipelined after it (entries, barriers) is accepted there until a new handshake.
//!
//! The core does no I/O of its own: it asks for an fsync with [`ReceiverAction::Sync`]
//! and answers the barriers it covers only when the shell feeds back
//! [`ReceiverInput::Synced`]. One sync is in flight at a time; barriers that become
//! ready meanwhile wait for the next one, so a burst of barriers costs one fsync.
//! [`step_blocking`] is the shell for callers that may block: it performs each sync at
//! once, on the calling thread.
//!
//! One primary per epoch: the first primary that opens a session (resume or rebuild
//! handshake) naming its ReplicaID at epoch E owns E here; a handshake at E from another
//! ReplicaID (or from an unnamed primary) is refused with `SessionOwned`, and entries,
//! barriers, truncations and base blocks are accepted only on connections whose handshake
//! was accepted (heartbeats, which travel on a separate control connection, are answered
//! on any). The binding lives in memory: it starts again with the first handshake after
//! the replica restarts.

use std::collections::BTreeMap;

use super::ConnId;
use super::plan::RebuildProgress;
use super::storage::{AppendOutcome, ReplicaLog};
use super::types::{Epoch, Lba, Lsn, ReplicaId, VolumeId, WalEntry};
use super::wire::{BarrierStatus, Body, ErrorCode, ResumeStatus, VolumeMsg};

/// Receiver bounds.
#[derive(Debug, Clone, Copy)]
pub struct ReceiverConfig {
    /// A barrier whose LSN has not arrived within this time fails with Timeout.
    pub barrier_timeout_ms: u64,
    /// Most barriers waiting at once; more are refused with Timeout.
    pub pending_barriers_max: usize,
    /// Test-only: accept entries from an older epoch, from any connection (no binding of
    /// the session to one primary), so the simulation can prove its checker catches
    /// stale-epoch writes. Never set in production.
    pub test_knob_accept_stale_epoch: bool,
    /// Test-only: accept a handshake at the session's epoch from any primary (no
    /// binding of an epoch to the first named primary), so the simulation can prove its
    /// checker catches two primaries at one epoch. Never set in production.
    pub test_knob_no_session_binding: bool,
    /// Test-only: answer a barrier as soon as its sync is issued instead of when it is
    /// done, so the simulation can prove its checker catches acknowledgements of
    /// entries a crash can still lose. Never set in production.
    pub test_knob_ack_before_synced: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            barrier_timeout_ms: 5_000,
            pending_barriers_max: 1024,
            test_knob_accept_stale_epoch: false,
            test_knob_no_session_binding: false,
            test_knob_ack_before_synced: false,
        }
    }
}

/// Inputs to the receiver.
#[derive(Debug, Clone)]
pub enum ReceiverInput {
    Received {
        conn: ConnId,
        msg: VolumeMsg,
    },
    ConnectionLost(ConnId),
    Tick,
    /// The sync asked for by the last [`ReceiverAction::Sync`] finished: the log's
    /// durable LSN after it, or why it failed (the replica then fails).
    Synced {
        result: Result<Lsn, String>,
    },
}

/// Actions for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    Send {
        conn: ConnId,
        msg: VolumeMsg,
    },
    Close {
        conn: ConnId,
        reason: String,
    },
    /// Make every entry appended so far durable (at least through `through`), then feed
    /// back [`ReceiverInput::Synced`]. Never asked for again before that.
    Sync {
        through: Lsn,
    },
}

/// What happened, for logs, status and the simulation's checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    Applied {
        lsn: Lsn,
        msg_epoch: Epoch,
        local_epoch: Epoch,
    },
    EpochAdopted {
        from: Epoch,
        to: Epoch,
    },
    StaleRefused {
        msg_epoch: Epoch,
        local_epoch: Epoch,
    },
    GapRefused {
        expected: Lsn,
        got: Lsn,
    },
    Truncated {
        after: Lsn,
    },
    RebuildStarted {
        base_lsn: Lsn,
    },
    RebuildFinished {
        head: Lsn,
    },
    StorageFailed {
        reason: String,
    },
}

#[derive(Debug)]
struct PendingBarrier {
    conn: ConnId,
    id: u64,
    lsn: Lsn,
    deadline_ms: u64,
    epoch: Epoch,
}

#[derive(Debug)]
struct RebuildRecv {
    session: u64,
    base_lsn: Lsn,
    base_epoch: Epoch,
    blocks: u64,
    /// Base bytes the primary announced (None: a primary that does not announce them)
    /// and bytes installed so far.
    bytes_total: Option<u64>,
    bytes_done: u64,
}

/// The session's owner at `session_epoch` and the connections it was accepted on.
#[derive(Debug, Default)]
struct Binding {
    /// The primary that owns the session at that epoch (None: no named primary yet).
    owner: Option<(Epoch, ReplicaId)>,
    /// Connections whose handshake was accepted at `session_epoch`, with the primary
    /// they named.
    conns: BTreeMap<ConnId, Option<ReplicaId>>,
}

/// Replica-side core for one volume.
#[derive(Debug)]
pub struct ReceiverCore {
    volume: VolumeId,
    cfg: ReceiverConfig,
    /// Epoch of the last handshake (resume or rebuild start) - entries need one.
    session_epoch: Option<Epoch>,
    /// Which primary owns the session and on which connections (boxed: rarely touched,
    /// and it keeps the core small).
    binding: Box<Binding>,
    rebuild: Option<Box<RebuildRecv>>,
    pending: Vec<PendingBarrier>,
    /// The sync in flight: the head it was issued at. Barriers at or below it are
    /// answered when it is done (lowered by a truncation, which removes what it covered).
    syncing: Option<Lsn>,
    flushed_reported: Lsn,
    failed: Option<String>,
    events: Vec<ReceiverEvent>,
}

impl ReceiverCore {
    pub fn new(volume: VolumeId, cfg: ReceiverConfig) -> Self {
        Self {
            volume,
            cfg,
            session_epoch: None,
            binding: Box::default(),
            rebuild: None,
            pending: Vec::new(),
            syncing: None,
            flushed_reported: Lsn(0),
            failed: None,
            events: Vec::new(),
        }
    }

    pub fn take_events(&mut self) -> Vec<ReceiverEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether a barrier waits for entries or a sync still to come: the entry that
    /// completes it makes that step ask for a sync.
    pub fn barriers_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Set after a storage failure: the replica refuses everything until reopened.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn reply(&self, conn: ConnId, epoch: Epoch, body: Body) -> ReceiverAction {
        ReceiverAction::Send {
            conn,
            msg: VolumeMsg {
                volume: self.volume.clone(),
                epoch,
                body,
            },
        }
    }

    fn error(&self, conn: ConnId, epoch: Epoch, code: ErrorCode, detail: String) -> ReceiverAction {
        self.reply(
            conn,
            epoch,
            Body::Error {
                code,
                current_epoch: epoch,
                detail,
            },
        )
    }

    /// Refuses a message that needs a session `conn` does not carry at `epoch`.
    fn no_session(&self, conn: ConnId, epoch: Epoch, detail: &str) -> ReceiverAction {
        self.error(conn, epoch, ErrorCode::NoSession, detail.into())
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(volume = %self.volume, %reason, "replica storage failed");
        self.events.push(ReceiverEvent::StorageFailed {
            reason: reason.clone(),
        });
        self.failed = Some(reason);
    }

    /// Feeds one input; returns the actions to perform in order.
    pub fn step(
        &mut self,
        now_ms: u64,
        input: ReceiverInput,
        log: &mut dyn ReplicaLog,
    ) -> Vec<ReceiverAction> {
        let mut out = Vec::new();
        match input {
            ReceiverInput::Tick => self.expire_barriers(now_ms, log, &mut out),
            ReceiverInput::ConnectionLost(conn) => {
                self.pending.retain(|p| p.conn != conn);
                self.binding.conns.remove(&conn);
            }
            ReceiverInput::Received { conn, msg } => {
                self.on_message(now_ms, conn, msg, log, &mut out)
            }
            ReceiverInput::Synced { result } => self.synced(result, log, &mut out),
        }
        out
    }

    /// Checks the message's volume, the replica's health and the epoch (adopting a newer
    /// one, refusing an older one) and the handshake's owner, then hands the message to
    /// the function for its kind, at the session's epoch.
    fn on_message(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        msg: VolumeMsg,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        let local = log.epoch();
        if msg.volume != self.volume {
            out.push(ReceiverAction::Close {
                conn,
                reason: format!("message for volume {} sent to {}", msg.volume, self.volume),
            });
            return;
        }
        if let Some(reason) = &self.failed {
            out.push(self.error(conn, local, ErrorCode::StorageFailed, reason.clone()));
            return;
        }
        if msg.epoch < local && !self.cfg.test_knob_accept_stale_epoch {
            self.refuse_stale(conn, local, msg, out);
            return;
        }
        if msg.epoch > local && !self.adopt_epoch(conn, local, msg.epoch, log, out) {
            return;
        }
        let epoch = msg.epoch.max(local);
        let handshake_from = match &msg.body {
            Body::ResumeRequest { primary, .. } | Body::RebuildStart { primary, .. } => {
                Some(primary.clone())
            }
            _ => None,
        };
        if let Some(primary) = handshake_from
            && let Err(detail) = self.claim(conn, epoch, primary)
        {
            out.push(self.error(conn, epoch, ErrorCode::SessionOwned, detail));
            return;
        }
        match msg.body {
            Body::ResumeRequest { session, .. } => self.on_resume(conn, epoch, session, log, out),
            Body::Entry(entry) => self.on_entry(conn, epoch, msg.epoch, &entry, log, out),
            Body::BarrierRequest { id, lsn } => {
                let barrier = PendingBarrier {
                    conn,
                    id,
                    lsn,
                    deadline_ms: now_ms.saturating_add(self.cfg.barrier_timeout_ms),
                    epoch,
                };
                self.on_barrier(barrier, log, out)
            }
            Body::Truncate {
                after,
                expect_epoch,
                ..
            } => self.on_truncate(conn, epoch, after, expect_epoch, log, out),
            Body::CatchUpDone { .. } => {}
            Body::RebuildStart {
                session,
                base_lsn,
                base_epoch,
                base_bytes,
                ..
            } => {
                let rebuild = RebuildRecv {
                    session,
                    base_lsn,
                    base_epoch,
                    blocks: 0,
                    bytes_total: base_bytes,
                    bytes_done: 0,
                };
                self.on_rebuild_start(conn, epoch, rebuild, log, out)
            }
            Body::BaseBlock { session, lba, data } => {
                self.on_base_block(conn, epoch, session, lba, &data, log, out)
            }
            Body::BaseDone { session, blocks } => {
                self.on_base_done(conn, epoch, session, blocks, log, out)
            }
            Body::Heartbeat { seq } => {
                // Answered on any connection: heartbeats travel on a control connection
                // of their own. A primary sends them only to members in sync with it,
                // which a refused one never is here (it fences itself at the refusal).
                out.push(self.reply(conn, epoch, Body::HeartbeatAck { seq }))
            }
            Body::BarrierResponse { .. }
            | Body::ResumeResponse { .. }
            | Body::HeartbeatAck { .. }
            | Body::Error { .. } => {
                out.push(ReceiverAction::Close {
                    conn,
                    reason: "primary-bound message sent to a replica".into(),
                });
            }
        }
    }

    /// A message from an epoch older than the replica's: refused, in the answer its
    /// request expects where it expects one.
    fn refuse_stale(
        &mut self,
        conn: ConnId,
        local: Epoch,
        msg: VolumeMsg,
        out: &mut Vec<ReceiverAction>,
    ) {
        self.events.push(ReceiverEvent::StaleRefused {
            msg_epoch: msg.epoch,
            local_epoch: local,
        });
        let body = match msg.body {
            Body::BarrierRequest { id, .. } => Body::BarrierResponse {
                id,
                status: BarrierStatus::StaleEpoch,
                flushed: Lsn(0),
            },
            Body::ResumeRequest { session, .. } => Body::ResumeResponse {
                session,
                status: ResumeStatus::StaleEpoch,
                flushed: Lsn(0),
                flushed_epoch: Epoch(0),
                received: Lsn(0),
                checkpoint: Lsn(0),
                replica_epoch: local,
            },
            _ => Body::Error {
                code: ErrorCode::StaleEpoch,
                current_epoch: local,
                detail: format!("message epoch {} is older than {}", msg.epoch, local),
            },
        };
        out.push(self.reply(conn, local, body));
    }

    /// A newer epoch: persisted before anything acts on it, and it ends the session,
    /// its owner, a rebuild in progress and the barriers waiting. False (the message is
    /// refused) when it could not be persisted.
    fn adopt_epoch(
        &mut self,
        conn: ConnId,
        local: Epoch,
        epoch: Epoch,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) -> bool {
        if let Err(e) = log.set_epoch(epoch) {
            self.fail(format!("persisting epoch {epoch}: {e}"));
            out.push(self.error(conn, local, ErrorCode::StorageFailed, e.to_string()));
            return false;
        }
        self.events.push(ReceiverEvent::EpochAdopted {
            from: local,
            to: epoch,
        });
        self.session_epoch = None;
        self.binding.conns.clear();
        self.binding.owner = None;
        self.rebuild = None;
        self.pending.clear();
        true
    }

    /// The reconnect handshake: the replica's durable and received progress, or
    /// `NeedsRebuild` when an interrupted rebuild left no usable prefix.
    fn on_resume(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        session: u64,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        if log.rebuilding() {
            // An interrupted rebuild leaves no usable prefix: only a new rebuild helps.
            self.rebuild = None;
            self.session_epoch = None;
            out.push(self.reply(
                conn,
                epoch,
                Body::ResumeResponse {
                    session,
                    status: ResumeStatus::NeedsRebuild,
                    flushed: Lsn(0),
                    flushed_epoch: Epoch(0),
                    received: Lsn(0),
                    checkpoint: Lsn(0),
                    replica_epoch: log.epoch(),
                },
            ));
            return;
        }
        self.session_epoch = Some(epoch);
        let flushed = log.durable_lsn();
        out.push(self.reply(
            conn,
            epoch,
            Body::ResumeResponse {
                session,
                status: ResumeStatus::Ok,
                flushed,
                flushed_epoch: log.epoch_at(flushed).unwrap_or(Epoch(0)),
                received: log.head_lsn(),
                checkpoint: log.checkpoint_lsn(),
                replica_epoch: log.epoch(),
            },
        ));
        self.flushed_reported = flushed;
    }

    /// One entry, applied strictly in LSN order (gap → refused, duplicate → skipped).
    fn on_entry(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        msg_epoch: Epoch,
        entry: &WalEntry,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        if !self.in_session(conn, epoch) {
            out.push(self.no_session(conn, epoch, "entry before a handshake at this epoch"));
            return;
        }
        match log.append_replicated(entry) {
            Ok(AppendOutcome::Appended) => {
                self.events.push(ReceiverEvent::Applied {
                    lsn: entry.lsn,
                    msg_epoch,
                    local_epoch: log.epoch(),
                });
                self.complete_barriers(log, out);
            }
            Ok(AppendOutcome::Duplicate) => {}
            Err(super::Error::Gap { expected, got }) => {
                self.events
                    .push(ReceiverEvent::GapRefused { expected, got });
                out.push(self.error(
                    conn,
                    epoch,
                    ErrorCode::Gap,
                    format!("expected LSN {expected}, got {got}"),
                ));
            }
            Err(super::Error::BeyondSize(reason)) => {
                // An expansion this replica has not applied yet: nothing was
                // written, the storage is fine; the primary retries later.
                tracing::info!(volume = %self.volume, lsn = %entry.lsn, %reason, "entry beyond this replica's size; refused until it grows");
                out.push(self.error(conn, epoch, ErrorCode::BeyondSize, reason));
            }
            Err(e) => {
                self.fail(format!("append: {e}"));
                out.push(self.error(conn, epoch, ErrorCode::StorageFailed, e.to_string()));
            }
        }
    }

    /// A barrier waits until everything up to its LSN is received and synced.
    fn on_barrier(
        &mut self,
        barrier: PendingBarrier,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        let PendingBarrier {
            conn, id, epoch, ..
        } = barrier;
        let refused = if !self.in_session(conn, epoch) {
            Some(BarrierStatus::NoSession)
        } else if self.pending.len() >= self.cfg.pending_barriers_max {
            Some(BarrierStatus::Timeout)
        } else {
            None
        };
        if let Some(status) = refused {
            out.push(self.reply(
                conn,
                epoch,
                Body::BarrierResponse {
                    id,
                    status,
                    flushed: Lsn(0),
                },
            ));
            return;
        }
        self.pending.push(barrier);
        self.complete_barriers(log, out);
    }

    /// Drops the entries after `after` when the entry there has the epoch the primary
    /// expects; otherwise refuses, which ends the session on `conn`.
    fn on_truncate(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        after: Lsn,
        expect_epoch: Epoch,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        if !self.in_session(conn, epoch) {
            out.push(self.no_session(conn, epoch, "truncate before a handshake"));
            return;
        }
        if log.epoch_at(after) != Some(expect_epoch) {
            self.end_session_on(conn);
            out.push(self.error(
                conn,
                epoch,
                ErrorCode::TruncateRefused,
                format!("entry at {after} does not have epoch {expect_epoch}"),
            ));
            return;
        }
        match log.truncate_after(after) {
            Ok(()) => {
                self.events.push(ReceiverEvent::Truncated { after });
                // A truncation starts a new durable baseline for this session,
                // and the sync in flight no longer covers what it removed.
                self.flushed_reported = self.flushed_reported.min(after);
                self.syncing = self.syncing.map(|s| s.min(after));
            }
            Err(e) => {
                self.end_session_on(conn);
                out.push(self.error(conn, epoch, ErrorCode::TruncateRefused, e.to_string()))
            }
        }
    }

    /// The volume this core receives for.
    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    /// How far the base copy of the rebuild in progress is, when its primary announced
    /// the base's size; `None` outside a rebuild's base copy.
    pub fn rebuild_progress(&self) -> Option<RebuildProgress> {
        let rb = self.rebuild.as_ref()?;
        let total = rb.bytes_total?;
        Some(RebuildProgress {
            bytes_done: rb.bytes_done,
            bytes_total: total.max(rb.bytes_done),
        })
    }

    /// The rebuild handshake: the log starts over from a base the primary streams.
    fn on_rebuild_start(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        rebuild: RebuildRecv,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        if let Err(e) = log.begin_rebuild() {
            out.push(self.error(conn, epoch, ErrorCode::RebuildFailed, e.to_string()));
            return;
        }
        self.events.push(ReceiverEvent::RebuildStarted {
            base_lsn: rebuild.base_lsn,
        });
        self.session_epoch = Some(epoch);
        self.flushed_reported = Lsn(0);
        self.syncing = self.syncing.map(|_| Lsn(0));
        self.rebuild = Some(Box::new(rebuild));
    }

    /// One block of the rebuild's base, accepted only inside that rebuild's session.
    #[allow(clippy::too_many_arguments)]
    fn on_base_block(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        session: u64,
        lba: Lba,
        data: &[u8],
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        let in_session = self.in_session(conn, epoch);
        let Some(rb) = self
            .rebuild
            .as_mut()
            .filter(|r| r.session == session && in_session)
        else {
            out.push(self.no_session(conn, epoch, "base block without a rebuild"));
            return;
        };
        rb.blocks += 1;
        rb.bytes_done += data.len() as u64;
        if let Err(e) = log.install_base_block(lba, data) {
            self.rebuild = None;
            let code = match e {
                super::Error::BeyondSize(_) => ErrorCode::BeyondSize,
                _ => ErrorCode::RebuildFailed,
            };
            out.push(self.error(conn, epoch, code, e.to_string()));
        }
    }

    /// The end of the base: finishes the rebuild when every block arrived.
    fn on_base_done(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        session: u64,
        blocks: u64,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        let in_session = self.in_session(conn, epoch);
        let Some(rb) = self.rebuild.take_if(|r| r.session == session && in_session) else {
            out.push(self.no_session(conn, epoch, "base done without a rebuild"));
            return;
        };
        if rb.blocks != blocks {
            out.push(self.error(
                conn,
                epoch,
                ErrorCode::RebuildFailed,
                format!("received {} base blocks, primary sent {blocks}", rb.blocks),
            ));
            return;
        }
        // The tail is replayed after this, so live WAL always wins over the base.
        match log.finish_rebuild(rb.base_lsn, rb.base_epoch) {
            Ok(()) => {
                self.flushed_reported = log.durable_lsn();
                self.events.push(ReceiverEvent::RebuildFinished {
                    head: log.head_lsn(),
                })
            }
            Err(e) => out.push(self.error(conn, epoch, ErrorCode::RebuildFailed, e.to_string())),
        }
    }

    /// A refused truncation ends the session on `conn`: the entries and the barrier the
    /// primary sent after it assume the truncation happened, and would land on top of a
    /// suffix that diverged from the primary's history (a new handshake is needed).
    fn end_session_on(&mut self, conn: ConnId) {
        self.binding.conns.remove(&conn);
        self.pending.retain(|p| p.conn != conn);
    }

    /// Whether `conn` carries the accepted session at `epoch`.
    fn in_session(&self, conn: ConnId, epoch: Epoch) -> bool {
        self.session_epoch == Some(epoch)
            && (self.binding.conns.contains_key(&conn) || self.cfg.test_knob_accept_stale_epoch)
    }

    /// A handshake on `conn` at `epoch` from `primary`: accepted (and `conn` joins the
    /// session) unless another primary owns `epoch` here. The first named primary at an
    /// epoch becomes its owner; connections of anyone else are dropped from the session.
    fn claim(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        primary: Option<ReplicaId>,
    ) -> Result<(), String> {
        if self.cfg.test_knob_accept_stale_epoch {
            return Ok(());
        }
        if self.cfg.test_knob_no_session_binding {
            if self.session_epoch != Some(epoch) {
                self.binding.conns.clear();
            }
            self.binding.conns.insert(conn, primary);
            return Ok(());
        }
        match (&self.binding.owner, &primary) {
            (Some((e, owner)), _) if *e == epoch => {
                if primary.as_ref() != Some(owner) {
                    let who = primary
                        .as_ref()
                        .map_or("an unnamed primary", |p| p.as_str());
                    tracing::warn!(volume = %self.volume, %epoch, %owner, refused = who, "a second primary at one epoch refused");
                    return Err(format!(
                        "epoch {epoch} of volume {} is owned here by primary {owner}; refused {who}",
                        self.volume
                    ));
                }
            }
            (_, Some(p)) => {
                self.binding.owner = Some((epoch, p.clone()));
                self.binding
                    .conns
                    .retain(|_, named| named.as_ref() == Some(p));
            }
            (_, None) => {}
        }
        if self.session_epoch != Some(epoch) {
            self.binding.conns.clear();
        }
        self.binding.conns.insert(conn, primary);
        Ok(())
    }

    /// Asks for a sync when a barrier's entries have all arrived and none is in flight.
    fn complete_barriers(&mut self, log: &dyn ReplicaLog, out: &mut Vec<ReceiverAction>) {
        let head = log.head_lsn();
        if self.syncing.is_some() || !self.pending.iter().any(|p| p.lsn <= head) {
            return;
        }
        self.syncing = Some(head);
        out.push(ReceiverAction::Sync { through: head });
        if self.cfg.test_knob_ack_before_synced {
            self.answer_covered(head, Ok(head), out);
        }
    }

    /// The sync in flight finished: answers the barriers it covers, then asks for the
    /// next one if more barriers became ready meanwhile. A failed fsync fails the replica
    /// even when no sync was in flight: what it should have persisted may be lost.
    fn synced(
        &mut self,
        result: Result<Lsn, String>,
        log: &dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        if let Err(e) = &result {
            self.fail(format!("fsync: {e}"));
        }
        let Some(covered) = self.syncing.take() else {
            return;
        };
        self.answer_covered(covered, result, out);
        self.complete_barriers(log, out);
    }

    /// Answers the barriers at or below `covered` with the sync's result.
    fn answer_covered(
        &mut self,
        covered: Lsn,
        result: Result<Lsn, String>,
        out: &mut Vec<ReceiverAction>,
    ) {
        let ready = self.take_pending(|p| p.lsn <= covered);
        let (status, flushed) = match result {
            Ok(durable) => {
                // Reported progress never moves backwards.
                self.flushed_reported = self.flushed_reported.max(durable);
                (BarrierStatus::Ok, self.flushed_reported)
            }
            Err(_) => (BarrierStatus::FsyncFailed, Lsn(0)),
        };
        for p in ready {
            out.push(self.answer(&p, status, flushed));
        }
    }

    /// Removes and returns the waiting barriers `done` selects.
    fn take_pending(&mut self, done: impl Fn(&PendingBarrier) -> bool) -> Vec<PendingBarrier> {
        let (taken, rest) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| done(p));
        self.pending = rest;
        taken
    }

    fn answer(&self, p: &PendingBarrier, status: BarrierStatus, flushed: Lsn) -> ReceiverAction {
        let body = Body::BarrierResponse {
            id: p.id,
            status,
            flushed,
        };
        self.reply(p.conn, p.epoch, body)
    }

    fn expire_barriers(
        &mut self,
        now_ms: u64,
        log: &mut dyn ReplicaLog,
        out: &mut Vec<ReceiverAction>,
    ) {
        self.complete_barriers(log, out);
        for p in self.take_pending(|p| now_ms >= p.deadline_ms) {
            out.push(self.answer(&p, BarrierStatus::Timeout, Lsn(0)));
        }
    }
}

/// Runs one input through `core` and performs every sync it asks for at once, on the
/// calling thread, feeding each result back: the shell for callers that may block.
/// Returns the other actions in order (a barrier's answer where its sync was asked for).
pub fn step_blocking(
    core: &mut ReceiverCore,
    now_ms: u64,
    input: ReceiverInput,
    log: &mut dyn ReplicaLog,
) -> Vec<ReceiverAction> {
    let mut out = Vec::new();
    let mut todo = core.step(now_ms, input, log);
    todo.reverse();
    while let Some(a) = todo.pop() {
        match a {
            ReceiverAction::Sync { .. } => {
                let result = log.sync().map_err(|e| e.to_string());
                let more = core.step(now_ms, ReceiverInput::Synced { result }, log);
                todo.extend(more.into_iter().rev());
            }
            a => out.push(a),
        }
    }
    out
}
