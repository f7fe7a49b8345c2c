//! blockvol's storage engine for one replica on one host disk: the on-disk format
//! (superblock, WAL, extent), volume IO, the flusher, crash recovery, and the
//! replication protocol. It knows nothing about Kubernetes.
//!
//! Start at [`Volume`]: `create`/`open` a volume on a [`Disk`] (a [`FileDisk`] in
//! production, a [`SimDisk`] in tests), then `write`/`read`/`trim`/`write_zeroes`,
//! `flush` for durability. Replication uses `scan_from`, `append_replicated`,
//! `truncate_after`, the append observer, retention floors and the rebuild calls.

pub mod dirty_map;
pub mod disk;
pub mod error;
pub mod extent;
mod flusher;
mod group_commit;
mod recovery;
pub mod superblock;
pub mod types;
pub mod volume;
pub mod wal;

pub use disk::{CrashMode, Disk, FaultPlan, FileDisk, SimDisk};
pub use error::{Error, Result};
pub use types::{DurabilityMode, Epoch, Lba, Lsn, WalPos};
pub use volume::{AppendObserver, BaseImage, CreateOptions, Volume, VolumeConfig, VolumeStats};
pub use wal::{DecodeError, EntryKind, WalEntry};
