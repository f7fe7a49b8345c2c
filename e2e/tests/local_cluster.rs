//! The local cluster runner behind `hack/up.sh`: it prepares a control plane for blockvol
//! (CRDs, zoned Node objects, the system namespace, a peer secret), publishes a working
//! kubeconfig in its state dir, and stops everything on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

use e2e::local::{
    LocalCluster, LocalClusterOptions, PEER_SECRET_BYTES, SYSTEM_NAMESPACE, ZONE_LABEL,
};

/// Bound on the runner's start-up (control plane with controller manager, on a busy host).
const READY_TIMEOUT_MS: u64 = 240_000;
/// Bound on the runner's shutdown after SIGTERM.
const EXIT_TIMEOUT_MS: u64 = 30_000;
const POLL_MS: u64 = 200;

async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

async fn assert_prepared_for_blockvol(client: &Client, nodes: &[String]) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "blockvolumes.blockvol.io",
        "blockreplicas.blockvol.io",
        "blocknodes.blockvol.io",
    ] {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("CRD {name}: {e}"));
    }
    let node_api: Api<Node> = Api::all(client.clone());
    let mut zones = Vec::new();
    for node in nodes {
        let n = node_api
            .get(node)
            .await
            .unwrap_or_else(|e| panic!("node {node}: {e}"));
        let zone = n
            .metadata
            .labels
            .unwrap_or_default()
            .get(ZONE_LABEL)
            .cloned()
            .unwrap_or_else(|| panic!("node {node} has no {ZONE_LABEL} label"));
        zones.push(zone);
    }
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), nodes.len(), "each node is in its own zone");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .get(SYSTEM_NAMESPACE)
        .await
        .unwrap_or_else(|e| panic!("namespace {SYSTEM_NAMESPACE}: {e}"));
}

#[tokio::test]
async fn local_cluster_has_crds_zoned_nodes_namespace_and_peer_secret() {
    let state = tempfile::tempdir().expect("state dir");
    let cluster = LocalCluster::start(LocalClusterOptions::new(state.path()))
        .await
        .expect("local cluster starts");
    assert_eq!(cluster.nodes(), ["node-1", "node-2", "node-3"]);
    assert!(cluster.kubeconfig().starts_with(state.path()));
    let client = client_from(cluster.kubeconfig()).await;
    assert_prepared_for_blockvol(&client, cluster.nodes()).await;

    let secret = std::fs::read_to_string(cluster.peer_secret_file()).expect("peer secret");
    assert_eq!(secret.len(), PEER_SECRET_BYTES * 2);
    assert!(
        secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "hex: {secret}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cluster.peer_secret_file())
        .expect("peer secret metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "peer secret is private to its owner");
}

/// Kills the runner if the test fails before it stopped it.
struct Runner(Child);

impl Drop for Runner {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: plain signal to our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_millis(EXIT_TIMEOUT_MS);
            while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(POLL_MS));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn local_runner_serves_until_sigterm_then_stops_its_control_plane() {
    let state = tempfile::tempdir().expect("state dir");
    let mut runner = Runner(
        // Built by `cargo test --workspace` (alone: `cargo build -p tools --bins`).
        Command::new(
            e2e::cluster::workspace_binary("blockvol-local").expect("blockvol-local is built"),
        )
        .arg(state.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("runner spawns"),
    );
    let ready = state.path().join("ready");
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    while !ready.exists() {
        if let Some(status) = runner.0.try_wait().expect("runner status") {
            panic!("runner exited before ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "runner not ready in {READY_TIMEOUT_MS} ms"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let kubeconfig = std::fs::read_to_string(&ready).expect("ready names the kubeconfig");
    let kubeconfig = Path::new(kubeconfig.trim());
    assert_eq!(kubeconfig, state.path().join("kubeconfig"));
    let client = client_from(kubeconfig).await;
    let nodes: Vec<String> = (1..=3).map(|i| format!("node-{i}")).collect();
    assert_prepared_for_blockvol(&client, &nodes).await;

    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(runner.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_millis(EXIT_TIMEOUT_MS);
    let status = loop {
        if let Some(status) = runner.0.try_wait().expect("runner status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "runner still running {EXIT_TIMEOUT_MS} ms after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    assert!(status.success(), "runner exit: {status}");
    assert!(!ready.exists(), "ready marker removed on stop");
    let nodes_api: Api<Node> = Api::all(client);
    assert!(
        nodes_api.list(&Default::default()).await.is_err(),
        "the API server is gone after the runner stopped"
    );
}
