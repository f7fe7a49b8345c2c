//! Replication: ships a primary's WAL to its replicas in LSN order, gates FLUSH acks on the
//! committed in-sync set's durable progress, and recovers lagging replicas by catch-up or
//! rebuild. The protocol core is sans-IO (events in, actions out) so a seeded simulation can
//! drive it; storage is reached only through the `ReplicaLog` trait. No sockets and no async
//! runtime here: `crate::net` runs these cores over TCP.

pub mod plan;
pub mod primary;
pub mod receiver;
pub mod retention;
pub mod storage;
pub mod types;
pub mod volume_log;
pub mod wire;

pub use plan::{
    EventKind, HandshakeReply, Outcome, RebuildProgress, RecoveryEvent, RecoveryPlan,
    RetainedHistory, classify_handshake,
};
pub use primary::{
    Action, Durability, FlushId, Input, Peer, PrimaryConfig, PrimaryCore, RecoveryBytes,
    ReplicaState, Report,
};
pub use receiver::{
    ReceiverAction, ReceiverConfig, ReceiverCore, ReceiverEvent, ReceiverInput, step_blocking,
};
pub use retention::{HoldId, HoldKind, Pinner};
pub use storage::{AppendOutcome, BaseChunk, BaseKind, BasePin, MemLog, ReplicaLog};
pub use types::{
    Endpoint, EntryKind, Epoch, Generation, Lba, Lsn, ReplicaId, VolumeId, WalEntry, entry_bytes,
};
pub use volume_log::VolumeLog;
pub use wire::{
    AttachmentGeneration, Body, ForwardMsg, ForwardOp, ForwardPayload, ForwardStatus, Message,
    VolumeMsg, WireConfig, WireError,
};

/// Connection handle chosen by the core; the I/O shell maps it to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Errors crossing the replication boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid {what}: {reason}")]
    InvalidIdentity { what: &'static str, reason: String },
    #[error("invalid endpoint {0:?}: need a canonical ip:port (no wildcard host, no port 0)")]
    InvalidEndpoint(String),
    #[error("LSN gap: expected {expected}, got {got}")]
    Gap { expected: Lsn, got: Lsn },
    #[error("WAL from LSN {from} was recycled (retained start {retained_start})")]
    Recycled { from: Lsn, retained_start: Lsn },
    #[error("cannot truncate after LSN {lsn}: checkpoint {checkpoint} is already in the extent")]
    TruncateBelowCheckpoint { lsn: Lsn, checkpoint: Lsn },
    #[error("fsync failed")]
    FsyncFailed,
    #[error("unknown base pin {0}")]
    UnknownBasePin(u64),
    #[error("retention hold refused: {0}")]
    HoldRefused(String),
    #[error("storage: {0}")]
    Storage(String),
    /// The entry or block lies beyond the replica's current size: the volume was
    /// expanded and this replica has not applied the new size yet. Retryable.
    #[error("beyond the replica's size: {0}")]
    BeyondSize(String),
    #[error("wire: {0}")]
    Wire(#[from] WireError),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
