//! The kubelet's part of running a pod with a blockvol volume, without a kubelet: plugin
//! registration (the node's CSINode entry, as node-driver-registrar leaves it), attach
//! (a VolumeAttachment, as the attach/detach controller creates it; csi-attacher then
//! calls ControllerPublishVolume), NodeStageVolume and NodePublishVolume on the node's
//! CSI socket, NodeExpandVolume after a resize, and all of it in reverse.
//!
//! Paths follow the kubelet's layout under a per-node kubelet directory, with the PV
//! name standing in for the pod (one publication per PV per node), so a later
//! [`Kubelet::unmount`] finds everything from the PV and node names alone. Every step
//! is idempotent, like the kubelet's reconciler: running `mount` twice or `unmount` on
//! a volume that is half torn down finishes the work instead of failing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi::csi_proto::node_client::NodeClient;
use csi::csi_proto::volume_capability::access_mode::Mode;
use csi::csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::csi_proto::{
    CapacityRange, NodeExpandVolumeRequest, NodeGetInfoRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{
    CSINode, CSINodeDriver, CSINodeSpec, VolumeAttachment, VolumeAttachmentSource,
    VolumeAttachmentSpec,
};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tonic::transport::Channel;

use crate::cluster::wait_for;
use crate::error::{Error, Result};

/// Field manager of the objects the kubelet player writes.
pub const FIELD_MANAGER: &str = "blockvol-kubelet";
/// Directory of the CSI plugin's files inside a kubelet directory (the kubelet's own).
const CSI_PLUGIN_DIR: &str = "plugins/kubernetes.io/csi";

/// Bounds of the kubelet player's waits and calls.
#[derive(Clone, Debug)]
pub struct KubeletSettings {
    /// How long csi-attacher may take to attach or detach a volume.
    pub attach_timeout_ms: u64,
    /// Upper bound of one node plugin call (staging formats a blank volume).
    pub node_call_timeout_ms: u64,
    /// How long a resize may take to reach the PV before node expansion gives up.
    pub resize_timeout_ms: u64,
}

impl Default for KubeletSettings {
    fn default() -> Self {
        KubeletSettings {
            attach_timeout_ms: 120_000,
            node_call_timeout_ms: 180_000,
            resize_timeout_ms: 120_000,
        }
    }
}

/// How the volume is presented at the target path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presentation {
    /// A mounted filesystem of this type.
    Filesystem(String),
    /// The block device itself (PVC volumeMode Block).
    Block,
}

/// A volume staged and published on a node.
#[derive(Clone, Debug)]
pub struct Mounted {
    pub pv: String,
    pub node: String,
    /// The CSI volume id (the BlockVolume name).
    pub volume_handle: String,
    pub attachment: String,
    pub staging_path: PathBuf,
    /// Where the pod would see the volume: a directory for a filesystem, a device
    /// file for a block volume.
    pub target_path: PathBuf,
    pub presentation: Presentation,
}

/// The kubelet of one node: its name, its node plugin's socket and its directory.
pub struct Kubelet {
    client: Client,
    node: String,
    csi_socket: PathBuf,
    dir: PathBuf,
    settings: KubeletSettings,
}

/// What the CSI calls need from a PV.
struct PvInfo {
    name: String,
    handle: String,
    volume_context: HashMap<String, String>,
    block: bool,
    fs_type: Option<String>,
    access_modes: Vec<String>,
}

