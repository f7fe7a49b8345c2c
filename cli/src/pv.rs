//! `pv`: the static PersistentVolume and claim through which a pod uses a BlockVolume
//! that was created with `kubectl apply` rather than by a StorageClass. The PV names the
//! blockvol CSI driver and the BlockVolume as its volume handle; the claim binds to it by
//! `volumeName` (and the PV reserves itself for the claim with `claimRef`), so no
//! StorageClass and no provisioner take part. Reclaim policy `Retain`: deleting the
//! claim never deletes the BlockVolume, which its owner manages with `kubectl`.

use api::BlockVolume;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::ObjectMeta;

use crate::error::{Error, Result};
use crate::format::exact_quantity;

/// Filesystems the blockvol node plugin formats (as the driver's `FS_TYPES`).
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// How the pod sees the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VolumeMode {
    /// A filesystem mounted into the pod (formatted on first use).
    #[value(name = "Filesystem")]
    Filesystem,
    /// The raw block device.
    #[value(name = "Block")]
    Block,
}

impl VolumeMode {
    fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// What the printed objects look like.
#[derive(Debug, Clone)]
pub struct StaticPv {
    /// Name of the PV (default: the BlockVolume's).
    pub pv_name: String,
    pub claim_name: String,
    pub claim_namespace: String,
    pub fs_type: String,
    pub mode: VolumeMode,
}

/// The PV and the claim for `volume`.
pub fn objects(
    volume: &BlockVolume,
    opts: &StaticPv,
) -> Result<(PersistentVolume, PersistentVolumeClaim)> {
    if opts.mode == VolumeMode::Filesystem && !FS_TYPES.contains(&opts.fs_type.as_str()) {
        return Err(Error::InvalidArgument {
            flag: "--fs",
            message: format!(
                "{:?} is not supported: allowed values are \"ext4\", \"xfs\"",
                opts.fs_type
            ),
        });
    }
    let name = volume.name_any();
    let bytes = volume.spec.size_bytes().map_err(|e| Error::BadSize {
        name: name.clone(),
        message: e.to_string(),
    })?;
    let size = Quantity(exact_quantity(bytes));
    let labels = Some([(api::LABEL_VOLUME.to_string(), name.clone())].into());
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(opts.pv_name.clone()),
            labels: labels.clone(),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_string(), size.clone())].into()),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            volume_mode: Some(opts.mode.as_str().into()),
            claim_ref: Some(ObjectReference {
                namespace: Some(opts.claim_namespace.clone()),
                name: Some(opts.claim_name.clone()),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: api::CSI_DRIVER_NAME.into(),
                volume_handle: name.clone(),
                fs_type: (opts.mode == VolumeMode::Filesystem).then(|| opts.fs_type.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    let pvc = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(opts.claim_name.clone()),
            namespace: Some(opts.claim_namespace.clone()),
            labels,
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(String::new()),
            volume_mode: Some(opts.mode.as_str().into()),
            volume_name: Some(opts.pv_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), size)].into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    Ok((pv, pvc))
}

