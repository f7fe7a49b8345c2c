//! A PVC provisioned for real: kube-apiserver and kube-controller-manager, the operator
//! reconciler and the CSI controller in process (on a unix socket), and the pinned
//! csi-provisioner, csi-attacher and csi-resizer pointed at that socket. The test plays
//! the node agents and the kubelet's VolumeAttachment. Provision, bind, attach, expand
//! and delete all go through the sidecars.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use api::{BlockReplica, BlockVolume, VolumePhase};
use common::{MIB, Task, WAIT, WAIT_TIMEOUT_MS, agent, operator};
use csi::controller::{ControllerService, ControllerSettings as CsiSettings};
use csi::identity::IdentityService;
use csi::server::{Endpoint, Services};
use e2e::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{
    CSINode, CSINodeDriver, CSINodeSpec, StorageClass, VolumeAttachment,
};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const DRIVER: &str = "csi.blockvol.io";
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// Bound on each sidecar's CSI calls.
const SIDECAR_TIMEOUT_S: u64 = 90;
const SOCKET_WAIT_MS: u64 = 10_000;

/// A sidecar process, killed when dropped; its log is kept for failure messages.
struct Sidecar {
    child: tokio::process::Child,
}

fn sidecar(name: &str, args: &[String], dir: &Path) -> Sidecar {
    let bin = e2e::tool(name).expect("CSI sidecars are built by hack/tools/build.sh");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Sidecar { child }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Nodes and CSINodes as kubelets with the node plugin registered would leave them.
async fn register_nodes(cp: &ControlPlane) {
    let csinodes: Api<CSINode> = Api::all(cp.client());
    for n in NODES {
        let labels = BTreeMap::from([(api::TOPOLOGY_NODE_KEY.to_string(), n.to_string())]);
        cp.create_node(n, &labels).await.expect("Node");
        let csinode = CSINode {
            metadata: ObjectMeta {
                name: Some(n.into()),
                ..Default::default()
            },
            spec: CSINodeSpec {
                drivers: vec![CSINodeDriver {
                    name: DRIVER.into(),
                    node_id: n.into(),
                    topology_keys: Some(vec![api::TOPOLOGY_NODE_KEY.into()]),
                    ..Default::default()
                }],
            },
        };
        csinodes
            .create(&PostParams::default(), &csinode)
            .await
            .expect("CSINode");
    }
}

async fn serve_csi_controller(client: Client, socket: PathBuf) -> Task {
    let endpoint = Endpoint::Unix(socket.clone());
    let services = Services {
        identity: IdentityService::new(true),
        controller: Some(ControllerService::new(
            client,
            CsiSettings {
                create_ready_timeout_ms: WAIT_TIMEOUT_MS,
                ..CsiSettings::default()
            },
        )),
        node: None,
    };
    let task = Task(tokio::spawn(async move {
        if let Err(e) = csi::server::serve(&endpoint, services, std::future::pending()).await {
            panic!("CSI controller stopped: {e}");
        }
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SOCKET_WAIT_MS);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "CSI socket never accepted connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in ["csi-provisioner", "csi-attacher", "csi-resizer"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!("--- {name} ---\n"));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Prints the sidecars' last log lines when the test fails.
struct LogsOnPanic(PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", logs(&self.0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pvc_is_provisioned_attached_expanded_and_deleted_through_the_sidecars() {
    let cp = common::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await;
    let client = cp.client();
    register_nodes(&cp).await;
    let mut agents = Vec::new();
    for n in NODES {
        agents.push(agent(&client, n).await);
    }
    let _op = operator(&client);
    let dir = tempfile::tempdir().expect("tempdir");
    let _logs = LogsOnPanic(dir.path().to_path_buf());
    let socket = dir.path().join("csi.sock");
    let _csi = serve_csi_controller(client.clone(), socket.clone()).await;
    let common_args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("--csi-address={}", socket.display()),
            format!("--kubeconfig={}", cp.kubeconfig().display()),
            "--leader-election=false".into(),
            format!("--timeout={SIDECAR_TIMEOUT_S}s"),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let _provisioner = sidecar(
        "csi-provisioner",
        &common_args(&["--extra-create-metadata"]),
        dir.path(),
    );
    let _attacher = sidecar("csi-attacher", &common_args(&[]), dir.path());
    let _resizer = sidecar(
        "csi-resizer",
        &common_args(&["--handle-volume-inuse-error=false"]),
        dir.path(),
    );

    let scs: Api<StorageClass> = Api::all(client.clone());
    scs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "blockvol"},
            "provisioner": DRIVER,
            "parameters": {"replicas": "3", "durability": "syncAll"},
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": true,
        }))
        .expect("StorageClass"),
    )
    .await
    .expect("create StorageClass");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    pvcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "blockvol",
                "resources": {"requests": {"storage": "64Mi"}},
            },
        }))
        .expect("PVC"),
    )
    .await
    .expect("create PVC");

    // Provisioned and bound; the BlockVolume is Ready with three replicas.
    let pvc = WAIT
        .expect("PVC bound", || async {
            pvcs.get("data")
                .await
                .ok()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
        })
        .await;
    let pv_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .expect("bound PVC names its PV");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await.expect("PV exists");
    let handle = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| (c.driver.clone(), c.volume_handle.clone()))
        .expect("CSI PV");
    assert_eq!(handle.0, DRIVER);
    let vols: Api<BlockVolume> = Api::all(client.clone());
    // Bound once CreateVolume saw Ready=True; all three replicas in sync follows.
    let bv = WAIT
        .expect("BlockVolume Ready with 3 in sync", || async {
            vols.get(&handle.1).await.ok().filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count == 3)
            })
        })
        .await;
    assert_eq!(bv.spec.replicas, 3);
    assert_eq!(bv.spec.size_bytes(), Ok(64 * MIB as u64));
    let replicas: Api<BlockReplica> = Api::all(client.clone());
    let of_volume = ListParams::default().labels(&format!("{}={}", api::LABEL_VOLUME, handle.1));
    assert_eq!(
        replicas
            .list(&of_volume)
            .await
            .expect("replicas")
            .items
            .len(),
        3
    );

    // The attach/detach controller's part: a VolumeAttachment for node-b.
    let vas: Api<VolumeAttachment> = Api::all(client.clone());
    vas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
            "metadata": {"name": "va-data"},
            "spec": {
                "attacher": DRIVER, "nodeName": "node-b",
                "source": {"persistentVolumeName": pv_name},
            },
        }))
        .expect("VolumeAttachment"),
    )
    .await
    .expect("create VolumeAttachment");
    WAIT.expect("csi-attacher publishes to node-b", || async {
        vas.get("va-data")
            .await
            .ok()
            .filter(|v| v.status.as_ref().is_some_and(|s| s.attached))
    })
    .await;
    let bv = WAIT
        .expect("operator reports the attachment", || async {
            vols.get(&handle.1).await.ok().filter(|v| {
                v.status.as_ref().and_then(|s| s.attached_to.as_deref()) == Some("node-b")
            })
        })
        .await;
    assert_eq!(
        bv.annotations()
            .get(api::ANNOTATION_ATTACHED_NODE)
            .map(String::as_str),
        Some("node-b")
    );

    // Expansion through csi-resizer.
    pvcs.patch(
        "data",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "128Mi"}}}})),
    )
    .await
    .expect("resize PVC");
    WAIT.expect("BlockVolume and PV grown to 128Mi", || async {
        let bv_grown = vols
            .get(&handle.1)
            .await
            .ok()
            .is_some_and(|v| v.spec.size_bytes() == Ok(128 * MIB as u64));
        let pv_grown = pvs.get(&pv_name).await.ok().is_some_and(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .is_some_and(|q| q.0 == "128Mi")
        });
        (bv_grown && pv_grown).then_some(())
    })
    .await;

    // Detach, then delete the claim: PV and BlockVolume go.
    vas.delete("va-data", &DeleteParams::default())
        .await
        .expect("delete VolumeAttachment");
    WAIT.expect("csi-attacher unpublishes", || async {
        let va_gone = vas
            .get_opt("va-data")
            .await
            .ok()
            .is_some_and(|o| o.is_none());
        let unannotated = vols
            .get(&handle.1)
            .await
            .ok()
            .is_some_and(|v| !v.annotations().contains_key(api::ANNOTATION_ATTACHED_NODE));
        (va_gone && unannotated).then_some(())
    })
    .await;
    pvcs.delete("data", &DeleteParams::default())
        .await
        .expect("delete PVC");
    WAIT.expect("PVC, PV and BlockVolume deleted", || async {
        let pvc_gone = pvcs.get_opt("data").await.ok().is_some_and(|o| o.is_none());
        let pv_gone = pvs
            .get_opt(&pv_name)
            .await
            .ok()
            .is_some_and(|o| o.is_none());
        let bv_gone = vols
            .get_opt(&handle.1)
            .await
            .ok()
            .is_some_and(|o| o.is_none());
        (pvc_gone && pv_gone && bv_gone).then_some(())
    })
    .await;
}
