//! What a CreateVolume request asks for, checked before anything is written: the
//! StorageClass parameters, the capacity range and the volume capabilities. Every
//! rejection names the parameter or field and the values that would be accepted, and
//! nothing here has side effects, so a bad request never half-applies.

use std::collections::{BTreeMap, HashMap};

use api::volume::DataLocality;
use api::{
    BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_REPLICAS, Durability, MAX_REPLICAS, MIN_REPLICAS,
    PvcReference,
};

use crate::csi_proto::volume_capability::AccessType;
use crate::csi_proto::volume_capability::access_mode::Mode;
use crate::csi_proto::{CapacityRange, VolumeCapability};
use crate::error::{Error, Result};

/// StorageClass parameter: number of replicas, 1 to 5.
pub const PARAM_REPLICAS: &str = "replicas";
/// StorageClass parameter: `syncAll` or `async`.
pub const PARAM_DURABILITY: &str = "durability";
/// StorageClass parameter: logical block size in bytes, 512 or 4096.
pub const PARAM_BLOCK_SIZE: &str = "blockSize";
/// StorageClass parameter: filesystem made on first stage, `ext4` or `xfs`.
pub const PARAM_FS_TYPE: &str = "fsType";
/// StorageClass parameter: `disabled` or `bestEffort`.
pub const PARAM_DATA_LOCALITY: &str = "dataLocality";
/// StorageClass parameter: only nodes with every one of these labels hold a replica;
/// `key=value` pairs separated by commas (`disk=ssd,blockvol.io/pool=fast`).
pub const PARAM_NODE_SELECTOR: &str = "nodeSelector";
/// StorageClass parameter: node label whose values the replicas are spread across
/// (default: `topology.kubernetes.io/zone`, then hostname).
pub const PARAM_TOPOLOGY_KEY: &str = "topologyKey";
/// Every StorageClass parameter the driver accepts.
pub const PARAMS: [&str; 7] = [
    PARAM_REPLICAS,
    PARAM_DURABILITY,
    PARAM_BLOCK_SIZE,
    PARAM_FS_TYPE,
    PARAM_DATA_LOCALITY,
    PARAM_NODE_SELECTOR,
    PARAM_TOPOLOGY_KEY,
];
/// Parameters the Kubernetes sidecars add themselves; they carry no volume intent.
pub const SIDECAR_PARAM_PREFIX: &str = "csi.storage.k8s.io/";
/// Sidecar parameter (csi-provisioner `--extra-create-metadata`): the claim's name.
pub const SIDECAR_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Sidecar parameter (csi-provisioner `--extra-create-metadata`): the claim's namespace.
pub const SIDECAR_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";

/// Filesystems the node plugin can make and grow.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
/// Filesystem used when neither the capability nor the StorageClass names one.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// Volume context keys: what NodeStageVolume learns about the volume.
pub const CTX_BLOCK_SIZE: &str = "blockvol.io/blockSize";
pub const CTX_FS_TYPE: &str = "blockvol.io/fsType";
pub const CTX_REPLICAS: &str = "blockvol.io/replicas";
pub const CTX_DURABILITY: &str = "blockvol.io/durability";

/// The volume a StorageClass asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u8,
    pub durability: Durability,
    pub block_size: u32,
    /// Filesystem for mount access, if the StorageClass names one.
    pub fs_type: Option<String>,
    pub data_locality: Option<DataLocality>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub topology_key: Option<String>,
    /// The claim being provisioned, when the provisioner passes it (both its name and
    /// namespace); recorded as the volume's `spec.pvc`.
    pub pvc: Option<PvcReference>,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            replicas: DEFAULT_REPLICAS,
            durability: Durability::SyncAll,
            block_size: DEFAULT_BLOCK_SIZE,
            fs_type: None,
            data_locality: None,
            node_selector: None,
            topology_key: None,
            pvc: None,
        }
    }
}

