//! The operator's part, played by tests: BlockVolumes become Ready, BlockNodes exist
//! with some allocatable space. Only what the CSI driver reads is written.

use std::collections::BTreeMap;
use std::time::Duration;

use api::{BlockNode, BlockNodeSpec, BlockVolume};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use testkit::{ControlPlane, ControlPlaneOptions};

/// A control plane with blockvol's CRDs applied, and a client for it: the API server the
/// driver and the played operator share.
pub async fn api_server() -> (ControlPlane, Client) {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    cp.apply_crds(&testkit::crds_dir())
        .await
        .expect("CRDs applied");
    let client = cp.client();
    (cp, client)
}

/// Marks every BlockVolume not named `pending-*` Ready, the operator's job.
pub fn play_operator(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<BlockVolume> = Api::all(client);
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for bv in list.items {
                    let name = bv.name_any();
                    let ready = bv
                        .status
                        .as_ref()
                        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"));
                    if !ready && !name.starts_with("pending-") {
                        let _ = set_conditions(&api, &name, &[("Ready", "True")]).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

pub async fn set_conditions(
    api: &Api<BlockVolume>,
    name: &str,
    conds: &[(&str, &str)],
) -> kube::Result<BlockVolume> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let conditions: Vec<_> = conds
        .iter()
        .map(|(t, s)| {
            json!({
                "type": t, "status": s, "reason": "PlayedByTest",
                "message": format!("{t}={s} set by the test"), "lastTransitionTime": now,
            })
        })
        .collect();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await
}

pub async fn create_block_node(client: &Client, name: &str, allocatable: u64) {
    let api: Api<BlockNode> = Api::all(client.clone());
    let node = BlockNode::new(
        name,
        BlockNodeSpec {
            node_name: name.into(),
            data_address: "127.0.0.1:7700".into(),
            data_dir: "/var/lib/blockvol".into(),
            topology: BTreeMap::new(),
            ..Default::default()
        },
    );
    api.create(&PostParams::default(), &node)
        .await
        .expect("create BlockNode");
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"allocatableBytes": allocatable, "capacityBytes": allocatable}}),
        ),
    )
    .await
    .expect("BlockNode status");
}
