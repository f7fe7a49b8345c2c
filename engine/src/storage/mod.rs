//! One replica's bytes on one host disk: the disk abstraction, the file layout, the
//! superblock and the WAL formats, volume IO with group commit, the flusher that copies
//! durable WAL entries into the extent, and crash recovery. Knows nothing of the network:
//! no tokio, no sockets (replication reaches a volume through `replication::VolumeLog`).

pub mod dirty_map;
pub mod disk;
mod flusher;
mod group_commit;
pub mod layout;
mod recovery;
pub mod superblock;
pub mod volume;
pub mod wal;