/// Parses a `nodeSelector` parameter: `key=value` pairs separated by commas, each key
/// and value in Kubernetes label syntax, no key twice.
pub fn parse_node_selector(value: &str) -> Result<BTreeMap<String, String>> {
    let bad = |why: String| {
        Error::InvalidArgument(format!(
            "StorageClass parameter {PARAM_NODE_SELECTOR:?} has invalid value {value:?}: {why}; \
             write label pairs as key=value separated by commas, such as \"disk=ssd,topology.kubernetes.io/zone=a\""
        ))
    };
    let mut sel = BTreeMap::new();
    for pair in value.split(',').map(str::trim) {
        if pair.is_empty() {
            return Err(bad("an empty pair".into()));
        }
        let Some((k, v)) = pair.split_once('=') else {
            return Err(bad(format!("{pair:?} has no '='")));
        };
        let (k, v) = (k.trim(), v.trim());
        if !api::labels::valid_label_key(k) {
            return Err(bad(format!("{k:?} is not a valid label key")));
        }
        if !api::labels::valid_label_value(v) {
            return Err(bad(format!("{v:?} is not a valid label value")));
        }
        if sel.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad(format!("{k:?} appears twice")));
        }
    }
    Ok(sel)
}

fn invalid_param(name: &str, value: &str, allowed: &str) -> Error {
    Error::InvalidArgument(format!(
        "StorageClass parameter {name:?} has invalid value {value:?}: allowed values are {allowed}"
    ))
}

impl VolumeParams {
    /// Parses StorageClass parameters. Unknown keys are refused (a typo must not
    /// silently give a volume with default durability); keys under
    /// `csi.storage.k8s.io/` belong to the sidecars and are ignored.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self> {
        let mut params = VolumeParams::default();
        // Sorted so the first bad parameter reported is the same on every retry.
        let sorted: BTreeMap<&String, &String> = parameters.iter().collect();
        for (key, value) in sorted {
            match key.as_str() {
                PARAM_REPLICAS => {
                    let allowed = format!("integers {MIN_REPLICAS} to {MAX_REPLICAS}");
                    params.replicas = value
                        .trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|n| (MIN_REPLICAS..=MAX_REPLICAS).contains(n))
                        .ok_or_else(|| invalid_param(key, value, &allowed))?;
                }
                PARAM_DURABILITY => {
                    params.durability = Durability::parse(value.trim())
                        .ok_or_else(|| invalid_param(key, value, "\"syncAll\", \"async\""))?;
                }
                PARAM_BLOCK_SIZE => {
                    let allowed = BLOCK_SIZES
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    params.block_size = value
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|b| BLOCK_SIZES.contains(b))
                        .ok_or_else(|| invalid_param(key, value, &allowed))?;
                }
                PARAM_FS_TYPE => {
                    let fs = value.trim();
                    if !FS_TYPES.contains(&fs) {
                        return Err(invalid_param(key, value, "\"ext4\", \"xfs\""));
                    }
                    params.fs_type = Some(fs.to_string());
                }
                PARAM_DATA_LOCALITY => {
                    params.data_locality = Some(match value.trim() {
                        "disabled" => DataLocality::Disabled,
                        "bestEffort" => DataLocality::BestEffort,
                        _ => {
                            return Err(invalid_param(key, value, "\"disabled\", \"bestEffort\""));
                        }
                    });
                }
                PARAM_NODE_SELECTOR => {
                    params.node_selector = Some(parse_node_selector(value)?);
                }
                PARAM_TOPOLOGY_KEY => {
                    let k = value.trim();
                    if !api::labels::valid_label_key(k) {
                        return Err(invalid_param(
                            key,
                            value,
                            "a node label key such as \"topology.kubernetes.io/zone\" or \"kubernetes.io/hostname\"",
                        ));
                    }
                    params.topology_key = Some(k.to_string());
                }
                k if k.starts_with(SIDECAR_PARAM_PREFIX) => {}
                _ => {
                    let known: Vec<String> = PARAMS.iter().map(|p| format!("{p:?}")).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown StorageClass parameter {key:?}: known parameters are {}",
                        known.join(", ")
                    )));
                }
            }
        }
        params.pvc = pvc_of(parameters)?;
        Ok(params)
    }
}

/// The claim the provisioner names in the sidecar parameters: `None` unless it passes
/// both the name and the namespace; a value no claim could have is refused.
fn pvc_of(parameters: &HashMap<String, String>) -> Result<Option<PvcReference>> {
    let (Some(name), Some(namespace)) = (
        parameters.get(SIDECAR_PVC_NAME),
        parameters.get(SIDECAR_PVC_NAMESPACE),
    ) else {
        return Ok(None);
    };
    let pvc = PvcReference {
        name: name.clone(),
        namespace: namespace.clone(),
    };
    pvc.validate().map_err(|e| {
        let param = if e.field.ends_with("namespace") {
            SIDECAR_PVC_NAMESPACE
        } else {
            SIDECAR_PVC_NAME
        };
        Error::InvalidArgument(format!("parameter {param:?}: {}", e.message))
    })?;
    Ok(Some(pvc))
}

