//! Controller service over real unix-socket gRPC against a real kube-apiserver with
//! the blockvol CRDs applied. No operator runs, so the test plays it: a background
//! task marks new BlockVolumes Ready (except those named `pending-*`, which stay
//! unready to exercise CreateVolume's bounded wait). Needs the control-plane binaries
//! that hack/tools/build.sh installs.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use api::BlockVolume;
use common::operator::{api_server, create_block_node, play_operator, set_conditions};
use common::{Served, controller_services, serve_csi, wait_for_socket};
use csi::agent::unix_channel;
use csi::controller::ControllerSettings;
use csi::csi_proto::controller_client::ControllerClient;
use csi::csi_proto::volume_capability::access_mode::Mode;
use csi::csi_proto::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::csi_proto::*;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn create_req(name: &str, required: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn publish_req(volume: &str, node: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

/// The attachment generation a ControllerPublish reply carries.
fn attachment_generation(r: tonic::Response<ControllerPublishVolumeResponse>) -> Option<String> {
    r.into_inner()
        .publish_context
        .get(csi::controller::CTX_ATTACHMENT_GENERATION)
        .cloned()
}

struct Env {
    c: ControllerClient<Channel>,
    volumes: Api<BlockVolume>,
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

impl Env {
    async fn create(&mut self, req: CreateVolumeRequest) -> Reply<CreateVolumeResponse> {
        self.c.create_volume(req).await
    }

    async fn publish(
        &mut self,
        volume: &str,
        node: &str,
    ) -> Reply<ControllerPublishVolumeResponse> {
        self.c
            .controller_publish_volume(publish_req(volume, node))
            .await
    }

    async fn unpublish(
        &mut self,
        volume: &str,
        node: &str,
    ) -> Reply<ControllerUnpublishVolumeResponse> {
        self.c
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
    }

    async fn delete(&mut self, volume: &str) -> Reply<DeleteVolumeResponse> {
        self.c
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await
    }

    async fn expand(
        &mut self,
        volume: &str,
        required: i64,
        capability: Option<VolumeCapability>,
    ) -> Reply<ControllerExpandVolumeResponse> {
        self.c
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: volume.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: required,
                    limit_bytes: 0,
                }),
                volume_capability: capability,
                ..Default::default()
            })
            .await
    }

    /// How many BlockVolumes exist.
    async fn volume_count(&self) -> usize {
        self.volumes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
    }

    /// Whether BlockVolume `name` carries an attachment annotation.
    async fn attached(&self, name: &str) -> bool {
        self.volumes
            .get(name)
            .await
            .unwrap()
            .annotations()
            .contains_key(api::ANNOTATION_ATTACHED_NODE)
    }
}

/// The StorageClass parameters of "pvc-params".
const PARAMS: &[(&str, &str)] = &[
    ("replicas", "2"),
    ("durability", "async"),
    ("blockSize", "512"),
    ("fsType", "xfs"),
];

async fn create_volume_applies_the_parameters_and_waits_for_ready(env: &mut Env) {
    let resp = env
        .create(create_req(
            "pvc-params",
            10 * MIB + 1,
            &[PARAMS, &[("csi.storage.k8s.io/pvc/name", "data")]].concat(),
        ))
        .await
        .expect("create")
        .into_inner();
    let vol = resp.volume.expect("volume");
    assert_eq!(vol.volume_id, "pvc-params");
    assert_eq!(
        vol.capacity_bytes,
        10 * MIB + 512,
        "rounded up to the block size"
    );
    assert_eq!(
        vol.volume_context
            .get("blockvol.io/fsType")
            .map(String::as_str),
        Some("xfs")
    );
    let bv = env
        .volumes
        .get("pvc-params")
        .await
        .expect("BlockVolume exists");
    assert_eq!(bv.spec.size_bytes(), Ok((10 * MIB + 512) as u64));
    assert_eq!(bv.spec.replicas, 2);
    assert_eq!(bv.spec.durability, api::Durability::Async);
    assert_eq!(bv.spec.block_size, 512);

    // Same request again: same volume. Different size: AlreadyExists.
    let again = env
        .create(create_req("pvc-params", 10 * MIB + 1, PARAMS))
        .await
        .expect("idempotent create")
        .into_inner();
    assert_eq!(again.volume.unwrap().volume_id, "pvc-params");
    let err = env
        .create(create_req("pvc-params", 20 * MIB, PARAMS))
        .await
        .expect_err("different size");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = env
        .create(create_req("pvc-params", 10 * MIB + 1, &[("replicas", "3")]))
        .await
        .expect_err("different params");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

async fn names_that_are_not_labels_map_to_a_hashed_volume(env: &mut Env) {
    let resp = env
        .create(create_req("Sanity Volume #1", MIB, &[]))
        .await
        .expect("create")
        .into_inner();
    let id = resp.volume.unwrap().volume_id;
    assert_eq!(id, csi::names::volume_name_for("Sanity Volume #1"));
    assert!(id.starts_with("bv-"), "{id}");
    env.volumes
        .get(&id)
        .await
        .expect("hashed BlockVolume exists");
}

async fn bad_parameters_create_nothing(env: &mut Env) {
    let before = env.volume_count().await;
    for (params, name) in [
        (vec![("replicas", "7")], "replicas"),
        (vec![("durability", "quorum")], "durability"),
        (vec![("blockSize", "1024")], "blockSize"),
        (vec![("fsType", "btrfs")], "fsType"),
        (vec![("replicaCount", "3")], "replicaCount"),
    ] {
        let err = env
            .create(create_req("pvc-bad", MIB, &params))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(name), "{name}: {}", err.message());
    }
    let mut multi = create_req("pvc-bad", MIB, &[]);
    multi.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    let err = env.create(multi).await.expect_err("multi-node writer");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("MULTI_NODE_MULTI_WRITER"),
        "{}",
        err.message()
    );
    let err = env
        .create(CreateVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: 4097,
                limit_bytes: 5000,
            }),
            ..create_req("pvc-bad", 0, &[])
        })
        .await
        .expect_err("rounding past the limit");
    assert_eq!(err.code(), Code::OutOfRange);
    let after = env.volume_count().await;
    assert_eq!(
        before, after,
        "no BlockVolume was created for a bad request"
    );
}

