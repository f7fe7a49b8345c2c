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
            "InSync",
            "Phase",
            "Primary",
            "Attached",
            "Durability",
            "Epoch",
            "Age"
        ]
    );
}

/// The printer columns of a CRD as (name, jsonPath, priority).
fn printer_columns(crd: &Value) -> Vec<(String, String, i64)> {
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["jsonPath"].as_str().unwrap().to_owned(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn every_printer_column_reads_a_field_the_schema_declares() {
    for (file, crd) in api::crd::all() {
        let crd = serde_json::to_value(&crd).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for (name, path, _) in printer_columns(&crd) {
            if path == ".metadata.creationTimestamp" {
                continue;
            }
            let mut node = schema;
            for part in path.trim_start_matches('.').split('.') {
                node = &node["properties"][part];
                assert!(
                    !node.is_null(),
                    "{file}: column {name} reads {path}, which the schema does not declare"
                );
            }
        }
    }
}

#[test]
fn default_columns_show_attachment_and_wide_ones_the_details() {
    let bv = serde_json::to_value(<api::BlockVolume as kube::CustomResourceExt>::crd()).unwrap();
    let columns = printer_columns(&bv);
    assert!(columns.contains(&("Attached".into(), ".status.attachedTo".into(), 0)));
    assert!(columns.contains(&("Durability".into(), ".spec.durability".into(), 1)));
    let br = serde_json::to_value(<api::BlockReplica as kube::CustomResourceExt>::crd()).unwrap();
    let default: Vec<String> = printer_columns(&br)
        .into_iter()
        .filter(|c| c.2 == 0)
        .map(|c| c.0)
        .collect();
    assert_eq!(default, ["Volume", "Node", "Role", "State", "Epoch", "Age"]);
    for crd in [
        bv,
        br,
        serde_json::to_value(<api::BlockNode as kube::CustomResourceExt>::crd()).unwrap(),
    ] {
        // `kubectl get blockvol` lists all three kinds.
        assert_eq!(
            crd["spec"]["names"]["categories"],
            serde_json::json!(["blockvol"])
        );
        // `kubectl explain` shows a real description, not the derive's placeholder.
        let description = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
            .as_str()
            .unwrap_or("");
        assert!(
            !description.is_empty() && !description.contains("Auto-generated"),
            "{description}"
        );
    }
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
