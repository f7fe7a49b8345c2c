//! The BlockVolume CRD on a real API server: the generated schema and CEL rules accept
//! valid volumes, reject each invalid one naming the offending field, and enforce the
//! update rules (immutable blockSize/durability, size only grows).

use std::time::Duration;

use api::{BlockVolume, BlockVolumeSpec};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::core::Status;
use serde_json::json;

use e2e::{ControlPlane, ControlPlaneOptions};

/// Bound on waiting for one watch event.
const WATCH_EVENT_TIMEOUT_MS: u64 = 20_000;

async fn cluster() -> ControlPlane {
    let cp = ControlPlane::from_env(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
    let crds = cp
        .apply_crds(&e2e::crds_dir())
        .await
        .unwrap_or_else(|e| panic!("applying CRDs: {e}"));
    assert!(
        crds.contains(&"blockvolumes.blockvol.io".to_owned()),
        "{crds:?}"
    );
    cp
}

/// A name unique to this test process, so runs against a shared cluster do not collide.
fn name(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

fn dynamic_api(cp: &ControlPlane) -> Api<DynamicObject> {
    Api::all_with(cp.client(), &ApiResource::erase::<BlockVolume>(&()))
}

fn raw_volume(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "blockvol.io/v1alpha1",
        "kind": "BlockVolume",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a well-formed object")
}

/// The API status of a rejected request, or a panic naming what happened instead.
fn rejection(result: Result<impl std::fmt::Debug, kube::Error>, case: &str) -> Box<Status> {
    match result {
        Ok(obj) => panic!("{case}: the server accepted it: {obj:?}"),
        Err(kube::Error::Api(status)) => status,
        Err(e) => panic!("{case}: expected an API rejection, got {e}"),
    }
}

/// Asserts the rejection is a 422 Invalid whose causes name `field`.
fn assert_names_field(status: &Status, field: &str, case: &str) {
    assert_eq!(status.code, 422, "{case}: {status:?}");
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.clone())
        .unwrap_or_default();
    assert!(
        causes.iter().any(|c| c.field == field),
        "{case}: no cause names {field}: {status:?}"
    );
    assert!(
        status.message.contains(field),
        "{case}: message does not name {field}: {}",
        status.message
    );
}

async fn delete_quietly(api: &Api<BlockVolume>, name: &str) {
    let _ = api.delete(name, &DeleteParams::default()).await;
}

#[tokio::test]
async fn blockvolume_can_be_created_read_updated_watched_and_deleted() {
    let cp = cluster().await;
    let api: Api<BlockVolume> = Api::all(cp.client());
    let vol_name = name("crud");

    let list = api.list(&ListParams::default()).await.expect("list");
    let rv = list
        .metadata
        .resource_version
        .expect("list has a resourceVersion");
    let wp = WatchParams::default().fields(&format!("metadata.name={vol_name}"));
    let mut events = api.watch(&wp, &rv).await.expect("watch").boxed();

    let created = api
        .create(
            &PostParams::default(),
            &BlockVolume::new(&vol_name, BlockVolumeSpec::with_size("1Gi")),
        )
        .await
        .expect("create a valid volume");
    // Schema defaults come back from the server.
    assert_eq!(created.spec.replicas, api::DEFAULT_REPLICAS);
    assert_eq!(created.spec.block_size, api::DEFAULT_BLOCK_SIZE);
    assert_eq!(created.spec.durability, api::Durability::SyncAll);

    let read = api.get(&vol_name).await.expect("get");
    assert_eq!(read.spec, created.spec);

    let mut spec = read.spec.clone();
    spec.replicas = 5;
    spec.size = IntOrString::String("2Gi".into());
    let patch = json!({"spec": {"replicas": 5, "size": "2Gi"}});
    let updated = api
        .patch(&vol_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("update replicas and grow size");
    assert_eq!(updated.spec, spec);

    api.delete(&vol_name, &DeleteParams::default())
        .await
        .expect("delete");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let next = tokio::time::timeout(
            Duration::from_millis(WATCH_EVENT_TIMEOUT_MS),
            events.try_next(),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("no watch event within {WATCH_EVENT_TIMEOUT_MS} ms after {seen:?}")
        })
        .expect("watch stream error")
        .expect("watch stream ended");
        match next {
            WatchEvent::Added(v) => seen.push(("Added", v.spec.size.clone())),
            WatchEvent::Modified(v) => seen.push(("Modified", v.spec.size.clone())),
            WatchEvent::Deleted(v) => seen.push(("Deleted", v.spec.size.clone())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error: {e:?}"),
        }
    }
    let kinds: Vec<_> = seen.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["Added", "Modified", "Deleted"]);
    assert_eq!(seen[0].1, IntOrString::String("1Gi".into()));
    assert_eq!(seen[1].1, IntOrString::String("2Gi".into()));
}

