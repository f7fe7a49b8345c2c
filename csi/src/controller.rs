//! CSI Controller service: turns CreateVolume into a cluster-scoped `BlockVolume`
//! (the operator makes it Ready), records attachments, expands and reports volumes.
//!
//! Guarantees:
//! - Every call is idempotent and keyed by the BlockVolume name; a second call for a
//!   volume while one runs fails with ABORTED.
//! - CreateVolume never returns a volume that is not Ready; when the operator has not
//!   made it Ready within `create_ready_timeout_ms` it answers DEADLINE_EXCEEDED and
//!   leaves the object, so the provisioner's retry picks it up.
//! - Attachment is recorded by this service alone, in the annotation
//!   [`api::ANNOTATION_ATTACHED_NODE`] on the BlockVolume, written with the object's
//!   resourceVersion so two publishers cannot both win. Every publish that attaches
//!   the volume increments [`api::ANNOTATION_ATTACHMENT_GENERATION`] in the same write
//!   (unpublish keeps it) and hands the generation to the node in the publish context
//!   ([`CTX_ATTACHMENT_GENERATION`]); a repeated publish of an existing attachment hands
//!   over the same one.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use api::volume::condition;
use api::{BlockNode, BlockVolume, BlockVolumeSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::csi_proto::controller_server::Controller;
use crate::csi_proto::controller_service_capability::rpc::Type as RpcType;
use crate::csi_proto::controller_service_capability::{self, Rpc};
use crate::csi_proto::*;
use crate::error::{Error, Result, is_kube_conflict, is_kube_not_found};
use crate::guard::InFlight;
use crate::names::volume_name_for;
use crate::params::{
    Access, CTX_BLOCK_SIZE, CTX_DURABILITY, CTX_FS_TYPE, CTX_REPLICAS, VolumeParams,
    check_capabilities, check_capability, size_for_capacity,
};
use crate::rpc::{required, required_capability, run};

/// Publish-context key carrying the attachment generation to NodeStage (decimal).
pub const CTX_ATTACHMENT_GENERATION: &str = "blockvol.io/attachment-generation";

/// The attachment generation a BlockVolume records (0: none yet).
fn attachment_generation(bv: &BlockVolume) -> Result<u64> {
    match annotation(bv, api::ANNOTATION_ATTACHMENT_GENERATION) {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            Error::Internal(format!(
                "annotation {} is {v:?}, not a non-negative integer",
                api::ANNOTATION_ATTACHMENT_GENERATION
            ))
        }),
    }
}

fn publish_context(generation: u64) -> HashMap<String, String> {
    HashMap::from([(
        CTX_ATTACHMENT_GENERATION.to_string(),
        generation.to_string(),
    )])
}

/// Annotation holding the CSI volume name the object was created for.
pub const ANNOTATION_CSI_NAME: &str = "blockvol.io/csi-volume-name";
/// Annotation holding the StorageClass `fsType`, handed to the node in the context.
pub const ANNOTATION_FS_TYPE: &str = "blockvol.io/fs-type";
/// Value of `app.kubernetes.io/managed-by` on volumes this driver created.
pub const MANAGED_BY_CSI: &str = "blockvol-csi";

/// Bounds of the controller's waits, each a setting.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// How long CreateVolume waits for the BlockVolume's Ready condition.
    pub create_ready_timeout_ms: u64,
    /// How often CreateVolume re-reads the BlockVolume while waiting.
    pub ready_poll_interval_ms: u64,
    /// Size of a volume whose request names no capacity.
    pub default_volume_size_bytes: u64,
    /// Largest page ListVolumes returns when the caller sets no max_entries.
    pub list_page_entries_max: usize,
    /// How often a guarded update is re-read and retried when another writer (the
    /// operator's status updates) changed the object first; then ABORTED.
    pub conflict_retries_max: u32,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            create_ready_timeout_ms: 60_000,
            ready_poll_interval_ms: 500,
            default_volume_size_bytes: 1 << 30,
            list_page_entries_max: 500,
            conflict_retries_max: 5,
        }
    }
}

