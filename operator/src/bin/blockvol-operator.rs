//! The blockvol operator binary: parses settings, connects, serves metrics and runs the
//! Lease-elected controller from the library.
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use operator::primary_move::MoveSettings;
use operator::replacement::ReplacementSettings;
use operator::{Context, ControllerSettings, LeaderElector, LeaderSettings, Metrics};
use telemetry::logging::LogFormat;

/// blockvol operator: placement, epochs, in-sync set, failover, rebuild.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Namespace of the leader Lease and of the node agents' Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "blockvol-system")]
    namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "blockvol-operator")]
    leader_lease_name: String,
    /// This operator's identity in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's claim lasts without renewal (the node agent's flag has the
    /// same spelling; `--lease-duration-s` is still accepted, so old arguments keep
    /// working across an upgrade).
    #[arg(
        long = "lease-duration-seconds",
        alias = "lease-duration-s",
        default_value_t = 15
    )]
    lease_duration_s: u32,
    /// Milliseconds between leader Lease renewals.
    #[arg(long, default_value_t = 2_000)]
    renew_interval_ms: u64,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Milliseconds between periodic re-checks of each volume.
    #[arg(long, default_value_t = 30_000)]
    resync_interval_ms: u64,
    /// Volumes reconciled at the same time. When a node dies, every volume whose
    /// primary it held is promoted by a reconcile of its own; each waits on a few API
    /// round trips, so more in flight shortens a mass failover.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// Milliseconds a replica may report NeedsRebuild or Failed before it is replaced.
    #[arg(long, default_value_t = 60_000)]
    replica_failure_grace_ms: u64,
    /// Milliseconds a node agent may be gone before its replicas are replaced.
    #[arg(long, default_value_t = 300_000)]
    node_gone_grace_ms: u64,
    /// Most replicas rebuilding onto one node at once.
    #[arg(long, default_value_t = 2)]
    max_rebuilds_per_node: u32,
    /// Milliseconds a primary whose agent reports it could not take its assignment
    /// (Failed, not acting as primary at the volume's epoch) keeps the role before
    /// another member is promoted.
    #[arg(long, default_value_t = 30_000)]
    primary_failure_grace_ms: u64,
    /// Milliseconds a planned primary move may take before it is abandoned (the
    /// standard promotion rule then picks the primary).
    #[arg(long, default_value_t = 30_000)]
    primary_move_timeout_ms: u64,
    /// Only nodes matching this label selector get replicas (`key=value`, `key!=value`,
    /// `key`, `!key`, comma-separated; matched against the Node's labels). Empty: every
    /// node with an agent. Cordoned nodes never get new replicas either way.
    #[arg(long, default_value = "")]
    storage_node_selector: operator::placement::StorageNodeSelector,
    /// Volumes moving replicas off draining nodes at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    drain_concurrency: u32,
    /// Log as JSON lines (as `BLOCKVOL_LOG_FORMAT=json` does).
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let format = match LogFormat::from_env() {
        _ if args.log_json => LogFormat::Json,
        Ok(f) => f,
        Err(e) => return Err(e.into()),
    };
    telemetry::logging::init(format);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = match args.identity {
        Some(i) => i,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("no --identity and no hostname")?,
    };
    let metrics = Arc::new(Metrics::default());
    let listener = operator::metrics::bind(args.metrics_addr).await?;
    tokio::spawn(telemetry::http::serve(listener, metrics.clone()));
    let settings = ControllerSettings {
        node_lease_namespace: args.namespace.clone(),
        replacement: ReplacementSettings {
            replica_failure_grace_ms: args.replica_failure_grace_ms,
            node_gone_grace_ms: args.node_gone_grace_ms,
            max_rebuilds_per_node: args.max_rebuilds_per_node,
            primary_failure_grace_ms: args.primary_failure_grace_ms,
        },
        moves: MoveSettings {
            primary_move_timeout_ms: args.primary_move_timeout_ms,
        },
        resync_interval_ms: args.resync_interval_ms,
        concurrency: args.reconcile_concurrency,
        storage_node_selector: args.storage_node_selector,
        drain: operator::drain::DrainSettings {
            drain_concurrency: args.drain_concurrency,
        },
        ..Default::default()
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        Some(identity.clone()),
    ));
    let elector = LeaderElector::new(
        kube::Api::namespaced(client, &args.namespace),
        LeaderSettings {
            lease_name: args.leader_lease_name,
            identity,
            lease_duration_s: args.lease_duration_s,
            renew_interval_ms: args.renew_interval_ms,
        },
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    operator::run(ctx, elector, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn lease_duration_takes_the_agents_spelling_and_still_accepts_the_old_one() {
        let new = Args::try_parse_from(["blockvol-operator", "--lease-duration-seconds=9"])
            .expect("new spelling");
        assert_eq!(new.lease_duration_s, 9);
        let old = Args::try_parse_from(["blockvol-operator", "--lease-duration-s=7"])
            .expect("old spelling, as an upgrade from older arguments passes it");
        assert_eq!(old.lease_duration_s, 7);
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--lease-duration-seconds"), "{help}");
        assert!(
            !help.contains("--lease-duration-s "),
            "the old spelling is hidden: {help}"
        );
    }
}
