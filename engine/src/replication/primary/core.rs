//! `PrimaryCore::step` and the protocol around it: control-plane inputs, connections,
//! handshakes, catch-up and rebuild through plans, ticks, and retention holds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::sender::{Exec, Sender};
use super::{Action, Input, Peer, PrimaryConfig, PrimaryCore, RecoveryBytes, ReplicaState, Report};
use crate::replication::ConnId;
use crate::replication::plan::{
    self, CatchUpBudget, CatchUpExec, EventKind, HandshakeReply, Outcome, RebuildExec,
    RebuildProgress, RecoveryEvent, RetainedHistory,
};
use crate::replication::retention::Pinner;
use crate::replication::storage::ReplicaLog;
use crate::replication::types::{
    Endpoint, Epoch, Generation, Lsn, ReplicaId, VolumeId, WalEntry, entry_bytes,
};
use crate::replication::wire::{BarrierStatus, Body, ErrorCode, ResumeStatus, VolumeMsg};

/// Which recovery a body was sent for.
#[derive(Debug, Clone, Copy)]
enum RecoveryKind {
    CatchUp,
    Rebuild,
}

/// Bytes of `b` that count as recovery traffic: an entry's encoded size, a base block's
/// data.
fn recovery_body_bytes(b: &Body) -> u64 {
    match b {
        Body::Entry(e) => entry_bytes(e),
        Body::BaseBlock { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// Heartbeats whose send time is kept for the member proof; an answer to an older one
/// proves nothing newer than the proofs already held.
const HEARTBEATS_TRACKED: usize = 16;

/// The flushed LSN the gate may count after a handshake that reported `from`. A replica
/// asked to truncate has not proven yet that its entries up to the truncation point match
/// this primary's (it may refuse); until its next barrier answers, only what was already
/// trusted in this primary's epoch, cut at the truncation point, counts.
fn trusted_flushed(current: Lsn, from: Lsn, truncate: Option<&plan::Truncation>) -> Lsn {
    match truncate {
        None => from,
        Some(t) => current.min(t.after),
    }
}

fn state_name(s: ReplicaState) -> String {
    format!("{s:?}")
}

impl PrimaryCore {
    /// A primary at `epoch` (already persisted) with the committed set it was given.
    pub fn new(
        volume: VolumeId,
        self_id: ReplicaId,
        epoch: Epoch,
        cfg: PrimaryConfig,
        generation: Generation,
        committed: Vec<ReplicaId>,
        log: &dyn ReplicaLog,
    ) -> Self {
        let committed: BTreeSet<ReplicaId> =
            committed.into_iter().filter(|m| *m != self_id).collect();
        Self {
            volume,
            self_id,
            epoch,
            cfg,
            senders: BTreeMap::new(),
            generation,
            committed,
            head: log.head_lsn(),
            local_durable: log.durable_lsn(),
            fsync_inflight: false,
            pending: VecDeque::new(),
            acked_high: Lsn(0),
            pinner: Pinner::new(),
            floor: None,
            floor_applied: false,
            bytes: VecDeque::new(),
            bytes_total: 0,
            next_conn: 0,
            next_session: 0,
            next_barrier: 0,
            heartbeat_seq: 0,
            last_heartbeat_ms: 0,
            heartbeats_sent: VecDeque::new(),
            fenced: None,
            disk_failed: false,
            events: Vec::new(),
            recovery_sent: BTreeMap::new(),
            out: Vec::new(),
            now: 0,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn fenced(&self) -> Option<Epoch> {
        self.fenced
    }
    pub fn head(&self) -> Lsn {
        self.head
    }
    pub fn acked_high(&self) -> Lsn {
        self.acked_high
    }
    pub fn state_of(&self, id: &ReplicaId) -> Option<ReplicaState> {
        self.senders.get(id).map(|s| s.state)
    }
    pub fn flushed_of(&self, id: &ReplicaId) -> Option<Lsn> {
        self.senders.get(id).map(|s| s.flushed)
    }
    /// Every replica with its state and known durable progress.
    pub fn replicas(&self) -> Vec<(ReplicaId, ReplicaState, Lsn)> {
        self.senders
            .values()
            .map(|s| (s.id.clone(), s.state, s.flushed))
            .collect()
    }
    /// Bytes shipped to each replica by catch-ups and rebuilds since this core was
    /// created; replicas never recovered by it are absent.
    pub fn recovery_bytes(&self) -> &BTreeMap<ReplicaId, RecoveryBytes> {
        &self.recovery_sent
    }
    /// The base-copy progress of every replica being rebuilt.
    pub fn rebuild_progress(&self) -> BTreeMap<ReplicaId, RebuildProgress> {
        self.senders
            .values()
            .filter_map(|s| match &s.exec {
                Some(Exec::Rebuild(r)) if s.state == ReplicaState::Rebuilding => {
                    Some((s.id.clone(), r.progress()))
                }
                _ => None,
            })
            .collect()
    }
    pub fn is_counted(&self, id: &ReplicaId) -> bool {
        self.committed.contains(id) || self.senders.get(id).is_some_and(|s| s.counting)
    }
    pub fn pinner(&self) -> &Pinner {
        &self.pinner
    }
    pub fn retention_floor(&self) -> Option<Lsn> {
        self.floor
    }
    pub fn pending_flushes(&self) -> usize {
        self.pending.len()
    }
    /// Structured recovery log since the last call.
    pub fn take_events(&mut self) -> Vec<RecoveryEvent> {
        std::mem::take(&mut self.events)
    }

    fn event(&mut self, replica: &ReplicaId, session: u64, kind: EventKind) {
        tracing::debug!(volume = %self.volume, %replica, session, event = kind.name(), ?kind, "replication event");
        self.events.push(RecoveryEvent {
            at_ms: self.now,
            replica: replica.clone(),
            session,
            kind,
        });
    }

    fn msg(&self, body: Body) -> VolumeMsg {
        VolumeMsg {
            volume: self.volume.clone(),
            epoch: self.epoch,
            body,
        }
    }

    /// Sends `body` to `id` on `conn` as part of a `kind` recovery, counting its bytes.
    fn send_recovery(&mut self, id: &ReplicaId, kind: RecoveryKind, conn: ConnId, body: Body) {
        let bytes = recovery_body_bytes(&body);
        let sent = self.recovery_sent.entry(id.clone()).or_default();
        match kind {
            RecoveryKind::CatchUp => sent.catch_up += bytes,
            RecoveryKind::Rebuild => sent.rebuild += bytes,
        }
        self.send(conn, body);
    }

    pub(super) fn send(&mut self, conn: ConnId, mut body: Body) {
        // Handshakes name this primary: a replica binds its session at an epoch to one
        // primary and refuses a second one at the same epoch.
        if let Body::ResumeRequest { primary, .. } | Body::RebuildStart { primary, .. } = &mut body
        {
            *primary = Some(self.self_id.clone());
        }
        let m = self.msg(body);
        self.out.push(Action::Send { conn, msg: m });
    }

    /// Feeds one input at time `now_ms`; returns the actions to perform in order.
    pub fn step(&mut self, now_ms: u64, input: Input, log: &mut dyn ReplicaLog) -> Vec<Action> {
        self.now = self.now.max(now_ms);
        let acked_before = self.acked_high;
        if self.fenced.is_some() || self.disk_failed {
            if let Input::FlushRequested(id) = input {
                self.out.push(Action::FlushFailed {
                    id,
                    reason: "primary is fenced or its disk failed".into(),
                });
            }
            return std::mem::take(&mut self.out);
        }
        match input {
            Input::Tick => self.on_tick(log),
            Input::PeersAssigned(peers) => self.on_peers(peers, log),
            Input::InSyncSetCommitted {
                generation,
                members,
            } => self.on_committed(generation, members, log),
            Input::Appended(e) => self.on_appended(e),
            Input::FlushRequested(id) => {
                // The volume's head, not this core's: a flush covers every write
                // acknowledged before it, including entries this core has not been
                // handed yet (or lost), so it can never be acknowledged without them.
                let lsn = self.head.max(log.head_lsn());
                self.on_flush_requested(id, lsn);
            }
            Input::LocalFsyncDone { durable } => self.on_local_fsync_done(durable),
            Input::LocalFsyncFailed => self.on_local_fsync_failed(),
            Input::Connected(conn) => self.on_connected(conn, log),
            Input::ConnectFailed(conn) => self.on_conn_gone(conn, "connect failed", log),
            Input::ConnectionLost(conn) => self.on_conn_gone(conn, "connection lost", log),
            Input::Received { conn, msg } => self.on_received(conn, msg, log),
            Input::RebuildRequested(id) => self.on_rebuild_requested(id, log),
            Input::EpochChanged(e) => self.on_epoch_changed(e, log),
            Input::AckedLocally { lsn } => self.acked_high = self.acked_high.max(lsn),
            Input::AppendsLost { resume_after } => self.on_appends_lost(resume_after, log),
        }
        if self.fenced.is_none() && !self.disk_failed {
            self.evaluate_gate();
            self.update_retention(log);
        }
        debug_assert!(
            self.acked_high >= acked_before,
            "the acknowledged LSN never moves backwards"
        );
        std::mem::take(&mut self.out)
    }

    // ----- control plane ----------------------------------------------------------------

    fn on_committed(
        &mut self,
        generation: Generation,
        members: Vec<ReplicaId>,
        log: &mut dyn ReplicaLog,
    ) {
        if generation <= self.generation {
            return;
        }
        self.generation = generation;
        self.committed = members.into_iter().filter(|m| *m != self.self_id).collect();
        let ids: Vec<ReplicaId> = self.senders.keys().cloned().collect();
        for id in ids {
            let committed = self.committed.contains(&id);
            let gen_now = self.generation;
            let Some(s) = self.senders.get_mut(&id) else {
                continue;
            };
            if committed {
                s.counting = true;
            } else if s.counting {
                s.unreachable_reported = None;
                if s.state == ReplicaState::InSync {
                    // Still counted; ask again at the new generation.
                    let flushed = s.flushed;
                    self.out.push(Action::Report(Report::MemberInSync {
                        replica: id.clone(),
                        generation: gen_now,
                        flushed,
                    }));
                } else {
                    s.counting = false;
                }
            }
        }
        // Rebuilds refused while their replica was committed may start now.
        let deferred: Vec<ReplicaId> = self
            .senders
            .values()
            .filter(|s| s.rebuild_deferred && !self.committed.contains(&s.id))
            .map(|s| s.id.clone())
            .collect();
        for id in deferred {
            self.on_rebuild_requested(id, log);
        }
    }

    fn on_peers(&mut self, peers: Vec<Peer>, log: &mut dyn ReplicaLog) {
        let wanted: BTreeMap<ReplicaId, Endpoint> = peers
            .into_iter()
            .filter(|p| p.id != self.self_id)
            .map(|p| (p.id, p.endpoint))
            .collect();
        let gone: Vec<ReplicaId> = self
            .senders
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            self.invalidate_session(&id, "replica removed", log);
            if let Some(s) = self.senders.remove(&id)
                && let Some(h) = s.hold
            {
                self.pinner.release(h);
            }
        }
        for (id, endpoint) in wanted {
            match self.senders.get_mut(&id) {
                Some(s) if s.endpoint == endpoint => {}
                Some(s) => {
                    s.endpoint = endpoint;
                    self.invalidate_session(&id, "endpoint_changed", log);
                    if let Some(s) = self.senders.get_mut(&id)
                        && s.recoverable()
                    {
                        s.next_connect_ms = 0;
                        self.set_state(&id, ReplicaState::Disconnected);
                    }
                }
                None => {
                    let counting = self.committed.contains(&id);
                    self.senders
                        .insert(id.clone(), Sender::new(id, endpoint, counting, self.now));
                }
            }
        }
    }

    fn on_epoch_changed(&mut self, e: Epoch, log: &mut dyn ReplicaLog) {
        if e <= self.epoch {
            return;
        }
        self.epoch = e;
        let ids: Vec<ReplicaId> = self.senders.keys().cloned().collect();
        for id in ids {
            self.invalidate_session(&id, "epoch_changed", log);
            if let Some(s) = self.senders.get_mut(&id)
                && s.recoverable()
            {
                s.next_connect_ms = 0;
                self.set_state(&id, ReplicaState::Disconnected);
            }
        }
    }

    /// Ends the sender's session (connection, executor and its pins); the sender survives.
    fn invalidate_session(&mut self, id: &ReplicaId, reason: &str, log: &mut dyn ReplicaLog) {
        let now = self.now;
        let Some(s) = self.senders.get_mut(id) else {
            return;
        };
        let session = s.session;
        let (conn, exec) = s.end_session();
        let had_session = conn.is_some() || exec.is_some();
        if let Some(c) = conn {
            self.out.push(Action::Close {
                conn: c,
                reason: reason.to_string(),
            });
        }
        if had_session {
            self.event(
                id,
                session,
                EventKind::SessionInvalidated {
                    reason: reason.to_string(),
                },
            );
        }
        if let Some(exec) = exec {
            let plan = match exec {
                Exec::CatchUp(c) => c.into_plan(),
                Exec::Rebuild(r) => r.into_plan(),
            };
            plan::release_plan(plan, &mut self.pinner, log, now, &mut self.events);
        }
    }

    fn fence(&mut self, observed: Epoch) {
        if self.fenced.is_some() {
            return;
        }
        tracing::warn!(volume = %self.volume, epoch = %self.epoch, %observed, "primary fenced by a newer epoch");
        self.fenced = Some(observed);
        self.fail_all_flushes("primary fenced by a newer epoch");
        let conns: Vec<ConnId> = self
            .senders
            .values_mut()
            .filter_map(Sender::disconnect)
            .collect();
        for c in conns {
            self.out.push(Action::Close {
                conn: c,
                reason: "fenced".into(),
            });
        }
        self.out.push(Action::Report(Report::Fenced { observed }));
    }

    fn set_state(&mut self, id: &ReplicaId, to: ReplicaState) {
        let Some(s) = self.senders.get_mut(id) else {
            return;
        };
        let from = s.state;
        if from == to {
            return;
        }
        s.state = to;
        let (session, flushed) = (s.session, s.flushed);
        self.event(
            id,
            session,
            EventKind::StateChanged {
                from: state_name(from),
                to: state_name(to),
            },
        );
        self.out.push(Action::Report(Report::StateChanged {
            replica: id.clone(),
            state: to,
            flushed,
        }));
    }

    // ----- connections ------------------------------------------------------------------

    fn sender_by_conn(&self, conn: ConnId) -> Option<ReplicaId> {
        self.senders
            .values()
            .find(|s| s.conn == Some(conn))
            .map(|s| s.id.clone())
    }

    fn open_conn(&mut self, id: &ReplicaId) {
        self.next_conn += 1;
        self.next_session += 1;
        let conn = ConnId(self.next_conn);
        let session = self.next_session;
        let deadline = self.now.saturating_add(self.cfg.barrier_timeout_ms);
        let Some(s) = self.senders.get_mut(id) else {
            return;
        };
        s.begin_session(conn, session, deadline);
        let endpoint = s.endpoint.clone();
        self.event(id, session, EventKind::SessionStarted);
        self.out.push(Action::Connect {
            conn,
            replica: id.clone(),
            endpoint,
        });
    }

    fn on_connected(&mut self, conn: ConnId, log: &mut dyn ReplicaLog) {
        let Some(id) = self.sender_by_conn(conn) else {
            self.out.push(Action::Close {
                conn,
                reason: "stale connection".into(),
            });
            return;
        };
        let (state, session) = match self.senders.get_mut(&id) {
            Some(s) => {
                s.conn_up = true;
                (s.state, s.session)
            }
            None => return,
        };
        match state {
            ReplicaState::Connecting => {
                let body = Body::ResumeRequest {
                    session,
                    head: self.head,
                    retained_start: log.retained_start(),
                    primary: Some(self.self_id.clone()),
                };
                self.send(conn, body);
            }
            ReplicaState::Rebuilding => {
                if let Some(s) = self.senders.get_mut(&id)
                    && let Some(Exec::Rebuild(r)) = s.exec.as_mut()
                {
                    r.restart(self.now);
                }
                self.rebuild_step(&id, log);
            }
            _ => {}
        }
    }

    fn on_conn_gone(&mut self, conn: ConnId, reason: &str, log: &mut dyn ReplicaLog) {
        if let Some(id) = self.sender_by_conn(conn) {
            self.fail_sender(&id, reason, log);
        }
    }

    /// A transport or protocol failure: ends the session; catch-up failures count toward
    /// the retry limit; a rebuild keeps its plan and reconnects.
    fn fail_sender(&mut self, id: &ReplicaId, reason: &str, log: &mut dyn ReplicaLog) {
        let Some(s) = self.senders.get(id) else {
            return;
        };
        let state = s.state;
        let was_catchup = matches!(s.exec, Some(Exec::CatchUp(_)));
        tracing::info!(volume = %self.volume, replica = %id, ?state, reason, "replica session failed");
        if state == ReplicaState::Rebuilding {
            self.drop_rebuild_conn(id, reason);
            return;
        }
        self.invalidate_session(id, reason, log);
        let retries_max = self.cfg.catchup_retries_max;
        let backoff = self.now.saturating_add(self.cfg.reconnect_backoff_ms);
        let mut escalate = false;
        if let Some(s) = self.senders.get_mut(id) {
            s.next_connect_ms = backoff;
            if was_catchup {
                s.catchup_failures += 1;
                escalate = s.catchup_failures >= retries_max;
            }
        }
        if escalate {
            self.escalate(id, "catch-up failed catchup_retries_max times", log);
        } else if state != ReplicaState::NeedsRebuild {
            self.set_state(id, ReplicaState::Degraded);
        }
    }

    /// A rebuilding replica's connection failed: keep the plan, drop only the
    /// connection, and retry after backoff.
    fn drop_rebuild_conn(&mut self, id: &ReplicaId, reason: &str) {
        let backoff = self.now.saturating_add(self.cfg.reconnect_backoff_ms);
        if let Some(c) = self.senders.get_mut(id).and_then(|s| s.drop_conn(backoff)) {
            self.out.push(Action::Close {
                conn: c,
                reason: reason.to_string(),
            });
        }
    }

    /// The replica's node hosts no replica of this volume yet (its agent is still
    /// creating or opening it) or any more. Ends this session only and retries after
    /// `reconnect_backoff_ms`; it is not a catch-up failure (the replica's data was never
    /// reached) and a rebuild keeps its plan.
    fn replica_not_hosted(&mut self, id: &ReplicaId, detail: &str, log: &mut dyn ReplicaLog) {
        self.retry_member_later(id, "replica not hosted on its node", detail, log);
    }

    /// Ends `id`'s session without blaming its storage or history: it is retried after
    /// the reconnect backoff and nothing counts toward escalation.
    fn retry_member_later(
        &mut self,
        id: &ReplicaId,
        reason: &str,
        detail: &str,
        log: &mut dyn ReplicaLog,
    ) {
        let Some(s) = self.senders.get(id) else {
            return;
        };
        let state = s.state;
        tracing::info!(volume = %self.volume, replica = %id, ?state, detail, reason, "retrying the member later");
        if state == ReplicaState::Rebuilding {
            self.drop_rebuild_conn(id, reason);
            return;
        }
        self.invalidate_session(id, reason, log);
        let backoff = self.now.saturating_add(self.cfg.reconnect_backoff_ms);
        if let Some(s) = self.senders.get_mut(id) {
            s.next_connect_ms = backoff;
        }
        if state != ReplicaState::NeedsRebuild {
            self.set_state(id, ReplicaState::Degraded);
        }
    }

    fn escalate(&mut self, id: &ReplicaId, reason: &str, log: &mut dyn ReplicaLog) {
        self.invalidate_session(id, reason, log);
        let session = self.senders.get(id).map_or(0, |s| s.session);
        if let Some(s) = self.senders.get_mut(id) {
            if let Some(h) = s.hold.take() {
                self.pinner.release(h);
            }
            // Its history is no longer trusted: what it reported must not count toward
            // any later flush ack (it matters while it is still a committed member).
            s.forget_progress();
        }
        self.event(
            id,
            session,
            EventKind::EscalatedNeedsRebuild {
                reason: reason.to_string(),
            },
        );
        self.set_state(id, ReplicaState::NeedsRebuild);
        self.out.push(Action::Report(Report::NeedsRebuild {
            replica: id.clone(),
            reason: reason.to_string(),
        }));
    }

    // ----- messages ---------------------------------------------------------------------

    fn on_received(&mut self, conn: ConnId, msg: VolumeMsg, log: &mut dyn ReplicaLog) {
        let Some(id) = self.sender_by_conn(conn) else {
            return;
        };
        if msg.volume != self.volume {
            self.fail_sender(&id, "message for another volume", log);
            return;
        }
        if let Body::Error {
            code: ErrorCode::UnknownVolume,
            detail,
            ..
        } = &msg.body
        {
            // Says nothing about epochs: the receiver has no replica of this volume.
            self.replica_not_hosted(&id, detail, log);
            return;
        }
        if msg.epoch > self.epoch {
            self.fence(msg.epoch);
            return;
        }
        if msg.epoch < self.epoch {
            self.fail_sender(&id, "reply from an older epoch", log);
            return;
        }
        if let Some(s) = self.senders.get_mut(&id) {
            s.last_contact_ms = self.now;
        }
        match msg.body {
            Body::ResumeResponse {
                session,
                status,
                flushed,
                flushed_epoch,
                received,
                checkpoint,
                replica_epoch,
            } => {
                let ok = self
                    .senders
                    .get(&id)
                    .is_some_and(|s| s.state == ReplicaState::Connecting && s.session == session);
                if !ok {
                    return;
                }
                match status {
                    ResumeStatus::StaleEpoch => self.fence(replica_epoch),
                    ResumeStatus::NeedsRebuild => {
                        self.escalate(&id, "replica has an interrupted rebuild", log)
                    }
                    ResumeStatus::Ok => {
                        let reply = HandshakeReply {
                            flushed,
                            flushed_epoch,
                            received,
                            checkpoint,
                            replica_epoch,
                        };
                        self.on_handshake(&id, conn, reply, log);
                    }
                }
            }
            Body::BarrierResponse {
                id: bid,
                status,
                flushed,
            } => self.on_barrier_response(&id, bid, status, flushed, log),
            Body::HeartbeatAck { seq } => {
                let sent = self
                    .heartbeats_sent
                    .iter()
                    .find(|(q, _)| *q == seq)
                    .map(|(_, at)| *at);
                if let (Some(at), Some(s)) = (sent, self.senders.get_mut(&id)) {
                    s.record_heartbeat_ack(at);
                }
            }
            Body::Error {
                code,
                current_epoch,
                detail,
            } => {
                if code == ErrorCode::StaleEpoch && current_epoch > self.epoch {
                    self.fence(current_epoch);
                } else if code == ErrorCode::SessionOwned && current_epoch == self.epoch {
                    // Another primary holds this epoch on that replica (two primaries at
                    // one epoch): this one must stop, and only a later epoch may serve.
                    tracing::error!(volume = %self.volume, replica = %id, epoch = %self.epoch, detail, "another primary owns this epoch on a replica; fencing");
                    self.fence(Epoch(self.epoch.0.saturating_add(1)));
                } else if code == ErrorCode::BeyondSize {
                    // The volume grew here first; the replica has not applied the new
                    // size yet. Not a failure of the replica: retry it after the backoff,
                    // however often, without counting toward escalation.
                    self.retry_member_later(
                        &id,
                        "replica has not grown to the volume size yet",
                        &detail,
                        log,
                    );
                } else if matches!(code, ErrorCode::TruncateRefused | ErrorCode::RebuildFailed) {
                    if self.state_of(&id) == Some(ReplicaState::Rebuilding) {
                        self.invalidate_session(&id, &detail, log);
                    }
                    self.escalate(&id, &format!("replica refused: {detail}"), log);
                } else {
                    self.fail_sender(&id, &format!("replica error {code:?}: {detail}"), log);
                }
            }
            _ => self.fail_sender(&id, "replica sent a primary-only message", log),
        }
    }

    fn on_handshake(
        &mut self,
        id: &ReplicaId,
        conn: ConnId,
        reply: HandshakeReply,
        log: &mut dyn ReplicaLog,
    ) {
        let hist = RetainedHistory::from_log(log, self.epoch);
        let hist = RetainedHistory {
            head: self.head,
            ..hist
        };
        let outcome = {
            let lr: &dyn ReplicaLog = log;
            plan::classify_handshake(
                &reply,
                &hist,
                &|l| lr.epoch_at(l),
                self.cfg.catchup_entries_max,
            )
        };
        let session = self.senders.get(id).map_or(0, |s| s.session);
        self.event(
            id,
            session,
            EventKind::HandshakeClassified(format!("{outcome:?}")),
        );
        match outcome {
            Outcome::Fenced { replica_epoch } => self.fence(replica_epoch),
            Outcome::NeedsRebuild { reason } => self.escalate(id, reason, log),
            Outcome::ZeroGap { from, truncate } => {
                if let Some(s) = self.resume_at(id, conn, session, from, truncate) {
                    s.live = true;
                }
                self.send_barrier(id, self.head);
            }
            Outcome::CatchUp {
                from,
                target,
                truncate,
            } => {
                let plan =
                    match plan::plan_catch_up(id, session, from, target, &mut self.pinner, log) {
                        Ok(p) => p,
                        Err(e) => {
                            self.event(id, session, EventKind::PinFailed(e.to_string()));
                            self.fail_sender(id, "catch-up pin failed", log);
                            return;
                        }
                    };
                self.event(
                    id,
                    session,
                    EventKind::PlanCreated(format!("{:?}", plan.kind())),
                );
                let exec = match CatchUpExec::new(plan, self.now) {
                    Ok(e) => e,
                    Err(e) => {
                        self.fail_sender(id, &e.to_string(), log);
                        return;
                    }
                };
                if let Some(s) = self.resume_at(id, conn, session, from, truncate) {
                    s.exec = Some(Exec::CatchUp(exec));
                }
                self.set_state(id, ReplicaState::CatchingUp);
                self.catchup_step(id, log);
            }
        }
    }

    /// Starts a resumed session at `from`: tells the replica to drop what `truncate`
    /// names, and takes the replica's progress as known from there. Returns the
    /// replica's sender for the caller to set what follows (live, or a catch-up).
    fn resume_at(
        &mut self,
        id: &ReplicaId,
        conn: ConnId,
        session: u64,
        from: Lsn,
        truncate: Option<plan::Truncation>,
    ) -> Option<&mut Sender> {
        if let Some(t) = truncate {
            self.send(
                conn,
                Body::Truncate {
                    session,
                    after: t.after,
                    expect_epoch: t.expect_epoch,
                },
            );
        }
        let s = self.senders.get_mut(id)?;
        s.flushed = trusted_flushed(s.flushed, from, truncate.as_ref());
        s.progress_known = true;
        Some(s)
    }

    fn catchup_step(&mut self, id: &ReplicaId, log: &mut dyn ReplicaLog) {
        let batch = self.cfg.catchup_batch_entries;
        let res = match self.senders.get_mut(id).and_then(|s| s.exec.as_mut()) {
            Some(Exec::CatchUp(c)) => c.next_batch(log, batch),
            _ => return,
        };
        match res {
            Ok((bodies, barrier_lsn)) => {
                self.send_batch(id, RecoveryKind::CatchUp, bodies, barrier_lsn);
            }
            Err(e) => {
                let reason = format!("catch-up source unavailable: {e}");
                self.escalate(id, &reason, log);
            }
        }
    }

    fn rebuild_step(&mut self, id: &ReplicaId, log: &mut dyn ReplicaLog) {
        let (blocks, entries) = (
            self.cfg.rebuild_batch_blocks,
            self.cfg.rebuild_batch_entries,
        );
        let res = match self.senders.get_mut(id).and_then(|s| s.exec.as_mut()) {
            Some(Exec::Rebuild(r)) => r.next_batch(log, blocks, entries),
            _ => return,
        };
        match res {
            Ok((bodies, barrier_lsn)) => {
                self.send_batch(id, RecoveryKind::Rebuild, bodies, barrier_lsn);
            }
            Err(e) => {
                let reason = format!("rebuild source unavailable: {e}");
                self.invalidate_session(id, &reason, log);
                self.escalate(id, &reason, log);
            }
        }
    }

    /// Sends a recovery batch on the replica's connection, then a barrier at
    /// `barrier_lsn`; nothing while the replica has no connection.
    fn send_batch(
        &mut self,
        id: &ReplicaId,
        kind: RecoveryKind,
        bodies: Vec<Body>,
        barrier_lsn: Lsn,
    ) {
        let Some(conn) = self.senders.get(id).and_then(|s| s.conn) else {
            return;
        };
        for b in bodies {
            self.send_recovery(id, kind, conn, b);
        }
        self.send_barrier(id, barrier_lsn);
    }

    /// Ends a recovery executor (target reached): ship the live tail past the frozen
    /// target, release the plan's pins, and ask for a barrier at head.
    fn go_live(&mut self, id: &ReplicaId, log: &mut dyn ReplicaLog) {
        let Some(s) = self.senders.get_mut(id) else {
            return;
        };
        let Some(exec) = s.exec.take() else {
            return;
        };
        let (target, session, plan, kind) = match exec {
            Exec::CatchUp(c) => (
                c.target(),
                c.session(),
                c.into_plan(),
                RecoveryKind::CatchUp,
            ),
            Exec::Rebuild(r) => (
                r.target(),
                r.session(),
                r.into_plan(),
                RecoveryKind::Rebuild,
            ),
        };
        let Some(conn) = s.conn else {
            plan::release_plan(plan, &mut self.pinner, log, self.now, &mut self.events);
            return;
        };
        s.live = true;
        let mut from = target.next();
        let mut ok = true;
        while from <= self.head {
            match log.scan_from(from, 1024) {
                Ok(entries) if !entries.is_empty() => {
                    for e in entries {
                        from = e.lsn.next();
                        // The tail past the frozen target completes that recovery.
                        self.send_recovery(id, kind, conn, Body::Entry(e));
                    }
                }
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        self.send(
            conn,
            Body::CatchUpDone {
                session,
                last: target,
            },
        );
        plan::release_plan(plan, &mut self.pinner, log, self.now, &mut self.events);
        self.event(id, session, EventKind::SessionCompleted);
        if ok {
            self.send_barrier(id, self.head);
        } else {
            self.fail_sender(id, "live tail no longer retained", log);
        }
    }

    fn on_barrier_response(
        &mut self,
        id: &ReplicaId,
        bid: u64,
        status: BarrierStatus,
        flushed: Lsn,
        log: &mut dyn ReplicaLog,
    ) {
        let Some(s) = self.senders.get_mut(id) else {
            return;
        };
        let Some(inflight) = s.barrier.filter(|b| b.id == bid) else {
            return;
        };
        s.barrier = None;
        match status {
            BarrierStatus::Ok => {}
            BarrierStatus::StaleEpoch => {
                self.fence(Epoch(self.epoch.0 + 1));
                return;
            }
            other => {
                self.fail_sender(id, &format!("barrier failed: {other:?}"), log);
                return;
            }
        }
        s.record_flushed(flushed);
        let now = self.now;
        let session = s.session;
        match s.exec.as_mut() {
            Some(Exec::CatchUp(c)) => {
                let done = c.on_progress(flushed, now);
                let target = c.target();
                self.event(id, session, EventKind::CatchUpProgress { flushed, target });
                if done {
                    self.go_live(id, log);
                } else {
                    self.catchup_step(id, log);
                }
                return;
            }
            Some(Exec::Rebuild(r)) => {
                r.on_progress(now);
                if r.finished() {
                    self.go_live(id, log);
                } else {
                    self.rebuild_step(id, log);
                }
                return;
            }
            None => {}
        }
        // Only a barrier success grants InSync, and only if it covers every ack so far.
        let grant = s.live
            && s.state != ReplicaState::InSync
            && flushed >= inflight.lsn
            && flushed >= self.acked_high;
        if grant {
            s.catchup_failures = 0;
            s.progress_known = true;
            let newly_counted = !s.counting;
            s.counting = true;
            // A committed member reported unreachable at this generation (it was still
            // catching up when a flush timed out) must be reported back in sync, or the
            // control plane keeps treating it as unreachable.
            let was_reported_unreachable = s.unreachable_reported.take().is_some();
            self.set_state(id, ReplicaState::InSync);
            if newly_counted || was_reported_unreachable {
                self.out.push(Action::Report(Report::MemberInSync {
                    replica: id.clone(),
                    generation: self.generation,
                    flushed,
                }));
            }
        } else if self
            .senders
            .get(id)
            .is_some_and(|s| s.live && s.state != ReplicaState::InSync)
        {
            if flushed >= self.head {
                // It holds all this core has seen, yet less than a flush acknowledged
                // locally (`Input::AckedLocally`) whose appends are still on their way:
                // asking again now would only spin. A background barrier asks once the
                // head has moved.
                return;
            }
            // Not enough yet: ask again at the current head.
            self.send_barrier(id, self.head);
            return;
        }
        self.request_barriers();
        self.request_background_barriers();
    }

    fn on_rebuild_requested(&mut self, id: ReplicaId, log: &mut dyn ReplicaLog) {
        if let Some(s) = self.senders.get_mut(&id) {
            s.rebuild_deferred = false;
        }
        if self.state_of(&id) != Some(ReplicaState::NeedsRebuild) {
            return;
        }
        if self.committed.contains(&id) {
            // Wiping a committed member would lose acknowledged data; it must be removed
            // from the set first (reported unreachable), and the rebuild waits for that.
            if let Some(s) = self.senders.get_mut(&id) {
                s.rebuild_deferred = true;
            }
            self.out.push(Action::Report(Report::MemberUnreachable {
                replica: id.clone(),
                generation: self.generation,
            }));
            return;
        }
        self.next_session += 1;
        let session = self.next_session;
        match plan::plan_rebuild(&id, session, &mut self.pinner, log) {
            Ok(plan) => {
                self.event(
                    &id,
                    session,
                    EventKind::PlanCreated(format!("{:?}", plan.kind())),
                );
                let exec = match RebuildExec::new(plan, self.now) {
                    Ok(e) => e,
                    Err(e) => {
                        self.event(&id, session, EventKind::PinFailed(e.to_string()));
                        return;
                    }
                };
                if let Some(s) = self.senders.get_mut(&id) {
                    s.start_rebuild(session, exec);
                }
                self.set_state(&id, ReplicaState::Rebuilding);
            }
            Err(e) => {
                self.event(&id, session, EventKind::PinFailed(e.to_string()));
            }
        }
    }

    fn on_appended(&mut self, e: WalEntry) {
        if e.lsn != self.head.next() {
            // Duplicates are harmless; a gap means the shell lost an entry and must resync
            // from the log (`head()` says where), so never ship out of order.
            if e.lsn > self.head.next() {
                tracing::warn!(volume = %self.volume, head = %self.head, got = %e.lsn, "appended entry out of order; waiting for resync");
            }
            return;
        }
        self.head = e.lsn;
        self.bytes_total += entry_bytes(&e);
        self.bytes.push_back((e.lsn, self.bytes_total));
        let targets: Vec<ConnId> = self
            .senders
            .values()
            .filter_map(Sender::live_conn)
            .collect();
        for c in targets {
            self.send(c, Body::Entry(e.clone()));
        }
        if !self.pending.is_empty() {
            self.request_barriers();
        }
        self.request_background_barriers();
    }

    fn on_appends_lost(&mut self, resume_after: Lsn, log: &mut dyn ReplicaLog) {
        if resume_after <= self.head {
            return;
        }
        tracing::error!(volume = %self.volume, head = %self.head, %resume_after, "appended entries were recycled before they could be shipped; every replica needs a rebuild");
        let ids: Vec<ReplicaId> = self
            .senders
            .values()
            .filter(|s| s.state != ReplicaState::NeedsRebuild)
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            self.escalate(
                &id,
                "entries it lacks were recycled before they could be shipped",
                log,
            );
        }
        self.head = resume_after;
        self.bytes.push_back((resume_after, self.bytes_total));
    }

    // ----- time -------------------------------------------------------------------------

    fn on_tick(&mut self, log: &mut dyn ReplicaLog) {
        let now = self.now;
        let ids: Vec<ReplicaId> = self.senders.keys().cloned().collect();
        for id in &ids {
            let Some(s) = self.senders.get(id) else {
                continue;
            };
            let state = s.state;
            let barrier_late = s.barrier_late(now, self.cfg.barrier_timeout_ms);
            let handshake_late = s.handshake_late(now);
            let budget = match &s.exec {
                Some(Exec::CatchUp(c)) => c.over_budget(
                    &CatchUpBudget {
                        entries_max: self.cfg.catchup_entries_max,
                        duration_ms_max: self.cfg.catchup_duration_ms_max,
                        progress_deadline_ms: self.cfg.catchup_progress_deadline_ms,
                    },
                    now,
                ),
                Some(Exec::Rebuild(r)) => r.over_budget(self.cfg.rebuild_progress_deadline_ms, now),
                None => None,
            };
            let may_connect = s.may_connect(now);
            if let Some(reason) = budget {
                if state == ReplicaState::Rebuilding {
                    self.escalate(id, reason, log);
                } else {
                    self.fail_sender(id, reason, log);
                }
                continue;
            }
            if barrier_late {
                self.fail_sender(id, "barrier timed out", log);
                continue;
            }
            if handshake_late {
                self.fail_sender(id, "handshake timed out", log);
                continue;
            }
            match state {
                ReplicaState::Disconnected | ReplicaState::Degraded if may_connect => {
                    self.open_conn(id);
                    self.set_state(id, ReplicaState::Connecting);
                }
                ReplicaState::Rebuilding if may_connect => self.open_conn(id),
                _ => {}
            }
        }
        self.check_retention_budgets(log);
        self.check_unreachable();
        self.check_flush_timeouts();
        self.request_barriers();
        self.request_background_barriers();
        if now.saturating_sub(self.last_heartbeat_ms) >= self.cfg.heartbeat_interval_ms {
            self.last_heartbeat_ms = now;
            self.heartbeat_seq += 1;
            let seq = self.heartbeat_seq;
            if self.heartbeats_sent.len() >= HEARTBEATS_TRACKED {
                self.heartbeats_sent.pop_front();
            }
            self.heartbeats_sent.push_back((seq, now));
            let conns: Vec<ConnId> = self
                .senders
                .values()
                .filter_map(Sender::heartbeat_conn)
                .collect();
            for c in conns {
                self.send(c, Body::Heartbeat { seq });
            }
        }
    }

    pub(super) fn lag_bytes(&self, from: Lsn) -> u64 {
        let at = match self.bytes.binary_search_by(|(l, _)| l.cmp(&from)) {
            Ok(i) => self.bytes.get(i).map_or(0, |(_, b)| *b),
            Err(0) => self.bytes.front().map_or(self.bytes_total, |(_, b)| *b),
            Err(i) => self.bytes.get(i - 1).map_or(0, |(_, b)| *b),
        };
        self.bytes_total.saturating_sub(at)
    }

    fn check_retention_budgets(&mut self, log: &mut dyn ReplicaLog) {
        let now = self.now;
        let mut doomed = Vec::new();
        for s in self.senders.values() {
            if s.hold.is_none() || s.state == ReplicaState::InSync {
                continue;
            }
            let since = s.retention_clock_ms();
            if now.saturating_sub(since) > self.cfg.wal_retention_timeout_ms {
                doomed.push((
                    s.id.clone(),
                    "lagging replica exceeded wal_retention_timeout_ms",
                ));
            } else if self.lag_bytes(s.flushed) > self.cfg.wal_retention_bytes_max {
                doomed.push((
                    s.id.clone(),
                    "lagging replica exceeded wal_retention_bytes_max",
                ));
            }
        }
        for (id, reason) in doomed {
            self.escalate(&id, reason, log);
        }
    }

    /// Keeps one WAL hold per recoverable replica at its flushed LSN and hands the minimum
    /// of all holds to storage as the retention floor.
    fn update_retention(&mut self, log: &mut dyn ReplicaLog) {
        let retained = log.retained_start();
        let ids: Vec<ReplicaId> = self.senders.keys().cloned().collect();
        for id in ids {
            let Some(s) = self.senders.get_mut(&id) else {
                continue;
            };
            let from = s.hold_from(retained);
            match (s.recoverable(), s.hold) {
                (true, Some(h)) => {
                    if s.progress_known {
                        self.pinner.advance(h, s.flushed);
                    }
                }
                (true, None) => {
                    if let Ok(h) = self.pinner.hold_wal(&id, from, retained) {
                        s.hold = Some(h);
                    }
                }
                (false, Some(h)) => {
                    self.pinner.release(h);
                    s.hold = None;
                }
                (false, None) => {}
            }
        }
        let floor = self.pinner.min_floor();
        if floor != self.floor || !self.floor_applied {
            self.floor = floor;
            self.floor_applied = true;
            log.set_retention_floor(floor);
        }
        let keep_from = floor.unwrap_or(self.head);
        while self.bytes.len() > 1 && self.bytes.get(1).is_some_and(|(l, _)| *l <= keep_from) {
            self.bytes.pop_front();
        }
    }
}