impl Kubelet {
    /// A kubelet for `node` whose node plugin serves on `csi_socket`; its paths live
    /// under `dir` (created on first use).
    pub fn new(
        client: Client,
        node: &str,
        csi_socket: &Path,
        dir: &Path,
        settings: KubeletSettings,
    ) -> Kubelet {
        Kubelet {
            client,
            node: node.to_string(),
            csi_socket: csi_socket.to_path_buf(),
            dir: dir.to_path_buf(),
            settings,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A client of this node's CSI node plugin.
    pub fn node_client(&self) -> Result<NodeClient<Channel>> {
        let channel = csi::agent::unix_channel(
            &self.csi_socket,
            Duration::from_millis(self.settings.node_call_timeout_ms),
        )
        .map_err(|e| Error::Csi {
            call: "connect",
            node: self.node.clone(),
            message: e.to_string(),
        })?;
        Ok(NodeClient::new(channel))
    }

    /// Where NodeStageVolume puts the volume (the kubelet's global mount / device
    /// staging directory).
    pub fn staging_path(&self, pv: &str, block: bool) -> PathBuf {
        let csi = self.dir.join(CSI_PLUGIN_DIR);
        if block {
            csi.join("volumeDevices/staging").join(pv)
        } else {
            csi.join("pv").join(pv).join("globalmount")
        }
    }

    /// Where NodePublishVolume puts the volume (the pod's volume path; the PV name
    /// stands in for the pod UID).
    pub fn target_path(&self, pv: &str, block: bool) -> PathBuf {
        if block {
            self.dir
                .join(CSI_PLUGIN_DIR)
                .join("volumeDevices/publish")
                .join(pv)
                .join(pv)
        } else {
            self.dir
                .join("pods")
                .join(pv)
                .join("volumes/kubernetes.io~csi")
                .join(pv)
                .join("mount")
        }
    }

    /// The VolumeAttachment name the attach/detach controller would use for `pv` here.
    pub fn attachment_name(&self, pv: &str) -> String {
        format!("csi-{pv}-{}", self.node)
    }

    /// Registers the node plugin as the kubelet does when node-driver-registrar shows
    /// it: asks NodeGetInfo, labels the Node with the plugin's topology segments and
    /// records the node id and topology keys in the node's CSINode object.
    /// csi-provisioner needs both to pick a topology, csi-attacher the node id.
    pub async fn register(&self) -> Result<()> {
        let info = self
            .node_client()?
            .node_get_info(NodeGetInfoRequest {})
            .await
            .map_err(|s| self.csi_error("NodeGetInfo", &s))?
            .into_inner();
        let segments: BTreeMap<String, String> = info
            .accessible_topology
            .map(|t| t.segments.into_iter().collect())
            .unwrap_or_default();
        let topology_keys: Vec<String> = segments.keys().cloned().collect();
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .patch(
                &self.node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": segments}})),
            )
            .await?;
        let driver = CSINodeDriver {
            name: api::CSI_DRIVER_NAME.into(),
            node_id: info.node_id,
            topology_keys: Some(topology_keys),
            ..Default::default()
        };
        let csinodes: Api<CSINode> = Api::all(self.client.clone());
        let mut drivers = match csinodes.get_opt(&self.node).await? {
            Some(existing) => existing
                .spec
                .drivers
                .into_iter()
                .filter(|d| d.name != api::CSI_DRIVER_NAME)
                .collect(),
            None => Vec::new(),
        };
        drivers.push(driver);
        let csinode = CSINode {
            metadata: ObjectMeta {
                name: Some(self.node.clone()),
                ..Default::default()
            },
            spec: CSINodeSpec { drivers },
        };
        csinodes
            .patch(
                &self.node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&csinode),
            )
            .await?;
        Ok(())
    }

    /// The PV a claim is bound to.
    pub async fn bound_pv(&self, namespace: &str, pvc: &str) -> Result<String> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let claim = claims
            .get_opt(pvc)
            .await?
            .ok_or_else(|| Error::Volume(format!("PVC {namespace}/{pvc} does not exist")))?;
        let phase = claim.status.as_ref().and_then(|s| s.phase.clone());
        let pv = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        match (phase.as_deref(), pv) {
            (Some("Bound"), Some(pv)) if !pv.is_empty() => Ok(pv),
            (phase, _) => Err(Error::Volume(format!(
                "PVC {namespace}/{pvc} is not bound to a volume (phase {})",
                phase.unwrap_or("unknown")
            ))),
        }
    }

