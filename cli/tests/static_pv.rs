//! The documented way for a pod to use a `kubectl apply`'d BlockVolume, end to end on
//! real processes: the volume is applied with kubectl, `kubectl blockvol pv` prints its
//! static PersistentVolume and claim, kubectl applies them, and the kubelet (played by
//! `e2e::kubelet`) attaches, formats, mounts and writes through them, with the data
//! read back. `describe volume` then names the claim and the node it is attached to.
//!
//! Needs root (mount, loop devices, FUSE), the pinned tools (`hack/tools/build.sh`) and
//! the daemons built (`cargo build --bins`; `cargo test --workspace` builds them).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use api::{BlockVolume, VolumePhase};
use e2e::cluster::{TestCluster, TestClusterOptions, wait_for};
use e2e::kubelet::Presentation;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;

/// Longest any one expectation may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);
/// Longest the write-and-read through the mount may take.
const IO_TIMEOUT: Duration = Duration::from_secs(90);

const VOLUME: &str = "db-data";

async fn plugin(cluster: &TestCluster, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-blockvol"))
        .args(args)
        .env("KUBECONFIG", cluster.control_plane.kubeconfig())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running kubectl-blockvol");
    testkit::stdout_of(&out, &format!("kubectl-blockvol {args:?}"))
}

async fn apply(cluster: &TestCluster, dir: &std::path::Path, name: &str, yaml: &str) {
    let file = dir.join(name);
    std::fs::write(&file, yaml).expect("writing a manifest");
    cluster
        .control_plane
        .kubectl(["apply", "-f", file.to_str().expect("utf-8 path")])
        .await
        .unwrap_or_else(|e| panic!("kubectl apply\n{yaml}\n: {e}"));
}

#[tokio::test]
async fn a_kubectl_applied_volume_is_mounted_through_the_printed_static_pv() {
    let mut options = TestClusterOptions::nodes(2);
    options.controller_manager = true;
    let mut cluster = TestCluster::start(options).await.expect("cluster starts");
    cluster.start_csi().await.expect("CSI driver starts");
    let dir = tempfile::tempdir().expect("temp dir");

    apply(
        &cluster,
        dir.path(),
        "bv.yaml",
        &format!(
            "apiVersion: blockvol.io/v1alpha1\nkind: BlockVolume\nmetadata:\n  name: {VOLUME}\n\
             spec:\n  size: 64Mi\n  replicas: 2\n"
        ),
    )
    .await;
    let volumes: Api<BlockVolume> = Api::all(cluster.client.clone());
    wait_for(&format!("{VOLUME} Ready"), WAIT, || async {
        volumes.get(VOLUME).await.ok().filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Ready)
        })
    })
    .await
    .expect("the volume becomes Ready");

    let manifest = plugin(&cluster, &["pv", VOLUME]).await;
    apply(&cluster, dir.path(), "pv.yaml", &manifest).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), "default");
    wait_for(&format!("claim {VOLUME} Bound"), WAIT, || async {
        let c = claims.get(VOLUME).await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())
    })
    .await
    .expect("the claim binds to the printed PV");

    let kubelet = cluster.kubelet("node-1").expect("kubelet of node-1");
    let m = kubelet
        .mount("default", VOLUME, None)
        .await
        .expect("attach, stage and publish through the static PV");
    assert_eq!(m.presentation, Presentation::Filesystem("ext4".into()));
    assert_eq!(m.volume_handle, VOLUME);
    let file: PathBuf = m.target_path.join("hello.txt");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<String> {
            let mut f = std::fs::File::create(&file)?;
            f.write_all(b"hello from a static PV\n")?;
            f.sync_all()?;
            let mut back = String::new();
            std::fs::File::open(&file)?.read_to_string(&mut back)?;
            Ok(back)
        })();
        let _ = tx.send(result);
    });
    let back = tokio::time::timeout(IO_TIMEOUT, rx)
        .await
        .expect("IO through the mount in time")
        .expect("the IO thread reports")
        .expect("write, sync and read through the mount");
    assert_eq!(back, "hello from a static PV\n");

    let text = plugin(&cluster, &["describe", "volume", "default/db-data"]).await;
    assert!(
        text.contains("Claim:        default/db-data (PV db-data)"),
        "{text}"
    );
    assert!(text.contains("Attached:     node-1"), "{text}");
    kubelet
        .unmount("default", VOLUME)
        .await
        .expect("unpublish and unstage");
}
