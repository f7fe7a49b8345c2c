//! CSI Node service: stages a volume by asking the local node agent for its block
//! device, then either mounts a filesystem on it (made on first use) or bind-mounts
//! the device node itself, and publishes by bind-mounting into the pod's path.
//!
//! Guarantees:
//! - Every call is idempotent: state is read back from the mount table, so a retry
//!   after a crash finishes or confirms the work instead of repeating it.
//! - A device is formatted only when blkid finds no signature and its first MiB is
//!   zeros; anything else that is not the requested filesystem is refused.
//! - Paths from the CO must be absolute and free of `..`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};

use crate::agent::{Agent, AgentSettings};
use crate::csi_proto::node_server::Node;
use crate::csi_proto::node_service_capability::rpc::Type as RpcType;
use crate::csi_proto::node_service_capability::{self, Rpc};
use crate::csi_proto::volume_capability::access_mode::Mode;
use crate::csi_proto::*;
use crate::error::{Error, Result};
use crate::guard::InFlight;
use crate::mount::{self, CommandSettings, DeviceContent, check_path, mount_at};
use crate::params::{Access, CTX_FS_TYPE, DEFAULT_FS_TYPE, FS_TYPES, check_capability};
use crate::rpc::{required, required_capability, run};

/// Name of the file inside the staging directory onto which a raw block volume's
/// device is bind-mounted: the record that the volume is staged, and the source
/// of every publish.
pub const BLOCK_STAGE_FILE: &str = "blockdev";

/// What the node plugin needs to run.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// This node's name, reported by NodeGetInfo and used as the topology value.
    pub node_id: String,
    pub agent: AgentSettings,
    pub commands: CommandSettings,
    /// The kubelet's directory: when set, staging and target paths must lie under it,
    /// so a confused or hostile caller cannot mount over arbitrary host paths.
    pub kubelet_dir: Option<PathBuf>,
}

/// The Node service.
#[derive(Clone)]
pub struct NodeService {
    node_id: String,
    agent: Agent,
    commands: CommandSettings,
    kubelet_dir: Option<PathBuf>,
    inflight: InFlight,
}

/// The attachment generation ControllerPublish handed over in the publish context
/// ([`crate::controller::CTX_ATTACHMENT_GENERATION`]); 0 when it named none.
fn attachment_generation(ctx: &std::collections::HashMap<String, String>) -> Result<u64> {
    match ctx.get(crate::controller::CTX_ATTACHMENT_GENERATION) {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "publish_context {:?} is {v:?}, not a non-negative integer",
                crate::controller::CTX_ATTACHMENT_GENERATION
            ))
        }),
    }
}

impl NodeService {
    pub fn new(settings: NodeSettings) -> Result<Self> {
        if settings.node_id.is_empty() {
            return Err(Error::InvalidArgument("node id is required".into()));
        }
        Ok(NodeService {
            node_id: settings.node_id,
            agent: Agent::new(&settings.agent)?,
            commands: settings.commands,
            kubelet_dir: settings.kubelet_dir,
            inflight: InFlight::new(),
        })
    }
}

