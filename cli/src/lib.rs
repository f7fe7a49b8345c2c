//! `kubectl blockvol`: a kubectl plugin to see and steer blockvol. `get` joins volumes
//! with their replicas, claims and nodes; `describe volume` tells one volume's story with
//! what to do about each unhealthy condition; `move-primary` asks for (and follows) a
//! planned switchover; `cordon`, `uncordon` and `drain` take a node out of placement
//! for maintenance (see [`maintenance`]); `pv` prints a static PersistentVolume and claim for a
//! `kubectl apply`'d BlockVolume; `dump` writes a support bundle.
//!
//! It only reads, except `move-primary` (one annotation) and `cordon`/`uncordon`/`drain`
//! (the admin's `BlockNode` spec fields) — it never writes replica or status fields, which belong to the operator and the agents. Every error names the
//! object and what to do; every relative path is resolved against the current directory.

pub mod cluster;
pub mod describe;
pub mod dump;
pub mod error;
pub mod format;
pub mod maintenance;
pub mod move_primary;
pub mod progress;
pub mod pv;
pub mod tar;
pub mod views;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use cluster::Cluster;
pub use error::{Error, Result};

/// See and steer blockvol volumes, replicas and nodes.
#[derive(Parser, Debug)]
#[command(name = "kubectl blockvol", version)]
pub struct Cli {
    /// Path of the kubeconfig (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of claims named without one (default: the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Namespace blockvol runs in (the agents' Leases).
    #[arg(
        long,
        global = true,
        env = "BLOCKVOL_NAMESPACE",
        default_value = "blockvol-system"
    )]
    pub blockvol_namespace: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List volumes, replicas or nodes.
    Get {
        kind: Kind,
        /// Output format.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
        /// Only the replicas of this volume (for `get replicas`).
        #[arg(long)]
        volume: Option<String>,
    },
    /// Show one volume's replicas, in-sync set, attachment, conditions and Events.
    Describe {
        /// Only `volume` can be described.
        #[arg(value_parser = ["volume", "volumes", "bv"])]
        kind: String,
        /// A BlockVolume name, a claim in the namespace, or `namespace/claim`.
        name: String,
    },
    /// Move the primary of a volume to another node holding an in-sync replica.
    MovePrimary {
        volume: String,
        /// Target node.
        #[arg(long)]
        to: String,
        /// Follow the move until the primary is there or the move fails.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (ms, s, m, h).
        #[arg(long, default_value = "60s", value_parser = move_primary::parse_timeout)]
        timeout: Duration,
    },
    /// Keep new replicas off a node (storage cordon); replicas already there stay.
    Cordon { node: String },
    /// Let new replicas onto a node again; stops a drain that is still running.
    Uncordon { node: String },
    /// Cordon a node and move every replica off it, one volume at a time: a new replica
    /// elsewhere catches up and joins the in-sync set before the old one is removed; a
    /// primary is moved first.
    Drain {
        node: String,
        /// Follow the drain until no replica is left on the node.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (ms, s, m, h).
        #[arg(long, default_value = "30m", value_parser = move_primary::parse_timeout)]
        timeout: Duration,
    },
    /// Print a static PersistentVolume and a claim bound to it for a BlockVolume.
    Pv {
        volume: String,
        /// Filesystem the volume is formatted with on first use (Filesystem mode).
        #[arg(long = "fs", default_value = "ext4")]
        fs_type: String,
        /// Whether the pod gets a filesystem or the raw block device.
        #[arg(long, value_enum, default_value = "Filesystem")]
        mode: pv::VolumeMode,
        /// Name of the claim (default: the volume's name).
        #[arg(long)]
        claim: Option<String>,
        /// Name of the PersistentVolume (default: the volume's name).
        #[arg(long)]
        pv_name: Option<String>,
    },
    /// Write a support bundle (CRs, Events, Leases, PVs) as a tarball.
    Dump {
        /// Output file (`.tar.gz` or `.tgz` is compressed with gzip, `.tar` is not).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// What `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    #[value(alias = "volume", alias = "bv", alias = "vol")]
    Volumes,
    #[value(alias = "replica", alias = "br")]
    Replicas,
    #[value(alias = "node", alias = "bn")]
    Nodes,
}

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
    Wide,
}

