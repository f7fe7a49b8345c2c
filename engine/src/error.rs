//! The engine's error type. Every variant names the value that was wrong and, where it
//! helps, the allowed range, so a caller can show it to an operator unchanged.

use crate::types::{Epoch, Lba, Lsn};

/// Errors returned by the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("request out of range: {reason}")]
    OutOfRange { reason: String },
    #[error("no valid superblock in {file}: copy A: {copy_a}; copy B: {copy_b}")]
    NoValidSuperblock {
        file: String,
        copy_a: String,
        copy_b: String,
    },
    #[error("corrupt data in {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "WAL full: {needed_bytes} bytes needed, still not free after wal_full_timeout_ms={timeout_ms}"
    )]
    WalFull { needed_bytes: u64, timeout_ms: u64 },
    #[error("WAL entries from LSN {from} are recycled; oldest retained LSN is {retained_start}")]
    WalRecycled { from: Lsn, retained_start: Lsn },
    #[error("LSN gap: expected {expected}, got {got}")]
    LsnGap { expected: Lsn, got: Lsn },
    #[error(
        "cannot truncate after LSN {lsn}: entries up to checkpoint {checkpoint} are already in the extent"
    )]
    TruncationUnsafe { lsn: Lsn, checkpoint: Lsn },
    #[error(
        "cannot truncate after LSN {lsn}: the extent may hold entries up to LSN {copied} (a crash interrupted a flusher cycle) and the WAL no longer holds what block {lba} held before them; the replica needs a rebuild"
    )]
    TruncationNeedsRebuild { lsn: Lsn, copied: Lsn, lba: Lba },
    #[error("epoch {requested} is lower than the persisted epoch {current}")]
    EpochRegression { current: Epoch, requested: Epoch },
    #[error("volume failed and refuses IO until reopened: {reason}")]
    Failed { reason: String },
    #[error("volume is being rebuilt: {reason}")]
    Rebuilding { reason: String },
    #[error("volume is closed")]
    Closed,
}

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn range(reason: impl Into<String>) -> Self {
        Error::OutOfRange {
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
