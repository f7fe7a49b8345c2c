//! The CSI controller and the operator agree on one attachment record: a volume
//! published by ControllerPublishVolume shows up in the operator's
//! `status.attachedTo` and Attached condition, and neither DeleteVolume nor a direct
//! delete of the BlockVolume removes it until it is unpublished. Real kube-apiserver,
//! operator reconciler in process, the test plays three node agents.

mod common;

use api::{BlockReplica, BlockVolume, VolumePhase};
use common::{MIB, WAIT, WAIT_TIMEOUT_MS, agent, operator};
use csi::controller::{ControllerService, ControllerSettings as CsiSettings};
use csi::csi_proto::controller_server::Controller;
use csi::csi_proto::volume_capability::access_mode::Mode;
use csi::csi_proto::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::csi_proto::*;
use e2e::ControlPlaneOptions;
use kube::api::{Api, DeleteParams, ListParams};
use tonic::{Code, Request};

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn attached_condition(v: &BlockVolume) -> Option<(String, String)> {
    v.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Attached")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reports_and_guards_a_csi_published_attachment() {
    let cp = common::start(ControlPlaneOptions::default()).await;
    let client = cp.client();
    let mut agents = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        agents.push(agent(&client, n).await);
    }
    let _op = operator(&client);
    let csi = ControllerService::new(
        client.clone(),
        CsiSettings {
            create_ready_timeout_ms: WAIT_TIMEOUT_MS,
            ..CsiSettings::default()
        },
    );
    let vols: Api<BlockVolume> = Api::all(client.clone());

    // CreateVolume returns only once the operator made the volume Ready.
    let created = csi
        .create_volume(Request::new(CreateVolumeRequest {
            name: "pvc-attach".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: [("replicas", "3"), ("durability", "syncAll")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }))
        .await
        .expect("CreateVolume")
        .into_inner();
    let id = created.volume.expect("volume").volume_id;
    // Ready=True may come while the last replica still catches up; then all three.
    let v = WAIT
        .expect("volume Ready with 3 in sync", || async {
            vols.get(&id).await.ok().filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count == 3)
            })
        })
        .await;
    assert_eq!(v.status.as_ref().and_then(|s| s.attached_to.clone()), None);

    csi.controller_publish_volume(Request::new(ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }))
    .await
    .expect("ControllerPublishVolume");
    let v = WAIT
        .expect("operator mirrors the attachment", || async {
            vols.get(&id).await.ok().filter(|v| {
                v.status.as_ref().and_then(|s| s.attached_to.as_deref()) == Some("node-b")
            })
        })
        .await;
    assert_eq!(
        attached_condition(&v).map(|c| c.0),
        Some("True".to_string()),
        "{:?}",
        v.status
    );

    // DeleteVolume refuses; a direct delete leaves the object and its replicas alone.
    let err = csi
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("DeleteVolume while attached");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    vols.delete(&id, &DeleteParams::default())
        .await
        .expect("delete request");
    WAIT.expect("deletion waits for detach", || async {
        vols.get(&id)
            .await
            .ok()
            .filter(|v| attached_condition(v).is_some_and(|c| c.1 == "DeletionWaitsForDetach"))
    })
    .await;
    let replicas = Api::<BlockReplica>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={id}", api::LABEL_VOLUME)))
        .await
        .expect("list replicas");
    assert_eq!(replicas.items.len(), 3, "nothing deleted while attached");

    // Unpublish: the operator finishes the deletion.
    csi.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        ..Default::default()
    }))
    .await
    .expect("ControllerUnpublishVolume");
    WAIT.expect("volume gone after detach", || async {
        vols.get_opt(&id)
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
}
