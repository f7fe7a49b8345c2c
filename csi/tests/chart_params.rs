//! The chart's values.schema.json accepts exactly the StorageClass parameters
//! blockvol-csi accepts: the same keys, each enum value parses, a value outside it is
//! refused by both, and the sidecars' `csi.storage.k8s.io/` keys pass both. A StorageClass
//! the schema lets through therefore never fails at CreateVolume on its parameters.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use csi::params::{
    PARAM_BLOCK_SIZE, PARAM_DATA_LOCALITY, PARAM_DURABILITY, PARAM_FS_TYPE, PARAM_REPLICAS,
    SIDECAR_PARAM_PREFIX, VolumeParams,
};
use serde_json::Value;

fn schema_params() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/blockvol/values.schema.json");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("values.schema.json"))
            .expect("JSON");
    schema["properties"]["storageClass"]["properties"]["parameters"].clone()
}

fn parses(key: &str, value: &str) -> bool {
    VolumeParams::parse(&HashMap::from([(key.to_string(), value.to_string())])).is_ok()
}

#[test]
fn schema_covers_every_storage_class_parameter_the_driver_accepts() {
    let params = schema_params();
    assert_eq!(
        params["additionalProperties"], false,
        "unknown keys are refused"
    );
    let keys: BTreeSet<&str> = params["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .map(String::as_str)
        .collect();
    let driver: BTreeSet<&str> = csi::params::PARAMS.into();
    assert!(
        [
            PARAM_REPLICAS,
            PARAM_DURABILITY,
            PARAM_BLOCK_SIZE,
            PARAM_FS_TYPE,
            PARAM_DATA_LOCALITY,
        ]
        .iter()
        .all(|p| driver.contains(p))
    );
    assert_eq!(keys, driver);
    assert!(!parses("bogus", "1"), "the driver refuses unknown keys too");

    for key in [
        PARAM_DURABILITY,
        PARAM_BLOCK_SIZE,
        PARAM_FS_TYPE,
        PARAM_DATA_LOCALITY,
    ] {
        let allowed = params["properties"][key]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{key} has an enum"));
        for v in allowed {
            let v = v.as_str().expect("StorageClass parameters are strings");
            assert!(
                parses(key, v),
                "schema allows {key}={v} but the driver refuses it"
            );
        }
        assert!(!parses(key, "bogus"), "{key}=bogus");
    }
    // Every value the driver accepts for these is in the enum (the driver's lists).
    for (key, values) in [
        (PARAM_DURABILITY, vec!["syncAll", "async"]),
        (PARAM_FS_TYPE, csi::params::FS_TYPES.to_vec()),
        (PARAM_DATA_LOCALITY, vec!["disabled", "bestEffort"]),
    ] {
        let allowed: Vec<&str> = params["properties"][key]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for v in values {
            assert!(parses(key, v) && allowed.contains(&v), "{key}={v}");
        }
    }
    let sizes: Vec<String> = api::BLOCK_SIZES.iter().map(u32::to_string).collect();
    assert_eq!(
        params["properties"][PARAM_BLOCK_SIZE]["enum"],
        serde_json::json!(sizes)
    );

    assert_eq!(
        params["properties"][PARAM_REPLICAS]["pattern"],
        format!("^[{}-{}]$", api::MIN_REPLICAS, api::MAX_REPLICAS)
    );
    for n in 0..=9u8 {
        let in_range = (api::MIN_REPLICAS..=api::MAX_REPLICAS).contains(&n);
        assert_eq!(
            parses(PARAM_REPLICAS, &n.to_string()),
            in_range,
            "replicas={n}"
        );
    }

    let prefix = params["patternProperties"]
        .as_object()
        .expect("patternProperties")
        .keys()
        .next()
        .expect("one pattern")
        .clone();
    assert_eq!(
        prefix,
        format!("^{}", SIDECAR_PARAM_PREFIX.replace('.', "\\."))
    );
    assert!(parses(&format!("{SIDECAR_PARAM_PREFIX}fstype"), "xfs"));
}
