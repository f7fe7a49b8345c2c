//! Runs a local blockvol control plane until SIGINT or SIGTERM (used by `hack/up.sh`),
//! and plays the kubelet against it.
//!
//! - `blockvol-local STATE_DIR`: once ready it writes `STATE_DIR/ready` naming the
//!   kubeconfig; on a signal it stops every daemon it started and removes `ready`.
//! - `blockvol-local register --node NODE`: registers the node's CSI plugin (CSINode,
//!   topology labels) as the kubelet does.
//! - `blockvol-local mount --pvc NAME --node NODE`: attaches, stages and publishes the
//!   claim's volume on the node and prints the path it is published at.
//! - `blockvol-local unmount --pvc NAME --node NODE` (or `--all`): the reverse.
//! - `blockvol-local expand --pvc NAME --node NODE`: grows the published filesystem
//!   after the claim was resized.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use e2e::kubelet::{Kubelet, Presentation};
use e2e::local::{LocalCluster, LocalClusterOptions, LocalState};

#[derive(Parser, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run the control plane with its state (kubeconfig, peer secret) in this directory.
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register a node's CSI node plugin (CSINode entry, Node topology labels), as the
    /// kubelet does when the plugin starts.
    Register {
        /// State directory of the running local cluster.
        #[arg(long, env = "BLOCKVOL_LOCAL_DIR", default_value = ".local-cluster")]
        state_dir: PathBuf,
        /// Node whose plugin to register.
        #[arg(long)]
        node: String,
    },
    /// Attach, stage and publish a claim's volume on a node; prints the target path.
    Mount {
        #[command(flatten)]
        target: Target,
        /// Filesystem to make or expect (ext4 or xfs); default: the PV's, else ext4.
        #[arg(long)]
        fs_type: Option<String>,
    },
    /// Unpublish, unstage and detach a claim's volume (or every blockvol volume).
    Unmount {
        #[command(flatten)]
        target: Target,
        /// Every volume attached to a local node through the blockvol driver.
        #[arg(long, conflicts_with_all = ["pvc", "node"])]
        all: bool,
    },
    /// Grow a published volume's filesystem after its claim was resized.
    Expand {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
struct Target {
    /// State directory of the running local cluster.
    #[arg(long, env = "BLOCKVOL_LOCAL_DIR", default_value = ".local-cluster")]
    state_dir: PathBuf,
    /// Name of the PersistentVolumeClaim.
    #[arg(long)]
    pvc: Option<String>,
    /// Namespace of the claim.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Node to act on (node-1, node-2, ...).
    #[arg(long)]
    node: Option<String>,
}

impl Target {
    /// The claim and node; clap guarantees both unless `--all` was given.
    fn claim_and_node(&self) -> anyhow::Result<(&str, &str)> {
        match (self.pvc.as_deref(), self.node.as_deref()) {
            (Some(pvc), Some(node)) => Ok((pvc, node)),
            _ => anyhow::bail!("--pvc NAME and --node NODE are required"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match (cli.command, cli.state_dir) {
        (None, Some(state_dir)) => run(state_dir).await,
        (None, None) => anyhow::bail!("usage: blockvol-local STATE_DIR | mount | unmount | expand"),
        (Some(command), _) => kubelet_command(command).await,
    }
}

async fn kubelet_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Register { state_dir, node } => {
            LocalState::new(&state_dir)
                .kubelet(&node)
                .await?
                .register()
                .await?;
            eprintln!("the CSI node plugin of {node} is registered");
        }
        Command::Mount { target, fs_type } => {
            let (pvc, node) = target.claim_and_node()?;
            let kubelet = LocalState::new(&target.state_dir).kubelet(node).await?;
            let mounted = kubelet
                .mount(&target.namespace, pvc, fs_type.as_deref())
                .await?;
            let what = match &mounted.presentation {
                Presentation::Filesystem(fs) => format!("{fs} filesystem"),
                Presentation::Block => "block device".to_string(),
            };
            eprintln!(
                "{}/{pvc} (PV {}) is published on {node} as a {what} at:",
                target.namespace, mounted.pv
            );
            println!("{}", mounted.target_path.display());
        }
        Command::Unmount { target, all: false } => {
            let (pvc, node) = target.claim_and_node()?;
            let kubelet = LocalState::new(&target.state_dir).kubelet(node).await?;
            kubelet.unmount(&target.namespace, pvc).await?;
            eprintln!(
                "{}/{pvc} is unmounted from {node} and detached",
                target.namespace
            );
        }
        Command::Unmount { target, all: true } => {
            let state = LocalState::new(&target.state_dir);
            for node in state.kubelet_nodes()? {
                let kubelet: Kubelet = state.kubelet(&node).await?;
                for pv in kubelet.attached_pvs().await? {
                    kubelet.unmount_pv(&pv).await?;
                    eprintln!("PV {pv} is unmounted from {node} and detached");
                }
            }
        }
        Command::Expand { target } => {
            let (pvc, node) = target.claim_and_node()?;
            let kubelet = LocalState::new(&target.state_dir).kubelet(node).await?;
            let bytes = kubelet.expand(&target.namespace, pvc).await?;
            eprintln!("{}/{pvc} on {node} is now {bytes} bytes", target.namespace);
        }
    }
    Ok(())
}

async fn run(state_dir: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = LocalCluster::start(LocalClusterOptions::new(&state_dir)).await?;
    let ready = state_dir.join("ready");
    std::fs::write(&ready, format!("{}\n", cluster.kubeconfig().display()))?;
    tracing::info!(
        kubeconfig = %cluster.kubeconfig().display(),
        server = cluster.control_plane().server_url(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "local cluster ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping the local cluster");
    let _ = std::fs::remove_file(&ready);
    drop(cluster);
    Ok(())
}
