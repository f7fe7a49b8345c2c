//! The agent's local gRPC service for the CSI node plugin (`blockvol.agent.v1.NodeAgent`,
//! defined in proto/proto/agent.proto): Attach turns the volume's NBD export on this node
//! into a kernel block device through an [`Attacher`]; Expand grows an attached device
//! to the volume's new size while it stays in use. Every call is idempotent and errors
//! carry the gRPC codes the proto documents.
//!
//! Expand grows nothing before every member of the volume's committed in-sync set
//! reports the new size ([`MemberSizes`], when set): the primary grows first and each
//! replica when its agent applies the new size, and a device grown earlier would send
//! writes past the end of a replica that has not grown yet. The wait is bounded
//! (`expand_wait`); past it Expand fails with UNAVAILABLE naming the members still
//! short, and the caller retries.
//!
//! With forwarding on (the agent's setup), every device is attached through a
//! forwarding export, also when the primary serves on this node (it then runs requests
//! in process): one path that survives the primary moving away. Forwarding exports live
//! in agent memory, so [`AttachService::restore_forwarding`] re-creates them at start for
//! every attachment the attacher persisted, before the attach proxy gives up
//! reconnecting.
//!
//! An Attach names the attachment's generation (from ControllerPublish); the export
//! sends it with every forwarded request. An export left by an attachment of another
//! generation (a re-attach to this node) is replaced, and the primary refuses requests
//! of the old one. Exports restored at start carry no generation (the node alone is
//! checked) until the next Attach.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use blockvol_proto::agent::node_agent_server::NodeAgent;
use blockvol_proto::agent::{
    AttachRequest, AttachResponse, DetachRequest, DetachResponse, ExpandRequest, ExpandResponse,
    StatsRequest, StatsResponse,
};
use engine::replication::AttachmentGeneration;
use tonic::{Request, Response, Status};

use crate::attach::{self, Attacher, validate_volume_name};
use crate::frontend::forwarding::{
    ForwardSettings, ForwardingBackend, LocalPath, PrimaryResolver, ResolveError,
};
use crate::frontend::metered::NbdMetrics;
use crate::frontend::nbd::{BlockBackend, ExportRegistry};

/// Which volumes have a local replica at all (to tell NOT_FOUND from
/// FAILED_PRECONDITION when there is no export here).
pub type LocalVolumes = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Members short of a size: each ReplicaID with the size it reports (None: none yet).
pub type ShortMembers = Vec<(String, Option<u64>)>;

/// How far the members of a volume have grown.
pub trait MemberSizes: Send + Sync + 'static {
    /// The members of `volume`'s committed in-sync set whose reported size is below
    /// `size_bytes`, each with the size it reports (None: none reported yet). Empty when
    /// every member has grown.
    fn short_of<'a>(
        &'a self,
        volume: &'a str,
        size_bytes: u64,
    ) -> BoxFuture<'a, Result<ShortMembers, String>>;
}

/// The members of the committed in-sync set, as the primary's spec (the highest epoch)
/// names it, whose `BlockReplica` status reports less than `size_bytes`. A member
/// without a `BlockReplica` counts as short (size None).
pub fn members_short_of(
    replicas: &[api::BlockReplica],
    volume: &str,
    size_bytes: u64,
) -> Result<ShortMembers, String> {
    let mine: Vec<&api::BlockReplica> = replicas
        .iter()
        .filter(|r| r.spec.volume == volume)
        .collect();
    let primary = mine
        .iter()
        .filter(|r| r.spec.role == api::ReplicaRole::Primary)
        .max_by_key(|r| r.spec.epoch)
        .ok_or_else(|| format!("volume {volume} has no primary"))?;
    let mut short = Vec::new();
    for member in &primary.spec.in_sync_set {
        let reported = mine
            .iter()
            .filter(|r| &r.spec.replica_id == member)
            .filter_map(|r| r.status.as_ref().and_then(|s| s.size_bytes))
            .max();
        if reported.is_none_or(|s| s < size_bytes) {
            short.push((member.clone(), reported));
        }
    }
    Ok(short)
}

/// [`MemberSizes`] from the API server: the volume's `BlockReplica`s.
pub struct KubeMemberSizes {
    client: kube::Client,
}

impl KubeMemberSizes {
    pub fn new(client: kube::Client) -> Self {
        KubeMemberSizes { client }
    }
}

