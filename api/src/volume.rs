//! `BlockVolume`: the user's intent for one replicated block volume, and the status the
//! operator reports for it. The schema rejects invalid objects (CEL rules with the field
//! named); [`BlockVolumeSpec::validate`] and [`BlockVolumeSpec::validate_update`] apply
//! the same rules in Rust for callers that build specs themselves (the CSI driver).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::parse_quantity_bytes;
use crate::{BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_REPLICAS, MAX_REPLICAS, MIN_REPLICAS};

/// A replicated block volume. Cluster-scoped; `kubectl get bv`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "blockvol.io",
    version = "v1alpha1",
    kind = "BlockVolume",
    shortname = "bv",
    status = "BlockVolumeStatus",
    category = "blockvol",
    doc = "A replicated block volume: the size, replica count and durability a user asks for, and the placement, primary, committed in-sync set and attachment the operator reports.",
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"InSync","type":"integer","jsonPath":".status.inSyncCount"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.primaryNode"}"#,
    printcolumn = r#"{"name":"Attached","type":"string","jsonPath":".status.attachedTo"}"#,
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvc.name"}"#,
    printcolumn = r#"{"name":"PVC-Namespace","type":"string","jsonPath":".spec.pvc.namespace","priority":1}"#,
    printcolumn = r#"{"name":"Durability","type":"string","jsonPath":".spec.durability","priority":1}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "isQuantity(string(self.size)) && quantity(string(self.size)).isInteger() && quantity(string(self.size)).asInteger() > 0",
        "message": "spec.size must be a positive whole number of bytes, written as a quantity such as 10Gi",
        "fieldPath": ".size",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "type(self.size) == string || self.size <= 2147483647",
        "message": "spec.size written as a plain integer must be at most 2147483647 (int32, what Kubernetes clients decode); write larger sizes as a quantity string such as 10Gi",
        "fieldPath": ".size",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!isQuantity(string(self.size)) || !quantity(string(self.size)).isInteger() || quantity(string(self.size)).asInteger() % self.blockSize == 0",
        "message": "spec.size must be a multiple of spec.blockSize",
        "fieldPath": ".size",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!isQuantity(string(self.size)) || !isQuantity(string(oldSelf.size)) || quantity(string(self.size)).compareTo(quantity(string(oldSelf.size))) >= 0",
        "message": "spec.size may only grow: shrinking a volume would destroy data",
        "fieldPath": ".size",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.blockSize == oldSelf.blockSize",
        "message": "spec.blockSize is immutable",
        "fieldPath": ".blockSize",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.durability == oldSelf.durability",
        "message": "spec.durability is immutable",
        "fieldPath": ".durability",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct BlockVolumeSpec {
    /// Capacity of the volume: a quantity (`10Gi`) or a byte count, a multiple of
    /// `blockSize`. May grow; never shrink. A plain integer must fit in int32 (clients
    /// decode it as one); larger sizes are written as quantity strings.
    #[schemars(schema_with = "size_schema")]
    pub size: IntOrString,
    /// Number of replicas, each on a distinct node (1 to 5).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u8,
    /// When a flush is acknowledged: `syncAll` waits for every member of the committed
    /// in-sync set; `async` waits for the primary's disk only.
    #[serde(default)]
    pub durability: Durability,
    /// Logical block size in bytes: 512 or 4096. Immutable.
    #[serde(default = "default_block_size")]
    #[schemars(extend("enum" = [512, 4096]))]
    pub block_size: u32,
    /// Only nodes whose labels match every entry may hold a replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Node label whose values replicas are spread across (default: zone, then hostname).
    /// A label key: an optional DNS-subdomain prefix and `/`, then a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    ))]
    pub topology_key: Option<String>,
    /// Whether to keep a replica (and so the primary) on the node that uses the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_locality: Option<DataLocality>,
    /// The PersistentVolumeClaim the volume serves, if any: the CSI driver records it
    /// at provisioning; set it by hand for a hand-made volume. It labels the volume's
    /// metrics (`pvc`, `pvc_namespace`) and receives copies of its important Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcReference>,
}

/// Longest PersistentVolumeClaim name (a DNS-1123 subdomain).
pub const PVC_NAME_MAX_LEN: usize = 253;
/// Longest namespace name (a DNS-1123 label).
pub const NAMESPACE_MAX_LEN: usize = 63;

/// A PersistentVolumeClaim, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcReference {
    /// Name of the claim: a DNS-1123 subdomain (lowercase alphanumerics, `-` and `.`).
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub name: String,
    /// Namespace of the claim: a DNS-1123 label (lowercase alphanumerics and `-`).
    #[schemars(length(min = 1, max = 63))]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
}

