//! The node agent daemon: wires registration, the Lease, the replica loop over the
//! engine runtime, the replication data port, the NBD server and the local attach
//! service together. Settings are validated before anything binds or touches the API,
//! so a bad flag fails at start with the flag's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engine::net::{NetConfig, ReceiverServer, Transport};
use kube::Client;
use tokio_stream::wrappers::UnixListenerStream;

use crate::attach::{Attacher, LauncherClient, LocalProxies, ProxyCommand, ProxyHost};
use crate::attach_service::{AttachService, Forwarding};
use crate::frontend::forwarding::{
    Attachments, ForwardSettings, KubeResolver, LocalPath, kube_attachment_lookup,
    watch_attachments,
};
use crate::frontend::metered::{NbdMetrics, VolumeClaims};
use crate::frontend::nbd::{ExportRegistry, NbdServer, ServerConfig};
use crate::k8s::{
    AgentContext, LeaseRenewer, LeaseSettings, NodeHealth, NodeRegistration, ReplicaSettings,
    keep_registered, run_replicas, validate_data_address,
};
use crate::metrics::{AgentMetrics, Readiness};
use crate::replicas::{EngineRuntime, EngineSettings};

/// Name of the NBD server's unix socket inside `--nbd-socket-dir`.
pub const NBD_SOCKET_NAME: &str = "nbd.sock";
/// Name of the forwarding NBD server's unix socket inside `--nbd-socket-dir` (exports of
/// volumes whose primary is on another node).
pub const FORWARD_SOCKET_NAME: &str = "forward.sock";

/// How long the primary waits for the API server when it re-reads a volume's attachment
/// before refusing a forwarding node.
const ATTACHMENT_LOOKUP_TIMEOUT_MS: u64 = 2_000;