#[tokio::test]
async fn every_invalid_blockvolume_is_rejected_naming_the_field() {
    let cp = cluster().await;
    let api = dynamic_api(&cp);
    let cases = [
        ("size zero", json!({"size": "0"}), "spec.size"),
        ("integer size zero", json!({"size": 0}), "spec.size"),
        ("negative size", json!({"size": "-1Gi"}), "spec.size"),
        ("negative integer size", json!({"size": -5}), "spec.size"),
        (
            "size not a quantity",
            json!({"size": "ten gigs"}),
            "spec.size",
        ),
        (
            "size not a multiple of blockSize",
            json!({"size": "1000"}),
            "spec.size",
        ),
        (
            "size not a multiple of blockSize 512",
            json!({"size": 1000, "blockSize": 512}),
            "spec.size",
        ),
        (
            "replicas 0",
            json!({"size": "1Gi", "replicas": 0}),
            "spec.replicas",
        ),
        (
            "replicas 6",
            json!({"size": "1Gi", "replicas": 6}),
            "spec.replicas",
        ),
        (
            "blockSize 1024",
            json!({"size": "1Gi", "blockSize": 1024}),
            "spec.blockSize",
        ),
        (
            "durability quorum",
            json!({"size": "1Gi", "durability": "quorum"}),
            "spec.durability",
        ),
        (
            "topologyKey not a label key",
            json!({"size": "1Gi", "topologyKey": "my zone"}),
            "spec.topologyKey",
        ),
    ];
    for (i, (case, spec, field)) in cases.iter().enumerate() {
        let obj = raw_volume(&name(&format!("invalid-{i}")), spec.clone());
        let status = rejection(api.create(&PostParams::default(), &obj).await, case);
        assert_names_field(&status, field, case);
    }

    // The same requests with the offending field corrected are accepted, so the
    // rejections above are about that field and nothing else.
    let typed: Api<BlockVolume> = Api::all(cp.client());
    for (i, spec) in [
        json!({"size": 1536, "blockSize": 512}),
        json!({"size": "1Gi", "replicas": 1}),
        json!({"size": "1Gi", "replicas": 5, "durability": "async"}),
        json!({"size": "1Gi", "topologyKey": "topology.kubernetes.io/zone"}),
    ]
    .into_iter()
    .enumerate()
    {
        let vol_name = name(&format!("valid-{i}"));
        api.create(&PostParams::default(), &raw_volume(&vol_name, spec.clone()))
            .await
            .unwrap_or_else(|e| panic!("valid spec {spec} rejected: {e}"));
        delete_quietly(&typed, &vol_name).await;
    }
}

#[tokio::test]
async fn block_size_and_durability_cannot_change_after_creation() {
    let cp = cluster().await;
    let api: Api<BlockVolume> = Api::all(cp.client());
    let vol_name = name("immutable");
    api.create(
        &PostParams::default(),
        &BlockVolume::new(&vol_name, BlockVolumeSpec::with_size("1Gi")),
    )
    .await
    .expect("create");

    let pp = PatchParams::default();
    let status = rejection(
        api.patch(
            &vol_name,
            &pp,
            &Patch::Merge(json!({"spec": {"blockSize": 512}})),
        )
        .await,
        "blockSize 4096 -> 512",
    );
    assert_names_field(&status, "spec.blockSize", "blockSize change");
    assert!(status.message.contains("immutable"), "{}", status.message);

    let status = rejection(
        api.patch(
            &vol_name,
            &pp,
            &Patch::Merge(json!({"spec": {"durability": "async"}})),
        )
        .await,
        "durability syncAll -> async",
    );
    assert_names_field(&status, "spec.durability", "durability change");
    assert!(status.message.contains("immutable"), "{}", status.message);

    let stored = api.get(&vol_name).await.expect("get");
    assert_eq!(stored.spec.block_size, 4096);
    assert_eq!(stored.spec.durability, api::Durability::SyncAll);
    delete_quietly(&api, &vol_name).await;
}

#[tokio::test]
async fn size_can_grow_but_never_shrink() {
    let cp = cluster().await;
    let api: Api<BlockVolume> = Api::all(cp.client());
    let vol_name = name("resize");
    api.create(
        &PostParams::default(),
        &BlockVolume::new(&vol_name, BlockVolumeSpec::with_size("2Gi")),
    )
    .await
    .expect("create");
    let pp = PatchParams::default();

    for smaller in [json!("1Gi"), json!("2147479552"), json!(1073741824)] {
        let case = format!("shrink 2Gi -> {smaller}");
        let status = rejection(
            api.patch(
                &vol_name,
                &pp,
                &Patch::Merge(json!({"spec": {"size": smaller}})),
            )
            .await,
            &case,
        );
        assert_names_field(&status, "spec.size", &case);
    }

    // Same size in another spelling, then growth in several spellings.
    for (size, bytes) in [
        (json!("2147483648"), 2u64 << 30),
        (json!("3Gi"), 3 << 30),
        (json!("4294967296"), 4 << 30),
    ] {
        let vol = api
            .patch(
                &vol_name,
                &pp,
                &Patch::Merge(json!({"spec": {"size": size}})),
            )
            .await
            .unwrap_or_else(|e| panic!("resize to {size} rejected: {e}"));
        assert_eq!(vol.spec.size_bytes(), Ok(bytes));
    }
    delete_quietly(&api, &vol_name).await;
}