impl MemberSizes for KubeMemberSizes {
    fn short_of<'a>(
        &'a self,
        volume: &'a str,
        size_bytes: u64,
    ) -> BoxFuture<'a, Result<ShortMembers, String>> {
        Box::pin(async move {
            let replicas: kube::Api<api::BlockReplica> = kube::Api::all(self.client.clone());
            let lp =
                kube::api::ListParams::default().labels(&format!("{}={volume}", api::LABEL_VOLUME));
            let list = replicas
                .list(&lp)
                .await
                .map_err(|e| format!("listing the replicas of {volume}: {e}"))?;
            members_short_of(&list.items, volume, size_bytes)
        })
    }
}

/// Waits until no member of `volume`'s in-sync set is short of `size_bytes`, asking
/// `sizes` every `poll` for at most `wait`. The error names the members still short
/// (or the last lookup error).
pub async fn wait_for_members(
    sizes: &dyn MemberSizes,
    volume: &str,
    size_bytes: u64,
    wait: Duration,
    poll: Duration,
) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let why = match sizes.short_of(volume, size_bytes).await {
            Ok(short) if short.is_empty() => return Ok(()),
            Ok(short) => short
                .iter()
                .map(|(id, s)| match s {
                    Some(s) => format!("{id} reports {s} bytes"),
                    None => format!("{id} reports no size"),
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + poll > deadline {
            return Err(Status::unavailable(format!(
                "volume {volume}: not every in-sync replica has grown to {size_bytes} bytes within {} ms ({why}); the device keeps its size, retry later",
                wait.as_millis()
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Forwarding exports: served on their own NBD socket (same export name, the volume's),
/// so they never collide with a local primary's export when the primary moves here.
pub struct Forwarding {
    pub exports: ExportRegistry,
    pub nbd_socket: PathBuf,
    pub net: engine::net::NetConfig,
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
    /// Expand waits for these members' sizes (None: grows at once, for tests without
    /// an API server).
    member_sizes: Option<Arc<dyn MemberSizes>>,
    /// How long Expand waits for the members to grow.
    expand_wait: Duration,
}

/// How long Expand waits for every in-sync replica to report the new size by default.
pub const EXPAND_WAIT_DEFAULT: Duration = Duration::from_secs(30);
/// How often Expand asks for the replicas' sizes while it waits.
const EXPAND_POLL: Duration = Duration::from_millis(250);

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
            member_sizes: None,
            expand_wait: EXPAND_WAIT_DEFAULT,
        }
    }

    /// Makes Expand wait, at most `wait`, until every in-sync replica reports the new
    /// size before it grows a device.
    pub fn with_member_sizes(mut self, sizes: Arc<dyn MemberSizes>, wait: Duration) -> Self {
        self.member_sizes = Some(sizes);
        self.expand_wait = wait;
        self
    }

    /// Waits until every in-sync member of `volume` has grown to `size` (see the module
    /// docs); at once without a [`MemberSizes`].
    async fn members_grown(&self, volume: &str, size: u64) -> Result<(), Status> {
        match &self.member_sizes {
            Some(m) => {
                wait_for_members(m.as_ref(), volume, size, self.expand_wait, EXPAND_POLL).await
            }
            None => Ok(()),
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

    /// Makes the forwarding export of `volume` for the attachment of generation
    /// `attachment` (resolving and reaching its primary).
    async fn open_forwarding(
        &self,
        volume: &str,
        attachment: Option<AttachmentGeneration>,
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
        let backend = ForwardingBackend::open_attached(
            volume,
            f.net.clone(),
            f.settings.clone(),
            f.resolver.clone(),
            f.local.clone(),
            attachment,
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
            Err(crate::frontend::nbd::Error::ExportExists(_)) => {}
            Err(e) => return Err(Status::internal(format!("forwarding export: {e}"))),
        }
        let in_process = typed.is_local().await;
        tracing::info!(
            volume,
            in_process,
            attachment = attachment.map(|g| g.0),
            "forwarding export created"
        );
        let served = f.exports.get(volume).map(|e| e.backend().clone());
        Ok((served.unwrap_or(backend), f.nbd_socket.clone()))
    }

    /// Whether the forwarding export of `volume` here serves another attachment than
    /// the generation `attachment` an Attach asks for (so it must be replaced).
    fn other_attachment(&self, volume: &str, attachment: Option<AttachmentGeneration>) -> bool {
        self.forwarding.is_some()
            && attachment.is_some()
            && self
                .forwarded_map()
                .get(volume)
                .is_some_and(|e| e.attachment() != attachment)
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
            Err(crate::frontend::nbd::Error::ExportNotFound(_)) => Ok(()),
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
            match self.open_forwarding(&a.volume, None).await {
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
        let attachment = (req.attachment_generation > 0)
            .then_some(AttachmentGeneration(req.attachment_generation));
        if self.other_attachment(&req.volume_id, attachment) {
            // An export left by an earlier attachment (a re-attach to this node): its
            // requests carry the older generation, which the primary refuses; this
            // attachment gets an export of its own.
            tracing::info!(
                volume = %req.volume_id,
                attachment = req.attachment_generation,
                "replacing the forwarding export of an earlier attachment"
            );
            self.remove_forwarding(&req.volume_id).await?;
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
                let (b, s) = self.open_forwarding(&req.volume_id, attachment).await?;
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
            self.members_grown(&req.volume_id, size).await?;
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
        self.members_grown(&req.volume_id, size).await?;
        let size = self.grow_device(&req.volume_id, size).await?;
        Ok(Response::new(ExpandResponse { size_bytes: size }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn replica(
        id: &str,
        role: api::ReplicaRole,
        epoch: u64,
        size: Option<u64>,
    ) -> api::BlockReplica {
        let mut r = api::BlockReplica::new(
            &format!("vol-{id}"),
            api::BlockReplicaSpec {
                pvc: None,
                volume: "vol".into(),
                replica_id: id.into(),
                node: format!("node-{id}"),
                role,
                epoch,
                size_bytes: 2 << 20,
                block_size: 4096,
                durability: api::Durability::SyncAll,
                peers: vec![],
                in_sync_set: if role == api::ReplicaRole::Primary {
                    vec!["a".into(), "b".into(), "c".into()]
                } else {
                    vec![]
                },
                in_sync_set_generation: 1,
            },
        );
        r.status = size.map(|s| api::BlockReplicaStatus {
            size_bytes: Some(s),
            ..Default::default()
        });
        r
    }

    #[test]
    fn members_short_of_names_every_in_sync_member_below_the_size() {
        use api::ReplicaRole::{Primary, Replica};
        let grown = 2 << 20;
        let all = vec![
            replica("a", Primary, 3, Some(grown)),
            replica("b", Replica, 3, Some(1 << 20)),
            replica("c", Replica, 3, None),
            // Not in the in-sync set: its size does not matter.
            replica("d", Replica, 3, Some(1 << 20)),
        ];
        assert_eq!(
            members_short_of(&all, "vol", grown).unwrap(),
            vec![("b".to_string(), Some(1 << 20)), ("c".to_string(), None)]
        );
        assert_eq!(
            members_short_of(&all, "vol", 1 << 20).unwrap(),
            vec![("c".to_string(), None)]
        );
        let grown_all = vec![
            replica("a", Primary, 3, Some(grown)),
            replica("b", Replica, 3, Some(grown)),
            replica("c", Replica, 3, Some(grown)),
        ];
        assert!(
            members_short_of(&grown_all, "vol", grown)
                .unwrap()
                .is_empty()
        );
        // A member missing altogether is short, not skipped.
        assert_eq!(
            members_short_of(&grown_all[..2], "vol", grown).unwrap(),
            vec![("c".to_string(), None)]
        );
        assert!(
            members_short_of(&all[1..], "vol", grown).is_err(),
            "no primary"
        );
    }

    /// Short for the first `short_calls` calls, then grown.
    struct Growing {
        calls: AtomicUsize,
        short_calls: usize,
    }

    impl MemberSizes for Growing {
        fn short_of<'a>(
            &'a self,
            _volume: &'a str,
            _size_bytes: u64,
        ) -> BoxFuture<'a, Result<ShortMembers, String>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let short = if n < self.short_calls {
                vec![("b".to_string(), Some(1 << 20))]
            } else {
                vec![]
            };
            Box::pin(async move { Ok(short) })
        }
    }

    #[tokio::test]
    async fn expand_waits_for_the_members_and_gives_up_naming_them() {
        let poll = Duration::from_millis(5);
        let growing = Growing {
            calls: AtomicUsize::new(0),
            short_calls: 3,
        };
        wait_for_members(&growing, "vol", 2 << 20, Duration::from_secs(30), poll)
            .await
            .expect("the member grows while Expand waits");
        assert_eq!(growing.calls.load(Ordering::SeqCst), 4);

        let never = Growing {
            calls: AtomicUsize::new(0),
            short_calls: usize::MAX,
        };
        let err = wait_for_members(&never, "vol", 2 << 20, Duration::from_millis(50), poll)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("b reports 1048576 bytes"), "{err}");
    }

    /// Attach hands the attachment generation to the forwarding export, whose requests
    /// carry it; an Attach of the same generation keeps the export, one of another
    /// generation (a re-attach to this node) replaces it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attach_of_a_new_generation_replaces_the_forwarding_export() {
        use crate::frontend::forwarding::PrimaryTarget;
        use engine::forward::{ForwardHandler, ForwardOutcome, ForwardSource};
        use engine::net::NetConfig;
        use engine::replication::{Epoch, ForwardOp, ForwardPayload, VolumeId};
        use std::path::Path;

        /// A primary on this node that records the generation of every request.
        #[derive(Default)]
        struct Primary(std::sync::Mutex<Vec<Option<AttachmentGeneration>>>);
        impl ForwardHandler for Primary {
            fn handle(
                &self,
                from: &ForwardSource,
                _volume: &VolumeId,
                epoch: Epoch,
                op: ForwardOp,
            ) -> ForwardOutcome {
                self.0.lock().unwrap().push(from.attachment());
                let payload = match op {
                    ForwardOp::Geometry => ForwardPayload::Geometry {
                        size_bytes: 1 << 20,
                        block_size: 4096,
                    },
                    ForwardOp::Read { length, .. } => {
                        ForwardPayload::Data(vec![0; length as usize])
                    }
                    _ => ForwardPayload::None,
                };
                ForwardOutcome::ok(epoch, payload)
            }
        }
        impl crate::frontend::forwarding::LocalExecutor for Primary {
            fn serves(&self, _volume: &str) -> bool {
                true
            }
        }
        struct Here;
        impl PrimaryResolver for Here {
            fn resolve<'a>(
                &'a self,
                _volume: &'a str,
            ) -> BoxFuture<'a, Result<PrimaryTarget, ResolveError>> {
                Box::pin(async {
                    Ok(PrimaryTarget {
                        node: "a".into(),
                        addr: "127.0.0.1:9".parse().unwrap(),
                        epoch: Epoch(1),
                    })
                })
            }
        }
        struct Devices;
        impl Attacher for Devices {
            fn attach(&self, volume: &str, _socket: &Path) -> attach::Result<PathBuf> {
                Ok(PathBuf::from(format!("/dev/test-{volume}")))
            }
            fn detach(&self, _volume: &str) -> attach::Result<()> {
                Ok(())
            }
            fn list(&self) -> attach::Result<Vec<attach::Attachment>> {
                Ok(vec![])
            }
        }

        let primary = Arc::new(Primary::default());
        let svc = AttachService::new(
            ExportRegistry::new(),
            PathBuf::from("/nonexistent/nbd.sock"),
            Arc::new(Devices),
            Arc::new(|_: &str| false),
        )
        .with_forwarding(Forwarding {
            exports: ExportRegistry::new(),
            nbd_socket: PathBuf::from("/nonexistent/forward.sock"),
            net: NetConfig::new("a", b"secret"),
            settings: ForwardSettings::default(),
            resolver: Arc::new(Here),
            remove_wait_ms: 1_000,
            local: Some(LocalPath {
                node: "a".into(),
                primaries: primary.clone(),
            }),
            metrics: None,
        });
        let attach = |g: u64| {
            svc.attach(Request::new(AttachRequest {
                volume_id: "vol".into(),
                readonly: false,
                attachment_generation: g,
            }))
        };
        let export = || svc.forwarded_map().get("vol").cloned().expect("export");
        let g = |n| Some(AttachmentGeneration(n));

        attach(1).await.expect("attach");
        let first = export();
        assert_eq!(first.attachment(), g(1));
        attach(1).await.expect("attach again");
        assert!(
            Arc::ptr_eq(&first, &export()),
            "the same attachment kept its export"
        );
        attach(2).await.expect("attach of a new generation");
        let second = export();
        assert!(!Arc::ptr_eq(&first, &second), "the export was not replaced");
        assert_eq!(second.attachment(), g(2));
        let seen = primary.0.lock().unwrap().clone();
        assert_eq!(seen.first(), Some(&g(1)), "{seen:?}");
        assert_eq!(seen.last(), Some(&g(2)), "{seen:?}");
    }
}
