//! blockvol-csi: the CSI driver binary. `--mode controller` runs Identity and
//! Controller (talks to the Kubernetes API), `--mode node` runs Identity and Node
//! (talks to the local node agent), `--mode all` runs all three. With
//! `--registration-dir` the node plugin also registers itself with the kubelet
//! (`csi::registration`), so no node-driver-registrar sidecar is needed. With
//! `--health-addr` it serves `GET /healthz` for the kubelet's probes (`csi::health`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use csi::agent::AgentSettings;
use csi::controller::{ControllerService, ControllerSettings};
use csi::identity::IdentityService;
use csi::mount::CommandSettings;
use csi::node::{NodeService, NodeSettings};
use csi::registration::{self, RegistrationService};
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
    /// The kubelet's plugin registration directory (usually
    /// `<kubelet-dir>/plugins_registry`); node and all modes. Set: the plugin serves the
    /// kubelet's plugin-registration API on a socket there. Unset: an external
    /// registrar (node-driver-registrar) registers it.
    #[arg(long, env = "REGISTRATION_DIR")]
    registration_dir: Option<PathBuf>,
    /// The CSI socket's path as the kubelet sees it (default: the --endpoint path).
    #[arg(long)]
    kubelet_registration_path: Option<PathBuf>,
    /// Address of the HTTP health endpoint (`GET /healthz`: 200 while this process's
    /// CSI endpoint answers an Identity Probe). Unset: no health endpoint.
    #[arg(long, env = "HEALTH_ADDR")]
    health_addr: Option<std::net::SocketAddr>,
    /// Upper bound of the Probe behind one `/healthz` answer, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    health_probe_timeout_ms: u64,
    /// Size of a volume whose request names no capacity, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    default_volume_size_bytes: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::logging::init_from_env()?;
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
    let registration = match (&args.registration_dir, with_node) {
        (Some(dir), true) => {
            let csi_path = match (&args.kubelet_registration_path, &endpoint) {
                (Some(p), _) => p.clone(),
                (None, Endpoint::Unix(p)) => p.clone(),
                (None, Endpoint::Tcp(_)) => anyhow::bail!(
                    "--registration-dir needs a unix --endpoint or --kubelet-registration-path"
                ),
            };
            Some((
                dir.join(registration::socket_name(api::CSI_DRIVER_NAME)),
                RegistrationService::new(api::CSI_DRIVER_NAME, csi_path),
            ))
        }
        (Some(_), false) => anyhow::bail!("--registration-dir applies to node and all modes"),
        (None, _) => None,
    };
    if let Some(addr) = args.health_addr {
        let listener = csi::health::bind(addr).await?;
        tracing::info!(%addr, "serving /healthz");
        let timeout = std::time::Duration::from_millis(args.health_probe_timeout_ms.max(1));
        let health = csi::health::CsiHealth::new(endpoint.clone(), timeout);
        tokio::spawn(telemetry::http::serve(
            listener,
            std::sync::Arc::new(health),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                    let _ = stop_tx.send(true);
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let csi = serve(&endpoint, services, stopped(stop_rx.clone()));
    match registration {
        // The kubelet re-attempts a registration whose NodeGetInfo failed on its next
        // reconcile pass, so the order the two sockets appear in does not matter.
        Some((socket, service)) => {
            let reg = registration::serve(&socket, service, stopped(stop_rx));
            let (csi, reg) = tokio::join!(csi, reg);
            csi?;
            reg?;
        }
        None => csi.await?,
    }
    Ok(())
}
