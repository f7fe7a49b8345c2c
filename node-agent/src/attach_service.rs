//! The agent's local gRPC service for the CSI node plugin (`blockvol.agent.v1.NodeAgent`,
//! defined in csi/proto/agent.proto): Attach turns the volume's NBD export on this node
//! into a kernel block device through an [`Attacher`]; Expand grows an attached device
//! to the volume's new size while it stays in use. Every call is idempotent and errors
//! carry the gRPC codes the proto documents.
//!
//! With forwarding on (the agent's setup), every device is attached through a
//! forwarding export, also when the primary serves on this node (it then runs requests
//! in process): one path that survives the primary moving away. Forwarding exports live
//! in agent memory, so [`AttachService::restore_forwarding`] re-creates them at start for
//! every attachment the attacher persisted, before the attach proxy gives up
//! reconnecting.

use std::path::PathBuf;
use std::sync::Arc;

use csi::agent_proto::node_agent_server::NodeAgent;
use csi::agent_proto::{
    AttachRequest, AttachResponse, DetachRequest, DetachResponse, ExpandRequest, ExpandResponse,
    StatsRequest, StatsResponse,
};
use tonic::{Request, Response, Status};

use crate::attach::{self, Attacher, validate_volume_name};
use crate::forward::{
    ForwardSettings, ForwardingBackend, LocalPath, PrimaryResolver, ResolveError,
};
use crate::metrics::NbdMetrics;
use crate::nbd::{BlockBackend, ExportRegistry};