impl PvcReference {
    /// Why this reference could not name a claim, if it could not.
    pub fn validate(&self) -> Result<(), ValidationError> {
        fn label(s: &str) -> bool {
            !s.is_empty()
                && s.len() <= NAMESPACE_MAX_LEN
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        }
        if self.name.len() > PVC_NAME_MAX_LEN || !self.name.split('.').all(label) {
            return Err(ValidationError::new(
                "spec.pvc.name",
                format!(
                    "{:?} is not a DNS-1123 subdomain (at most {PVC_NAME_MAX_LEN} lowercase alphanumerics, '-' and '.')",
                    self.name
                ),
            ));
        }
        if !label(&self.namespace) {
            return Err(ValidationError::new(
                "spec.pvc.namespace",
                format!(
                    "{:?} is not a DNS-1123 label (at most {NAMESPACE_MAX_LEN} lowercase alphanumerics and '-')",
                    self.namespace
                ),
            ));
        }
        Ok(())
    }
}

fn default_replicas() -> u8 {
    DEFAULT_REPLICAS
}

fn default_block_size() -> u32 {
    DEFAULT_BLOCK_SIZE
}

fn size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Capacity of the volume: a quantity (10Gi) or a byte count, a multiple of blockSize.",
        "pattern": "^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$",
        "x-kubernetes-int-or-string": true
    })
}

/// When a flush is acknowledged.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Durability {
    /// Every member of the committed in-sync set has the data on disk.
    #[default]
    SyncAll,
    /// The primary has the data on disk; replicas follow as fast as they can.
    Async,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::SyncAll => "syncAll",
            Durability::Async => "async",
        }
    }

    /// Parses the spelling used in the CRD and StorageClass parameters.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "syncAll" => Some(Durability::SyncAll),
            "async" => Some(Durability::Async),
            _ => None,
        }
    }
}

/// Placement preference relative to the node that attaches the volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DataLocality {
    Disabled,
    BestEffort,
}

/// Coarse lifecycle of a volume, for `kubectl get bv`. Conditions carry the detail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    #[default]
    Pending,
    Creating,
    Ready,
    Degraded,
    Failed,
    Deleting,
}

/// Observed state of a volume, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockVolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// Ready, Degraded, Rebuilding, Attached (Kubernetes condition conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Current replication epoch; bumped on every promotion.
    #[serde(default)]
    pub epoch: u64,
    /// ReplicaID of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Node of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    /// The committed in-sync set: ReplicaIDs every acknowledged flush is durable on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_sync_set: Vec<String>,
    /// Bumped each time the committed in-sync set changes.
    #[serde(default)]
    pub in_sync_set_generation: u64,
    /// Size of `inSyncSet`, for printer columns.
    #[serde(default)]
    pub in_sync_count: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaSummary>,
    /// Node the volume is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// Size every replica has reached, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A planned primary move in progress. Recorded before any replica changes, so an
    /// operator that restarts mid-move resumes it instead of starting a failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_move: Option<PrimaryMove>,
}

/// A planned switchover of the primary to another committed in-sync member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryMove {
    /// ReplicaID of the primary being moved away from.
    pub from: String,
    /// ReplicaID of the member that becomes primary.
    pub to: String,
    /// Node of `to`.
    pub to_node: String,
    /// Epoch the old primary is demoted to and the new one promoted at (current + 1).
    pub epoch: u64,
    pub phase: MovePhase,
    pub reason: MoveReason,
    /// When the move was recorded; it is abandoned after the operator's move timeout.
    pub started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// Steps of a primary move, in order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MovePhase {
    /// Recorded; no replica has changed yet.
    Requested,
    /// The old primary is assigned `Replica` at the new epoch; waiting for it to report
    /// the demotion and for the target to hold every entry it flushed.
    Demoting,
}

/// What asked for a primary move.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MoveReason {
    /// `spec.dataLocality: BestEffort` and the volume is attached on the target's node.
    DataLocality,
    /// The `blockvol.io/move-primary-to` annotation names the target's node.
    Requested,
    /// The primary's node is being drained (`BlockNode.spec.evacuate`).
    Drain,
}

/// One line per replica in the volume status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSummary {
    pub replica_id: String,
    pub node: String,
    pub role: String,
    pub state: String,
    #[serde(default)]
    pub flushed_lsn: u64,
    /// Since when the operator has seen this replica unusable (node agent gone,
    /// `NeedsRebuild` or `Failed`); it is replaced once this is older than the grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Condition types a `BlockVolume` reports.