/// The Controller service, backed by the Kubernetes API.
#[derive(Clone)]
pub struct ControllerService {
    volumes: Api<BlockVolume>,
    nodes: Api<BlockNode>,
    settings: ControllerSettings,
    inflight: InFlight,
}

impl ControllerService {
    pub fn new(client: Client, settings: ControllerSettings) -> Self {
        ControllerService {
            volumes: Api::all(client.clone()),
            nodes: Api::all(client),
            settings,
            inflight: InFlight::new(),
        }
    }
}

/// Whether the BlockVolume reports condition `kind` with status True.
fn condition_true(bv: &BlockVolume, kind: &str) -> bool {
    condition_of(bv, kind).is_some_and(|c| c.status == "True")
}

fn condition_of<'a>(
    bv: &'a BlockVolume,
    kind: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    bv.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind))
}

fn annotation<'a>(bv: &'a BlockVolume, key: &str) -> Option<&'a str> {
    bv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The node the volume is published to, from our annotation or the operator's status.
/// The node the volume is published to. The annotation is the record
/// ControllerPublish/Unpublish keep; `status.attachedTo` only mirrors it later (the
/// operator copies it), so it must not be consulted: right after an unpublish it
/// still names the old node.
fn attached_node(bv: &BlockVolume) -> Option<String> {
    annotation(bv, api::ANNOTATION_ATTACHED_NODE)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

fn size_of(bv: &BlockVolume) -> Result<u64> {
    bv.spec.size_bytes().map_err(|e| {
        Error::Internal(format!(
            "BlockVolume {} has an unusable size: {e}",
            bv.name_any()
        ))
    })
}

/// What NodeStageVolume needs to know about the volume.
fn volume_context(bv: &BlockVolume) -> HashMap<String, String> {
    let mut ctx = HashMap::from([
        (CTX_BLOCK_SIZE.to_string(), bv.spec.block_size.to_string()),
        (CTX_REPLICAS.to_string(), bv.spec.replicas.to_string()),
        (
            CTX_DURABILITY.to_string(),
            bv.spec.durability.as_str().to_string(),
        ),
    ]);
    if let Some(fs) = annotation(bv, ANNOTATION_FS_TYPE) {
        ctx.insert(CTX_FS_TYPE.to_string(), fs.to_string());
    }
    ctx
}

fn topology_of(bv: &BlockVolume) -> Vec<Topology> {
    match bv
        .spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get(api::TOPOLOGY_NODE_KEY))
    {
        Some(node) => vec![Topology {
            segments: HashMap::from([(api::TOPOLOGY_NODE_KEY.to_string(), node.clone())]),
        }],
        None => Vec::new(),
    }
}

fn csi_volume(bv: &BlockVolume) -> Result<Volume> {
    Ok(Volume {
        capacity_bytes: size_of(bv)? as i64,
        volume_id: bv.name_any(),
        volume_context: volume_context(bv),
        content_source: None,
        accessible_topology: topology_of(bv),
    })
}

