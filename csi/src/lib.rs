//! The blockvol CSI driver: Identity, Controller and Node services over gRPC, and the
//! protocol between the node plugin and the node agent (`agent_proto`), and the node
//! plugin's registration with the kubelet (`registration`).
//!
//! The controller maps CSI volumes onto `BlockVolume` objects and leaves replication
//! to the operator; the node plugin asks the local node agent for a block device and
//! formats, mounts and bind-mounts it. Neither holds replication state.

/// The generated protocols, from the `blockvol-proto` crate, under the names this
/// crate's modules and its users know them by.
pub use blockvol_proto::agent as agent_proto;
pub use blockvol_proto::csi as csi_proto;
pub use blockvol_proto::registration as registration_proto;

pub mod agent;
pub mod controller;
pub mod error;
pub mod guard;
pub mod health;
pub mod identity;
pub mod mount;
pub mod names;
pub mod node;
pub mod params;
pub mod registration;
pub mod rpc;
pub mod server;

pub use error::{Error, Result};
