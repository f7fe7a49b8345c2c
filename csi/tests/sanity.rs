//! The Kubernetes CSI conformance suite, `csi-sanity`, against `--mode all`: identity,
//! controller (on a real kube-apiserver, the test playing the operator) and node (with
//! an agent that attaches loop devices) in one endpoint. Needs the binaries that
//! hack/tools/build.sh installs, root and loop devices.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::operator::{api_server, create_block_node, play_operator};
use common::{
    LoopAgent, Served, controller_services, serve_agent_for, serve_csi, unmount_all_under,
    wait_for_socket,
};
use csi::agent::AgentSettings;
use csi::controller::{ControllerService, ControllerSettings};
use csi::identity::IdentityService;
use csi::mount::CommandSettings;
use csi::node::{NodeService, NodeSettings};
use csi::server::Services;
use e2e::cluster::{TestCluster, TestClusterOptions};
use kube::Api;

const NODE: &str = "sanity-node";
/// Test volume size: xfs (whose online grow works without CAP_SYS_RESOURCE) needs
/// 300 MB. The backing files are sparse.
const VOLUME_BYTES: u64 = 320 << 20;
/// Upper bound of the whole suite run.
const SANITY_TIMEOUT_MS: u64 = 600_000;

/// Tears down in order: servers, mounts, loop devices, then the temp dir.
struct Teardown {
    agent: Arc<LoopAgent>,
    dir: std::path::PathBuf,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        unmount_all_under(&self.dir);
        self.agent.detach_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_against_mode_all() {
    let sanity = testkit::tool("csi-sanity").expect("csi-sanity is built by hack/tools/build.sh");
    let (_cp, client) = api_server().await;
    create_block_node(&client, NODE, 100 << 30).await;
    let operator = play_operator(client.clone());

    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(LoopAgent::new(dir.path(), VOLUME_BYTES));
    let _teardown = Teardown {
        agent: Arc::clone(&agent),
        dir: dir.path().to_path_buf(),
    };
    let agent_socket = dir.path().join("agent.sock");
    let _agent_server: Served = serve_agent_for(
        Arc::clone(&agent),
        Some(Api::all(client.clone())),
        &agent_socket,
    );
    let csi_socket = dir.path().join("csi.sock");
    let settings = ControllerSettings {
        create_ready_timeout_ms: 10_000,
        ready_poll_interval_ms: 50,
        default_volume_size_bytes: VOLUME_BYTES,
        ..ControllerSettings::default()
    };
    let node = NodeService::new(NodeSettings {
        node_id: NODE.into(),
        agent: AgentSettings {
            socket_path: agent_socket.clone(),
            agent_call_timeout_ms: 60_000,
        },
        commands: CommandSettings::default(),
        kubelet_dir: None,
    })
    .unwrap();
    let _csi: Served = serve_csi(
        controller_services(&client, settings, Some(node)),
        &csi_socket,
    );
    wait_for_socket(&agent_socket).await;
    wait_for_socket(&csi_socket).await;

    let params = dir.path().join("params.yaml");
    std::fs::write(&params, "fsType: xfs\n").unwrap();
    let passed = sanity_passes(&sanity, dir.path(), &csi_socket, &params, None).await;
    operator.abort();
    assert!(passed.0, "csi-sanity failed; full output:\n{}", passed.1);
}

/// The same suite with nothing played by the test: a real `blockvol-agent` process
/// (engine volumes, its NBD frontend, FUSE file + loop attach) and a real
/// `blockvol-operator` process on the control plane; one node, so `replicas: "1"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_against_a_real_agent_and_operator() {
    let sanity = testkit::tool("csi-sanity").expect("csi-sanity is built by hack/tools/build.sh");
    let cluster = TestCluster::start(TestClusterOptions::nodes(1))
        .await
        .expect("cluster with one agent and the operator starts");
    let agent = &cluster.agents[0];
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountUnder(dir.path().to_path_buf());
    let csi_socket = dir.path().join("csi.sock");
    let _csi: Served = serve_csi(
        Services {
            identity: IdentityService::new(true),
            controller: Some(ControllerService::new(
                cluster.client.clone(),
                ControllerSettings {
                    create_ready_timeout_ms: 60_000,
                    ready_poll_interval_ms: 100,
                    default_volume_size_bytes: VOLUME_BYTES,
                    ..ControllerSettings::default()
                },
            )),
            node: Some(
                NodeService::new(NodeSettings {
                    node_id: agent.node.clone(),
                    agent: AgentSettings {
                        socket_path: agent.agent_socket.clone(),
                        agent_call_timeout_ms: 60_000,
                    },
                    commands: CommandSettings::default(),
                    kubelet_dir: None,
                })
                .unwrap(),
            ),
        },
        &csi_socket,
    );
    wait_for_socket(&agent.agent_socket).await;
    wait_for_socket(&csi_socket).await;

