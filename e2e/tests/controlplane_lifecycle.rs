//! The harness itself: a local control plane serves kubectl and simulated nodes, runs the
//! controller manager when asked, and leaves no process or directory behind after drop,
//! including when the test that owns it panics.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{ControlPlane, ControlPlaneOptions};

/// Bound on waiting for a killed daemon to disappear from the process table.
const GONE_TIMEOUT_MS: u64 = 5_000;

/// Whether a process (or, with a negative id, a process group) still exists.
fn exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn assert_all_gone(pids: &[(&str, u32)], dir: &Path) {
    let deadline = Instant::now() + Duration::from_millis(GONE_TIMEOUT_MS);
    for (name, pid) in pids {
        let pid = *pid as i32;
        while (exists(pid) || exists(-pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!exists(pid), "{name} (pid {pid}) still running after drop");
        assert!(
            !exists(-pid),
            "{name}'s process group {pid} still has members"
        );
    }
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

/// Every daemon in `pids` still runs and the API server answers /readyz with ok.
async fn assert_running_and_ready(cp: &ControlPlane, pids: &[(&'static str, u32)]) {
    assert!(pids.iter().all(|(_, pid)| exists(*pid as i32)));
    let readyz = cp
        .kubectl(["get", "--raw", "/readyz"])
        .await
        .expect("kubectl");
    assert_eq!(readyz.trim(), "ok");
}

#[tokio::test]
async fn full_control_plane_serves_kubectl_nodes_and_controllers_then_cleans_up() {
    let opts = ControlPlaneOptions {
        controller_manager: true,
        ..ControlPlaneOptions::default()
    };
    let cp = ControlPlane::start(opts).await.expect("start");
    let pids = cp.daemon_pids();
    let names: Vec<_> = pids.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager"]);
    let dir = cp
        .dir()
        .expect("a local control plane has a dir")
        .to_owned();
    assert_running_and_ready(&cp, &pids).await;
    // The admin client is in system:masters and RBAC is on.
    let can = cp
        .kubectl(["auth", "can-i", "create", "nodes"])
        .await
        .expect("kubectl auth can-i");
    assert_eq!(can.trim(), "yes");
    let anonymous = cp
        .kubectl(["auth", "can-i", "list", "secrets", "--as=someone"])
        .await;
    assert!(
        matches!(&anonymous, Err(testkit::Error::Kubectl { .. })),
        "an unbound user must be denied: {anonymous:?}"
    );

    let labels = BTreeMap::from([("topology.kubernetes.io/zone".to_owned(), "z1".to_owned())]);
    let node = cp.create_node("worker-1", &labels).await.expect("node");
    let node_labels = node.metadata.labels.unwrap_or_default();
    assert_eq!(
        node_labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("z1")
    );
    assert_eq!(
        node_labels
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("worker-1")
    );
    let ready = cp
        .kubectl([
            "get",
            "node",
            "worker-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .await
        .expect("kubectl get node");
    assert_eq!(ready.trim(), "True");

    // The same cluster reached as an "existing" one through its kubeconfig: usable, and
    // dropping that handle leaves the cluster running.
    let external = ControlPlane::external(cp.kubeconfig())
        .await
        .expect("connect through the kubeconfig");
    assert!(external.is_external());
    assert!(external.daemon_pids().is_empty());
    assert_eq!(external.server_url(), cp.server_url());
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(external.client());
    assert!(nodes.get_opt("worker-1").await.expect("get node").is_some());
    drop(external);
    assert_running_and_ready(&cp, &pids).await;

    drop(cp);
    assert_all_gone(&pids, &dir);
}

#[test]
fn a_panicking_test_still_tears_its_control_plane_down() {
    let (tx, rx) = std::sync::mpsc::channel();
    let owner = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let cp = ControlPlane::start(ControlPlaneOptions::default())
                .await
                .expect("start");
            let dir = cp.dir().expect("dir").to_owned();
            tx.send((cp.daemon_pids(), dir)).expect("send");
            panic!("simulated test failure while the control plane runs");
        })
    });
    let outcome = owner.join();
    assert!(outcome.is_err(), "the owner thread was meant to panic");
    let (pids, dir) = rx.recv().expect("the control plane had started");
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_all_gone(&pids, &dir);
}