async fn unready_volume_times_out_and_is_kept_for_the_retry(env: &mut Env) {
    let err = env
        .create(create_req("pending-one", MIB, &[]))
        .await
        .expect_err("never Ready");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    env.volumes
        .get("pending-one")
        .await
        .expect("the BlockVolume is kept, not deleted");
    set_conditions(&env.volumes, "pending-one", &[("Ready", "True")])
        .await
        .unwrap();
    let resp = env
        .create(create_req("pending-one", MIB, &[]))
        .await
        .expect("retry succeeds once Ready");
    assert_eq!(resp.into_inner().volume.unwrap().volume_id, "pending-one");
}

async fn publish_records_one_attachment_and_blocks_delete(env: &mut Env) {
    env.create(create_req("pvc-pub", MIB, &[]))
        .await
        .expect("create");
    // Each publish that succeeds, with the attachment generation it reports.
    let published = [
        ("node-a", "publish", "1", "the first attachment"),
        (
            "node-a",
            "publish again to the same node",
            "1",
            "a repeated publish of the same attachment keeps its generation",
        ),
    ];
    for (node, what, generation, why) in published {
        let r = env.publish("pvc-pub", node).await.expect(what);
        assert_eq!(
            attachment_generation(r).as_deref(),
            Some(generation),
            "{why}"
        );
    }
    let bv = env.volumes.get("pvc-pub").await.unwrap();
    assert_eq!(
        bv.annotations()
            .get(api::ANNOTATION_ATTACHED_NODE)
            .map(String::as_str),
        Some("node-a")
    );
    assert_eq!(
        bv.annotations()
            .get(api::ANNOTATION_ATTACHMENT_GENERATION)
            .map(String::as_str),
        Some("1")
    );
    for (volume, node, code, what) in [
        ("pvc-pub", "node-b", Code::FailedPrecondition, "second node"),
        ("pvc-pub", "no-such-node", Code::NotFound, "unknown node"),
        ("no-such-volume", "node-a", Code::NotFound, "unknown volume"),
    ] {
        let err = env.publish(volume, node).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }

    let err = env
        .delete("pvc-pub")
        .await
        .expect_err("delete while attached");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let got = env
        .c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-pub".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.as_ref().unwrap().published_node_ids,
        vec!["node-a".to_string()]
    );

    // Unpublish from another node changes nothing; from node-a it detaches.
    env.unpublish("pvc-pub", "node-b").await.unwrap();
    assert!(env.attached("pvc-pub").await);
    for _ in 0..2 {
        env.unpublish("pvc-pub", "node-a")
            .await
            .expect("unpublish (twice)");
    }
    assert!(!env.attached("pvc-pub").await);
    let moved = env
        .publish("pvc-pub", "node-b")
        .await
        .expect("free to move after unpublish");
    assert_eq!(
        attachment_generation(moved).as_deref(),
        Some("2"),
        "every new attachment gets a higher generation, also after an unpublish"
    );
    env.unpublish("pvc-pub", "node-b").await.unwrap();
    for _ in 0..2 {
        env.delete("pvc-pub").await.expect("delete (twice)");
    }
    assert!(env.volumes.get_opt("pvc-pub").await.unwrap().is_none());
}

