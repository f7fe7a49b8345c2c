//! The committed CRD YAML is exactly what the types generate, and the schema carries the
//! validation rules the API server enforces.

use std::path::Path;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn committed_crds_match_the_generated_ones() {
    for (file, crd) in api::crd::all() {
        let want = api::crd::to_yaml(&crd).unwrap();
        for dir in api::crd::OUTPUT_DIRS {
            let path = root().join(dir).join(file);
            let got = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `cargo run -p api --bin crdgen`",
                    path.display()
                )
            });
            assert!(
                got == want,
                "{} is stale; run `cargo run -p api --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

fn volume_schema() -> Value {
    let crd = serde_json::to_value(<api::BlockVolume as kube::CustomResourceExt>::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn volume_crd_is_cluster_scoped_with_short_name_bv() {
    let crd = <api::BlockVolume as kube::CustomResourceExt>::crd();
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.group, api::GROUP);
    assert_eq!(crd.spec.names.short_names, Some(vec!["bv".to_string()]));
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        [
            "Size",
            "Replicas",
            "Durability",
            "Phase",
            "Primary",
            "InSync",
            "Age"
        ]
    );
}

#[test]
fn volume_schema_requires_size_and_bounds_replicas_and_block_size() {
    let spec = &volume_schema()["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["size"]));
    let replicas = &spec["properties"]["replicas"];
    assert_eq!(replicas["minimum"].as_f64(), Some(1.0));
    assert_eq!(replicas["maximum"].as_f64(), Some(5.0));
    assert_eq!(
        spec["properties"]["blockSize"]["enum"],
        serde_json::json!([512, 4096])
    );
    assert_eq!(spec["properties"]["blockSize"]["default"], 4096);
    assert_eq!(
        spec["properties"]["size"]["x-kubernetes-int-or-string"],
        true
    );
    let durability = &spec["properties"]["durability"];
    assert_eq!(durability["enum"], serde_json::json!(["syncAll", "async"]));
    assert_eq!(durability["default"], "syncAll");
}

#[test]
fn volume_schema_carries_cel_rules_naming_their_fields() {
    let spec = &volume_schema()["properties"]["spec"];
    let rules = spec["x-kubernetes-validations"].as_array().unwrap();
    let field_paths: Vec<&str> = rules
        .iter()
        .map(|r| r["fieldPath"].as_str().unwrap())
        .collect();
    assert_eq!(
        field_paths,
        [
            ".size",
            ".size",
            ".size",
            ".size",
            ".blockSize",
            ".durability"
        ]
    );
    for rule in rules {
        let message = rule["message"].as_str().unwrap();
        assert!(
            message.starts_with("spec."),
            "message must name the field: {message}"
        );
    }
    let transition: Vec<&str> = rules
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .filter(|r| r.contains("oldSelf"))
        .collect();
    assert_eq!(
        transition.len(),
        3,
        "size growth, blockSize and durability immutability"
    );
}
