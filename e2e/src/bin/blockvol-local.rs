//! Runs a local blockvol control plane until SIGINT or SIGTERM (used by `hack/up.sh`).
//! Usage: `blockvol-local STATE_DIR`. Once ready it writes `STATE_DIR/ready` naming the
//! kubeconfig; on a signal it stops every daemon it started and removes `ready`.

use std::path::PathBuf;
use std::time::Instant;

use e2e::local::{LocalCluster, LocalClusterOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args_os().skip(1);
    let state_dir = match (args.next(), args.next()) {
        (Some(dir), None) => PathBuf::from(dir),
        _ => anyhow::bail!("usage: blockvol-local STATE_DIR"),
    };
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