/// Command-line settings; the names match the Helm chart's node DaemonSet.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about = "blockvol node agent: runs replicas, serves NBD, attaches block devices"
)]
pub struct Settings {
    /// This node's name (the Kubernetes Node name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Namespace of the node Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "blockvol-system")]
    pub namespace: String,
    /// Directory holding the replicas' volume files.
    #[arg(long, default_value = "/var/lib/blockvol")]
    pub data_dir: PathBuf,
    /// ip:port of the replication data port; peers dial it, so no wildcard or `:port`.
    #[arg(long)]
    pub data_address: String,
    /// ip:port peers are told to dial for the data port (the node's `BlockNode`), when
    /// it differs from `--data-address`: behind NAT, a load balancer or a proxy. Empty:
    /// `--data-address`.
    #[arg(long, default_value = "")]
    pub advertise_data_address: String,
    /// Unix socket of the attach service for the CSI node plugin.
    #[arg(long)]
    pub agent_socket: PathBuf,
    /// File holding the shared secret peers authenticate with.
    #[arg(long)]
    pub peer_secret_file: PathBuf,
    /// How long the node Lease holds without renewal, in seconds.
    #[arg(long = "lease-duration-seconds", default_value_t = 10)]
    pub lease_duration_s: u32,
    /// Address of the metrics and health endpoint (`/metrics`, `/healthz`, `/readyz`);
    /// empty disables it.
    #[arg(long, default_value = "")]
    pub metrics_addr: String,
    /// Kubeconfig file; without it the in-cluster config or $KUBECONFIG is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the NBD server's unix socket (default: <data-dir>/run).
    #[arg(long)]
    pub nbd_socket_dir: Option<PathBuf>,
    /// Optional loopback TCP address for the NBD server (tools, benchmarks).
    #[arg(long)]
    pub nbd_tcp_addr: Option<SocketAddr>,
    /// How often replica status is re-reported, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub status_interval_ms: u64,
    /// How often the BlockNode is re-applied, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub registration_interval_ms: u64,
    /// How long a primary keeps WAL for a lagging replica out of contact before that
    /// replica needs a rebuild, in milliseconds (the retention time budget).
    #[arg(long, default_value_t = engine::replication::PrimaryConfig::default().wal_retention_timeout_ms)]
    pub wal_retention_timeout_ms: u64,
    /// How long a write waits for WAL space without any being freed before it fails with
    /// EIO, in milliseconds. Must exceed the replication barrier timeout, so a stuck
    /// replica is escalated (and its WAL freed) before writers give up.
    #[arg(long, default_value_t = engine::VolumeConfig::default().wal_full_timeout_ms)]
    pub wal_full_timeout_ms: u64,
    /// How often a primary asks a replica that is behind for a barrier without a client
    /// FLUSH, so the WAL it holds is freed, in milliseconds.
    #[arg(long, default_value_t = engine::replication::PrimaryConfig::default().background_barrier_interval_ms)]
    pub background_barrier_interval_ms: u64,
    /// How long a heartbeat answered by every in-sync member lets a primary serve without
    /// a fresh Lease (through an API-server outage), in milliseconds; a promoted replica
    /// waits this long after the last heartbeat it answered before serving. Must exceed
    /// the heartbeat interval (1000 ms) plus a round trip, and should stay below the
    /// Lease duration so an ordinary failover does not wait at all.
    #[arg(long, default_value_t = EngineSettings::default().member_proof_window_ms)]
    pub member_proof_window_ms: u64,
    /// Let attached devices wait for a restarted agent: each device's attach proxy (this
    /// binary's `attach-proxy` subcommand, which serves it) re-dials the NBD socket for
    /// up to 60 s. With false, their I/O fails as soon as the agent is gone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub attach_proxy: bool,
    /// Start attach proxies through the attach launcher listening on this socket
    /// (`blockvol-agent attach-launcher`) instead of as children of the agent. In a
    /// container this is what lets devices outlive the agent's container: its stop ends
    /// every process in it.
    #[arg(long)]
    pub attach_launcher_socket: Option<PathBuf>,
    /// How volumes become block devices: `kernel` (the nbd driver over netlink), `fuse-loop`
    /// (FUSE + loop), or `auto` (the kernel driver where it answers, else fuse-loop).
    #[arg(long, value_enum, default_value_t = crate::attach::AttachMode::Auto)]
    pub attacher: crate::attach::AttachMode,
    /// Bound of the acknowledged-but-unflushed writes a forwarding export keeps for
    /// replay on a new primary, in bytes (reaching it forwards a FLUSH first).
    #[arg(long, default_value_t = 64 << 20)]
    pub forward_replay_bytes_max: u64,
    /// How long forwarded IO waits for a reachable primary during a failover before it
    /// fails with EIO, in milliseconds.
    #[arg(long, default_value_t = 120_000)]
    pub forward_failover_wait_ms: u64,
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--{flag}: {reason}")]
    Setting { flag: &'static str, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes client: {0}")]
    Client(String),
    #[error("data port {address}: {source}")]
    DataPort {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server: {0}")]
    Nbd(#[from] crate::frontend::nbd::Error),
    #[error("attach: {0}")]
    Attach(#[from] crate::attach::Error),
    #[error("attach service: {0}")]
    Grpc(String),
    #[error("metrics endpoint {address}: {source}")]
    Metrics {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Settings {
    /// Checks every flag that can be checked without side effects.
    pub fn validate(&self) -> Result<SocketAddr> {
        let setting = |flag, reason: String| Error::Setting { flag, reason };
        if self.node_name.is_empty() {
            return Err(setting("node-name", "is required".into()));
        }
        let addr = validate_data_address(&self.data_address)
            .map_err(|e| setting("data-address", e.to_string()))?;
        if !self.advertise_data_address.is_empty() {
            validate_data_address(&self.advertise_data_address)
                .map_err(|e| setting("advertise-data-address", e.to_string()))?;
        }
        if self.lease_duration_s < 2 {
            return Err(setting(
                "lease-duration-seconds",
                format!("{} is below the minimum 2", self.lease_duration_s),
            ));
        }
        if self.attach_launcher_socket.is_some() && !self.attach_proxy {
            return Err(setting(
                "attach-launcher-socket",
                "the launcher keeps devices across agent restarts; it contradicts --attach-proxy=false".into(),
            ));
        }
        if self.forward_replay_bytes_max < 1 << 20 {
            return Err(setting(
                "forward-replay-bytes-max",
                format!(
                    "{} is below the minimum 1048576",
                    self.forward_replay_bytes_max
                ),
            ));
        }
        if self.forward_failover_wait_ms < 1_000 {
            return Err(setting(
                "forward-failover-wait-ms",
                format!(
                    "{} is below the minimum 1000",
                    self.forward_failover_wait_ms
                ),
            ));
        }
        if self.wal_retention_timeout_ms == 0 {
            return Err(setting(
                "wal-retention-timeout-ms",
                "0 would drop a lagging replica's WAL at once; give a budget of at least 1".into(),
            ));
        }
        let barrier_timeout_ms = engine::replication::PrimaryConfig::default().barrier_timeout_ms;
        if self.wal_full_timeout_ms <= barrier_timeout_ms {
            return Err(setting(
                "wal-full-timeout-ms",
                format!(
                    "{} must exceed the barrier timeout ({barrier_timeout_ms} ms), or writers fail before a stuck replica is escalated",
                    self.wal_full_timeout_ms
                ),
            ));
        }
        let heartbeat_ms = engine::replication::PrimaryConfig::default().heartbeat_interval_ms;
        if self.member_proof_window_ms <= heartbeat_ms {
            return Err(setting(
                "member-proof-window-ms",
                format!(
                    "{} must exceed the heartbeat interval ({heartbeat_ms} ms), or a healthy primary loses its proof between heartbeats",
                    self.member_proof_window_ms
                ),
            ));
        }
        if self.background_barrier_interval_ms == 0 {
            return Err(setting(
                "background-barrier-interval-ms",
                "0 would send barriers without pause; give at least 1".into(),
            ));
        }
        if let Some(a) = self.nbd_tcp_addr
            && !a.ip().is_loopback()
        {
            return Err(setting(
                "nbd-tcp-addr",
                format!("{a} is not a loopback address; NBD has no authentication"),
            ));
        }
        Ok(addr)
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.nbd_socket_dir().join(NBD_SOCKET_NAME)
    }

    pub fn forward_socket(&self) -> PathBuf {
        self.nbd_socket_dir().join(FORWARD_SOCKET_NAME)
    }

    fn nbd_socket_dir(&self) -> PathBuf {
        self.nbd_socket_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("run"))
    }
}

/// Reads the peer secret: the file's bytes without a trailing newline; empty is refused.
pub fn read_peer_secret(path: &Path) -> Result<Vec<u8>> {
    let mut s = std::fs::read(path).map_err(|source| Error::Io {
        what: "reading peer secret",
        path: path.to_path_buf(),
        source,
    })?;
    while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        s.pop();
    }
    if s.is_empty() {
        return Err(Error::Setting {
            flag: "peer-secret-file",
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(s)
}

async fn client(settings: &Settings) -> Result<Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Client(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::Client(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Client(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}

/// Topology labels copied from the Kubernetes Node (zone, region, hostname); the
/// hostname defaults to the node name so placement can spread without a Node object.
async fn topology(client: &Client, node_name: &str) -> BTreeMap<String, String> {
    const COPIED: [&str; 3] = [
        "topology.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "kubernetes.io/hostname",
    ];
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let labels = match nodes.get_opt(node_name).await {
        Ok(Some(n)) => n.metadata.labels.unwrap_or_default(),
        Ok(None) => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(node = %node_name, error = %e, "reading the Node's topology labels");
            BTreeMap::new()
        }
    };
    let mut out: BTreeMap<String, String> = labels
        .into_iter()
        .filter(|(k, _)| COPIED.contains(&k.as_str()))
        .collect();
    out.entry("kubernetes.io/hostname".into())
        .or_insert_with(|| node_name.to_string());
    out.insert(api::TOPOLOGY_NODE_KEY.into(), node_name.to_string());
    out
}

fn create_dir(what: &'static str, path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn bind_unix(path: &Path) -> Result<UnixListenerStream> {
    if let Some(parent) = path.parent() {
        create_dir("creating the agent socket directory", parent)?;
    }
    // A socket left by an earlier run would make bind fail.
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| Error::Io {
        what: "binding the agent socket",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(UnixListenerStream::new(l))
}

/// Applies the `BlockNode` until it succeeds once (readiness waits for that), retrying
/// every `interval_ms`.
async fn register_once(
    registration: &NodeRegistration,
    client: &Client,
    health: &impl Fn() -> NodeHealth,
    interval_ms: u64,
) {
    loop {
        match registration.apply(client, health()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(node = %registration.node_name, error = %e, "BlockNode registration failed")
            }
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

/// Handles of a started agent; dropping it stops every task (like a crash: the
/// Lease is not released and the data stays).
pub struct Agent {
    pub runtime: Arc<EngineRuntime>,
    pub data_address: SocketAddr,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub forward_socket: PathBuf,
    nbd: NbdServer,
    forward_nbd: NbdServer,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.nbd.shutdown();
        self.forward_nbd.shutdown();
    }
}

impl Agent {
    /// Starts every part of the agent and returns once all listeners are bound. The
    /// steps run in this order: settings, secret, data directory and API client; the
    /// data port; the NBD sockets; the engine runtime behind the node Lease's fence;
    /// the attachment fence of forwarded IO; the telemetry endpoint; the attach
    /// service; then the loops (Lease, lapse confirmation, registration, replicas).
    pub async fn start(settings: Settings) -> Result<Agent> {
        let data_address = settings.validate()?;
        let secret = read_peer_secret(&settings.peer_secret_file)?;
        let data_dir = data_dir(&settings)?;
        let client = client(&settings).await?;

        let net = NetConfig::new(&settings.node_name, &secret);
        let receiver = Arc::new(
            ReceiverServer::bind(data_address, net.clone())
                .await
                .map_err(|source| Error::DataPort {
                    address: data_address,
                    source,
                })?,
        );
        let transport = Transport::new(net.clone());
        let frontends = Frontends::bind(&settings).await?;

        let lease = node_lease(&settings, &client);
        let nbd_metrics = NbdMetrics::default();
        let claims = nbd_metrics.claims().clone();
        let runtime = engine_runtime(
            &settings,
            receiver.clone(),
            transport,
            frontends.exports.clone(),
            &lease,
            &nbd_metrics,
        );
        let readiness = Arc::new(Readiness::default());
        readiness.set_data_port(receiver.local_addr());
        receiver.set_forward_handler(Arc::new(runtime.local_primaries()));

        let mut tasks = vec![fence_forwarded_io(&client, &runtime)];
        let mut metrics_addr = None;
        if !settings.metrics_addr.is_empty() {
            let metrics = AgentMetrics::new(
                nbd_metrics.clone(),
                runtime.clone(),
                lease.clone(),
                readiness.clone(),
                data_dir.clone(),
            );
            let (addr, task) = serve_metrics(&settings.metrics_addr, metrics).await?;
            metrics_addr = Some(addr);
            tasks.push(task);
        }
        let Frontends {
            exports,
            nbd,
            nbd_socket,
            nbd_tcp,
            forward_exports,
            forward_nbd,
            forward_socket,
        } = frontends;
        let forwarding = Forwarding {
            exports: forward_exports,
            nbd_socket: forward_socket.clone(),
            net,
            settings: ForwardSettings {
                replay_bytes_max: settings.forward_replay_bytes_max,
                failover_wait_ms: settings.forward_failover_wait_ms,
                ..ForwardSettings::default()
            },
            resolver: Arc::new(KubeResolver::new(client.clone())),
            remove_wait_ms: EngineSettings::default().export_remove_wait_ms,
            local: Some(LocalPath {
                node: settings.node_name.clone(),
                primaries: Arc::new(runtime.local_primaries()),
            }),
            metrics: Some(nbd_metrics),
        };
        tasks.extend(serve_attach(
            &settings,
            &client,
            &data_dir,
            &runtime,
            exports,
            nbd_socket.clone(),
            forwarding,
        )?);

        tasks.extend(keep_lease(&client, &settings.node_name, &lease, &runtime));
        let registration = NodeRegistration {
            node_name: settings.node_name.clone(),
            data_address: if settings.advertise_data_address.is_empty() {
                data_address.to_string()
            } else {
                settings.advertise_data_address.clone()
            },
            data_dir: data_dir.clone(),
            topology: topology(&client, &settings.node_name).await,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tasks.extend(run_kubernetes_side(
            &settings,
            client,
            runtime.clone(),
            registration,
            lease.clone(),
            readiness,
            claims,
        ));
        tracing::info!(node = %settings.node_name, data_address = %data_address, nbd_socket = %nbd_socket.display(), "agent started");
        Ok(Agent {
            runtime,
            data_address,
            nbd_socket,
            nbd_tcp,
            metrics_addr,
            forward_socket,
            nbd,
            forward_nbd,
            tasks,
        })
    }

    /// Stops serving: replicas closed (exports removed, drivers stopped), tasks ended.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.runtime.close_all().await;
    }
}

/// Creates the data directory and resolves it, so every path under it is absolute.
fn data_dir(settings: &Settings) -> Result<PathBuf> {
    create_dir("creating the data directory", &settings.data_dir)?;
    std::fs::canonicalize(&settings.data_dir).map_err(|source| Error::Io {
        what: "resolving the data directory",
        path: settings.data_dir.clone(),
        source,
    })
}

/// The two NBD servers: the replicas' own exports, and the forwarding exports every
/// attached device goes through.
struct Frontends {
    exports: ExportRegistry,
    nbd: NbdServer,
    nbd_socket: PathBuf,
    nbd_tcp: Option<SocketAddr>,
    forward_exports: ExportRegistry,
    forward_nbd: NbdServer,
    forward_socket: PathBuf,
}

impl Frontends {
    async fn bind(settings: &Settings) -> Result<Frontends> {
        let exports = ExportRegistry::new();
        let nbd = NbdServer::new(exports.clone(), ServerConfig::default())?;
        let nbd_socket = settings.nbd_socket();
        if let Some(dir) = nbd_socket.parent() {
            create_dir("creating the NBD socket directory", dir)?;
        }
        nbd.listen_unix(&nbd_socket).await?;
        let nbd_tcp = match settings.nbd_tcp_addr {
            Some(a) => Some(nbd.listen_tcp(a).await?),
            None => None,
        };
        let forward_exports = ExportRegistry::new();
        let forward_nbd = NbdServer::new(forward_exports.clone(), ServerConfig::default())?;
        let forward_socket = settings.forward_socket();
        forward_nbd.listen_unix(&forward_socket).await?;
        Ok(Frontends {
            exports,
            nbd,
            nbd_socket,
            nbd_tcp,
            forward_exports,
            forward_nbd,
            forward_socket,
        })
    }
}

/// The node Lease's renewer, renewing four times per duration (at least every 250 ms).
fn node_lease(settings: &Settings, client: &Client) -> Arc<LeaseRenewer> {
    Arc::new(LeaseRenewer::new(
        client.clone(),
        LeaseSettings {
            lease_duration_s: settings.lease_duration_s,
            renew_interval_ms: (u64::from(settings.lease_duration_s) * 1000 / 4).max(250),
            ..LeaseSettings::new(settings.namespace.clone(), settings.node_name.clone())
        },
    ))
}

/// The engine runtime, its IO fenced while the node Lease is not fresh.
fn engine_runtime(
    settings: &Settings,
    receiver: Arc<ReceiverServer>,
    transport: Arc<Transport>,
    exports: ExportRegistry,
    lease: &Arc<LeaseRenewer>,
    nbd_metrics: &NbdMetrics,
) -> Arc<EngineRuntime> {
    let fence = {
        let lease = lease.clone();
        Arc::new(move || lease.is_fresh())
    };
    let mut engine_settings = EngineSettings::default();
    engine_settings.primary.wal_retention_timeout_ms = settings.wal_retention_timeout_ms;
    engine_settings.primary.background_barrier_interval_ms =
        settings.background_barrier_interval_ms;
    engine_settings.volume.wal_full_timeout_ms = settings.wal_full_timeout_ms;
    engine_settings.member_proof_window_ms = settings.member_proof_window_ms;
    Arc::new(
        EngineRuntime::new(engine_settings, receiver, transport, exports, fence)
            .with_nbd_metrics(nbd_metrics.clone()),
    )
}

/// Forwarded IO is accepted only from the node a volume is attached to: the view
/// follows the BlockVolumes' attachment annotations and re-reads a volume from the API
/// server before refusing a node. Returns the watch's task.
fn fence_forwarded_io(
    client: &Client,
    runtime: &Arc<EngineRuntime>,
) -> tokio::task::JoinHandle<()> {
    let attachments = Arc::new(Attachments::new(kube_attachment_lookup(
        client.clone(),
        tokio::runtime::Handle::current(),
        ATTACHMENT_LOOKUP_TIMEOUT_MS,
    )));
    runtime
        .local_primaries()
        .fence_by_attachment(attachments.clone());
    tokio::spawn(watch_attachments(client.clone(), attachments))
}

/// Binds the telemetry endpoint at `address` and serves `metrics` there.
async fn serve_metrics(
    address: &str,
    metrics: AgentMetrics,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let bind_err = |source| Error::Metrics {
        address: address.to_string(),
        source,
    };
    let l = tokio::net::TcpListener::bind(address)
        .await
        .map_err(bind_err)?;
    let addr = l.local_addr().map_err(bind_err)?;
    Ok((
        addr,
        tokio::spawn(telemetry::http::serve(l, Arc::new(metrics))),
    ))
}

/// Opens the attacher and serves the local attach service on the agent socket;
/// devices attached before a restart get their exports and sockets back. Returns the
/// tasks.
fn serve_attach(
    settings: &Settings,
    client: &Client,
    data_dir: &Path,
    runtime: &Arc<EngineRuntime>,
    exports: ExportRegistry,
    nbd_socket: PathBuf,
    forwarding: Forwarding,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let proxies: Arc<dyn ProxyHost> = match &settings.attach_launcher_socket {
        Some(socket) => Arc::new(LauncherClient::new(socket)),
        None => {
            let mut proxy = ProxyCommand::current_exe().map_err(|source| Error::Io {
                what: "locating the agent binary for the attach proxy",
                path: PathBuf::from("/proc/self/exe"),
                source,
            })?;
            if !settings.attach_proxy {
                proxy.args.push("--reconnect-timeout-ms=0".into());
            }
            Arc::new(LocalProxies::new(proxy))
        }
    };
    let opened = crate::attach::open_attacher(settings.attacher, data_dir, proxies)?;
    let attacher: Arc<dyn Attacher> = opened.attacher;
    let local = {
        let runtime = runtime.clone();
        Arc::new(move |volume: &str| runtime.local_role(volume).is_some())
    };
    let service = AttachService::new(exports, nbd_socket, attacher, local)
        .with_forwarding(forwarding)
        .with_member_sizes(
            Arc::new(crate::attach_service::KubeMemberSizes::new(client.clone())),
            crate::attach_service::EXPAND_WAIT_DEFAULT,
        );
    let service = Arc::new(service);
    let mut tasks = Vec::new();
    {
        // Devices attached before a restart are kept by their attach proxies, which
        // re-dial the forwarding socket: give them their exports back.
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let restored = service.restore_forwarding().await;
            tracing::info!(restored, "forwarding exports of attached devices restored");
        }));
    }
    if let Some(kernel) = opened.kernel {
        // Kernel nbd devices outlive the agent with dead sockets: give them new ones.
        tasks.push(tokio::task::spawn_blocking(move || {
            kernel.reconnect_all();
        }));
    }
    let incoming = bind_unix(&settings.agent_socket)?;
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(
                blockvol_proto::agent::node_agent_server::NodeAgentServer::from_arc(service),
            )
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "attach service stopped");
        }
    }));
    Ok(tasks)
}

/// Renews the node Lease and re-opens the IO fence after each lapse once the
/// assignments are confirmed. Returns the tasks.
fn keep_lease(
    client: &Client,
    node_name: &str,
    lease: &Arc<LeaseRenewer>,
    runtime: &Arc<EngineRuntime>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let renew = {
        let lease = lease.clone();
        tokio::spawn(async move { lease.run().await })
    };
    let confirm = tokio::spawn(confirm_after_lapses(
        client.clone(),
        node_name.to_string(),
        lease.clone(),
        runtime.clone(),
    ));
    [renew, confirm]
}

/// Registers the `BlockNode` (readiness waits for the first time) and keeps it
/// registered, and drives the replicas from their `BlockReplica`s. Returns the tasks.
fn run_kubernetes_side(
    settings: &Settings,
    client: Client,
    runtime: Arc<EngineRuntime>,
    registration: NodeRegistration,
    lease: Arc<LeaseRenewer>,
    readiness: Arc<Readiness>,
    claims: VolumeClaims,
) -> [tokio::task::JoinHandle<()>; 2] {
    let ctx = Arc::new(
        AgentContext::new(
            client.clone(),
            ReplicaSettings {
                node_name: settings.node_name.clone(),
                data_dir: registration.data_dir.clone(),
                status_interval_ms: settings.status_interval_ms,
                error_retry_ms: 1_000,
            },
            runtime,
        )
        .with_claims(claims),
    );
    let register = {
        let ctx = ctx.clone();
        let interval = settings.registration_interval_ms;
        let health = move || NodeHealth {
            promised_bytes: ctx.promised_bytes(),
            replicas: ctx.replica_count(),
            lease_renewing: lease.is_fresh(),
        };
        tokio::spawn(async move {
            register_once(&registration, &client, &health, interval).await;
            readiness.set_registered();
            keep_registered(registration, client, health, interval).await
        })
    };
    let replicas = tokio::spawn(async move { run_replicas(ctx, std::future::pending()).await });
    [register, replicas]
}

/// Keeps the Lease fence shut after each lapse until this node's `BlockReplica`s have
/// been read afresh from the API server (a LIST, not the watch cache, which may lag) and
/// every local primary they no longer name at its epoch is fenced. Retries every
/// `LAPSE_CONFIRM_RETRY_MS` while the API server does not answer.
async fn confirm_after_lapses(
    client: kube::Client,
    node: String,
    lease: Arc<LeaseRenewer>,
    runtime: Arc<EngineRuntime>,
) {
    const LAPSE_CONFIRM_RETRY_MS: u64 = 500;
    let api: kube::Api<api::BlockReplica> = kube::Api::all(client);
    let selector = format!("{}={}", api::LABEL_NODE, node);
    let mut renewed = lease.last_renewed();
    loop {
        if let Some(lapse) = lease.unconfirmed_lapse() {
            match api
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
            {
                Ok(list) => {
                    let assigned = list
                        .items
                        .iter()
                        .filter(|r| r.metadata.deletion_timestamp.is_none())
                        .map(|r| (r.spec.replica_id.clone(), (r.spec.role, r.spec.epoch)))
                        .collect();
                    let fenced = runtime.fence_unassigned_primaries(&assigned).await;
                    lease.confirm(lapse);
                    tracing::info!(
                        lapse,
                        fenced,
                        "assignments re-read after a lease lapse; IO fence open"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-reading this node's assignments after a lease lapse failed; IO stays fenced");
                    tokio::time::sleep(Duration::from_millis(LAPSE_CONFIRM_RETRY_MS)).await;
                    continue;
                }
            }
        }
        if renewed.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(settings: Settings) -> Result<()> {
    let agent = Agent::start(settings).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Setting {
            flag: "signal",
            reason: e.to_string(),
        })?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> std::result::Result<Settings, clap::Error> {
        let mut args = vec![
            "blockvol-agent",
            "--node-name=n1",
            "--agent-socket=/run/a.sock",
            "--peer-secret-file=/etc/s",
        ];
        args.extend_from_slice(extra);
        Settings::try_parse_from(args)
    }

    #[test]
    fn chart_flags_parse_and_data_address_must_be_dialable() {
        let s = parse(&[
            "--namespace=ns",
            "--data-dir=/var/lib/blockvol",
            "--data-address=10.0.0.5:7400",
            "--lease-duration-seconds=15",
            "--metrics-addr=0.0.0.0:9464",
        ])
        .expect("chart flags parse");
        assert_eq!(s.validate().unwrap().to_string(), "10.0.0.5:7400");
        assert_eq!(s.lease_duration_s, 15);
        assert_eq!(
            s.nbd_socket(),
            PathBuf::from("/var/lib/blockvol/run/nbd.sock")
        );
        for bad in ["0.0.0.0:7400", ":7400", "[::]:7400", "node1:7400"] {
            let s = parse(&[&format!("--data-address={bad}")]).unwrap();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.starts_with("--data-address"), "{bad}: {e}");
        }
        // Each refused flag, with what its error must say.
        for (flag, says) in [
            ("--nbd-tcp-addr=0.0.0.0:10809", "loopback"),
            ("--wal-retention-timeout-ms=0", "--wal-retention-timeout-ms"),
            ("--wal-full-timeout-ms=5000", "--wal-full-timeout-ms"),
            (
                "--background-barrier-interval-ms=0",
                "--background-barrier-interval-ms",
            ),
            ("--advertise-data-address=:7400", "--advertise-data-address"),
        ] {
            let s = parse(&["--data-address=10.0.0.5:7400", flag]).unwrap();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{flag}: {e}");
            if says.starts_with("--") {
                assert!(e.starts_with(says), "{flag}: {e}");
            }
        }
        let s = parse(&[
            "--data-address=10.0.0.5:7400",
            "--advertise-data-address=192.0.2.7:17400",
        ])
        .unwrap();
        assert_eq!(s.validate().unwrap().to_string(), "10.0.0.5:7400");
        assert!(parse(&[]).is_err(), "--data-address is required");
    }

    #[test]
    fn peer_secret_trailing_newline_is_stripped_and_empty_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(read_peer_secret(&p).unwrap(), b"abc");
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_peer_secret(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(read_peer_secret(&d.path().join("missing")).is_err());
    }
}