/// A client for the kubeconfig and context the flags name.
pub async fn connect(cli: &Cli) -> Result<Cluster> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config: std::result::Result<Config, String> = match &cli.kubeconfig {
        Some(path) => {
            let path = dump::absolute(path)?;
            let kubeconfig = Kubeconfig::read_from(&path)
                .map_err(|e| Error::Connect(format!("reading {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| e.to_string())
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| e.to_string()),
        None => Config::infer().await.map_err(|e| e.to_string()),
    };
    let config = config.map_err(Error::Connect)?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| Error::Connect(e.to_string()))?;
    Ok(Cluster {
        client,
        blockvol_namespace: cli.blockvol_namespace.clone(),
        namespace,
    })
}

/// Runs one command, printing to `out`.
pub async fn run(cli: &Cli, cluster: &Cluster, out: &mut dyn Write) -> Result<()> {
    match &cli.command {
        Command::Get {
            kind,
            output,
            volume,
        } => {
            let snap = cluster.snapshot().await?;
            let wide = *output == Some(Output::Wide);
            let text = match kind {
                Kind::Volumes => {
                    let rows = views::volume_rows(&snap);
                    render(&rows, *output, || views::volume_table(&rows, wide).render())?
                }
                Kind::Replicas => {
                    if let Some(v) = volume
                        && !snap
                            .volumes
                            .iter()
                            .any(|bv| kube::ResourceExt::name_any(bv) == *v)
                    {
                        return Err(Error::VolumeNotFound { name: v.clone() });
                    }
                    let rows = views::replica_rows(&snap, volume.as_deref());
                    render(&rows, *output, || {
                        views::replica_table(&rows, wide).render()
                    })?
                }
                Kind::Nodes => {
                    let rows = views::node_rows(&snap);
                    render(&rows, *output, || views::node_table(&rows, wide).render())?
                }
            };
            write_all(out, &text)
        }
        Command::Describe { name, .. } => {
            let (volume, claim) = cluster.resolve(name).await?;
            let vname = kube::ResourceExt::name_any(&volume);
            let replicas = cluster.replicas_of(&vname).await?;
            let events = cluster.events_of("BlockVolume", &vname).await?;
            let text = describe::render(&describe::Described {
                volume: &volume,
                claim: &claim,
                replicas: &replicas,
                events: &events,
                now: Timestamp::now(),
            });
            write_all(out, &text)
        }
        Command::MovePrimary {
            volume,
            to,
            wait,
            timeout,
        } => move_primary::run(cluster, volume, to, wait.then_some(*timeout), out).await,
        Command::Cordon { node } => {
            maintenance::run(cluster, node, maintenance::Maintenance::Cordon, None, out).await
        }
        Command::Uncordon { node } => {
            maintenance::run(cluster, node, maintenance::Maintenance::Uncordon, None, out).await
        }
        Command::Drain {
            node,
            wait,
            timeout,
        } => {
            maintenance::run(
                cluster,
                node,
                maintenance::Maintenance::Drain,
                wait.then_some(*timeout),
                out,
            )
            .await
        }
        Command::Pv {
            volume,
            fs_type,
            mode,
            claim,
            pv_name,
        } => {
            let bv = cluster.volume(volume).await?;
            let opts = pv::StaticPv {
                pv_name: pv_name.clone().unwrap_or_else(|| volume.clone()),
                claim_name: claim.clone().unwrap_or_else(|| volume.clone()),
                claim_namespace: cluster.namespace.clone(),
                fs_type: fs_type.clone(),
                mode: *mode,
            };
            let (p, c) = pv::objects(&bv, &opts)?;
            write_all(out, &pv::to_yaml(&p, &c)?)
        }
        Command::Dump { out: file } => {
            let now = Timestamp::now();
            let file = file
                .clone()
                .unwrap_or_else(|| PathBuf::from(dump::default_file_name(now)));
            let file = dump::absolute(&file)?;
            let mut snap = cluster.snapshot().await?;
            snap.now = Some(now);
            let bundle = dump::collect(cluster, &snap).await;
            let n = dump::write(&bundle, &file, now)?;
            for e in &bundle.errors {
                writeln!(out, "warning: {e}").ok();
            }
            write_all(out, &format!("wrote {} ({n} files)\n", file.display()))
        }
    }
}

fn render<T: serde::Serialize>(
    rows: &[T],
    output: Option<Output>,
    table: impl FnOnce() -> String,
) -> Result<String> {
    match output {
        Some(Output::Json) => serde_json::to_string_pretty(rows)
            .map(|s| s + "\n")
            .map_err(|e| Error::Encode {
                what: "the rows",
                message: e.to_string(),
            }),
        Some(Output::Yaml) => serde_norway::to_string(rows).map_err(|e| Error::Encode {
            what: "the rows",
            message: e.to_string(),
        }),
        Some(Output::Wide) | None => Ok(table()),
    }
}

fn write_all(out: &mut dyn Write, text: &str) -> Result<()> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            what: "writing to",
            path: PathBuf::from("stdout"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_as_documented() {
        let cli = Cli::try_parse_from(["kubectl-blockvol", "get", "bv", "-o", "wide"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Get {
                kind: Kind::Volumes,
                output: Some(Output::Wide),
                ..
            }
        ));
        let cli = Cli::try_parse_from([
            "kubectl-blockvol",
            "move-primary",
            "v",
            "--to",
            "node-2",
            "--wait",
            "--timeout",
            "5s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::MovePrimary { wait: true, timeout, .. } if timeout == Duration::from_secs(5)
        ));
        let cli = Cli::try_parse_from([
            "kubectl-blockvol",
            "pv",
            "v",
            "--mode",
            "Block",
            "-n",
            "apps",
        ])
        .unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("apps"));
        let cli = Cli::try_parse_from(["kubectl-blockvol", "drain", "node-2", "--wait"]).unwrap();
        assert!(matches!(
            &cli.command,
            Command::Drain { node, wait: true, timeout } if node == "node-2" && *timeout == Duration::from_secs(1800)
        ));
        let cli = Cli::try_parse_from(["kubectl-blockvol", "cordon", "node-2"]).unwrap();
        assert!(matches!(&cli.command, Command::Cordon { node } if node == "node-2"));
        let cli = Cli::try_parse_from(["kubectl-blockvol", "uncordon", "node-2"]).unwrap();
        assert!(matches!(&cli.command, Command::Uncordon { node } if node == "node-2"));
        assert!(Cli::try_parse_from(["kubectl-blockvol", "drain"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-blockvol", "describe", "node", "x"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-blockvol", "get", "pods"]).is_err());
    }
}
