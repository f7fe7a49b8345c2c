//! The blockvol CSI driver: Identity, Controller and Node services over gRPC, and the
//! protocol between the node plugin and the node agent (`agent_proto`), and the node
//! plugin's registration with the kubelet (`registration`).
//!
//! The controller maps CSI volumes onto `BlockVolume` objects and leaves replication
//! to the operator; the node plugin asks the local node agent for a block device and
//! formats, mounts and bind-mounts it. Neither holds replication state.

/// Generated CSI v1 types and services (`csi.v1`, spec v1.12.0).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi_proto {
    tonic::include_proto!("csi.v1");
}

/// Generated node-agent service (`blockvol.agent.v1`, `proto/agent.proto`): the client
/// the CSI node plugin uses and the server trait (`node_agent_server::NodeAgent`) the
/// node agent implements.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod agent_proto {
    tonic::include_proto!("blockvol.agent.v1");
}

/// Generated kubelet plugin-registration service (`pluginregistration`, the kubelet's
/// `pluginregistration.v1` API, `proto/pluginregistration.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod registration_proto {
    tonic::include_proto!("pluginregistration");
}

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
