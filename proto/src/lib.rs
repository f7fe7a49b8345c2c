//! The gRPC protocols blockvol speaks, generated from `proto/*.proto` (see
//! `proto/README.md` for where each comes from): the CSI spec the driver serves, the
//! node agent's attach service between the CSI node plugin and the agent, and the
//! kubelet's plugin registration. Both the CSI driver and the node agent build on this
//! crate, so neither depends on the other for its wire types.

/// Generated CSI v1 types and services (`csi.v1`, spec v1.12.0).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Generated node-agent service (`blockvol.agent.v1`, `proto/agent.proto`): the client
/// the CSI node plugin uses and the server trait (`node_agent_server::NodeAgent`) the
/// node agent implements.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod agent {
    tonic::include_proto!("blockvol.agent.v1");
}

/// Generated kubelet plugin-registration service (`pluginregistration`, the kubelet's
/// `pluginregistration.v1` API, `proto/pluginregistration.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod registration {
    tonic::include_proto!("pluginregistration");
}
