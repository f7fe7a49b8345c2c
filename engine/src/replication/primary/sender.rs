//! One replica's sender: its session (connection, handshake, executor, barrier in flight),
//! its reported durable progress, and the transitions of that state. A sender lives as
//! long as its replica is assigned (keyed by stable ReplicaID); addresses and epochs
//! change only its session.

use super::ReplicaState;
use crate::replication::ConnId;
use crate::replication::plan::{CatchUpExec, RebuildExec};
use crate::replication::retention::HoldId;
use crate::replication::types::{Endpoint, Generation, Lsn, ReplicaId};

/// The recovery a session is running.
#[derive(Debug)]
pub(super) enum Exec {
    CatchUp(CatchUpExec),
    Rebuild(RebuildExec),
}

/// The barrier in flight on a session.
#[derive(Debug, Clone, Copy)]
pub(super) struct Inflight {
    pub(super) id: u64,
    pub(super) lsn: Lsn,
    pub(super) sent_ms: u64,
}

/// One assigned replica as the primary sees it (see the module docs).
#[derive(Debug)]
pub(super) struct Sender {
    pub(super) id: ReplicaId,
    pub(super) endpoint: Endpoint,
    pub(super) state: ReplicaState,
    pub(super) conn: Option<ConnId>,
    pub(super) conn_up: bool,
    pub(super) session: u64,
    pub(super) handshake_deadline_ms: u64,
    /// Durable progress the replica reported in this primary's epoch.
    pub(super) flushed: Lsn,
    pub(super) progress_known: bool,
    /// Appended entries are shipped as they come.
    pub(super) live: bool,
    pub(super) exec: Option<Exec>,
    pub(super) barrier: Option<Inflight>,
    /// When the last barrier was sent; paces background barriers.
    pub(super) last_barrier_ms: u64,
    pub(super) catchup_failures: u32,
    pub(super) next_connect_ms: u64,
    pub(super) last_contact_ms: u64,
    /// When the newest heartbeat this member answered at this primary's epoch was sent
    /// (0: none yet). A member answers at an epoch only while it has not persisted a
    /// newer one, so until `proof_ms` + the proof window nobody else is primary.
    pub(super) proof_ms: u64,
    /// When this member was assigned; starts its retention budget before first contact.
    pub(super) assigned_ms: u64,
    pub(super) hold: Option<HoldId>,
    pub(super) counting: bool,
    pub(super) rebuild_requested: bool,
    /// A rebuild was asked for while the replica was a committed member; it starts once
    /// the control plane removes it from the set.
    pub(super) rebuild_deferred: bool,
    pub(super) unreachable_reported: Option<Generation>,
}

impl Sender {
    /// The sender of a newly assigned replica: disconnected, its progress unknown.
    pub(super) fn new(id: ReplicaId, endpoint: Endpoint, counting: bool, now_ms: u64) -> Self {
        Sender {
            id,
            endpoint,
            state: ReplicaState::Disconnected,
            conn: None,
            conn_up: false,
            session: 0,
            handshake_deadline_ms: 0,
            flushed: Lsn(0),
            progress_known: false,
            live: false,
            exec: None,
            barrier: None,
            last_barrier_ms: 0,
            catchup_failures: 0,
            next_connect_ms: 0,
            last_contact_ms: 0,
            proof_ms: 0,
            assigned_ms: now_ms,
            hold: None,
            counting,
            rebuild_requested: false,
            rebuild_deferred: false,
            unreachable_reported: None,
        }
    }

    /// Whether a catch-up can bring it back: it neither needs nor runs a rebuild.
    pub(super) fn recoverable(&self) -> bool {
        !matches!(
            self.state,
            ReplicaState::NeedsRebuild | ReplicaState::Rebuilding
        )
    }

    /// Starts session `session` on `conn` (dialled, not connected yet); the handshake
    /// must complete by `handshake_deadline_ms`.
    pub(super) fn begin_session(&mut self, conn: ConnId, session: u64, handshake_deadline_ms: u64) {
        self.conn = Some(conn);
        self.conn_up = false;
        self.session = session;
        self.handshake_deadline_ms = handshake_deadline_ms;
    }

    /// Ends the session: nothing is shipped or awaited on it any more. Returns its
    /// connection (to close) and its executor (whose plan must be released).
    pub(super) fn end_session(&mut self) -> (Option<ConnId>, Option<Exec>) {
        let conn = self.conn.take();
        self.conn_up = false;
        self.live = false;
        self.barrier = None;
        (conn, self.exec.take())
    }

