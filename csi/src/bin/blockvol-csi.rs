//! blockvol-csi: the CSI driver binary. `--mode controller` runs Identity and
//! Controller (talks to the Kubernetes API), `--mode node` runs Identity and Node
//! (talks to the local node agent), `--mode all` runs all three.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use csi::agent::AgentSettings;
use csi::controller::{ControllerService, ControllerSettings};
use csi::identity::IdentityService;
use csi::mount::CommandSettings;
use csi::node::{NodeService, NodeSettings};
use csi::server::{Endpoint, Services, serve};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

/// blockvol CSI driver: controller and node services.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Which CSI services to serve.
    #[arg(long, value_enum, env = "CSI_MODE")]
    mode: Mode,
    /// Where to serve: unix:///path/csi.sock or tcp://IP:PORT.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (node and all modes); usually the Kubernetes node name.
    #[arg(long, env = "NODE_NAME")]
    node_id: Option<String>,
    /// Unix socket of the local blockvol node agent.
    #[arg(long, env = "AGENT_SOCKET", default_value = "/run/blockvol/agent.sock")]
    agent_socket: PathBuf,
    /// The kubelet's directory (node and all modes): staging and target paths outside
    /// it are refused. Unset: any absolute path is accepted.
    #[arg(long, env = "KUBELET_DIR")]
    kubelet_dir: Option<PathBuf>,
    /// Upper bound of one node-agent call, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    agent_call_timeout_ms: u64,
    /// Upper bound of one host command (mkfs, mount, resize2fs), in milliseconds.
    #[arg(long, default_value_t = 120_000)]
    command_timeout_ms: u64,
    /// How long CreateVolume waits for the volume to become Ready, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    create_ready_timeout_ms: u64,
    /// How often CreateVolume re-reads the volume while waiting, in milliseconds.
    #[arg(long, default_value_t = 500)]
    ready_poll_interval_ms: u64,
    /// Size of a volume whose request names no capacity, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    default_volume_size_bytes: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let with_controller = matches!(args.mode, Mode::Controller | Mode::All);
    let with_node = matches!(args.mode, Mode::Node | Mode::All);

    let controller = if with_controller {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
        Some(ControllerService::new(
            client,
            ControllerSettings {
                create_ready_timeout_ms: args.create_ready_timeout_ms,
                ready_poll_interval_ms: args.ready_poll_interval_ms,
                default_volume_size_bytes: args.default_volume_size_bytes,
                ..ControllerSettings::default()
            },
        ))
    } else {
        None
    };
    let node = if with_node {
        let node_id = args
            .node_id
            .clone()
            .context("--node-id (or NODE_NAME) is required in node and all modes")?;
        Some(NodeService::new(NodeSettings {
            node_id,
            agent: AgentSettings {
                socket_path: args.agent_socket.clone(),
                agent_call_timeout_ms: args.agent_call_timeout_ms,
            },
            commands: CommandSettings {
                command_timeout_ms: args.command_timeout_ms,
            },
            kubelet_dir: args.kubelet_dir.clone(),
        })?)
    } else {
        None
    };
    let services = Services {
        identity: IdentityService::new(with_controller),
        controller,
        node,
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    serve(&endpoint, services, shutdown).await?;
    Ok(())
}
