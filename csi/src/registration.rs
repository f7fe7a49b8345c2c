//! Registration of the CSI node plugin with the kubelet, without the
//! node-driver-registrar sidecar: the kubelet's plugin watcher finds a unix socket under
//! `<kubelet-dir>/plugins_registry/`, calls `GetInfo` on the `pluginregistration`
//! service there (type `CSIPlugin`, the driver name, the CSI endpoint as the kubelet sees
//! it, the supported versions), validates it, calls the CSI endpoint's `NodeGetInfo`,
//! and reports the outcome with `NotifyRegistrationStatus`.
//!
//! The registration socket lives as long as [`serve`] runs; when it returns the socket
//! file is removed, which is how the kubelet learns the plugin went away. A stale socket
//! left by a crashed predecessor is replaced (as for the CSI socket); any other file at
//! that path is refused. The last status the kubelet reported is kept in
//! [`RegistrationState`] for logs and tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::registration_proto::registration_server::{Registration, RegistrationServer};
use crate::registration_proto::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use crate::server::listen_unix;

/// The plugin type the kubelet's CSI plugin handler accepts.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// CSI spec versions the kubelet may speak to this plugin.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration socket's file name for driver `name` (the registrar's convention).
pub fn socket_name(driver: &str) -> String {
    format!("{driver}-reg.sock")
}

/// What the kubelet said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RegistrationState {
    /// No `NotifyRegistrationStatus` yet.
    #[default]
    Pending,
    Registered,
    /// The kubelet refused the plugin, with its reason.
    Failed(String),
}

/// The `pluginregistration.Registration` service of one CSI driver.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    driver: String,
    csi_endpoint: PathBuf,
    state: Arc<Mutex<RegistrationState>>,
}

impl RegistrationService {
    /// `csi_endpoint` is the CSI socket's path on the node, as the kubelet opens it.
    pub fn new(driver: impl Into<String>, csi_endpoint: impl Into<PathBuf>) -> Self {
        RegistrationService {
            driver: driver.into(),
            csi_endpoint: csi_endpoint.into(),
            state: Arc::default(),
        }
    }

    /// The last status the kubelet reported.
    pub fn state(&self) -> RegistrationState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> std::result::Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_owned(),
            name: self.driver.clone(),
            endpoint: self.csi_endpoint.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> std::result::Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let next = if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
            RegistrationState::Registered
        } else {
            tracing::error!(driver = %self.driver, error = %status.error, "the kubelet refused the registration");
            RegistrationState::Failed(status.error)
        };
        match self.state.lock() {
            Ok(mut s) => *s = next,
            Err(p) => *p.into_inner() = next,
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Serves `service` on `socket` until `shutdown` completes, then removes the socket so
/// the kubelet deregisters the plugin.
pub async fn serve(
    socket: &Path,
    service: RegistrationService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = listen_unix(socket)?;
    tracing::info!(socket = %socket.display(), "serving kubelet plugin registration");
    let served = Server::builder()
        .add_service(RegistrationServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = std::fs::remove_file(socket) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the registration socket");
        }
    }
    served.map_err(|e| Error::Unavailable(format!("registration server stopped: {e}")))
}