/// The volume size for a capacity range: the required bytes (or `default_bytes` when
/// none are required) rounded up to a whole number of blocks, never above the limit.
/// When only a limit below the default is given, the largest whole-block size under
/// the limit is used.
pub fn size_for_capacity(
    range: Option<&CapacityRange>,
    block_size: u32,
    default_bytes: u64,
) -> Result<u64> {
    let block = u64::from(block_size.max(1));
    let (required, limit) = match range {
        Some(r) => (r.required_bytes, r.limit_bytes),
        None => (0, 0),
    };
    if required < 0 || limit < 0 {
        return Err(Error::OutOfRange(format!(
            "capacity_range must not be negative (required_bytes {required}, limit_bytes {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "capacity_range.required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required > 0 {
        required
    } else if limit > 0 && limit < default_bytes {
        let fitting = limit / block * block;
        if fitting == 0 {
            return Err(Error::OutOfRange(format!(
                "capacity_range.limit_bytes {limit} is smaller than one block ({block} bytes)"
            )));
        }
        fitting
    } else {
        default_bytes
    };
    let rounded = wanted
        .div_ceil(block)
        .checked_mul(block)
        .filter(|n| *n <= i64::MAX as u64)
        .ok_or_else(|| Error::OutOfRange(format!("{wanted} bytes is too large a volume")))?;
    if limit > 0 && rounded > limit {
        return Err(Error::OutOfRange(format!(
            "{wanted} bytes rounded up to the block size {block} is {rounded} bytes, \
             above capacity_range.limit_bytes {limit}"
        )));
    }
    Ok(rounded)
}

/// How a volume is presented on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A raw block device.
    Block,
    /// A mounted filesystem; `fs_type` is `None` when the CO leaves the choice to us.
    Mount {
        fs_type: Option<String>,
        mount_flags: Vec<String>,
    },
}

/// What one volume capability asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Whether the access mode only permits reading.
    pub fn is_read_only(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly)
    }
}

/// Checks one volume capability: an access type (block or mount with a supported
/// filesystem) and a single-node access mode. A blockvol volume is attached to one
/// node at a time, so multi-node modes are refused with that reason.
pub fn check_capability(cap: &VolumeCapability) -> Result<Capability> {
    let mode_raw = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume_capability.access_mode is required".into()))?
        .mode;
    let mode = Mode::try_from(mode_raw).map_err(|_| {
        Error::InvalidArgument(format!(
            "volume_capability.access_mode {mode_raw} is unknown"
        ))
    })?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: a blockvol volume is attached to one node \
                 at a time; use SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, \
                 SINGLE_NODE_MULTI_WRITER or SINGLE_NODE_READER_ONLY (ReadWriteOnce, \
                 ReadWriteOncePod, ReadOnly on one node)",
                mode.as_str_name()
            )));
        }
        Mode::Unknown => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_mode must be set (it is UNKNOWN)".into(),
            ));
        }
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = match m.fs_type.trim() {
                "" => None,
                fs if FS_TYPES.contains(&fs) => Some(fs.to_string()),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "volume_capability.mount.fs_type {other:?} is not supported: \
                         allowed values are \"ext4\", \"xfs\""
                    )));
                }
            };
            if let Some(bad) = m.mount_flags.iter().find(|f| f.trim().is_empty()) {
                return Err(Error::InvalidArgument(format!(
                    "volume_capability.mount.mount_flags contains an empty flag {bad:?}"
                )));
            }
            Access::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_type is required (block or mount)".into(),
            ));
        }
    };
    Ok(Capability { access, mode })
}

