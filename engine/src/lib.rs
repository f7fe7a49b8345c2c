//! blockvol's storage engine for one replica on one host disk: the on-disk format
//! (superblock, WAL, extent), volume IO, the flusher, crash recovery, and the
//! replication protocol. It knows nothing about Kubernetes.

pub mod replication;