pub mod condition {
    /// True when the volume can serve IO with its committed in-sync set complete.
    pub const READY: &str = "Ready";
    /// True when fewer replicas than `spec.replicas` are in sync.
    pub const DEGRADED: &str = "Degraded";
    /// True while a replica is being rebuilt or caught up.
    pub const REBUILDING: &str = "Rebuilding";
    /// True while the volume is attached to a node.
    pub const ATTACHED: &str = "Attached";
}

/// A spec field that breaks a rule, named the way `kubectl` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        ValidationError {
            field,
            message: message.into(),
        }
    }
}

impl BlockVolumeSpec {
    /// A spec with the defaults for everything but the size.
    pub fn with_size(size: impl Into<String>) -> Self {
        BlockVolumeSpec {
            size: IntOrString::String(size.into()),
            replicas: DEFAULT_REPLICAS,
            durability: Durability::SyncAll,
            block_size: DEFAULT_BLOCK_SIZE,
            node_selector: None,
            topology_key: None,
            data_locality: None,
            pvc: None,
        }
    }

    /// The size in bytes, or the reason `spec.size` is not a usable size.
    pub fn size_bytes(&self) -> Result<u64, ValidationError> {
        let bytes = match &self.size {
            IntOrString::Int(n) => u64::try_from(*n)
                .map_err(|_| ValidationError::new("spec.size", format!("{n} is negative")))?,
            IntOrString::String(s) => parse_quantity_bytes(s)
                .map_err(|e| ValidationError::new("spec.size", e.to_string()))?,
        };
        if bytes == 0 {
            return Err(ValidationError::new(
                "spec.size",
                "must be greater than zero",
            ));
        }
        Ok(bytes)
    }

