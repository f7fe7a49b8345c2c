//! blockvol's storage engine for one replica on one host disk: the on-disk format
//! (superblock, WAL, extent), volume IO, the flusher, crash recovery, and the
//! replication protocol. It knows nothing about Kubernetes.
//!
//! Start at [`Volume`]: `create`/`open` a volume on a [`Disk`] (a [`FileDisk`] in
//! production, a [`SimDisk`] in tests), then `write`/`read`/`trim`/`write_zeroes`,
//! `flush` for durability. Replication uses `scan_from`, `append_replicated`,
//! `truncate_after`, the append observer, retention floors and the rebuild calls.

//!
//! # On-disk format (one sparse file per volume, little-endian)
//!
//! ```text
//! [0, 4K)         superblock copy A   } two alternating copies, each with a CRC32C;
//! [4K, 8K)        superblock copy B   } the valid copy with the higher seq wins
//! [8K, 8K+W)      circular WAL of records (see `wal`), logical positions mod W
//! [align(8K+W))   extent: block `lba` at extent_offset + lba * block_size
//! ```
//!
//! # Guarantees
//!
//! - `flush` (and `write_fua`) return only after an fdatasync covering every entry
//!   appended before the call; `durable_lsn` only moves forward and only after a sync
//!   (truncation and rebuild are the explicit exceptions).
//! - After a crash, `open` replays exactly an unbroken prefix of the log: every synced
//!   entry, never a torn or stale one (per-record CRC32C, dense LSNs, WAL generations).
//! - LSNs are dense and assigned in append order under one lock; the append observer
//!   sees them in that order.
//! - The flusher copies only durable entries into the extent, persists the checkpoint
//!   before reusing WAL space, and never frees entries at or above the retention floor.
//! - A truncation never exposes a dropped entry's data: a flusher cycle persists the
//!   highest LSN it may copy (`copied_lsn`) before copying, and truncating below it
//!   first restores the blocks those entries wrote (or is refused, and the replica
//!   must be rebuilt).
//! - Any failed sync or superblock write fails the volume (fail-stop): later calls
//!   return `Error::Failed` until it is reopened.
//! - A rebuild source is a [`BaseImage`]: it pauses the flusher so the extent stays
//!   exactly at the checkpoint while writes keep landing in the WAL.

pub mod error;
pub mod forward;
pub mod net;
mod random;
pub mod replication;
pub mod storage;
pub mod types;

pub use error::{Error, Result};
pub use storage::disk::{CrashMode, Disk, FaultPlan, FileDisk, SimDisk};
pub use storage::volume::{
    AppendObserver, BaseImage, CreateOptions, Volume, VolumeConfig, VolumeStats,
};
pub use storage::wal::{DecodeError, EntryKind, WalEntry};
pub use types::{DurabilityMode, Epoch, Lba, Lsn, WalPos};
