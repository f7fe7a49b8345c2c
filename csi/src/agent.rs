//! Client of the local node agent (`blockvol.agent.v1.NodeAgent`) over its unix
//! socket. The channel connects lazily, so the node plugin starts before the agent
//! and a restarted agent is picked up by the next call; every call has a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::agent_proto::node_agent_client::NodeAgentClient;
use crate::agent_proto::{
    AttachRequest, AttachResponse, DetachRequest, ExpandRequest, ExpandResponse, StatsRequest,
    StatsResponse,
};
use crate::error::{Error, Result};

/// Where the agent listens and how long a call may take.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub socket_path: PathBuf,
    /// Upper bound of one agent call (attach may wait for the volume's primary).
    pub agent_call_timeout_ms: u64,
}

/// A handle on the node agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    client: NodeAgentClient<Channel>,
}

/// A channel to a gRPC server on a unix socket, connecting on first use.
pub fn unix_channel(socket_path: &Path, call_timeout: Duration) -> Result<Channel> {
    let path = socket_path.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: the connector
    // below always dials the socket.
    let endpoint = Endpoint::try_from("http://agent.invalid")
        .map_err(|e| Error::Internal(format!("agent endpoint: {e}")))?
        .timeout(call_timeout)
        .connect_timeout(call_timeout);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })),
    )
}

impl Agent {
    pub fn new(settings: &AgentSettings) -> Result<Self> {
        let channel = unix_channel(
            &settings.socket_path,
            Duration::from_millis(settings.agent_call_timeout_ms),
        )?;
        Ok(Agent {
            client: NodeAgentClient::new(channel),
        })
    }

    /// Attaches `volume_id` here, for no attachment generation in particular.
    pub async fn attach(&self, volume_id: &str, readonly: bool) -> Result<AttachResponse> {
        self.attach_for(volume_id, readonly, 0).await
    }

    /// Attaches `volume_id` here for the attachment of generation `attachment` (0:
    /// unknown, from a ControllerPublish that recorded none).
    pub async fn attach_for(
        &self,
        volume_id: &str,
        readonly: bool,
        attachment: u64,
    ) -> Result<AttachResponse> {
        let reply = self
            .client
            .clone()
            .attach(AttachRequest {
                volume_id: volume_id.to_string(),
                readonly,
                attachment_generation: attachment,
            })
            .await
            .map_err(|s| Error::agent("Attach", s))?
            .into_inner();
        let path = Path::new(&reply.device_path);
        if !path.is_absolute() {
            return Err(Error::Internal(format!(
                "node agent Attach returned device path {:?}, which is not absolute",
                reply.device_path
            )));
        }
        Ok(reply)
    }

    pub async fn detach(&self, volume_id: &str) -> Result<()> {
        self.client
            .clone()
            .detach(DetachRequest {
                volume_id: volume_id.to_string(),
            })
            .await
            .map_err(|s| Error::agent("Detach", s))?;
        Ok(())
    }

    pub async fn stats(&self, volume_id: &str) -> Result<StatsResponse> {
        Ok(self
            .client
            .clone()
            .stats(StatsRequest {
                volume_id: volume_id.to_string(),
            })
            .await
            .map_err(|s| Error::agent("Stats", s))?
            .into_inner())
    }

    pub async fn expand(&self, volume_id: &str, size_bytes: u64) -> Result<ExpandResponse> {
        Ok(self
            .client
            .clone()
            .expand(ExpandRequest {
                volume_id: volume_id.to_string(),
                size_bytes,
            })
            .await
            .map_err(|s| Error::agent("Expand", s))?
            .into_inner())
    }
}
