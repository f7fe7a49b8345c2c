//! Property tests of CreateVolume validation: random StorageClass parameter maps,
//! capacity ranges and request names never panic; every refusal names the offending
//! parameter or field; every acceptance honours what was asked. Cases:
//! `BLOCKVOL_FUZZ_CASES` (default 256).

use std::collections::HashMap;

use csi::csi_proto::CapacityRange;
use csi::names::{is_dns1123_label, volume_name_for};
use csi::params::{
    PARAM_BLOCK_SIZE, PARAM_DATA_LOCALITY, PARAM_DURABILITY, PARAM_FS_TYPE, PARAM_REPLICAS,
    SIDECAR_PARAM_PREFIX, VolumeParams, size_for_capacity,
};
use proptest::prelude::*;

fn fuzz_cases() -> u32 {
    std::env::var("BLOCKVOL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(PARAM_REPLICAS.to_string()),
        Just(PARAM_DURABILITY.to_string()),
        Just(PARAM_BLOCK_SIZE.to_string()),
        Just(PARAM_FS_TYPE.to_string()),
        Just(PARAM_DATA_LOCALITY.to_string()),
        "[a-zA-Z/.]{0,12}".prop_map(|s| format!("{SIDECAR_PARAM_PREFIX}{s}")),
        any::<String>(),
        "[a-zA-Z]{1,12}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..8).prop_map(|n| n.to_string()),
        Just("syncAll".to_string()),
        Just("async".to_string()),
        Just("512".to_string()),
        Just("4096".to_string()),
        Just(" 4096 ".to_string()),
        Just("ext4".to_string()),
        Just("xfs".to_string()),
        Just("bestEffort".to_string()),
        Just("disabled".to_string()),
        any::<String>(),
        "[0-9 +-]{0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_parameter_maps_are_parsed_or_refused_naming_a_parameter(
        params in proptest::collection::hash_map(key(), value(), 0..7)
    ) {
        let params: HashMap<String, String> = params;
        match VolumeParams::parse(&params) {
            Ok(p) => {
                if let Some(v) = params.get(PARAM_REPLICAS) {
                    prop_assert_eq!(v.trim().parse::<u8>().ok(), Some(p.replicas));
                }
                if let Some(v) = params.get(PARAM_BLOCK_SIZE) {
                    prop_assert_eq!(v.trim().parse::<u32>().ok(), Some(p.block_size));
                }
                if let Some(v) = params.get(PARAM_FS_TYPE) {
                    prop_assert_eq!(Some(v.trim()), p.fs_type.as_deref());
                }
                for k in params.keys() {
                    let known = [PARAM_REPLICAS, PARAM_DURABILITY, PARAM_BLOCK_SIZE,
                        PARAM_FS_TYPE, PARAM_DATA_LOCALITY].contains(&k.as_str());
                    prop_assert!(known || k.starts_with(SIDECAR_PARAM_PREFIX), "accepted {:?}", k);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let named = params
                    .keys()
                    .filter(|k| !k.starts_with(SIDECAR_PARAM_PREFIX))
                    .any(|k| msg.contains(&format!("{k:?}")));
                prop_assert!(named, "error names no parameter: {}", msg);
            }
        }
    }

    #[test]
    fn random_capacity_ranges_give_whole_blocks_within_the_range(
        required in prop_oneof![any::<i64>(), 0i64..(1 << 34), Just(0i64)],
        limit in prop_oneof![any::<i64>(), 0i64..(1 << 34), Just(0i64)],
        block in prop_oneof![Just(512u32), Just(4096u32), any::<u32>()],
        default_bytes in prop_oneof![Just(1u64 << 30), any::<u64>()],
        present in any::<bool>(),
    ) {
        let range = CapacityRange { required_bytes: required, limit_bytes: limit };
        let r = if present { Some(&range) } else { None };
        match size_for_capacity(r, block, default_bytes) {
            Ok(size) => {
                let b = u64::from(block.max(1));
                prop_assert_eq!(size % b, 0);
                prop_assert!(size > 0 && size <= i64::MAX as u64);
                if present && required > 0 {
                    prop_assert!(size >= required as u64);
                }
                if present && limit > 0 {
                    prop_assert!(size <= limit as u64);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("capacity_range") || msg.contains("too large") || msg.contains("block"),
                    "{}", msg
                );
            }
        }
    }

    #[test]
    fn any_request_name_maps_to_a_stable_dns_label(name in any::<String>()) {
        let n = volume_name_for(&name);
        prop_assert!(is_dns1123_label(&n), "{:?} -> {:?}", name, n);
        prop_assert_eq!(volume_name_for(&name), n);
    }
}