impl NodeService {
    /// [`check_path`], and with a kubelet directory configured, that `path` lies
    /// strictly inside it.
    fn check_kubelet_path(&self, field: &str, path: &str) -> Result<()> {
        check_path(field, path)?;
        match &self.kubelet_dir {
            Some(dir) if !Path::new(path).starts_with(dir) || Path::new(path) == dir => {
                Err(Error::InvalidArgument(format!(
                    "{field} {path:?} is outside the kubelet directory {}",
                    dir.display()
                )))
            }
            _ => Ok(()),
        }
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

/// Creates an empty regular file (a bind-mount target for a device), and its parents.
fn create_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(|_| ())
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

/// Removes a file or an empty directory; a missing one is fine. A directory that
/// still holds files after its unmount is left alone (it is not ours to empty).
fn remove_path(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// The path a volume is published at, for calls that only inspect or grow it. A
/// path that is not absolute and clean cannot be one the CO published, so the
/// volume is reported not found there.
fn volume_path(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(Error::InvalidArgument("volume_path is required".into()));
    }
    check_path("volume_path", path)
        .map_err(|e| Error::NotFound(format!("no volume can be published there: {e}")))?;
    Ok(PathBuf::from(path))
}

impl NodeService {
    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        self.check_kubelet_path("staging_target_path", &req.staging_target_path)?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let _guard = self.inflight.try_acquire(volume_id)?;
        let staging = PathBuf::from(&req.staging_target_path);
        let readonly = cap.is_read_only();
        let attachment = attachment_generation(&req.publish_context)?;
        match &cap.access {
            Access::Block => {
                let dev_file = staging.join(BLOCK_STAGE_FILE);
                if mount_at(&dev_file)?.is_some() {
                    return Ok(NodeStageVolumeResponse {});
                }
                let attached = self
                    .agent
                    .attach_for(volume_id, readonly, attachment)
                    .await?;
                create_file(&dev_file)?;
                mount::bind_mount(
                    &self.commands,
                    Path::new(&attached.device_path),
                    &dev_file,
                    false,
                )
                .await?;
                tracing::info!(device = %attached.device_path, "staged raw block volume");
            }
            Access::Mount {
                fs_type,
                mount_flags,
            } => {
                let fs = fs_type
                    .clone()
                    .or_else(|| req.volume_context.get(CTX_FS_TYPE).cloned())
                    .unwrap_or_else(|| DEFAULT_FS_TYPE.to_string());
                if !FS_TYPES.contains(&fs.as_str()) {
                    return Err(Error::InvalidArgument(format!(
                        "volume_context {CTX_FS_TYPE:?} {fs:?} is not supported: allowed \
                         values are \"ext4\", \"xfs\""
                    )));
                }
                if let Some(existing) = mount_at(&staging)? {
                    if existing.fs_type == fs {
                        return Ok(NodeStageVolumeResponse {});
                    }
                    return Err(Error::FailedPrecondition(format!(
                        "staging path {} already holds a {} mount of {}, not {fs}",
                        staging.display(),
                        existing.fs_type,
                        existing.source
                    )));
                }
                let attached = self
                    .agent
                    .attach_for(volume_id, readonly, attachment)
                    .await?;
                let device = PathBuf::from(&attached.device_path);
                match mount::probe(&self.commands, &device).await? {
                    DeviceContent::Filesystem(found) if found == fs => {
                        // Expanded while detached: grow before mounting (see
                        // mount::grow_unmounted_ext4). Read-only stages leave it alone.
                        if fs == "ext4"
                            && !readonly
                            && mount::grow_unmounted_ext4(&self.commands, &device).await?
                        {
                            tracing::info!(device = %device.display(), "grew ext4 to fill the expanded device before mounting");
                        }
                    }
                    DeviceContent::Filesystem(found) => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {volume_id:?} holds a {found} filesystem, the request \
                             asks for {fs}; refusing to reformat"
                        )));
                    }
                    DeviceContent::Other(what) => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {volume_id:?} holds {what}, not a {fs} filesystem; \
                             refusing to format over it"
                        )));
                    }
                    DeviceContent::Blank if readonly => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {volume_id:?} has no filesystem and is staged read-only, \
                             so none can be made"
                        )));
                    }
                    DeviceContent::Blank => {
                        tracing::info!(device = %device.display(), fs_type = %fs, "formatting blank volume");
                        mount::mkfs(&self.commands, &fs, &device).await?;
                    }
                }
                create_dir(&staging)?;
                let mut options = mount_flags.clone();
                if readonly {
                    options.push("ro".into());
                }
                mount::mount(&self.commands, &device, &staging, Some(&fs), &options).await?;
                tracing::info!(device = %device.display(), fs_type = %fs, "staged filesystem volume");
            }
        }
        Ok(NodeStageVolumeResponse {})
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        self.check_kubelet_path("staging_target_path", &req.staging_target_path)?;
        let _guard = self.inflight.try_acquire(volume_id)?;
        let staging = PathBuf::from(&req.staging_target_path);
        let dev_file = staging.join(BLOCK_STAGE_FILE);
        mount::unmount(&self.commands, &dev_file).await?;
        remove_path(&dev_file)?;
        mount::unmount(&self.commands, &staging).await?;
        self.agent.detach(volume_id).await?;
        tracing::info!("unstaged");
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        self.check_kubelet_path("staging_target_path", &req.staging_target_path)?;
        self.check_kubelet_path("target_path", &req.target_path)?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let _guard = self.inflight.try_acquire(volume_id)?;
        let staging = PathBuf::from(&req.staging_target_path);
        let target = PathBuf::from(&req.target_path);
        let readonly = req.readonly || cap.is_read_only();
        let source = match cap.access {
            Access::Block => staging.join(BLOCK_STAGE_FILE),
            Access::Mount { .. } => staging.clone(),
        };
        let Some(staged) = mount_at(&source)? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id:?} is not staged at {}",
                staging.display()
            )));
        };
        if mount_at(&target)?.is_some() {
            return Ok(NodePublishVolumeResponse {});
        }
        if cap.mode == Mode::SingleNodeSingleWriter {
            // The same filesystem or device node mounted anywhere but the staging path
            // is another publication of this volume.
            let others: Vec<String> = mount::mounts()?
                .into_iter()
                .filter(|m| {
                    m.source == staged.source
                        && m.root == staged.root
                        && m.fs_type == staged.fs_type
                        && Path::new(&m.target) != source
                })
                .map(|m| m.target)
                .collect();
            if let Some(other) = others.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id:?} has access mode SINGLE_NODE_SINGLE_WRITER and is \
                     already published at {other}"
                )));
            }
        }
        match cap.access {
            Access::Block => create_file(&target)?,
            Access::Mount { .. } => create_dir(&target)?,
        }
        mount::bind_mount(&self.commands, &source, &target, readonly).await?;
        tracing::info!(target = %target.display(), readonly, "published");
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        self.check_kubelet_path("target_path", &req.target_path)?;
        let _guard = self.inflight.try_acquire(volume_id)?;
        let target = PathBuf::from(&req.target_path);
        mount::unmount(&self.commands, &target).await?;
        remove_path(&target)?;
        tracing::info!(target = %target.display(), "unpublished");
        Ok(NodeUnpublishVolumeResponse {})
    }

    /// The agent's view of the volume's health as a CSI condition; an agent that
    /// cannot answer is itself reported as the abnormality.
    async fn condition(&self, volume_id: &str) -> VolumeCondition {
        match self.agent.stats(volume_id).await {
            Ok(s) if !s.attached => VolumeCondition {
                abnormal: true,
                message: "volume is not attached on this node".into(),
            },
            Ok(s) if !s.healthy => VolumeCondition {
                abnormal: true,
                message: s.message,
            },
            Ok(_) => VolumeCondition {
                abnormal: false,
                message: "volume is healthy".into(),
            },
            Err(e) => VolumeCondition {
                abnormal: true,
                message: format!("node agent cannot report on the volume: {e}"),
            },
        }
    }

    async fn stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let path = volume_path(&req.volume_path)?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "volume path {} does not exist",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
        };
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_block_device() {
            let stats = self.agent.stats(volume_id).await?;
            return Ok(NodeGetVolumeStatsResponse {
                usage: vec![VolumeUsage {
                    total: i64::try_from(stats.size_bytes).unwrap_or(i64::MAX),
                    unit: volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }],
                volume_condition: Some(self.condition(volume_id).await),
            });
        }
        if mount_at(&path)?.is_none() {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} is not mounted at {}",
                path.display()
            )));
        }
        let vfs = rustix::fs::statvfs(&path)
            .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let frsize = vfs.f_frsize;
        let bytes = VolumeUsage {
            total: clamp(vfs.f_blocks.saturating_mul(frsize)),
            available: clamp(vfs.f_bavail.saturating_mul(frsize)),
            used: clamp(
                vfs.f_blocks
                    .saturating_sub(vfs.f_bfree)
                    .saturating_mul(frsize),
            ),
            unit: volume_usage::Unit::Bytes as i32,
        };
        let inodes = VolumeUsage {
            total: clamp(vfs.f_files),
            available: clamp(vfs.f_favail),
            used: clamp(vfs.f_files.saturating_sub(vfs.f_ffree)),
            unit: volume_usage::Unit::Inodes as i32,
        };
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![bytes, inodes],
            volume_condition: Some(self.condition(volume_id).await),
        })
    }

    async fn expand(&self, req: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        let volume_id = required("volume_id", &req.volume_id)?;
        let path = volume_path(&req.volume_path)?;
        let block = match req.volume_capability.as_ref() {
            Some(c) => matches!(check_capability(c)?.access, Access::Block),
            None => false,
        };
        let _guard = self.inflight.try_acquire(volume_id)?;
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let wanted = match req.capacity_range.as_ref().map(|r| r.required_bytes) {
            Some(b) if b > 0 => b as u64,
            Some(b) if b < 0 => {
                return Err(Error::OutOfRange(format!(
                    "capacity_range.required_bytes must not be negative, got {b}"
                )));
            }
            _ => self.agent.stats(volume_id).await?.size_bytes,
        };
        let grown = self.agent.expand(volume_id, wanted).await?;
        if grown.size_bytes < wanted {
            return Err(Error::Unavailable(format!(
                "device of volume {volume_id:?} is {} bytes, not yet the requested {wanted}; retry",
                grown.size_bytes
            )));
        }
        use std::os::unix::fs::FileTypeExt;
        let is_device = std::fs::metadata(&path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if !block && !is_device {
            let entry = mount_at(&path)?.ok_or_else(|| {
                Error::NotFound(format!(
                    "volume {volume_id:?} is not mounted at {}",
                    path.display()
                ))
            })?;
            check_device_grown(volume_id, Path::new(&entry.source), wanted)?;
            mount::grow_filesystem(
                &self.commands,
                &entry.fs_type,
                Path::new(&entry.source),
                &path,
            )
            .await?;
            tracing::info!(size_bytes = grown.size_bytes, fs_type = %entry.fs_type, "grew filesystem");
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(grown.size_bytes).unwrap_or(i64::MAX),
        })
    }
}

