//! Primary side of the protocol, sans-IO: one sender per stable ReplicaID (surviving address
//! and epoch changes, which only invalidate its session), the replica state machine, the
//! reconnect handshake, catch-up and rebuild through plans, retention pins and budgets, and
//! the durability gate. Guarantees: under `SyncAll` a flush at LSN L is acked only when the
//! local fsync covers L and every member of the committed in-sync set (plus every joined
//! member counted since its first successful barrier) reported durable flushed >= L; the
//! primary never drops a member itself - it reports it and waits for a committed set.
//!
//! - `core`: `PrimaryCore::step` and the protocol: control-plane inputs, connections,
//!   handshakes, catch-up and rebuild, ticks, retention.
//! - `gate`: the durability gate (pending flushes, barriers, the member proof).
//! - `sender`: one replica's sender and the transitions of its own state.

mod core;
mod gate;
mod sender;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use self::gate::PendingFlush;
use self::sender::Sender;
use crate::replication::ConnId;
use crate::replication::plan::RecoveryEvent;
use crate::replication::retention::Pinner;
use crate::replication::types::{Endpoint, Epoch, Generation, Lsn, ReplicaId, VolumeId, WalEntry};
use crate::replication::wire::VolumeMsg;

/// Flush acknowledgement rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Ack when every committed in-sync member has the data durable.
    SyncAll,
    /// Ack after the local fsync.
    Async,
}

/// Primary bounds and policy. Every bound is named with its unit last.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub durability: Durability,
    /// A barrier (or handshake) without an answer for this long fails the session.
    pub barrier_timeout_ms: u64,
    pub reconnect_backoff_ms: u64,
    pub catchup_batch_entries: u64,
    pub catchup_entries_max: u64,
    pub catchup_duration_ms_max: u64,
    pub catchup_progress_deadline_ms: u64,
    /// Consecutive failed catch-ups before NeedsRebuild.
    pub catchup_retries_max: u32,
    /// Base blocks shipped per rebuild round trip (each batch ends with a barrier the
    /// replica answers before the next goes out): 2048 × 4 KiB = 8 MiB in flight.
    pub rebuild_batch_blocks: usize,
    pub rebuild_batch_entries: u64,
    pub rebuild_progress_deadline_ms: u64,
    /// A lagging replica out of contact this long loses its WAL hold (NeedsRebuild).
    pub wal_retention_timeout_ms: u64,
    /// A lagging replica needing more WAL than this loses its hold (NeedsRebuild).
    pub wal_retention_bytes_max: u64,
    /// A flush still waiting after this long fails (it is never acked unsafely).
    pub flush_timeout_ms: u64,
    /// A blocked flush waits this long for a missing member before reporting it unreachable.
    pub member_unreachable_after_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// A live replica holding this many shipped bytes not yet reported durable gets a
    /// barrier without waiting for a client FLUSH, so its retention hold (and the WAL
    /// behind it) moves on during long runs of unflushed writes. Capped by `fit_to_wal`.
    pub pressure_barrier_bytes: u64,
    /// A live replica behind the head gets a barrier at least this often, so the WAL is
    /// reclaimed after write bursts too small to reach `pressure_barrier_bytes`.
    pub background_barrier_interval_ms: u64,
    /// Test-only: ack flushes without waiting for members (lets the simulation prove its
    /// checker catches a broken gate). Never set in production.
    pub test_knob_skip_member_gate: bool,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        Self {
            durability: Durability::SyncAll,
            barrier_timeout_ms: 5_000,
            reconnect_backoff_ms: 500,
            catchup_batch_entries: 256,
            catchup_entries_max: 1 << 20,
            catchup_duration_ms_max: 300_000,
            catchup_progress_deadline_ms: 30_000,
            catchup_retries_max: 3,
            rebuild_batch_blocks: 2048,
            rebuild_batch_entries: 256,
            rebuild_progress_deadline_ms: 60_000,
            wal_retention_timeout_ms: 300_000,
            wal_retention_bytes_max: 64 << 20,
            flush_timeout_ms: 60_000,
            member_unreachable_after_ms: 5_000,
            heartbeat_interval_ms: 1_000,
            pressure_barrier_bytes: 8 << 20,
            background_barrier_interval_ms: 1_000,
            test_knob_skip_member_gate: false,
        }
    }
}

impl PrimaryConfig {
    /// Fits the byte bounds to a WAL of `wal_size_bytes`: a replica's unflushed bytes get
    /// a barrier at a quarter of the WAL at most, and a lagging replica may hold at most
    /// half of it before escalating to NeedsRebuild. With a larger retention budget a
    /// stuck replica would keep the WAL full forever and writers would only ever see
    /// `WalFull`; below half, the budget always trips before writers reach the WAL's
    /// hard watermark.
    pub fn fit_to_wal(mut self, wal_size_bytes: u64) -> Self {
        self.pressure_barrier_bytes = self.pressure_barrier_bytes.min(wal_size_bytes / 4).max(1);
        self.wal_retention_bytes_max = self.wal_retention_bytes_max.min(wal_size_bytes / 2);
        self
    }
}