/// Which volumes have a local replica at all (to tell NOT_FOUND from
/// FAILED_PRECONDITION when there is no export here).
pub type LocalVolumes = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Forwarding exports: served on their own NBD socket (same export name, the volume's),
/// so they never collide with a local primary's export when the primary moves here.
pub struct Forwarding {
    pub exports: ExportRegistry,
    pub nbd_socket: PathBuf,
    pub net: engine::replication::NetConfig,
    pub settings: ForwardSettings,
    pub resolver: Arc<dyn PrimaryResolver>,
    /// How long removing a forwarding export waits for its connections to close.
    pub remove_wait_ms: u64,
    /// This node's primaries, for the in-process fast path (None: always the data port).
    pub local: Option<LocalPath>,
    /// Counts the IO of every forwarding export, when set.
    pub metrics: Option<NbdMetrics>,
}

/// The attach service: exports come from the NBD registry (a local primary) or are
/// forwarding exports made on demand; devices come from the attacher.
pub struct AttachService {
    exports: ExportRegistry,
    nbd_socket: PathBuf,
    attacher: Arc<dyn Attacher>,
    local: LocalVolumes,
    forwarding: Option<Forwarding>,
    /// The forwarding backends by volume, for Expand (the registry holds them untyped).
    forwarded: std::sync::Mutex<std::collections::BTreeMap<String, Arc<ForwardingBackend>>>,
}

impl AttachService {
    pub fn new(
        exports: ExportRegistry,
        nbd_socket: PathBuf,
        attacher: Arc<dyn Attacher>,
        local: LocalVolumes,
    ) -> Self {
        AttachService {
            exports,
            nbd_socket,
            attacher,
            local,
            forwarding: None,
            forwarded: Default::default(),
        }
    }

    /// Lets Attach work on nodes without the volume's primary, by forwarding.
    pub fn with_forwarding(mut self, forwarding: Forwarding) -> Self {
        self.forwarding = Some(forwarding);
        self
    }

    /// The export serving `volume` here and the socket it is on: with forwarding, only
    /// a forwarding export (devices never attach to a local primary's export, which
    /// disappears when the primary moves away); without, a local primary's export.
    fn served(&self, volume: &str) -> Option<(Arc<dyn BlockBackend>, PathBuf)> {
        if let Some(f) = &self.forwarding {
            return f
                .exports
                .get(volume)
                .map(|e| (e.backend().clone(), f.nbd_socket.clone()));
        }
        self.exports
            .get(volume)
            .map(|e| (e.backend().clone(), self.nbd_socket.clone()))
    }

    /// Makes the forwarding export of `volume` (resolving and reaching its primary).
    async fn open_forwarding(
        &self,
        volume: &str,
    ) -> Result<(Arc<dyn BlockBackend>, PathBuf), Status> {
        let Some(f) = &self.forwarding else {
            return Err(Status::failed_precondition(format!(
                "volume {volume} has no serving primary on this node and forwarding is off"
            )));
        };
        // Answer at once when there is nothing to wait for; a primary that exists but is
        // unreachable is waited for (failover_wait_ms) like any forwarded request.
        match f.resolver.resolve(volume).await {
            Ok(_) | Err(ResolveError::Lookup(_)) => {}
            Err(e @ ResolveError::UnknownVolume(_)) => {
                return Err(Status::not_found(e.to_string()));
            }
            Err(e @ ResolveError::NoPrimary(_)) => {
                return Err(Status::failed_precondition(e.to_string()));
            }
        }
        let backend = ForwardingBackend::open_with_local(
            volume,
            f.net.clone(),
            f.settings.clone(),
            f.resolver.clone(),
            f.local.clone(),
        )
        .await
        .map_err(|e| Status::unavailable(format!("volume {volume}: reaching its primary: {e}")))?;
        let typed = Arc::new(backend);
        let backend: Arc<dyn BlockBackend> = match &f.metrics {
            Some(m) => m.wrap_forwarding(volume, typed.clone()),
            None => typed.clone(),
        };
        match f.exports.add(volume, backend.clone()) {
            Ok(_) => {
                self.forwarded_map()
                    .insert(volume.to_string(), typed.clone());
            }
            // A concurrent Attach made it first; use that one.
            Err(crate::nbd::Error::ExportExists(_)) => {}
            Err(e) => return Err(Status::internal(format!("forwarding export: {e}"))),
        }
        let in_process = typed.is_local().await;
        tracing::info!(volume, in_process, "forwarding export created");
        let served = f.exports.get(volume).map(|e| e.backend().clone());
        Ok((served.unwrap_or(backend), f.nbd_socket.clone()))
    }

    fn forwarded_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Arc<ForwardingBackend>>> {
        self.forwarded.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn remove_forwarding(&self, volume: &str) -> Result<(), Status> {
        let Some(f) = &self.forwarding else {
            return Ok(());
        };
        self.forwarded_map().remove(volume);
        match f.exports.remove(volume, f.remove_wait_ms).await {
            Ok(()) => {
                tracing::info!(volume, "forwarding export removed");
                Ok(())
            }
            Err(crate::nbd::Error::ExportNotFound(_)) => Ok(()),
            Err(e) => Err(Status::unavailable(format!(
                "removing the forwarding export: {e}"
            ))),
        }
    }

    /// Re-creates the forwarding export of every attachment the attacher persisted on
    /// the forwarding socket (they live in agent memory, so an agent restart lost them
    /// while the attach proxies keep the devices and re-dial). Each volume is restored
    /// on its own: one waits for its primary up to `failover_wait_ms` without holding
    /// up the others. Returns how many exports were restored.
    ///
    /// A volume whose primary stays unreachable for that long is logged and left; the
    /// next Attach of it (the CSI node plugin retries staging) creates the export.
    pub async fn restore_forwarding(&self) -> usize {
        let Some(f) = &self.forwarding else {
            return 0;
        };
        let attachments = match self.blocking(|a| a.list()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "listing persisted attachments to restore");
                return 0;
            }
        };
        let mine: Vec<_> = attachments
            .into_iter()
            .filter(|a| a.socket == f.nbd_socket)
            .collect();
        let restored = futures::future::join_all(mine.iter().map(|a| async move {
            if f.exports.get(&a.volume).is_some() {
                return true;
            }
            match self.open_forwarding(&a.volume).await {
                Ok(_) => {
                    tracing::info!(
                        volume = %a.volume,
                        device = %a.device.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                        "restored the forwarding export of an attached device"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(volume = %a.volume, error = %e.message(), "restoring the forwarding export of an attached device failed");
                    false
                }
            }
        }))
        .await;
        restored.into_iter().filter(|ok| *ok).count()
    }

    fn check_name(volume: &str) -> Result<(), Status> {
        if volume.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        validate_volume_name(volume).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Attacher) -> attach::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let a = self.attacher.clone();
        tokio::task::spawn_blocking(move || f(&*a))
            .await
            .map_err(|e| Status::internal(format!("attach task: {e}")))?
            .map_err(status_of)
    }
}

impl AttachService {
    /// Grows the attached device of `volume` (if it has one here) to the export's
    /// `size`, in use: returns the device's size as the kernel reports it, or `size`
    /// when nothing is attached.
    async fn grow_device(&self, volume: &str, size: u64) -> Result<u64, Status> {
        let list = self.blocking(|a| a.list()).await?;
        if !list
            .iter()
            .any(|a| a.volume == volume && a.device.is_some())
        {
            return Ok(size);
        }
        let v = volume.to_string();
        let device_size = self.blocking(move |a| a.resize(&v)).await?;
        if device_size < size {
            return Err(Status::internal(format!(
                "volume {volume}: its device has {device_size} bytes after growing, the volume {size}"
            )));
        }
        tracing::info!(volume, size_bytes = device_size, "attached device grown");
        Ok(device_size)
    }
}

