//! blockvol's Kubernetes API: the `BlockVolume`, `BlockReplica` and `BlockNode` custom
//! resources (group `blockvol.io`, version `v1alpha1`), the labels, finalizers and names
//! every component shares, and the validation the CRD schema enforces, mirrored in Rust
//! so controllers and the CSI driver reject the same objects the API server rejects.

pub mod crd;
pub mod labels;
pub mod node;
pub mod quantity;
pub mod replica;
pub mod volume;

pub use node::{BlockNode, BlockNodeSpec, BlockNodeStatus, EvacuationStatus};
pub use quantity::{QuantityError, format_bytes_binary, parse_quantity_bytes};
pub use replica::{
    BlockReplica, BlockReplicaSpec, BlockReplicaStatus, PeerAssignment, PeerStatus, RebuildStatus,
    ReplicaLag, ReplicaRole, ReplicaState,
};
pub use volume::{
    BlockVolume, BlockVolumeSpec, BlockVolumeStatus, DataLocality, Durability, MovePhase,
    MoveReason, PrimaryMove, PvcReference, ReplicaSummary, ValidationError, VolumePhase,
};

/// API group of every blockvol resource.
pub const GROUP: &str = "blockvol.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// The CSI driver name, as registered with the kubelet and named in StorageClasses.
pub const CSI_DRIVER_NAME: &str = "csi.blockvol.io";

/// Label on a `BlockReplica` naming the `BlockVolume` it belongs to.
pub const LABEL_VOLUME: &str = "blockvol.io/volume";
/// Label on a `BlockReplica` naming the node whose agent runs it.
pub const LABEL_NODE: &str = "blockvol.io/node";
/// Label on objects managed by blockvol components.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Finalizer the operator holds on a `BlockVolume` until every replica is gone.
pub const FINALIZER_VOLUME: &str = "blockvol.io/replicas";
/// Finalizer the node agent holds on a `BlockReplica` until its disk space is freed.
pub const FINALIZER_REPLICA: &str = "blockvol.io/disk";

/// Annotation on a `BlockVolume` naming the node it is attached to. The CSI controller
/// sets it on ControllerPublishVolume and removes it on ControllerUnpublishVolume; the
/// operator mirrors it into `status.attachedTo` and keeps an attached volume from being
/// deleted until it is detached. Only the CSI controller writes it.
pub const ANNOTATION_ATTACHED_NODE: &str = "blockvol.io/attached-node";
/// Annotation on a `BlockVolume`: the generation of its attachment, a decimal integer
/// the CSI controller increments with every ControllerPublish that attaches the volume
/// (and keeps across ControllerUnpublish, so the next attachment gets a higher one). A
/// node's forwarding export carries the generation it was attached with, and the
/// primary refuses forwarded IO of an older generation ("fenced: stale attachment"),
/// so a re-attach to the same node fences what the older attachment left running.
/// Only the CSI controller writes it.
pub const ANNOTATION_ATTACHMENT_GENERATION: &str = "blockvol.io/attachment-generation";
/// Annotation on a `BlockVolume`, `"true"` when its attachment is read-only. Written
/// together with [`ANNOTATION_ATTACHED_NODE`] and removed with it.
pub const ANNOTATION_ATTACHED_READONLY: &str = "blockvol.io/attached-readonly";

/// Annotation on a `BlockVolume` asking the operator to move the primary to the named
/// node (a planned switchover: the old primary is demoted first, so no acknowledged write
/// is lost and no failover timeout is waited out). The node must hold a replica in the
/// committed in-sync set. A standing request: while it is set and satisfiable, the
/// operator keeps the primary there. Written by the cluster admin only.
pub const ANNOTATION_MOVE_PRIMARY_TO: &str = "blockvol.io/move-primary-to";

/// Topology key the CSI driver reports for each node.
pub const TOPOLOGY_NODE_KEY: &str = "topology.blockvol.io/node";

/// `lastError` of a `Failed` primary whose own disk refused an fsync or a write. The
/// engine fail-stops such a volume (no later fsync can prove what an earlier failed one
/// lost), so it serves no IO while its agent still renews the node Lease; the operator
/// promotes another member on seeing it, as if the Lease had expired.
pub const PRIMARY_DISK_FAILED_ERROR: &str = "the local disk failed (fsync or write error); the volume serves no IO here until its agent restarts on a working disk";

/// `lastError` of a `Failed` primary whose volume was reopened (agent restart, node power
/// loss) at the epoch it is assigned to serve at. It may have lost entries it had already
/// issued and shipped at that epoch, so serving there again could give one LSN two
/// contents; it serves nothing and waits for a new epoch. The operator answers with the
/// standard promotion at epoch + 1, where this replica itself is a candidate.
pub const PRIMARY_NEEDS_NEW_EPOCH_ERROR: &str = "the volume was reopened at the epoch it is assigned to serve at; it serves no IO until the operator assigns a new epoch";

/// Field managers: one per component, so server-side apply keeps one writer per field.
pub const FIELD_MANAGER_OPERATOR: &str = "blockvol-operator";
pub const FIELD_MANAGER_AGENT: &str = "blockvol-agent";
pub const FIELD_MANAGER_CSI: &str = "blockvol-csi";

/// Block sizes a volume may have, in bytes.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];
/// Default block size in bytes.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Replica count bounds and default.
pub const MIN_REPLICAS: u8 = 1;
pub const MAX_REPLICAS: u8 = 5;
pub const DEFAULT_REPLICAS: u8 = 3;