    let params = dir.path().join("params.yaml");
    std::fs::write(&params, "fsType: xfs\nreplicas: \"1\"\n").unwrap();
    // Includes NodeExpand of a published volume: the agent grows the attached device
    // in place and the node plugin grows the mounted xfs.
    let (passed, log) = sanity_passes(&sanity, dir.path(), &csi_socket, &params, None).await;
    assert!(passed, "csi-sanity failed; full output:\n{log}");
    let leftover = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*dir.path().to_string_lossy()))
        .count();
    assert_eq!(
        leftover,
        0,
        "csi-sanity left mounts under {}",
        dir.path().display()
    );
}

/// Unmounts whatever a failed run left under a directory (before the temp dir goes).
struct UnmountUnder(std::path::PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        unmount_all_under(&self.0);
    }
}

/// Runs csi-sanity and prints its summary: (passed, full output).
async fn sanity_passes(
    sanity: &Path,
    dir: &Path,
    socket: &Path,
    params: &Path,
    skip: Option<&str>,
) -> (bool, String) {
    let report = dir.join("sanity.log");
    let status = run_sanity(sanity, dir, socket, params, skip, &report).await;
    let log = std::fs::read_to_string(&report).unwrap_or_default();
    let summary: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Ran ") || l.contains("Passed") || l.contains("[FAIL]"))
        .collect();
    println!("csi-sanity summary:\n{}", summary.join("\n"));
    println!("skipped specs:");
    for spec in skipped_specs(&report.with_extension("json")) {
        println!("  {spec}");
    }
    (status, log)
}

/// The names of the specs ginkgo skipped, from its JSON report (empty if unreadable).
fn skipped_specs(json_report: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(json_report).unwrap_or_default();
    let reports: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut names: Vec<String> = reports
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["SpecReports"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["State"] == "skipped")
        .map(|s| {
            let mut parts: Vec<String> = s["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            parts.extend(s["LeafNodeText"].as_str().map(str::to_string));
            parts.join(" / ")
        })
        .collect();
    names.sort();
    names
}

async fn run_sanity(
    sanity: &Path,
    dir: &Path,
    socket: &Path,
    params: &Path,
    skip: Option<&str>,
    report: &Path,
) -> bool {
    let out = std::fs::File::create(report).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = tokio::process::Command::new(sanity);
    if let Some(pattern) = skip {
        cmd.arg(format!("--ginkgo.skip={pattern}"));
    }
    let mut child = cmd
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!(
            "--csi.stagingdir={}",
            dir.join("sanity-staging").display()
        ))
        .arg(format!(
            "--csi.mountdir={}",
            dir.join("sanity-mount").display()
        ))
        .arg(format!("--csi.testvolumesize={VOLUME_BYTES}"))
        .arg(format!("--csi.testvolumeexpandsize={}", 2 * VOLUME_BYTES))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg("--ginkgo.no-color")
        .arg(format!(
            "--ginkgo.json-report={}",
            report.with_extension("json").display()
        ))
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("csi-sanity starts");
    match tokio::time::timeout(Duration::from_millis(SANITY_TIMEOUT_MS), child.wait()).await {
        Ok(Ok(status)) => status.success(),
        Ok(Err(e)) => panic!("waiting for csi-sanity: {e}"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("csi-sanity did not finish within {SANITY_TIMEOUT_MS} ms");
        }
    }
}
