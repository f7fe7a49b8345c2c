//! The blockvol node agent: runs the engine volumes of its node's `BlockReplica`s,
//! serves them over NBD, attaches kernel block devices, and reports status.

pub mod agent;
pub mod attach;
pub mod attach_service;
pub mod frontend;
pub mod k8s;
pub mod metrics;
pub mod replicas;
