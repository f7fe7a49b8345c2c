//! Serving the CSI services on the endpoint the CO gives (`unix:///csi/csi.sock`, the
//! usual, or `tcp://127.0.0.1:port` for tools). A stale socket file left by a crashed
//! predecessor is replaced; any other file at that path is refused, never deleted.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::controller::ControllerService;
use crate::csi_proto::controller_server::ControllerServer;
use crate::csi_proto::identity_server::IdentityServer;
use crate::csi_proto::node_server::NodeServer;
use crate::error::{Error, Result};
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    /// Parses `unix:///path`, `unix:/path`, an absolute path, or `tcp://ip:port`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let addr = rest.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "endpoint {s:?}: expected tcp://IP:PORT (for example tcp://127.0.0.1:10000)"
                ))
            })?;
            return Ok(Endpoint::Tcp(addr));
        }
        let path = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
            .unwrap_or(s);
        if !path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "endpoint {s:?}: expected unix:///ABSOLUTE/PATH or tcp://IP:PORT"
            )));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

/// Binds a unix socket at `path`, replacing a stale socket file.
pub fn listen_unix(path: &Path) -> Result<UnixListenerStream> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))?,
        Ok(_) => {
            return Err(Error::FailedPrecondition(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    Ok(UnixListenerStream::new(listener))
}

/// The services one process serves.
pub struct Services {
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
}

/// Serves until `shutdown` completes.
pub async fn serve(
    endpoint: &Endpoint,
    services: Services,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let router = Server::builder()
        .add_service(IdentityServer::new(services.identity))
        .add_optional_service(services.controller.map(ControllerServer::new))
        .add_optional_service(services.node.map(NodeServer::new));
    let served = match endpoint {
        Endpoint::Unix(path) => {
            let incoming = listen_unix(path)?;
            tracing::info!(endpoint = %path.display(), "serving CSI");
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
            tracing::info!(endpoint = %addr, "serving CSI");
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    };
    served.map_err(|e| Error::Unavailable(format!("CSI server stopped: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_in_the_spellings_sidecars_use() {
        assert_eq!(
            Endpoint::parse("unix:///csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".parse().unwrap())
        );
        assert!(Endpoint::parse("csi.sock").is_err());
        assert!(Endpoint::parse("tcp://localhost").is_err());
    }
}