/// The volume's health as CSI reports it: abnormal unless Ready and not Degraded.
fn volume_condition(bv: &BlockVolume) -> VolumeCondition {
    let ready = condition_of(bv, condition::READY);
    if condition_true(bv, condition::DEGRADED) {
        let msg = condition_of(bv, condition::DEGRADED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        return VolumeCondition {
            abnormal: true,
            message: format!("volume is degraded: {msg}"),
        };
    }
    match ready {
        Some(c) if c.status == "True" => VolumeCondition {
            abnormal: false,
            message: "volume is ready".into(),
        },
        Some(c) => VolumeCondition {
            abnormal: true,
            message: format!("volume is not ready ({}): {}", c.reason, c.message),
        },
        None => VolumeCondition {
            abnormal: true,
            message: "volume has no Ready condition yet".into(),
        },
    }
}

/// The node a single-replica volume should live on: the first preferred topology
/// (the consuming pod's node under WaitForFirstConsumer), else the first requisite.
fn pinned_node(req: Option<&TopologyRequirement>) -> Option<String> {
    let req = req?;
    req.preferred
        .iter()
        .chain(req.requisite.iter())
        .find_map(|t| t.segments.get(api::TOPOLOGY_NODE_KEY).cloned())
        .filter(|n| !n.is_empty())
}

/// The BlockVolume spec a validated CreateVolume request asks for.
///
/// A volume is reachable from every node with an agent (the local agent forwards IO
/// to the primary), so topology only pins placement when there is a single replica:
/// that replica goes to the requested node. With more replicas the operator spreads
/// them, and pinning all to one node would be impossible.
pub fn desired_spec(
    p: &VolumeParams,
    size_bytes: u64,
    topology: Option<&TopologyRequirement>,
) -> BlockVolumeSpec {
    let mut node_selector = p.node_selector.clone();
    if p.replicas == 1
        && let Some(n) = pinned_node(topology)
    {
        node_selector
            .get_or_insert_with(BTreeMap::new)
            .insert(api::TOPOLOGY_NODE_KEY.to_string(), n);
    }
    BlockVolumeSpec {
        size: IntOrString::String(size_bytes.to_string()),
        replicas: p.replicas,
        durability: p.durability,
        block_size: p.block_size,
        node_selector,
        topology_key: p.topology_key.clone(),
        data_locality: p.data_locality,
        pvc: p.pvc.clone(),
    }
}

/// Why an existing BlockVolume does not match a CreateVolume request, if it does not.
fn mismatch(
    existing: &BlockVolume,
    request_name: &str,
    want: &BlockVolumeSpec,
    fs_type: Option<&str>,
) -> Option<String> {
    let have = &existing.spec;
    if annotation(existing, ANNOTATION_CSI_NAME) != Some(request_name) {
        return Some(format!(
            "BlockVolume {} exists but was not created for volume name {request_name:?}",
            existing.name_any()
        ));
    }
    let differs = |what: &str, a: String, b: String| {
        Some(format!(
            "volume {request_name:?} exists with {what} {a}, the request asks for {b}"
        ))
    };
    let have_size = have.size_bytes().ok();
    let want_size = want.size_bytes().ok();
    if have_size != want_size {
        return differs(
            "size",
            format!("{have_size:?} bytes"),
            format!("{want_size:?} bytes"),
        );
    }
    if have.replicas != want.replicas {
        return differs(
            "replicas",
            have.replicas.to_string(),
            want.replicas.to_string(),
        );
    }
    if have.durability != want.durability {
        return differs(
            "durability",
            have.durability.as_str().into(),
            want.durability.as_str().into(),
        );
    }
    if have.block_size != want.block_size {
        return differs(
            "blockSize",
            have.block_size.to_string(),
            want.block_size.to_string(),
        );
    }
    if have.node_selector != want.node_selector {
        return differs(
            "node selector",
            format!("{:?}", have.node_selector),
            format!("{:?}", want.node_selector),
        );
    }
    if have.topology_key != want.topology_key {
        return differs(
            "topologyKey",
            format!("{:?}", have.topology_key),
            format!("{:?}", want.topology_key),
        );
    }
    if have.data_locality != want.data_locality {
        return differs(
            "dataLocality",
            format!("{:?}", have.data_locality),
            format!("{:?}", want.data_locality),
        );
    }
    if annotation(existing, ANNOTATION_FS_TYPE) != fs_type {
        return differs(
            "fsType",
            format!("{:?}", annotation(existing, ANNOTATION_FS_TYPE)),
            format!("{fs_type:?}"),
        );
    }
    None
}

fn rpc(t: RpcType) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(Rpc {
            r#type: t as i32,
        })),
    }
}

impl ControllerService {
    async fn get_volume(&self, name: &str) -> Result<Option<BlockVolume>> {
        Ok(self.volumes.get_opt(name).await?)
    }

