//! The `blockvol-csi` binary wires the services to the endpoint: started in node mode
//! it answers Identity and Node calls on its unix socket and exits cleanly on SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use csi::agent::unix_channel;
use csi::csi_proto::identity_client::IdentityClient;
use csi::csi_proto::node_client::NodeClient;
use csi::csi_proto::plugin_capability::service::Type as ServiceType;
use csi::csi_proto::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetInfoRequest, ProbeRequest,
    plugin_capability,
};
use testkit::Wait;

/// Kills the child if the test fails before it is stopped.
struct Child(Option<tokio::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// `blockvol-csi` in node mode as node "worker-1", serving CSI on `socket` and reaching
/// its agent through `agent.sock` in `dir`, its output discarded; the caller adds flags.
fn node_plugin(dir: &Path, socket: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_blockvol-csi"));
    cmd.args(["--mode", "node", "--node-id", "worker-1"])
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .arg(format!(
            "--agent-socket={}",
            dir.join("agent.sock").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Sends SIGTERM to the plugin and asserts that it exits cleanly within 10 s.
async fn stop_with_sigterm(child: &mut Child) {
    let mut c = child.0.take().unwrap();
    let pid = c.id().expect("running");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(10), c.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit, got {status}");
}

async fn wait_for_socket(path: &Path) {
    if let Err(e) = Wait::millis(30_000, 20).socket(path).await {
        panic!("{e}");
    }
}

#[tokio::test]
async fn node_mode_serves_identity_and_node_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let child = node_plugin(dir.path(), &socket)
        .spawn()
        .expect("binary starts");
    let mut child = Child(Some(child));
    wait_for_socket(&socket).await;
    let channel = unix_channel(&socket, Duration::from_secs(10)).unwrap();

    let mut identity = IdentityClient::new(channel.clone());
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, api::CSI_DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(ServiceType::VolumeAccessibilityConstraints as i32)));
    assert!(
        !services.contains(&(ServiceType::ControllerService as i32)),
        "node mode does not claim the controller service"
    );
    assert!(
        caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(plugin_capability::Type::VolumeExpansion(e))
                if e.r#type == plugin_capability::volume_expansion::Type::Online as i32
        )),
        "online volume expansion is advertised: {caps:?}"
    );

    let node_info = NodeClient::new(channel)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "worker-1");

    stop_with_sigterm(&mut child).await;
}

/// With --registration-dir the node plugin registers itself the way the kubelet's plugin
/// watcher expects (no node-driver-registrar): a socket named `<driver>-reg.sock` in that
/// dir answering GetInfo with type CSIPlugin, the driver name, the CSI socket's path and
/// version 1.0.0, accepting the kubelet's status, and gone after SIGTERM so the kubelet
/// deregisters the plugin.
#[tokio::test]
async fn node_mode_registers_itself_with_the_kubelet_plugin_watcher() {
    use csi::registration_proto::registration_client::RegistrationClient;
    use csi::registration_proto::{InfoRequest, RegistrationStatus};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let registry = dir.path().join("plugins_registry");
    let child = node_plugin(dir.path(), &socket)
        .arg(format!("--registration-dir={}", registry.display()))
        .spawn()
        .expect("binary starts");
    let mut child = Child(Some(child));
    let reg_socket = registry.join("csi.blockvol.io-reg.sock");
    wait_for_socket(&reg_socket).await;
    let channel = unix_channel(&reg_socket, Duration::from_secs(10)).unwrap();
    let mut registration = RegistrationClient::new(channel);
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, api::CSI_DRIVER_NAME);
    assert_eq!(info.endpoint, socket.display().to_string());
    assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
    // The endpoint it names is the CSI socket, serving Node calls.
    let node_info = NodeClient::new(unix_channel(&socket, Duration::from_secs(10)).unwrap())
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "worker-1");
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();

    stop_with_sigterm(&mut child).await;
    assert!(
        !reg_socket.exists(),
        "the registration socket outlived the plugin"
    );
}

#[tokio::test]
async fn log_format_env_selects_json_lines_and_refuses_unknown_values() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let start = |format: &str| {
        node_plugin(dir.path(), &dir.path().join(format!("{format}.sock")))
            .arg("--health-addr=127.0.0.1:0")
            .env("RUST_LOG", "info")
            .env("BLOCKVOL_LOG_FORMAT", format)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts")
    };

    let mut json = start("json");
    let stdout = json.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("a log line in time")
        .expect("read")
        .expect("a line before EOF");
    let v: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {first}"));
    assert_eq!(v["level"], "INFO", "{first}");
    assert!(v["fields"]["message"].is_string(), "{first}");
    json.kill().await.expect("stop");

    let bad = start("xml").wait_with_output().await.expect("runs");
    assert!(!bad.status.success(), "an unknown format is refused");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("text or json"), "{stderr}");
}
