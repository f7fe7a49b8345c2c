//! The replicas this node runs: [`contract`] is what the Kubernetes side asks of them
//! ([`ReplicaRuntime`], with an in-memory stand-in for tests), [`engine_runtime`] the
//! implementation on engine volumes, primary drivers and the data port.

pub mod contract;
pub mod engine_runtime;

pub use contract::{Assignment, InMemoryRuntime, Peer, ReplicaRuntime, RuntimeError};
pub use engine_runtime::{
    EngineRuntime, EngineSettings, LocalPrimaries, ReplicaSample, ReplicatedBackend,
    VOLUME_FILE_NAME,
};