/// The two objects as one YAML stream for `kubectl apply -f -`.
pub fn to_yaml(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> Result<String> {
    let encode = |v: serde_json::Value| {
        serde_norway::to_string(&v).map_err(|e| Error::Encode {
            what: "the PersistentVolume",
            message: e.to_string(),
        })
    };
    let with_kind = |value: serde_json::Value, api_version: &str, kind: &str| {
        let mut map = serde_json::Map::new();
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
        if let serde_json::Value::Object(fields) = value {
            map.extend(fields);
        }
        serde_json::Value::Object(map)
    };
    let to_value = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| Error::Encode {
            what: "the PersistentVolume",
            message: e.to_string(),
        })
    };
    let handle = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map_or("", |c| c.volume_handle.as_str());
    let pv = with_kind(
        to_value(serde_json::to_value(pv))?,
        "v1",
        "PersistentVolume",
    );
    let pvc = with_kind(
        to_value(serde_json::to_value(pvc))?,
        "v1",
        "PersistentVolumeClaim",
    );
    Ok(format!(
        "# A static PersistentVolume for BlockVolume {handle} and a claim bound to it.\n\
         # Apply with `kubectl apply -f -`; a pod then names the claim in spec.volumes.\n\
         ---\n{}---\n{}",
        encode(pv)?,
        encode(pvc)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::tests::volume;

    fn opts(mode: VolumeMode, fs: &str) -> StaticPv {
        StaticPv {
            pv_name: "db-data".into(),
            claim_name: "db-data".into(),
            claim_namespace: "apps".into(),
            fs_type: fs.into(),
            mode,
        }
    }

    #[test]
    fn the_pv_names_the_driver_and_the_volume_and_the_claim_binds_by_name() {
        let v = volume("db-data", "10Gi");
        let (pv, pvc) = objects(&v, &opts(VolumeMode::Filesystem, "xfs")).unwrap();
        let spec = pv.spec.as_ref().unwrap();
        let csi = spec.csi.as_ref().unwrap();
        assert_eq!(csi.driver, "csi.blockvol.io");
        assert_eq!(csi.volume_handle, "db-data");
        assert_eq!(csi.fs_type.as_deref(), Some("xfs"));
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "10Gi");
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        let claim_ref = spec.claim_ref.as_ref().unwrap();
        assert_eq!(claim_ref.namespace.as_deref(), Some("apps"));
        assert_eq!(claim_ref.name.as_deref(), Some("db-data"));
        let cspec = pvc.spec.as_ref().unwrap();
        assert_eq!(cspec.volume_name.as_deref(), Some("db-data"));
        assert_eq!(cspec.storage_class_name.as_deref(), Some(""));
        assert_eq!(
            cspec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "10Gi"
        );
    }

    #[test]
    fn block_mode_has_no_filesystem() {
        let v = volume("raw", "1Gi");
        let (pv, pvc) = objects(&v, &opts(VolumeMode::Block, "ext4")).unwrap();
        let spec = pv.spec.unwrap();
        assert_eq!(spec.csi.unwrap().fs_type, None);
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(pvc.spec.unwrap().volume_mode.as_deref(), Some("Block"));
    }

    #[test]
    fn an_unsupported_filesystem_is_refused_naming_the_allowed_ones() {
        let v = volume("db-data", "1Gi");
        let err = objects(&v, &opts(VolumeMode::Filesystem, "btrfs")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("--fs: \"btrfs\""), "{msg}");
        assert!(msg.contains("ext4") && msg.contains("xfs"), "{msg}");
    }

    #[test]
    fn the_filesystems_offered_are_the_drivers() {
        assert_eq!(FS_TYPES, csi::params::FS_TYPES);
    }

    #[test]
    fn a_byte_count_size_becomes_an_exact_quantity() {
        let mut v = volume("db-data", "1Gi");
        v.spec.size =
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("10737418240".into());
        let (pv, _) = objects(&v, &opts(VolumeMode::Filesystem, "ext4")).unwrap();
        assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "10Gi");
    }

    /// The README's example is what `pv db-data` prints for the README's 10Gi volume,
    /// so the documented way to use a `kubectl apply`'d volume cannot drift.
    #[test]
    fn the_readme_static_pv_example_is_what_the_command_prints() {
        const MARKER: &str = "<!-- static-pv-example:";
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let start = readme
            .find(MARKER)
            .expect("the README marks its static PV example");
        let body = &readme[start..];
        let body = &body[body.find("```yaml\n").expect("a yaml block") + 8..];
        let body = &body[..body.find("```").expect("the block ends")];
        let docs: Vec<serde_json::Value> = body
            .split("\n---\n")
            .map(|d| serde_norway::from_str(d).expect("README YAML parses"))
            .collect();
        let v = volume("db-data", "10Gi");
        let (pv, pvc) = objects(
            &v,
            &StaticPv {
                pv_name: "db-data".into(),
                claim_name: "db-data".into(),
                claim_namespace: "default".into(),
                fs_type: "ext4".into(),
                mode: VolumeMode::Filesystem,
            },
        )
        .unwrap();
        let printed: Vec<serde_json::Value> = to_yaml(&pv, &pvc)
            .unwrap()
            .split("\n---\n")
            .skip(1)
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        assert_eq!(
            docs[..2],
            printed[..],
            "README example and `pv` output differ"
        );
        assert_eq!(docs[2]["kind"], "Pod");
        assert_eq!(
            docs[2]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "db-data"
        );
    }

    #[test]
    fn yaml_is_two_documents_with_kinds() {
        let v = volume("db-data", "1Gi");
        let (pv, pvc) = objects(&v, &opts(VolumeMode::Filesystem, "ext4")).unwrap();
        let text = to_yaml(&pv, &pvc).unwrap();
        let docs: Vec<serde_json::Value> = text
            .split("\n---\n")
            .skip(1)
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{text}");
        assert_eq!(docs[0]["kind"], "PersistentVolume");
        assert_eq!(docs[0]["apiVersion"], "v1");
        assert_eq!(docs[0]["spec"]["csi"]["volumeHandle"], "db-data");
        assert_eq!(docs[1]["kind"], "PersistentVolumeClaim");
        assert_eq!(docs[1]["metadata"]["namespace"], "apps");
        assert!(text.starts_with("# A static PersistentVolume for BlockVolume db-data"));
    }
}