/// The annotation ControllerPublish writes is the attachment record: a stale
/// `status.attachedTo` (the operator mirrors the annotation later) must not block
/// DeleteVolume, and a volume whose deletion waits on a finalizer is no longer listed.
async fn stale_status_and_pending_deletion_do_not_mislead_the_co(env: &mut Env) {
    env.create(create_req("pvc-stale", MIB, &[]))
        .await
        .expect("create");
    let held = serde_json::json!({
        "metadata": { "finalizers": ["test.blockvol.io/hold"] },
    });
    env.volumes
        .patch("pvc-stale", &PatchParams::default(), &Patch::Merge(&held))
        .await
        .expect("hold the object with a finalizer");
    let stale = serde_json::json!({ "status": { "attachedTo": "node-a" } });
    env.volumes
        .patch_status("pvc-stale", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .expect("a status that still names node-a");

    env.delete("pvc-stale")
        .await
        .expect("unpublished volume deletes despite a stale status.attachedTo");
    let bv = env
        .volumes
        .get("pvc-stale")
        .await
        .expect("held by the finalizer");
    assert!(bv.metadata.deletion_timestamp.is_some());
    let listed: Vec<String> = env
        .c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert!(
        !listed.contains(&"pvc-stale".to_string()),
        "a deleted volume is not listed: {listed:?}"
    );

    let release = serde_json::json!({ "metadata": { "finalizers": null } });
    env.volumes
        .patch(
            "pvc-stale",
            &PatchParams::default(),
            &Patch::Merge(&release),
        )
        .await
        .expect("release the finalizer");
}

async fn expand_grows_the_spec_size_and_never_shrinks(env: &mut Env) {
    env.create(create_req("pvc-grow", 8 * MIB, &[]))
        .await
        .expect("create");
    let resp = env
        .expand(
            "pvc-grow",
            16 * MIB + 1,
            Some(mount_cap(Mode::SingleNodeWriter)),
        )
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(resp.capacity_bytes, 16 * MIB + 4096);
    assert!(resp.node_expansion_required);
    let bv = env.volumes.get("pvc-grow").await.unwrap();
    assert_eq!(bv.spec.size_bytes(), Ok((16 * MIB + 4096) as u64));
    let resp = env
        .expand("pvc-grow", 4 * MIB, None)
        .await
        .expect("smaller request is a no-op")
        .into_inner();
    assert_eq!(resp.capacity_bytes, 16 * MIB + 4096);
    let err = env
        .expand("no-such-volume", MIB, None)
        .await
        .expect_err("unknown volume");
    assert_eq!(err.code(), Code::NotFound);
}

async fn degraded_volume_reports_an_abnormal_condition(env: &mut Env) {
    env.create(create_req("pvc-health", MIB, &[]))
        .await
        .expect("create");
    let get = |c: &mut ControllerClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-health".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .volume_condition
            .unwrap()
        }
    };
    assert!(!get(&mut env.c).await.abnormal);
    set_conditions(
        &env.volumes,
        "pvc-health",
        &[("Ready", "True"), ("Degraded", "True")],
    )
    .await
    .unwrap();
    let cond = get(&mut env.c).await;
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("degraded"), "{}", cond.message);
}

async fn list_volumes_pages_with_tokens(env: &mut Env) {
    let all = env
        .c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_token.is_empty());
    let total = all.entries.len();
    assert!(total >= 3, "earlier scenarios made volumes: {total}");
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..total {
        let page = env
            .c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        token = page.next_token;
        if token.is_empty() {
            break;
        }
    }
    let mut expected: Vec<String> = all
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    expected.sort();
    assert_eq!(seen, expected, "pages cover every volume once, in order");
    let err = env
        .c
        .list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "invalid-token".into(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::Aborted);
}

async fn capacity_sums_allocatable_bytes_by_topology(env: &mut Env) {
    let all = env
        .c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.available_capacity, 3000 + 1000);
    let one = env
        .c
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(Topology {
                segments: HashMap::from([(
                    api::TOPOLOGY_NODE_KEY.to_string(),
                    "node-b".to_string(),
                )]),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.available_capacity, 1000);
    let err = env
        .c
        .get_capacity(GetCapacityRequest {
            parameters: HashMap::from([("replicas".to_string(), "0".to_string())]),
            ..Default::default()
        })
        .await
        .expect_err("bad parameters");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_against_a_real_api_server() {
    let (_cp, client) = api_server().await;
    create_block_node(&client, "node-a", 3000).await;
    create_block_node(&client, "node-b", 1000).await;
    let operator = play_operator(client.clone());

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let settings = ControllerSettings {
        create_ready_timeout_ms: 2_000,
        ready_poll_interval_ms: 50,
        ..ControllerSettings::default()
    };
    let _served: Served = serve_csi(controller_services(&client, settings, None), &socket);
    wait_for_socket(&socket).await;
    let mut env = Env {
        c: ControllerClient::new(unix_channel(&socket, Duration::from_secs(30)).unwrap()),
        volumes: Api::all(client.clone()),
    };

    create_volume_applies_the_parameters_and_waits_for_ready(&mut env).await;
    names_that_are_not_labels_map_to_a_hashed_volume(&mut env).await;
    bad_parameters_create_nothing(&mut env).await;
    unready_volume_times_out_and_is_kept_for_the_retry(&mut env).await;
    publish_records_one_attachment_and_blocks_delete(&mut env).await;
    stale_status_and_pending_deletion_do_not_mislead_the_co(&mut env).await;
    expand_grows_the_spec_size_and_never_shrinks(&mut env).await;
    degraded_volume_reports_an_abnormal_condition(&mut env).await;
    list_volumes_pages_with_tokens(&mut env).await;
    capacity_sums_allocatable_bytes_by_topology(&mut env).await;
    operator.abort();
}