/// Identifies one flush request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlushId(pub u64);

/// A replica assignment: identity plus current address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: ReplicaId,
    pub endpoint: Endpoint,
}

/// Per-replica state as the primary sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Disconnected,
    Connecting,
    CatchingUp,
    InSync,
    Degraded,
    NeedsRebuild,
    Rebuilding,
}

/// Inputs to the primary core.
#[derive(Debug, Clone)]
pub enum Input {
    Tick,
    PeersAssigned(Vec<Peer>),
    InSyncSetCommitted {
        generation: Generation,
        members: Vec<ReplicaId>,
    },
    /// The local volume appended this entry (in LSN order, under its append lock).
    Appended(WalEntry),
    FlushRequested(FlushId),
    LocalFsyncDone {
        durable: Lsn,
    },
    LocalFsyncFailed,
    Connected(ConnId),
    ConnectFailed(ConnId),
    ConnectionLost(ConnId),
    Received {
        conn: ConnId,
        msg: VolumeMsg,
    },
    /// The control plane asks to rebuild a replica that reported NeedsRebuild.
    RebuildRequested(ReplicaId),
    /// The control plane re-asserted this primary with a newer epoch (already persisted).
    EpochChanged(Epoch),
    /// The shell lost appended entries after [`PrimaryCore::head`]: the log recycled
    /// them before they could be re-read (the append queue overflowed while nothing
    /// pinned the WAL). They can never be shipped, so every sender that could still
    /// receive entries is escalated to NeedsRebuild, and the head moves to
    /// `resume_after`, from which the shell feeds entries again.
    AppendsLost {
        resume_after: Lsn,
    },
    /// Flushes up to `lsn` were acknowledged by the local fsync alone while
    /// [`PrimaryCore::gate_is_local_only`] held. Raises the ack high-water mark, so no
    /// member is granted InSync later without everything acknowledged that way.
    AckedLocally {
        lsn: Lsn,
    },
}

/// Facts for the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    StateChanged {
        replica: ReplicaId,
        state: ReplicaState,
        flushed: Lsn,
    },
    /// A member the gate counts cannot be reached; flush acks wait for a new committed set.
    MemberUnreachable {
        replica: ReplicaId,
        generation: Generation,
    },
    /// A member is counted for every ack from now on and may be committed at `generation`.
    MemberInSync {
        replica: ReplicaId,
        generation: Generation,
        flushed: Lsn,
    },
    NeedsRebuild {
        replica: ReplicaId,
        reason: String,
    },
    /// A peer knows a newer epoch (`observed`), or a replica is bound to another primary
    /// at this one (`observed` is then this epoch + 1: only a later epoch may serve):
    /// this primary must stop.
    Fenced {
        observed: Epoch,
    },
    LocalDiskFailed,
}

/// Bytes this primary core shipped to one replica to recover it, since the core was
/// created (a new primary term starts from zero): WAL entries (their encoded size)
/// sent by a catch-up, and base blocks plus WAL entries sent by a rebuild. Live
/// shipping of new appends to a replica that keeps up is in neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryBytes {
    pub catch_up: u64,
    pub rebuild: u64,
}

/// Actions for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect {
        conn: ConnId,
        replica: ReplicaId,
        endpoint: Endpoint,
    },
    Send {
        conn: ConnId,
        msg: VolumeMsg,
    },
    Close {
        conn: ConnId,
        reason: String,
    },
    LocalFsync {
        upto: Lsn,
    },
    FlushAcked {
        id: FlushId,
        lsn: Lsn,
    },
    FlushFailed {
        id: FlushId,
        reason: String,
    },
    Report(Report),
}

/// The primary's replication core for one volume.
#[derive(Debug)]
pub struct PrimaryCore {
    volume: VolumeId,
    self_id: ReplicaId,
    epoch: Epoch,
    cfg: PrimaryConfig,
    senders: BTreeMap<ReplicaId, Sender>,
    generation: Generation,
    committed: BTreeSet<ReplicaId>,
    head: Lsn,
    local_durable: Lsn,
    fsync_inflight: bool,
    pending: VecDeque<PendingFlush>,
    acked_high: Lsn,
    pinner: Pinner,
    floor: Option<Lsn>,
    floor_applied: bool,
    bytes: VecDeque<(Lsn, u64)>,
    bytes_total: u64,
    next_conn: u64,
    next_session: u64,
    next_barrier: u64,
    heartbeat_seq: u64,
    last_heartbeat_ms: u64,
    /// (sequence, send time) of the newest heartbeats, so an answer proves liveness as
    /// of the moment its heartbeat left, never later.
    heartbeats_sent: VecDeque<(u64, u64)>,
    fenced: Option<Epoch>,
    disk_failed: bool,
    events: Vec<RecoveryEvent>,
    /// Recovery bytes shipped per replica in this core's lifetime (kept when a sender
    /// is removed, so a counter never goes back within a term).
    recovery_sent: BTreeMap<ReplicaId, RecoveryBytes>,
    out: Vec<Action>,
    now: u64,
}