/// Fails unless the block device under a mount already has `wanted` bytes. The agent's
/// Expand grows the attached device before answering; should the device still be
/// smaller (an agent that cannot grow it), growing the filesystem would be a silent
/// no-op reported as success.
fn check_device_grown(volume_id: &str, device: &Path, wanted: u64) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let size = std::fs::File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| Error::io(format!("reading the size of {}", device.display()), e))?;
    if size < wanted {
        return Err(Error::FailedPrecondition(format!(
            "volume {volume_id:?} has grown to {wanted} bytes but its device {} on this node \
             still has {size}: the node agent did not grow the attached device; check its \
             log, or unpublish and unstage the volume and stage it again to use the new size",
            device.display()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodeStageVolume", &id, self.stage(req)).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodeUnstageVolume", &id, self.unstage(req)).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodePublishVolume", &id, self.publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodeUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodeGetVolumeStats", &id, self.stats(req)).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("NodeExpandVolume", &id, self.expand(req)).await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: RpcType| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [
                RpcType::StageUnstageVolume,
                RpcType::GetVolumeStats,
                RpcType::ExpandVolume,
                RpcType::VolumeCondition,
                RpcType::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(
                    api::TOPOLOGY_NODE_KEY.to_string(),
                    self.node_id.clone(),
                )]),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attachment_generation_comes_from_the_publish_context() {
        let ctx = |v: Option<&str>| {
            v.map(|v| {
                (
                    crate::controller::CTX_ATTACHMENT_GENERATION.to_string(),
                    v.to_string(),
                )
            })
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(attachment_generation(&ctx(None)).unwrap(), 0);
        assert_eq!(attachment_generation(&ctx(Some("7"))).unwrap(), 7);
        for bad in ["-1", "x", ""] {
            let e = attachment_generation(&ctx(Some(bad))).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains("publish_context")),
                "{e}"
            );
        }
    }
}