fn status_of(e: attach::Error) -> Status {
    match &e {
        attach::Error::InvalidVolumeName { .. } => Status::invalid_argument(e.to_string()),
        attach::Error::Busy { .. } | attach::Error::AttachedElsewhere { .. } => {
            Status::failed_precondition(e.to_string())
        }
        attach::Error::Unsupported(_) => Status::failed_precondition(e.to_string()),
        attach::Error::Timeout { .. } => Status::unavailable(e.to_string()),
        attach::Error::NotAttached { .. } => Status::failed_precondition(e.to_string()),
        // The export did not answer the handshake (agent restarting, volume not yet
        // served): worth a retry, like a timeout.
        attach::Error::Resize { .. } | attach::Error::Handshake { .. } => {
            Status::unavailable(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl NodeAgent for AttachService {
    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let req = request.into_inner();
        Self::check_name(&req.volume_id)?;
        if req.readonly {
            return Err(Status::failed_precondition(
                "read-only attachment is not supported by this agent",
            ));
        }
        let (backend, socket, created) = match self.served(&req.volume_id) {
            Some((b, s)) => (b, s, false),
            None if self.forwarding.is_none() => {
                return Err(if (self.local)(&req.volume_id) {
                    Status::failed_precondition(format!(
                        "volume {} has no serving primary on this node",
                        req.volume_id
                    ))
                } else {
                    Status::not_found(format!(
                        "volume {} has no replica on this node",
                        req.volume_id
                    ))
                });
            }
            None => {
                let (b, s) = self.open_forwarding(&req.volume_id).await?;
                (b, s, true)
            }
        };
        let size_bytes = backend.size_bytes();
        let volume = req.volume_id.clone();
        let device = match self.blocking(move |a| a.attach(&volume, &socket)).await {
            Ok(d) => d,
            Err(e) => {
                if created {
                    let _ = self.remove_forwarding(&req.volume_id).await;
                }
                return Err(e);
            }
        };
        tracing::info!(volume = %req.volume_id, device = %device.display(), "attached");
        Ok(Response::new(AttachResponse {
            device_path: device.display().to_string(),
            size_bytes,
        }))
    }

    async fn detach(
        &self,
        request: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let req = request.into_inner();
        Self::check_name(&req.volume_id)?;
        let volume = req.volume_id.clone();
        self.blocking(move |a| a.detach(&volume)).await?;
        self.remove_forwarding(&req.volume_id).await?;
        tracing::info!(volume = %req.volume_id, "detached");
        Ok(Response::new(DetachResponse {}))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let req = request.into_inner();
        Self::check_name(&req.volume_id)?;
        let list = self.blocking(|a| a.list()).await?;
        let attachment = list.into_iter().find(|x| x.volume == req.volume_id);
        let export = self.served(&req.volume_id);
        let (healthy, message) = match (&attachment, &export) {
            (_, Some(_)) => (true, String::new()),
            (Some(_), None) => (
                false,
                "the volume's primary no longer serves on this node".to_string(),
            ),
            (None, None) => (false, "the volume is not served on this node".to_string()),
        };
        Ok(Response::new(StatsResponse {
            attached: attachment.as_ref().is_some_and(|a| a.device.is_some()),
            device_path: attachment
                .and_then(|a| a.device)
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            size_bytes: export.map(|(b, _)| b.size_bytes()).unwrap_or(0),
            healthy,
            message,
        }))
    }

    async fn expand(
        &self,
        request: Request<ExpandRequest>,
    ) -> Result<Response<ExpandResponse>, Status> {
        let req = request.into_inner();
        Self::check_name(&req.volume_id)?;
        let forwarded = self.forwarded_map().get(&req.volume_id).cloned();
        if let Some(b) = forwarded {
            // The primary grows first; a forwarded attachment learns the size from it.
            let size = b.refresh_size().await.map_err(|e| {
                Status::unavailable(format!("volume {}: asking its primary: {e}", req.volume_id))
            })?;
            if size < req.size_bytes {
                return Err(Status::failed_precondition(format!(
                    "volume {} is {size} bytes at its primary; the replicas have not grown to {} bytes yet",
                    req.volume_id, req.size_bytes
                )));
            }
            let size = self.grow_device(&req.volume_id, size).await?;
            return Ok(Response::new(ExpandResponse { size_bytes: size }));
        }
        let export = self.exports.get(&req.volume_id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {} has no serving primary on this node",
                req.volume_id
            ))
        })?;
        let size = export.backend().size_bytes();
        if size < req.size_bytes {
            return Err(Status::failed_precondition(format!(
                "volume {} is {size} bytes here; the replicas have not grown to {} bytes yet",
                req.volume_id, req.size_bytes
            )));
        }
        let size = self.grow_device(&req.volume_id, size).await?;
        Ok(Response::new(ExpandResponse { size_bytes: size }))
    }
}