    /// The rules the CRD schema enforces on create.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !BLOCK_SIZES.contains(&self.block_size) {
            return Err(ValidationError::new(
                "spec.blockSize",
                format!("must be 512 or 4096, got {}", self.block_size),
            ));
        }
        if !(MIN_REPLICAS..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(ValidationError::new(
                "spec.replicas",
                format!(
                    "must be between {MIN_REPLICAS} and {MAX_REPLICAS}, got {}",
                    self.replicas
                ),
            ));
        }
        if let Some(sel) = &self.node_selector {
            for (k, v) in sel {
                if !crate::labels::valid_label_key(k) {
                    return Err(ValidationError::new(
                        "spec.nodeSelector",
                        format!("{k:?} is not a valid label key"),
                    ));
                }
                if !crate::labels::valid_label_value(v) {
                    return Err(ValidationError::new(
                        "spec.nodeSelector",
                        format!("{v:?} (for {k:?}) is not a valid label value"),
                    ));
                }
            }
        }
        if let Some(k) = &self.topology_key
            && !crate::labels::valid_label_key(k)
        {
            return Err(ValidationError::new(
                "spec.topologyKey",
                format!("{k:?} is not a valid label key"),
            ));
        }
        if let Some(pvc) = &self.pvc {
            pvc.validate()?;
        }
        let size = self.size_bytes()?;
        if size % u64::from(self.block_size) != 0 {
            return Err(ValidationError::new(
                "spec.size",
                format!(
                    "must be a multiple of spec.blockSize ({}), got {size} bytes",
                    self.block_size
                ),
            ));
        }
        Ok(())
    }

    /// The rules the CRD schema enforces on update, given the stored spec.
    pub fn validate_update(&self, old: &BlockVolumeSpec) -> Result<(), ValidationError> {
        self.validate()?;
        if self.block_size != old.block_size {
            return Err(ValidationError::new("spec.blockSize", "is immutable"));
        }
        if self.durability != old.durability {
            return Err(ValidationError::new("spec.durability", "is immutable"));
        }
        let (new_size, old_size) = (self.size_bytes()?, old.size_bytes()?);
        if new_size < old_size {
            return Err(ValidationError::new(
                "spec.size",
                format!("may only grow: {old_size} → {new_size} bytes would destroy data"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: &str) -> BlockVolumeSpec {
        BlockVolumeSpec::with_size(size)
    }

    fn field_of(r: Result<(), ValidationError>) -> &'static str {
        r.expect_err("must be rejected").field
    }

    #[test]
    fn default_spec_is_valid() {
        assert_eq!(spec("1Gi").validate(), Ok(()));
        assert_eq!(spec("1Gi").size_bytes(), Ok(1 << 30));
    }

    #[test]
    fn size_must_be_positive_and_whole() {
        assert_eq!(field_of(spec("0").validate()), "spec.size");
        assert_eq!(field_of(spec("-1Gi").validate()), "spec.size");
        assert_eq!(field_of(spec("ten gigs").validate()), "spec.size");
        let mut s = spec("1Gi");
        s.size = IntOrString::Int(-5);
        assert_eq!(field_of(s.validate()), "spec.size");
    }

    #[test]
    fn size_must_be_a_multiple_of_block_size() {
        assert_eq!(field_of(spec("1000").validate()), "spec.size");
        let mut s = spec("1536");
        s.block_size = 512;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn replicas_outside_one_to_five_are_rejected() {
        for bad in [0u8, 6, 255] {
            let mut s = spec("1Gi");
            s.replicas = bad;
            let err = s.validate().unwrap_err();
            assert_eq!(err.field, "spec.replicas");
            assert!(err.message.contains(&bad.to_string()), "{err}");
        }
    }

    #[test]
    fn block_size_other_than_512_or_4096_is_rejected() {
        let mut s = spec("1Gi");
        s.block_size = 1024;
        assert_eq!(field_of(s.validate()), "spec.blockSize");
    }

    #[test]
    fn node_selector_and_topology_key_must_be_label_syntax() {
        let mut s = spec("1Gi");
        s.node_selector = Some(BTreeMap::from([("disk".into(), "ssd".into())]));
        s.topology_key = Some("topology.kubernetes.io/zone".into());
        assert_eq!(s.validate(), Ok(()));
        s.node_selector = Some(BTreeMap::from([("bad key".into(), "ssd".into())]));
        assert_eq!(field_of(s.validate()), "spec.nodeSelector");
        s.node_selector = Some(BTreeMap::from([("disk".into(), "-ssd".into())]));
        assert_eq!(field_of(s.validate()), "spec.nodeSelector");
        s.node_selector = None;
        s.topology_key = Some("Zone/".into());
        assert_eq!(field_of(s.validate()), "spec.topologyKey");
    }

    #[test]
    fn durability_parses_only_known_spellings() {
        assert_eq!(Durability::parse("syncAll"), Some(Durability::SyncAll));
        assert_eq!(Durability::parse("async"), Some(Durability::Async));
        assert_eq!(Durability::parse("SyncAll"), None);
        let bad: Result<BlockVolumeSpec, _> =
            serde_json::from_value(serde_json::json!({"size": "1Gi", "durability": "quorum"}));
        assert!(bad.is_err());
    }

    #[test]
    fn block_size_and_durability_are_immutable() {
        let old = spec("1Gi");
        let mut new = old.clone();
        new.block_size = 512;
        assert_eq!(field_of(new.validate_update(&old)), "spec.blockSize");
        let mut new = old.clone();
        new.durability = Durability::Async;
        assert_eq!(field_of(new.validate_update(&old)), "spec.durability");
    }

    #[test]
    fn size_may_grow_but_not_shrink() {
        let old = spec("2Gi");
        assert_eq!(spec("3Gi").validate_update(&old), Ok(()));
        assert_eq!(spec("2Gi").validate_update(&old), Ok(()));
        assert_eq!(field_of(spec("1Gi").validate_update(&old)), "spec.size");
    }

    #[test]
    fn defaults_fill_in_when_fields_are_omitted() {
        let s: BlockVolumeSpec =
            serde_json::from_value(serde_json::json!({"size": 1073741824})).unwrap();
        assert_eq!(s.replicas, DEFAULT_REPLICAS);
        assert_eq!(s.block_size, DEFAULT_BLOCK_SIZE);
        assert_eq!(s.durability, Durability::SyncAll);
        assert_eq!(s.size_bytes(), Ok(1 << 30));
    }

    #[test]
    fn pvc_reference_must_name_a_claim() {
        let with = |name: &str, namespace: &str| BlockVolumeSpec {
            pvc: Some(PvcReference {
                name: name.into(),
                namespace: namespace.into(),
            }),
            ..spec("1Gi")
        };
        assert_eq!(with("data-db-0", "prod").validate(), Ok(()));
        assert_eq!(with("a.b-c", "x").validate(), Ok(()));
        for bad in ["", "Data", "-a", "a-", "a..b", "a_b", &"n".repeat(254)] {
            assert_eq!(
                field_of(with(bad, "prod").validate()),
                "spec.pvc.name",
                "{bad:?}"
            );
        }
        for bad in ["", "Prod", "a.b", "-a", &"n".repeat(64)] {
            assert_eq!(
                field_of(with("data", bad).validate()),
                "spec.pvc.namespace",
                "{bad:?}"
            );
        }
    }
}