/// Checks every capability of a request; at least one is required.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required and must not be empty".into(),
        ));
    }
    caps.iter().map(check_capability).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi_proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn invalid_naming(pairs: &[(&str, &str)], name: &str) {
        let err = VolumeParams::parse(&params(pairs)).expect_err("must be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains(&format!("{name:?}")),
            "message names {name:?}: {err}"
        );
    }

    #[test]
    fn no_parameters_give_the_api_defaults() {
        let p = VolumeParams::parse(&HashMap::new()).unwrap();
        assert_eq!(p, VolumeParams::default());
        assert_eq!(p.replicas, DEFAULT_REPLICAS);
        assert_eq!(p.block_size, DEFAULT_BLOCK_SIZE);
        assert_eq!(p.durability, Durability::SyncAll);
    }

    #[test]
    fn every_known_parameter_is_parsed() {
        let p = VolumeParams::parse(&params(&[
            ("replicas", "2"),
            ("durability", "async"),
            ("blockSize", "512"),
            ("fsType", "xfs"),
            ("dataLocality", "bestEffort"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, 2);
        assert_eq!(p.durability, Durability::Async);
        assert_eq!(p.block_size, 512);
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.data_locality, Some(DataLocality::BestEffort));
    }

    #[test]
    fn the_claim_is_taken_from_the_provisioner_metadata() {
        let p = VolumeParams::parse(&params(&[
            (SIDECAR_PVC_NAME, "data-db-0"),
            (SIDECAR_PVC_NAMESPACE, "prod"),
            ("csi.storage.k8s.io/pv/name", "pvc-1234"),
        ]))
        .unwrap();
        assert_eq!(
            p.pvc,
            Some(PvcReference {
                name: "data-db-0".into(),
                namespace: "prod".into()
            })
        );
        // A name without a namespace names no claim.
        let p = VolumeParams::parse(&params(&[(SIDECAR_PVC_NAME, "data")])).unwrap();
        assert_eq!(p.pvc, None);
        invalid_naming(
            &[(SIDECAR_PVC_NAME, "Data"), (SIDECAR_PVC_NAMESPACE, "prod")],
            SIDECAR_PVC_NAME,
        );
        invalid_naming(
            &[(SIDECAR_PVC_NAME, "data"), (SIDECAR_PVC_NAMESPACE, "a.b")],
            SIDECAR_PVC_NAMESPACE,
        );
    }

    #[test]
    fn node_selector_and_topology_key_are_parsed() {
        let p = VolumeParams::parse(&params(&[
            ("nodeSelector", "disk=ssd, topology.kubernetes.io/zone=a"),
            ("topologyKey", "kubernetes.io/hostname"),
        ]))
        .unwrap();
        assert_eq!(
            p.node_selector,
            Some(BTreeMap::from([
                ("disk".to_string(), "ssd".to_string()),
                ("topology.kubernetes.io/zone".to_string(), "a".to_string()),
            ]))
        );
        assert_eq!(p.topology_key.as_deref(), Some("kubernetes.io/hostname"));
    }

    #[test]
    fn bad_node_selector_or_topology_key_is_refused_naming_the_parameter() {
        for bad in [
            "",
            "disk",
            "disk=ssd,",
            "disk=ssd,disk=hdd",
            "bad key=x",
            "disk=-ssd",
            "Example.com/x=y",
        ] {
            invalid_naming(&[("nodeSelector", bad)], "nodeSelector");
        }
        for bad in ["", "bad key", "zone/", "-zone"] {
            invalid_naming(&[("topologyKey", bad)], "topologyKey");
        }
        let err = VolumeParams::parse(&params(&[("nodeSelector", "disk")])).unwrap_err();
        assert!(err.to_string().contains("key=value"), "{err}");
    }

    #[test]
    fn unknown_parameter_error_lists_every_known_parameter() {
        let err = VolumeParams::parse(&params(&[("nodeselector", "a=b")])).unwrap_err();
        for p in PARAMS {
            assert!(err.to_string().contains(&format!("{p:?}")), "{p}: {err}");
        }
    }

    #[test]
    fn bad_replicas_are_refused_naming_the_parameter_and_range() {
        for bad in ["0", "6", "-1", "three", "", "2.5", "256"] {
            invalid_naming(&[("replicas", bad)], "replicas");
        }
        let err = VolumeParams::parse(&params(&[("replicas", "9")])).unwrap_err();
        assert!(err.to_string().contains("1 to 5"), "{err}");
    }

    #[test]
    fn bad_durability_is_refused_naming_the_allowed_values() {
        for bad in ["quorum", "SyncAll", "sync", ""] {
            invalid_naming(&[("durability", bad)], "durability");
        }
        let err = VolumeParams::parse(&params(&[("durability", "x")])).unwrap_err();
        assert!(err.to_string().contains("\"syncAll\", \"async\""), "{err}");
    }

    #[test]
    fn bad_block_size_is_refused_naming_the_allowed_values() {
        for bad in ["1024", "0", "4k", "8192", ""] {
            invalid_naming(&[("blockSize", bad)], "blockSize");
        }
        let err = VolumeParams::parse(&params(&[("blockSize", "1")])).unwrap_err();
        assert!(err.to_string().contains("512, 4096"), "{err}");
    }

    #[test]
    fn bad_fs_type_and_locality_are_refused() {
        for bad in ["btrfs", "ext3", "EXT4", ""] {
            invalid_naming(&[("fsType", bad)], "fsType");
        }
        invalid_naming(&[("dataLocality", "strict")], "dataLocality");
    }

    #[test]
    fn unknown_parameters_are_refused_naming_them() {
        invalid_naming(&[("replica", "3")], "replica");
        invalid_naming(&[("replicas", "3"), ("Durability", "async")], "Durability");
        let err = VolumeParams::parse(&params(&[("foo", "bar")])).unwrap_err();
        assert!(
            err.to_string().contains("\"replicas\""),
            "lists known ones: {err}"
        );
    }

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn capacity_is_rounded_up_to_whole_blocks() {
        assert_eq!(
            size_for_capacity(Some(&range(1, 0)), 4096, GIB).unwrap(),
            4096
        );
        assert_eq!(
            size_for_capacity(Some(&range(4097, 0)), 4096, GIB).unwrap(),
            8192
        );
        assert_eq!(
            size_for_capacity(Some(&range(4096, 4096)), 4096, GIB).unwrap(),
            4096
        );
        assert_eq!(
            size_for_capacity(Some(&range(513, 0)), 512, GIB).unwrap(),
            1024
        );
        assert_eq!(
            size_for_capacity(Some(&range(1000, 1024)), 512, GIB).unwrap(),
            1024
        );
    }

    #[test]
    fn no_capacity_gives_the_default_size_within_the_limit() {
        assert_eq!(size_for_capacity(None, 4096, GIB).unwrap(), GIB);
        assert_eq!(
            size_for_capacity(Some(&range(0, 0)), 4096, GIB).unwrap(),
            GIB
        );
        // A limit below the default: the largest whole-block size under it.
        assert_eq!(
            size_for_capacity(Some(&range(0, 10_000)), 4096, GIB).unwrap(),
            8192
        );
    }

    #[test]
    fn impossible_capacity_is_out_of_range() {
        let out = |r: CapacityRange, bs: u32| {
            let e = size_for_capacity(Some(&r), bs, GIB).unwrap_err();
            assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
        };
        out(range(4097, 5000), 4096); // rounding passes the limit
        out(range(10, 5), 4096); // required above limit
        out(range(0, 100), 4096); // limit below one block
        out(range(-1, 0), 4096);
        out(range(0, -1), 4096);
        out(range(i64::MAX, 0), 4096); // rounding overflows i64
    }

    fn cap(mode: Mode, access: AccessType) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn single_node_modes_are_accepted_for_block_and_mount() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::SingleNodeReaderOnly,
        ] {
            let c = check_capability(&cap(mode, AccessType::Block(BlockVolume {}))).unwrap();
            assert_eq!(c.access, Access::Block);
            let c = check_capability(&cap(mode, mount("xfs"))).unwrap();
            assert_eq!(c.is_read_only(), mode == Mode::SingleNodeReaderOnly);
        }
        let c = check_capability(&cap(Mode::SingleNodeWriter, mount(""))).unwrap();
        assert_eq!(
            c.access,
            Access::Mount {
                fs_type: None,
                mount_flags: vec![]
            }
        );
    }

    #[test]
    fn multi_node_modes_are_refused_with_the_reason() {
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeReaderOnly,
        ] {
            let e = check_capability(&cap(mode, mount("ext4"))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(mode.as_str_name()), "{e}");
            assert!(e.to_string().contains("one node"), "{e}");
        }
    }

    #[test]
    fn malformed_capabilities_are_refused_naming_the_field() {
        let e = check_capability(&VolumeCapability {
            access_mode: None,
            access_type: Some(mount("ext4")),
        })
        .unwrap_err();
        assert!(e.to_string().contains("access_mode"), "{e}");
        let e = check_capability(&VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("access_type"), "{e}");
        let e = check_capability(&cap(Mode::Unknown, mount("ext4"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = check_capability(&VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            access_type: Some(mount("ext4")),
        })
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = check_capability(&cap(Mode::SingleNodeWriter, mount("btrfs"))).unwrap_err();
        assert!(e.to_string().contains("fs_type"), "{e}");
        let e = check_capabilities(&[]).unwrap_err();
        assert!(e.to_string().contains("volume_capabilities"), "{e}");
    }
}