    async fn pv_info(&self, pv: &str) -> Result<PvInfo> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let obj = pvs
            .get_opt(pv)
            .await?
            .ok_or_else(|| Error::Volume(format!("PV {pv} does not exist")))?;
        let spec = obj
            .spec
            .ok_or_else(|| Error::Volume(format!("PV {pv} has no spec")))?;
        let csi = spec
            .csi
            .ok_or_else(|| Error::Volume(format!("PV {pv} is not a CSI volume")))?;
        if csi.driver != api::CSI_DRIVER_NAME {
            return Err(Error::Volume(format!(
                "PV {pv} belongs to CSI driver {:?}, not {}",
                csi.driver,
                api::CSI_DRIVER_NAME
            )));
        }
        Ok(PvInfo {
            name: pv.to_string(),
            handle: csi.volume_handle,
            volume_context: csi
                .volume_attributes
                .unwrap_or_default()
                .into_iter()
                .collect(),
            block: spec.volume_mode.as_deref() == Some("Block"),
            fs_type: csi.fs_type.filter(|f| !f.is_empty()),
            access_modes: spec.access_modes.unwrap_or_default(),
        })
    }

    /// Attaches, stages and publishes the volume bound to `namespace/pvc` on this node.
    /// `fs_type` overrides the PV's filesystem type (ignored for block volumes).
    pub async fn mount(
        &self,
        namespace: &str,
        pvc: &str,
        fs_type: Option<&str>,
    ) -> Result<Mounted> {
        let pv = self.bound_pv(namespace, pvc).await?;
        self.mount_pv(&pv, fs_type).await
    }

    /// [`Kubelet::mount`] for a PV named directly.
    pub async fn mount_pv(&self, pv: &str, fs_type: Option<&str>) -> Result<Mounted> {
        let info = self.pv_info(pv).await?;
        self.register().await?;
        let attachment = self.attachment_name(pv);
        let publish_context = self.attach(&info, &attachment).await?;
        let capability = capability(&info, fs_type);
        let staging = self.staging_path(pv, info.block);
        let target = self.target_path(pv, info.block);
        let mut node = self.node_client()?;
        std::fs::create_dir_all(&staging)
            .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: info.handle.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: path_string(&staging),
            volume_capability: Some(capability.clone()),
            secrets: HashMap::new(),
            volume_context: info.volume_context.clone(),
        })
        .await
        .map_err(|s| self.csi_error("NodeStageVolume", &s))?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
        }
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: info.handle.clone(),
            publish_context,
            staging_target_path: path_string(&staging),
            target_path: path_string(&target),
            volume_capability: Some(capability.clone()),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: info.volume_context.clone(),
        })
        .await
        .map_err(|s| self.csi_error("NodePublishVolume", &s))?;
        tracing::info!(pv, node = %self.node, target = %target.display(), "volume mounted");
        Ok(Mounted {
            pv: info.name,
            node: self.node.clone(),
            volume_handle: info.handle,
            attachment,
            staging_path: staging,
            target_path: target,
            presentation: match capability.access_type {
                Some(AccessType::Mount(m)) => Presentation::Filesystem(m.fs_type),
                _ => Presentation::Block,
            },
        })
    }

    /// Creates the VolumeAttachment (if missing) and waits for csi-attacher to report
    /// it attached; returns its attachment metadata, the CSI publish context.
    async fn attach(&self, info: &PvInfo, name: &str) -> Result<HashMap<String, String>> {
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        if vas.get_opt(name).await?.is_none() {
            let va = VolumeAttachment {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                spec: VolumeAttachmentSpec {
                    attacher: api::CSI_DRIVER_NAME.into(),
                    node_name: self.node.clone(),
                    source: VolumeAttachmentSource {
                        persistent_volume_name: Some(info.name.clone()),
                        ..Default::default()
                    },
                },
                status: None,
            };
            match vas.create(&PostParams::default(), &va).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let timeout = Duration::from_millis(self.settings.attach_timeout_ms);
        let what = format!("csi-attacher to attach PV {} to {}", info.name, self.node);
        let attached = wait_for(&what, timeout, || {
            let vas = vas.clone();
            async move {
                let va = vas.get_opt(name).await.ok().flatten()?;
                let status = va.status?;
                status
                    .attached
                    .then(|| status.attachment_metadata.unwrap_or_default())
            }
        })
        .await;
        match attached {
            Ok(meta) => Ok(meta.into_iter().collect()),
            Err(e) => Err(self.attach_failure(&vas, name, e).await),
        }
    }

    /// A timed-out attach with the attacher's own error, when it reported one.
    async fn attach_failure(&self, vas: &Api<VolumeAttachment>, name: &str, e: Error) -> Error {
        let reported = vas
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|va| va.status)
            .and_then(|s| s.attach_error)
            .and_then(|e| e.message);
        match reported {
            Some(message) => Error::Volume(format!(
                "VolumeAttachment {name} is not attached: {message}"
            )),
            None => e,
        }
    }

    /// Unpublishes, unstages and detaches the volume bound to `namespace/pvc` here.
    pub async fn unmount(&self, namespace: &str, pvc: &str) -> Result<()> {
        let pv = self.bound_pv(namespace, pvc).await?;
        self.unmount_pv(&pv).await
    }

    /// [`Kubelet::unmount`] for a PV named directly. A PV that no longer exists is
    /// still detached (its VolumeAttachment deleted) so nothing stays behind.
    pub async fn unmount_pv(&self, pv: &str) -> Result<()> {
        match self.pv_info(pv).await {
            Ok(info) => self.unpublish_and_unstage(&info).await?,
            Err(Error::Volume(reason)) => {
                tracing::warn!(pv, %reason, "PV unreadable; only detaching");
            }
            Err(e) => return Err(e),
        }
        self.detach(pv).await
    }

    async fn unpublish_and_unstage(&self, info: &PvInfo) -> Result<()> {
        let staging = self.staging_path(&info.name, info.block);
        let target = self.target_path(&info.name, info.block);
        let mut node = self.node_client()?;
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: info.handle.clone(),
            target_path: path_string(&target),
        })
        .await
        .map_err(|s| self.csi_error("NodeUnpublishVolume", &s))?;
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: info.handle.clone(),
            staging_target_path: path_string(&staging),
        })
        .await
        .map_err(|s| self.csi_error("NodeUnstageVolume", &s))?;
        // The kubelet removes the directories it made; the plugin removed its own.
        for dir in [target.parent(), Some(staging.as_path())]
            .into_iter()
            .flatten()
        {
            remove_empty_dirs(dir, &self.dir);
        }
        tracing::info!(pv = %info.name, node = %self.node, "volume unmounted");
        Ok(())
    }

    /// Deletes the VolumeAttachment and waits until csi-attacher has unpublished the
    /// volume and let the object go.
    pub async fn detach(&self, pv: &str) -> Result<()> {
        let name = self.attachment_name(pv);
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        match vas.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let timeout = Duration::from_millis(self.settings.attach_timeout_ms);
        let what = format!("csi-attacher to detach PV {pv} from {}", self.node);
        wait_for(&what, timeout, || {
            let vas = vas.clone();
            let name = name.clone();
            async move { matches!(vas.get_opt(&name).await, Ok(None)).then_some(()) }
        })
        .await
    }

    /// The PVs attached to this node through VolumeAttachments of the blockvol driver.
    pub async fn attached_pvs(&self) -> Result<Vec<String>> {
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        let mut pvs: Vec<String> = vas
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|va| va.spec.attacher == api::CSI_DRIVER_NAME && va.spec.node_name == self.node)
            .filter_map(|va| va.spec.source.persistent_volume_name)
            .collect();
        pvs.sort();
        Ok(pvs)
    }

    /// Finishes a resize of `namespace/pvc` on this node, as the kubelet does once
    /// csi-resizer has grown the PV: NodeExpandVolume on the published path, then
    /// the claim's status capacity. Returns the size the node plugin reports.
    pub async fn expand(&self, namespace: &str, pvc: &str) -> Result<u64> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let pv = self.bound_pv(namespace, pvc).await?;
        let info = self.pv_info(&pv).await?;
        let wanted = requested_bytes(&claims.get(pvc).await?)
            .ok_or_else(|| Error::Volume(format!("PVC {namespace}/{pvc} requests no storage")))?;
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let timeout = Duration::from_millis(self.settings.resize_timeout_ms);
        let what = format!("csi-resizer to grow PV {pv} to {wanted} bytes");
        let capacity = wait_for(&what, timeout, || {
            let pvs = pvs.clone();
            let pv = pv.clone();
            async move {
                let obj = pvs.get(&pv).await.ok()?;
                let q = obj.spec?.capacity?.get("storage")?.clone();
                quantity_bytes(&q.0).filter(|b| *b >= wanted).map(|_| q)
            }
        })
        .await?;
        let target = self.target_path(&pv, info.block);
        let reply = self
            .node_client()?
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: info.handle.clone(),
                volume_path: path_string(&target),
                capacity_range: Some(CapacityRange {
                    required_bytes: i64::try_from(wanted).unwrap_or(i64::MAX),
                    limit_bytes: 0,
                }),
                staging_target_path: path_string(&self.staging_path(&pv, info.block)),
                volume_capability: Some(capability(&info, None)),
                secrets: HashMap::new(),
            })
            .await
            .map_err(|s| self.csi_error("NodeExpandVolume", &s))?
            .into_inner();
        let status = json!({"status": {
            "capacity": {"storage": capacity},
            "conditions": [],
            "allocatedResourceStatuses": null,
        }});
        claims
            .patch_status(pvc, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(u64::try_from(reply.capacity_bytes).unwrap_or(0))
    }

    fn csi_error(&self, call: &'static str, status: &tonic::Status) -> Error {
        Error::Csi {
            call,
            node: self.node.clone(),
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

/// The capability the kubelet derives from the PV: its volume mode, filesystem type
/// and access mode (RWO as SINGLE_NODE_MULTI_WRITER, which the plugin advertises, and
/// RWOP as SINGLE_NODE_SINGLE_WRITER).
fn capability(info: &PvInfo, fs_override: Option<&str>) -> VolumeCapability {
    let mode = if info.access_modes.iter().any(|m| m == "ReadWriteOncePod") {
        Mode::SingleNodeSingleWriter
    } else if info.access_modes.iter().any(|m| m == "ReadOnlyMany") {
        Mode::SingleNodeReaderOnly
    } else {
        Mode::SingleNodeMultiWriter
    };
    let access_type = if info.block {
        AccessType::Block(BlockVolume {})
    } else {
        let fs_type = fs_override
            .map(str::to_string)
            .or_else(|| info.fs_type.clone())
            .or_else(|| info.volume_context.get(csi::params::CTX_FS_TYPE).cloned())
            .unwrap_or_else(|| csi::params::DEFAULT_FS_TYPE.to_string());
        AccessType::Mount(MountVolume {
            fs_type,
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })
    };
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access_type),
    }
}

fn path_string(path: &Path) -> String {
    path.display().to_string()
}

/// Removes `dir` and then its parents while they are empty, stopping at `root`.
fn remove_empty_dirs(dir: &Path, root: &Path) {
    let mut current = Some(dir);
    while let Some(d) = current {
        if d == root || !d.starts_with(root) || std::fs::remove_dir(d).is_err() {
            break;
        }
        current = d.parent();
    }
}

/// The storage a claim requests, in bytes.
fn requested_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let q = pvc
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    quantity_bytes(&q.0)
}

/// Bytes of a storage quantity in the forms PVCs use (`1073741824`, `64Mi`, `1G`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
    ];
    let q = q.trim();
    let (digits, unit) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|d| (d, *m)))
        .unwrap_or((q, 1));
    digits.parse::<u64>().ok()?.checked_mul(unit)
}
