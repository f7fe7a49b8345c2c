//! The node agent's Kubernetes side: registers this node's `BlockNode`, renews its
//! Lease (the agent's liveness, which the operator waits out before promoting), and
//! drives a [`ReplicaRuntime`](crate::replicas::ReplicaRuntime) from the `BlockReplica`s assigned to this node, writing
//! their status as `blockvol-agent` (the only writer of replica status).

pub mod lease;
pub mod paths;
pub mod reconciler;
pub mod registration;

pub use lease::{LeaseRenewer, LeaseSettings};
pub use paths::replica_dir;
pub use reconciler::{AgentContext, ReplicaSettings, run_replicas};
pub use registration::{
    NodeHealth, NodeRegistration, NodeState, disk_usage, keep_registered, validate_data_address,
};

use crate::replicas::RuntimeError;

/// Errors of the Kubernetes side of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("data address {address:?} is not usable: {reason}")]
    DataAddress { address: String, reason: String },
    #[error("replica {replica}: {field} {value:?} is not a safe directory name: {reason}")]
    UnsafeName {
        replica: String,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("statvfs of {path}: {source}")]
    DiskUsage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("replica runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("replica {replica} is assigned to node {assigned}, not this node {this}")]
    WrongNode {
        replica: String,
        assigned: String,
        this: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
