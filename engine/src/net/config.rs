//! Settings of the node's replication transport, shared by the data port, the outbound
//! links, the primary drivers and the forwarding client.

use crate::replication::wire::WireConfig;

/// Transport settings (units last). `Debug` redacts the cluster secret so a logged
/// config cannot leak it.
#[derive(Clone)]
pub struct NetConfig {
    /// This node's name, sent in the hello.
    pub node_name: String,
    /// Shared cluster secret for peer authentication.
    pub cluster_secret: Vec<u8>,
    pub wire: WireConfig,
    pub dial_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    /// Frames queued per connection before the session is ended.
    pub send_queue_frames_max: usize,
    /// Appended entries queued between the volume and the driver before it falls back to
    /// re-reading the WAL.
    pub append_queue_entries_max: usize,
    pub tick_interval_ms: u64,
    /// Recovery events kept for inspection.
    pub events_kept_max: usize,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("node_name", &self.node_name)
            .field(
                "cluster_secret",
                &format_args!("<{} bytes redacted>", self.cluster_secret.len()),
            )
            .field("wire", &self.wire)
            .field("dial_timeout_ms", &self.dial_timeout_ms)
            .field("auth_timeout_ms", &self.auth_timeout_ms)
            .field("send_queue_frames_max", &self.send_queue_frames_max)
            .field("append_queue_entries_max", &self.append_queue_entries_max)
            .field("tick_interval_ms", &self.tick_interval_ms)
            .field("events_kept_max", &self.events_kept_max)
            .finish()
    }
}

impl NetConfig {
    pub fn new(node_name: &str, cluster_secret: &[u8]) -> Self {
        Self {
            node_name: node_name.to_string(),
            cluster_secret: cluster_secret.to_vec(),
            wire: WireConfig::default(),
            dial_timeout_ms: 3_000,
            auth_timeout_ms: 3_000,
            send_queue_frames_max: 65_536,
            append_queue_entries_max: 65_536,
            tick_interval_ms: 10,
            events_kept_max: 4096,
        }
    }
}