    async fn must_get_volume(&self, name: &str) -> Result<BlockVolume> {
        self.get_volume(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {name:?} does not exist")))
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        let request_name = required("name", &req.name)?;
        let caps = check_capabilities(&req.volume_capabilities)?;
        let p = VolumeParams::parse(&req.parameters)?;
        if req.volume_content_source.is_some() {
            return Err(Error::InvalidArgument(
                "volume_content_source is not supported: blockvol cannot create a volume \
                 from a snapshot or another volume"
                    .into(),
            ));
        }
        let size = size_for_capacity(
            req.capacity_range.as_ref(),
            p.block_size,
            self.settings.default_volume_size_bytes,
        )?;
        let fs_type = p.fs_type.clone().or_else(|| {
            caps.iter().find_map(|c| match &c.access {
                Access::Mount { fs_type, .. } => fs_type.clone(),
                Access::Block => None,
            })
        });
        let name = volume_name_for(request_name);
        let _guard = self.inflight.try_acquire(&name)?;
        let spec = desired_spec(&p, size, req.accessibility_requirements.as_ref());
        spec.validate()
            .map_err(|e| Error::InvalidArgument(format!("volume would be invalid: {e}")))?;

        let existing = match self.get_volume(&name).await? {
            Some(bv) => bv,
            None => {
                let mut bv = BlockVolume::new(&name, spec.clone());
                let mut annotations =
                    BTreeMap::from([(ANNOTATION_CSI_NAME.to_string(), request_name.to_string())]);
                if let Some(fs) = &fs_type {
                    annotations.insert(ANNOTATION_FS_TYPE.to_string(), fs.clone());
                }
                bv.metadata.annotations = Some(annotations);
                bv.metadata.labels = Some(BTreeMap::from([(
                    api::LABEL_MANAGED_BY.to_string(),
                    MANAGED_BY_CSI.to_string(),
                )]));
                let post = PostParams {
                    field_manager: Some(api::FIELD_MANAGER_CSI.to_string()),
                    ..Default::default()
                };
                match self.volumes.create(&post, &bv).await {
                    Ok(created) => {
                        tracing::info!(
                            size_bytes = size,
                            replicas = p.replicas,
                            "created BlockVolume"
                        );
                        created
                    }
                    // Created by a racing call between our get and create: compare below.
                    Err(e) if is_kube_conflict(&e) => self.must_get_volume(&name).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if let Some(why) = mismatch(&existing, request_name, &spec, fs_type.as_deref()) {
            return Err(Error::AlreadyExists(why));
        }
        if existing.metadata.deletion_timestamp.is_some() {
            return Err(Error::Aborted(format!(
                "volume {name:?} is being deleted; retry once it is gone"
            )));
        }
        let ready = self.wait_ready(&name).await?;
        Ok(CreateVolumeResponse {
            volume: Some(Volume {
                accessible_topology: req
                    .accessibility_requirements
                    .as_ref()
                    .map(|r| r.requisite.clone())
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| topology_of(&ready)),
                ..csi_volume(&ready)?
            }),
        })
    }

    /// Polls the BlockVolume until Ready=True, within `create_ready_timeout_ms`.
    async fn wait_ready(&self, name: &str) -> Result<BlockVolume> {
        let timeout = Duration::from_millis(self.settings.create_ready_timeout_ms);
        let interval = Duration::from_millis(self.settings.ready_poll_interval_ms.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let bv = self.get_volume(name).await?.ok_or_else(|| {
                Error::Aborted(format!("volume {name:?} was deleted while waiting for it"))
            })?;
            if condition_true(&bv, condition::READY) {
                return Ok(bv);
            }
            if tokio::time::Instant::now() + interval > deadline {
                let why = condition_of(&bv, condition::READY)
                    .map(|c| format!("Ready={} ({}): {}", c.status, c.reason, c.message))
                    .unwrap_or_else(|| "no Ready condition yet".into());
                return Err(Error::DeadlineExceeded(format!(
                    "volume {name:?} was created but is not ready after {} ms ({why}); \
                     the operator is still working on it, retry",
                    timeout.as_millis()
                )));
            }
            tokio::time::sleep(interval).await;
        }
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        let name = required("volume_id", &req.volume_id)?;
        let _guard = self.inflight.try_acquire(name)?;
        let Some(bv) = self.get_volume(name).await? else {
            return Ok(DeleteVolumeResponse {});
        };
        if let Some(node) = attached_node(&bv) {
            return Err(Error::FailedPrecondition(format!(
                "volume {name:?} is still attached to node {node:?}; unpublish it first"
            )));
        }
        let dp = DeleteParams {
            // The uid alone: status updates must not make the delete fail, and no
            // publish can interleave (same in-flight guard).
            preconditions: bv.metadata.uid.clone().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.volumes.delete(name, &dp).await {
            Ok(_) => {
                tracing::info!("deleted BlockVolume");
                Ok(DeleteVolumeResponse {})
            }
            Err(e) if is_kube_not_found(&e) => Ok(DeleteVolumeResponse {}),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a blockvol node agent runs on `node_id` (its BlockNode exists).
    async fn node_exists(&self, node_id: &str) -> Result<bool> {
        if self.nodes.get_opt(node_id).await?.is_some() {
            return Ok(true);
        }
        let all = self.nodes.list(&ListParams::default()).await?;
        Ok(all.items.iter().any(|n| n.spec.node_name == node_id))
    }

    async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> Result<ControllerPublishVolumeResponse> {
        let name = required("volume_id", &req.volume_id)?;
        let node = required("node_id", &req.node_id)?;
        let cap = required_capability(req.volume_capability.as_ref())?;
        let _guard = self.inflight.try_acquire(name)?;
        self.must_get_volume(name).await?;
        if !self.node_exists(node).await? {
            return Err(Error::NotFound(format!(
                "node {node:?} has no blockvol node agent (no BlockNode)"
            )));
        }
        let readonly = req.readonly || cap.is_read_only();
        let readonly_str = if readonly { "true" } else { "false" };
        let mut attempt = 0;
        loop {
            let bv = self.must_get_volume(name).await?;
            match attached_node(&bv) {
                Some(current) if current == node => {
                    let was_ro = annotation(&bv, api::ANNOTATION_ATTACHED_READONLY) == Some("true");
                    if was_ro != readonly {
                        return Err(Error::AlreadyExists(format!(
                            "volume {name:?} is already published to node {node:?} with \
                             readonly={was_ro}, the request asks for readonly={readonly}"
                        )));
                    }
                    return Ok(ControllerPublishVolumeResponse {
                        publish_context: publish_context(attachment_generation(&bv)?),
                    });
                }
                Some(current) => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {name:?} is published to node {current:?}; a blockvol volume \
                         is attached to one node at a time, unpublish it there first"
                    )));
                }
                None => {}
            }
            let generation = attachment_generation(&bv)?.checked_add(1).ok_or_else(|| {
                Error::Internal(format!("volume {name:?}: attachment generation overflows"))
            })?;
            let patch = json!({
                "metadata": {
                    "resourceVersion": bv.metadata.resource_version,
                    "annotations": {
                        api::ANNOTATION_ATTACHED_NODE: node,
                        api::ANNOTATION_ATTACHED_READONLY: readonly_str,
                        api::ANNOTATION_ATTACHMENT_GENERATION: generation.to_string(),
                    }
                }
            });
            match self.patch(name, &patch).await {
                Ok(_) => {
                    tracing::info!(node, readonly, generation, "published");
                    return Ok(ControllerPublishVolumeResponse {
                        publish_context: publish_context(generation),
                    });
                }
                Err(Error::Aborted(_)) if attempt < self.settings.conflict_retries_max => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A merge patch; with a resourceVersion in it, a concurrent writer makes it fail
    /// with ABORTED instead of being overwritten.
    async fn patch(&self, name: &str, patch: &serde_json::Value) -> Result<BlockVolume> {
        let pp = PatchParams {
            field_manager: Some(api::FIELD_MANAGER_CSI.to_string()),
            ..Default::default()
        };
        self.volumes
            .patch(name, &pp, &Patch::Merge(patch))
            .await
            .map_err(|e| match e {
                e if is_kube_conflict(&e) => Error::Aborted(format!(
                    "volume {name:?} changed while it was being updated; retry"
                )),
                e if is_kube_not_found(&e) => {
                    Error::NotFound(format!("volume {name:?} does not exist"))
                }
                e => e.into(),
            })
    }

    async fn unpublish(
        &self,
        req: ControllerUnpublishVolumeRequest,
    ) -> Result<ControllerUnpublishVolumeResponse> {
        let name = required("volume_id", &req.volume_id)?;
        let _guard = self.inflight.try_acquire(name)?;
        let mut attempt = 0;
        loop {
            let Some(bv) = self.get_volume(name).await? else {
                return Ok(ControllerUnpublishVolumeResponse {});
            };
            let Some(current) = annotation(&bv, api::ANNOTATION_ATTACHED_NODE) else {
                return Ok(ControllerUnpublishVolumeResponse {});
            };
            if !req.node_id.is_empty() && req.node_id != current {
                // Not published to that node: nothing to undo there.
                return Ok(ControllerUnpublishVolumeResponse {});
            }
            let patch = json!({
                "metadata": {
                    "resourceVersion": bv.metadata.resource_version,
                    "annotations": {
                        api::ANNOTATION_ATTACHED_NODE: null,
                        api::ANNOTATION_ATTACHED_READONLY: null,
                    }
                }
            });
            match self.patch(name, &patch).await {
                Ok(_) | Err(Error::NotFound(_)) => {
                    tracing::info!(node = %current, "unpublished");
                    return Ok(ControllerUnpublishVolumeResponse {});
                }
                Err(Error::Aborted(_)) if attempt < self.settings.conflict_retries_max => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        let name = required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required and must not be empty".into(),
            ));
        }
        let bv = self.must_get_volume(name).await?;
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if let Err(e) = check_capabilities(&req.volume_capabilities) {
            return Ok(unconfirmed(e.to_string()));
        }
        if let Err(e) = VolumeParams::parse(&req.parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: if req.volume_context.is_empty() {
                    volume_context(&bv)
                } else {
                    req.volume_context.clone()
                },
                volume_capabilities: req.volume_capabilities.clone(),
                parameters: req.parameters.clone(),
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(Error::InvalidArgument(format!(
                "max_entries must not be negative, got {}",
                req.max_entries
            )));
        }
        let start: usize = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token.parse().map_err(|_| {
                Error::Aborted(format!(
                    "starting_token {:?} was not issued by this plugin",
                    req.starting_token
                ))
            })?
        };
        let lp =
            ListParams::default().labels(&format!("{}={MANAGED_BY_CSI}", api::LABEL_MANAGED_BY));
        let mut all = self.volumes.list(&lp).await?.items;
        // A volume whose DeleteVolume succeeded is gone for the CO, even while the
        // operator still removes its replicas behind the finalizer.
        all.retain(|bv| bv.metadata.deletion_timestamp.is_none());
        all.sort_by_key(|bv| bv.name_any());
        if start > all.len() {
            return Err(Error::Aborted(format!(
                "starting_token {start} is past the end of the volume list ({} volumes)",
                all.len()
            )));
        }
        let page = if req.max_entries == 0 {
            self.settings.list_page_entries_max
        } else {
            req.max_entries as usize
        };
        let end = start.saturating_add(page).min(all.len());
        let mut entries = Vec::with_capacity(end - start);
        for bv in all.get(start..end).unwrap_or_default() {
            entries.push(list_volumes_response::Entry {
                volume: Some(csi_volume(bv)?),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: attached_node(bv).into_iter().collect(),
                    volume_condition: Some(volume_condition(bv)),
                }),
            });
        }
        Ok(ListVolumesResponse {
            entries,
            next_token: if end < all.len() {
                end.to_string()
            } else {
                String::new()
            },
        })
    }

    async fn capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        if !req.volume_capabilities.is_empty() {
            check_capabilities(&req.volume_capabilities)?;
        }
        let p = VolumeParams::parse(&req.parameters)?;
        let nodes = self.nodes.list(&ListParams::default()).await?.items;
        let matches = |n: &BlockNode| match &req.accessible_topology {
            None => true,
            Some(t) => t.segments.iter().all(|(k, v)| {
                if k == api::TOPOLOGY_NODE_KEY {
                    *v == n.spec.node_name || Some(v.as_str()) == n.metadata.name.as_deref()
                } else {
                    n.spec.topology.get(k) == Some(v)
                }
            }),
        };
        let mut free: Vec<u64> = nodes
            .iter()
            .filter(|n| matches(n))
            .map(|n| n.status.as_ref().map_or(0, |s| s.allocatable_bytes))
            .collect();
        let available: u64 = free.iter().fold(0u64, |acc, b| acc.saturating_add(*b));
        // Replicas sit on distinct nodes, so the largest volume is bounded by the
        // node with the replicas-th most free space.
        free.sort_unstable_by(|a, b| b.cmp(a));
        let replicas = if req.accessible_topology.is_some() {
            1
        } else {
            usize::from(p.replicas)
        };
        let maximum = free.get(replicas.saturating_sub(1)).copied().unwrap_or(0);
        let clamp = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
        Ok(GetCapacityResponse {
            available_capacity: clamp(available),
            maximum_volume_size: Some(clamp(maximum)),
            minimum_volume_size: Some(i64::from(p.block_size)),
        })
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse> {
        let name = required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(Error::InvalidArgument(
                "capacity_range must set required_bytes or limit_bytes".into(),
            ));
        }
        if let Some(c) = &req.volume_capability {
            check_capability(c)?;
        }
        let _guard = self.inflight.try_acquire(name)?;
        // Always through the node: for a filesystem (resize2fs/xfs_growfs) and for a
        // raw block device too, whose kernel device the agent must grow.
        let node_expansion_required = true;
        let mut attempt = 0;
        loop {
            let bv = self.must_get_volume(name).await?;
            let current = size_of(&bv)?;
            let wanted = size_for_capacity(Some(range), bv.spec.block_size, current)?;
            if wanted <= current {
                return Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: current as i64,
                    node_expansion_required,
                });
            }
            let mut new_spec = bv.spec.clone();
            new_spec.size = IntOrString::String(wanted.to_string());
            new_spec
                .validate_update(&bv.spec)
                .map_err(|e| Error::InvalidArgument(format!("expansion would be invalid: {e}")))?;
            let patch = json!({
                "metadata": { "resourceVersion": bv.metadata.resource_version },
                "spec": { "size": wanted.to_string() }
            });
            match self.patch(name, &patch).await {
                Ok(_) => {
                    tracing::info!(
                        from_bytes = current,
                        to_bytes = wanted,
                        "expanded BlockVolume"
                    );
                    return Ok(ControllerExpandVolumeResponse {
                        capacity_bytes: wanted as i64,
                        node_expansion_required,
                    });
                }
                Err(Error::Aborted(_)) if attempt < self.settings.conflict_retries_max => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn get(&self, req: ControllerGetVolumeRequest) -> Result<ControllerGetVolumeResponse> {
        let name = required("volume_id", &req.volume_id)?;
        let bv = self.must_get_volume(name).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&bv)?),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: attached_node(&bv).into_iter().collect(),
                volume_condition: Some(volume_condition(&bv)),
            }),
        })
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by blockvol"))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_name_for(&req.name);
        run("CreateVolume", &id, self.create(req)).await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("DeleteVolume", &id, self.delete(req)).await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("ControllerPublishVolume", &id, self.publish(req)).await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("ControllerUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("ValidateVolumeCapabilities", &id, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        run("ListVolumes", "", self.list(request.into_inner())).await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        run("GetCapacity", "", self.capacity(request.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                RpcType::CreateDeleteVolume,
                RpcType::PublishUnpublishVolume,
                RpcType::PublishReadonly,
                RpcType::ListVolumes,
                RpcType::GetCapacity,
                RpcType::ExpandVolume,
                RpcType::ListVolumesPublishedNodes,
                RpcType::VolumeCondition,
                RpcType::GetVolume,
                RpcType::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(unimplemented("ListSnapshots"))
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(unimplemented("GetSnapshot"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("ControllerExpandVolume", &id, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        run("ControllerGetVolume", &id, self.get(req)).await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::Durability;
    use api::volume::DataLocality;

    fn topo(node: &str) -> Topology {
        Topology {
            segments: HashMap::from([(api::TOPOLOGY_NODE_KEY.to_string(), node.to_string())]),
        }
    }

    #[test]
    fn single_replica_is_pinned_to_the_preferred_node() {
        let p = VolumeParams {
            replicas: 1,
            ..Default::default()
        };
        let req = TopologyRequirement {
            requisite: vec![topo("a"), topo("b")],
            preferred: vec![topo("b"), topo("a")],
        };
        let spec = desired_spec(&p, 4096, Some(&req));
        assert_eq!(
            spec.node_selector,
            Some(BTreeMap::from([(
                api::TOPOLOGY_NODE_KEY.to_string(),
                "b".to_string()
            )]))
        );
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn replicated_volumes_are_not_pinned_to_one_node() {
        let p = VolumeParams::default();
        let req = TopologyRequirement {
            requisite: vec![topo("a")],
            preferred: vec![topo("a")],
        };
        assert_eq!(desired_spec(&p, 4096, Some(&req)).node_selector, None);
    }

    #[test]
    fn desired_spec_carries_the_parameters() {
        let p = VolumeParams {
            pvc: None,
            replicas: 2,
            durability: Durability::Async,
            block_size: 512,
            fs_type: None,
            data_locality: Some(DataLocality::BestEffort),
            node_selector: Some(BTreeMap::from([("disk".into(), "ssd".into())])),
            topology_key: Some("rack".into()),
        };
        let spec = desired_spec(&p, 1 << 20, None);
        assert_eq!(spec.size_bytes(), Ok(1 << 20));
        assert_eq!(spec.replicas, 2);
        assert_eq!(spec.durability, Durability::Async);
        assert_eq!(spec.block_size, 512);
        assert_eq!(spec.data_locality, Some(DataLocality::BestEffort));
        assert_eq!(p.node_selector, spec.node_selector);
        assert_eq!(spec.topology_key.as_deref(), Some("rack"));
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn a_pinned_single_replica_keeps_the_storage_class_node_selector() {
        let p = VolumeParams {
            replicas: 1,
            node_selector: Some(BTreeMap::from([("disk".into(), "ssd".into())])),
            ..Default::default()
        };
        let req = TopologyRequirement {
            requisite: vec![topo("a")],
            preferred: vec![topo("a")],
        };
        let sel = desired_spec(&p, 4096, Some(&req)).node_selector.unwrap();
        assert_eq!(sel.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(
            sel.get(api::TOPOLOGY_NODE_KEY).map(String::as_str),
            Some("a")
        );
    }

    fn volume(conds: &[(&str, &str)]) -> BlockVolume {
        let mut bv = BlockVolume::new("v", BlockVolumeSpec::with_size("1Gi"));
        bv.status = Some(api::BlockVolumeStatus {
            conditions: conds
                .iter()
                .map(
                    |(t, s)| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                        type_: t.to_string(),
                        status: s.to_string(),
                        reason: "Test".into(),
                        message: format!("{t} is {s}"),
                        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            Default::default(),
                        ),
                        observed_generation: None,
                    },
                )
                .collect(),
            ..Default::default()
        });
        bv
    }

    #[test]
    fn volume_condition_is_abnormal_unless_ready_and_not_degraded() {
        assert!(!volume_condition(&volume(&[("Ready", "True")])).abnormal);
        assert!(volume_condition(&volume(&[("Ready", "False")])).abnormal);
        assert!(volume_condition(&volume(&[])).abnormal);
        let c = volume_condition(&volume(&[("Ready", "True"), ("Degraded", "True")]));
        assert!(c.abnormal);
        assert!(c.message.contains("degraded"), "{}", c.message);
    }

    #[test]
    fn an_existing_volume_matches_only_the_same_request() {
        let p = VolumeParams::default();
        let spec = desired_spec(&p, 1 << 30, None);
        let mut bv = BlockVolume::new("pvc-1", spec.clone());
        bv.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_CSI_NAME.to_string(),
            "pvc-1".to_string(),
        )]));
        assert_eq!(mismatch(&bv, "pvc-1", &spec, None), None);
        let bigger = desired_spec(&p, 2 << 30, None);
        assert!(
            mismatch(&bv, "pvc-1", &bigger, None)
                .unwrap()
                .contains("size")
        );
        let other = desired_spec(
            &VolumeParams {
                replicas: 2,
                ..Default::default()
            },
            1 << 30,
            None,
        );
        assert!(
            mismatch(&bv, "pvc-1", &other, None)
                .unwrap()
                .contains("replicas")
        );
        assert!(
            mismatch(&bv, "pvc-1", &spec, Some("xfs"))
                .unwrap()
                .contains("fsType")
        );
        assert!(mismatch(&bv, "other", &spec, None).is_some());
    }
}