    /// Drops only the connection (a rebuild keeps its executor and plan) and redials at
    /// `retry_at_ms`. Returns the connection to close.
    pub(super) fn drop_conn(&mut self, retry_at_ms: u64) -> Option<ConnId> {
        let conn = self.conn.take();
        self.conn_up = false;
        self.live = false;
        self.barrier = None;
        self.next_connect_ms = retry_at_ms;
        conn
    }

    /// Stops all shipping (the primary was fenced). Returns the connection to close.
    pub(super) fn disconnect(&mut self) -> Option<ConnId> {
        self.conn_up = false;
        self.live = false;
        self.conn.take()
    }

    /// Whether a barrier may go out now: shipping live on an open connection, with no
    /// barrier in flight and no recovery running (a recovery sends its own).
    pub(super) fn ready_for_barrier(&self) -> bool {
        self.live && self.conn_up && self.barrier.is_none() && self.exec.is_none()
    }

    /// Records barrier `id` at `lsn`, sent at `now_ms`, as in flight; returns the
    /// connection to send it on (`None`, recording nothing, without a connection).
    pub(super) fn start_barrier(&mut self, id: u64, lsn: Lsn, now_ms: u64) -> Option<ConnId> {
        let conn = self.conn?;
        self.barrier = Some(Inflight {
            id,
            lsn,
            sent_ms: now_ms,
        });
        self.last_barrier_ms = now_ms;
        Some(conn)
    }

    /// A barrier success reported `flushed`: the durable progress known for this replica
    /// never moves backwards on a reply (only an escalation, a rebuild or a truncating
    /// handshake lowers it, explicitly).
    pub(super) fn record_flushed(&mut self, flushed: Lsn) {
        let before = self.flushed;
        if flushed > self.flushed {
            self.flushed = flushed;
        }
        debug_assert!(
            self.flushed >= before && self.flushed >= flushed,
            "a barrier reply never lowers the flushed LSN"
        );
    }

    /// Its history is no longer trusted (it needs a rebuild): what it reported must not
    /// count toward any later flush ack.
    pub(super) fn forget_progress(&mut self) {
        self.progress_known = false;
        self.flushed = Lsn(0);
        self.catchup_failures = 0;
        self.rebuild_requested = false;
    }

    /// Starts rebuild `session`: its progress restarts from zero and it does not count
    /// toward the gate until it is in sync again.
    pub(super) fn start_rebuild(&mut self, session: u64, exec: RebuildExec) {
        self.session = session;
        self.exec = Some(Exec::Rebuild(exec));
        self.flushed = Lsn(0);
        self.progress_known = false;
        self.counting = false;
        self.next_connect_ms = 0;
        self.rebuild_requested = true;
    }

    /// The connection new appends are shipped on, while it ships live.
    pub(super) fn live_conn(&self) -> Option<ConnId> {
        self.conn.filter(|_| self.live)
    }

    /// The connection heartbeats go on: in-sync members with an open connection.
    pub(super) fn heartbeat_conn(&self) -> Option<ConnId> {
        self.conn
            .filter(|_| self.state == ReplicaState::InSync && self.conn_up)
    }

    /// It answered, at this primary's epoch, a heartbeat sent at `sent_ms`.
    pub(super) fn record_heartbeat_ack(&mut self, sent_ms: u64) {
        self.proof_ms = self.proof_ms.max(sent_ms);
    }

    /// Whether its barrier in flight is older than `barrier_timeout_ms`.
    pub(super) fn barrier_late(&self, now_ms: u64, barrier_timeout_ms: u64) -> bool {
        self.barrier
            .is_some_and(|b| now_ms.saturating_sub(b.sent_ms) > barrier_timeout_ms)
    }

    /// Whether its handshake missed the deadline of its session.
    pub(super) fn handshake_late(&self, now_ms: u64) -> bool {
        self.state == ReplicaState::Connecting
            && self.conn.is_some()
            && !self.live
            && now_ms > self.handshake_deadline_ms
    }

    /// Whether it may be dialled now: no connection, and its reconnect backoff is over.
    pub(super) fn may_connect(&self, now_ms: u64) -> bool {
        self.conn.is_none() && now_ms >= self.next_connect_ms
    }

    /// Where its WAL hold starts. Until its progress is known (before its first
    /// handshake) that is all WAL still retained (from `retained_start`): it may need any
    /// of it, and freeing it would turn a member that is only slow to connect into a
    /// rebuild.
    pub(super) fn hold_from(&self, retained_start: Lsn) -> Lsn {
        if self.progress_known {
            self.flushed
        } else {
            Lsn(retained_start.0.saturating_sub(1))
        }
    }

    /// When its retention budget's clock started: the later of the last contact and the
    /// assignment, so a member that has not connected yet gets a full budget.
    pub(super) fn retention_clock_ms(&self) -> u64 {
        self.last_contact_ms.max(self.assigned_ms)
    }
}
