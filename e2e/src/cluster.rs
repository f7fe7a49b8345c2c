//! blockvol's own daemons as processes for scenario tests: node agents (one per simulated
//! node, each with its own data directory, data port, NBD socket and attach socket) and
//! operators, started against a [`ControlPlane`]. They can be killed (SIGKILL, like a
//! crash), stopped (SIGTERM) and restarted with the same directories and ports. Dropping
//! a handle kills its process group and reaps it, so nothing outlives the test; when the
//! test is panicking, the tail of each log is printed.
//!
//! The binaries are the workspace's own (`blockvol-agent`, `blockvol-operator`), found in
//! the cargo target directory of the running test (`cargo test --workspace` builds them
//! before any test runs) unless a path is given.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api::{BlockReplica, BlockVolume};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

use crate::error::{Error, Result};
use crate::process::LOG_TAIL_LINES;
use crate::{ControlPlane, ControlPlaneOptions};

/// Namespace of the agents' and the operator's Leases.
pub const NAMESPACE: &str = "blockvol-system";
/// Name of the agent's NBD unix socket inside its socket directory.
pub const NBD_SOCKET_NAME: &str = "nbd.sock";
/// How often [`wait_for`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Where a workspace binary is: next to the running test's `deps/` directory.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the test binary", e))?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::BinaryMissing { path })
    }
}

/// A free TCP port on 127.0.0.1 (another process may take it before it is bound; the
/// daemons fail loudly at start when that happens).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, or fails after `timeout`
/// with an error naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                waited_ms: timeout.as_millis() as u64,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A restartable daemon: the command line is kept so a restart reuses every path/port.
struct Restartable {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Restartable {
    fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating {}", self.log.display()), e))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", self.program.display()), e))?;
        tracing::debug!(name = %self.name, pid = child.id(), "process started");
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (reaps it if it has exited).
    fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Sends `signal` to the process only (not its group: a test may want the
    /// processes it spawned, such as nbdfuse, to outlive it) and reaps it.
    fn signal_and_reap(&mut self, signal: libc::c_int) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet; no memory is
            // touched.
            unsafe {
                libc::kill(c.id() as libc::pid_t, signal);
            }
            let _ = c.wait();
        }
    }

    /// Kills the whole process group (whatever the daemon left in it) and reaps.
    fn kill_group(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with a negative pid signals the process group created for
            // this child (`process_group(0)`); no memory is touched.
            unsafe {
                libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.kill_group();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log {} (last lines) ----\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Settings of one node agent process.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub lease_duration_s: u32,
    pub status_interval_ms: u64,
    pub registration_interval_ms: u64,
    /// Serve NBD on a loopback TCP port as well as the unix socket.
    pub nbd_tcp: bool,
    /// Serve metrics on a loopback port.
    pub metrics: bool,
    /// Further command-line arguments.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` of the process.
    pub log_filter: String,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            lease_duration_s: 3,
            status_interval_ms: 300,
            registration_interval_ms: 1_000,
            nbd_tcp: false,
            metrics: false,
            extra_args: Vec::new(),
            log_filter: "info,node_agent=debug".into(),
        }
    }
}

/// One `blockvol-agent` process playing the node `node`.
pub struct AgentProcess {
    pub node: String,
    /// Root of this agent's files: `data/`, `run/`, `agent.sock`, `agent.log`.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub data_address: SocketAddr,
    pub agent_socket: PathBuf,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
    pub metrics_address: Option<SocketAddr>,
    process: Restartable,
}

impl AgentProcess {
    /// Starts an agent for `node` under `root/<node>`.
    pub fn spawn(
        binary: &Path,
        node: &str,
        root: &Path,
        kubeconfig: &Path,
        peer_secret_file: &Path,
        opts: &AgentOptions,
    ) -> Result<AgentProcess> {
        let dir = root.join(node);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let data_dir = dir.join("data");
        let run_dir = dir.join("run");
        let agent_socket = dir.join("agent.sock");
        let data_address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let nbd_tcp: Option<SocketAddr> =
            opts.nbd_tcp.then(|| ([127, 0, 0, 1], free_port()).into());
        let metrics_address: Option<SocketAddr> =
            opts.metrics.then(|| ([127, 0, 0, 1], free_port()).into());
        let mut args = vec![
            format!("--node-name={node}"),
            format!("--namespace={NAMESPACE}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--data-address={data_address}"),
            format!("--agent-socket={}", agent_socket.display()),
            format!("--peer-secret-file={}", peer_secret_file.display()),
            format!("--lease-duration-seconds={}", opts.lease_duration_s),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--nbd-socket-dir={}", run_dir.display()),
            format!("--status-interval-ms={}", opts.status_interval_ms),
            format!(
                "--registration-interval-ms={}",
                opts.registration_interval_ms
            ),
        ];
        if let Some(a) = nbd_tcp {
            args.push(format!("--nbd-tcp-addr={a}"));
        }
        if let Some(a) = metrics_address {
            args.push(format!("--metrics-addr={a}"));
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut process = Restartable {
            name: format!("agent {node}"),
            program: binary.to_path_buf(),
            args,
            env: vec![("RUST_LOG".into(), opts.log_filter.clone())],
            log: dir.join("agent.log"),
            child: None,
        };
        process.start()?;
        Ok(AgentProcess {
            node: node.to_string(),
            dir,
            data_dir,
            data_address,
            agent_socket,
            nbd_socket: run_dir.join(NBD_SOCKET_NAME),
            nbd_tcp,
            metrics_address,
            process,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL, like a crash of the agent (processes it spawned are left alone).
    pub fn kill(&mut self) {
        self.process.signal_and_reap(libc::SIGKILL);
    }

    /// SIGTERM and wait for the agent to exit.
    pub fn terminate(&mut self) {
        self.process.signal_and_reap(libc::SIGTERM);
    }

    /// Starts the agent again with the same directories and ports (no-op if running).
    pub fn restart(&mut self) -> Result<()> {
        self.process.start()
    }

    /// The NBD URI of `volume` on this agent's unix socket.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.nbd_socket.display())
    }

    /// The NBD URI of `volume`'s forwarding export (the one attached devices use), on
    /// the agent's forwarding socket next to its NBD socket.
    pub fn forward_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.nbd_socket.with_file_name("forward.sock").display()
        )
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// Settings of one operator process.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    pub lease_duration_s: u32,
    pub renew_interval_ms: u64,
    pub resync_interval_ms: u64,
    pub replica_failure_grace_ms: u64,
    pub node_gone_grace_ms: u64,
    pub extra_args: Vec<String>,
    pub log_filter: String,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        OperatorOptions {
            lease_duration_s: 3,
            renew_interval_ms: 500,
            resync_interval_ms: 1_000,
            replica_failure_grace_ms: 600_000,
            node_gone_grace_ms: 600_000,
            extra_args: Vec::new(),
            log_filter: "info,operator=debug".into(),
        }
    }
}

/// One `blockvol-operator` process with identity `identity`.
pub struct OperatorProcess {
    pub identity: String,
    pub metrics_address: SocketAddr,
    process: Restartable,
}

impl OperatorProcess {
    pub fn spawn(
        binary: &Path,
        identity: &str,
        root: &Path,
        kubeconfig: &Path,
        opts: &OperatorOptions,
    ) -> Result<OperatorProcess> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        let metrics_address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut args = vec![
            format!("--namespace={NAMESPACE}"),
            format!("--identity={identity}"),
            format!("--lease-duration-s={}", opts.lease_duration_s),
            format!("--renew-interval-ms={}", opts.renew_interval_ms),
            format!("--metrics-addr={metrics_address}"),
            format!("--resync-interval-ms={}", opts.resync_interval_ms),
            format!(
                "--replica-failure-grace-ms={}",
                opts.replica_failure_grace_ms
            ),
            format!("--node-gone-grace-ms={}", opts.node_gone_grace_ms),
        ];
        args.extend(opts.extra_args.iter().cloned());
        let mut process = Restartable {
            name: format!("operator {identity}"),
            program: binary.to_path_buf(),
            args,
            env: vec![
                ("RUST_LOG".into(), opts.log_filter.clone()),
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ],
            log: root.join(format!("operator-{identity}.log")),
            child: None,
        };
        process.start()?;
        Ok(OperatorProcess {
            identity: identity.to_string(),
            metrics_address,
            process,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        self.process.signal_and_reap(libc::SIGKILL);
    }

    /// Starts it again with the same identity and settings (no-op if running).
    pub fn restart(&mut self) -> Result<()> {
        self.process.start()
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// Settings of a [`TestCluster`].
#[derive(Clone, Debug)]
pub struct TestClusterOptions {
    /// Node names; one agent process each, started in this order.
    pub nodes: Vec<String>,
    pub agent: AgentOptions,
    /// How many operator processes to start (0: the test runs its own operator).
    pub operators: usize,
    pub operator: OperatorOptions,
    /// Also run kube-controller-manager (needed for PVCs, VolumeAttachments, GC).
    pub controller_manager: bool,
}

impl TestClusterOptions {
    /// `n` nodes named node-1..node-n, one operator.
    pub fn nodes(n: usize) -> Self {
        TestClusterOptions {
            nodes: (1..=n).map(|i| format!("node-{i}")).collect(),
            agent: AgentOptions::default(),
            operators: 1,
            operator: OperatorOptions::default(),
            controller_manager: false,
        }
    }
}

/// A control plane with the CRDs, the `blockvol-system` namespace, a Node object and an
/// agent process per node, and operator processes. Fields are public so a test can
/// kill, restart or add processes; everything stops when it is dropped (processes
/// before the control plane: fields drop in declaration order).
pub struct TestCluster {
    pub agents: Vec<AgentProcess>,
    pub operators: Vec<OperatorProcess>,
    pub client: Client,
    pub peer_secret_file: PathBuf,
    pub agent_binary: PathBuf,
    pub operator_binary: PathBuf,
    pub options: TestClusterOptions,
    pub control_plane: ControlPlane,
    /// Scratch directory of the processes; removed last.
    pub root: tempfile::TempDir,
}

impl TestCluster {
    /// Starts everything and returns once every agent has registered its BlockNode.
    pub async fn start(options: TestClusterOptions) -> Result<TestCluster> {
        let agent_binary = workspace_binary("blockvol-agent")?;
        let operator_binary = workspace_binary("blockvol-operator")?;
        let root = tempfile::Builder::new()
            .prefix("blockvol-cluster-")
            .tempdir()
            .map_err(|e| Error::io("creating the cluster directory", e))?;
        let control_plane = ControlPlane::start(ControlPlaneOptions {
            controller_manager: options.controller_manager,
            ..ControlPlaneOptions::default()
        })
        .await?;
        control_plane.apply_crds(&crate::crds_dir()).await?;
        let client = control_plane.client();
        create_namespace(&client).await?;
        for node in &options.nodes {
            let labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), node.clone())]);
            control_plane.create_node(node, &labels).await?;
        }
        let peer_secret_file = root.path().join("peer-secret");
        std::fs::write(
            &peer_secret_file,
            b"blockvol-test-cluster-secret-0123456789",
        )
        .map_err(|e| Error::io("writing the peer secret", e))?;
        let mut cluster = TestCluster {
            agents: Vec::new(),
            operators: Vec::new(),
            client,
            peer_secret_file,
            agent_binary,
            operator_binary,
            options: options.clone(),
            control_plane,
            root,
        };
        for node in &options.nodes {
            cluster.add_agent(node)?;
        }
        for i in 1..=options.operators {
            cluster.add_operator(&format!("operator-{i}"))?;
        }
        cluster.wait_registered(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Starts one more agent process for `node` (its Node object must exist).
    pub fn add_agent(&mut self, node: &str) -> Result<&mut AgentProcess> {
        let agent = AgentProcess::spawn(
            &self.agent_binary,
            node,
            self.root.path(),
            self.control_plane.kubeconfig(),
            &self.peer_secret_file,
            &self.options.agent,
        )?;
        self.agents.push(agent);
        Ok(self.agents.last_mut().expect("just pushed"))
    }

    /// Starts one more operator process.
    pub fn add_operator(&mut self, identity: &str) -> Result<&mut OperatorProcess> {
        let op = OperatorProcess::spawn(
            &self.operator_binary,
            identity,
            self.root.path(),
            self.control_plane.kubeconfig(),
            &self.options.operator,
        )?;
        self.operators.push(op);
        Ok(self.operators.last_mut().expect("just pushed"))
    }

    /// The agent playing `node`.
    pub fn agent(&mut self, node: &str) -> Option<&mut AgentProcess> {
        self.agents.iter_mut().find(|a| a.node == node)
    }

    /// Waits until every agent's BlockNode exists.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<()> {
        let nodes: Api<api::BlockNode> = Api::all(self.client.clone());
        let want: Vec<String> = self.agents.iter().map(|a| a.node.clone()).collect();
        wait_for("every agent to register its BlockNode", timeout, || {
            let nodes = nodes.clone();
            let want = want.clone();
            async move {
                let have = nodes.list(&ListParams::default()).await.ok()?;
                let names: Vec<String> = have
                    .items
                    .iter()
                    .filter_map(|n| n.metadata.name.clone())
                    .collect();
                want.iter().all(|w| names.contains(w)).then_some(())
            }
        })
        .await
    }

    /// The BlockVolume `name`, if it exists.
    pub async fn volume(&self, name: &str) -> Option<BlockVolume> {
        Api::<BlockVolume>::all(self.client.clone())
            .get_opt(name)
            .await
            .ok()
            .flatten()
    }

    /// The BlockReplicas of volume `name`.
    pub async fn replicas(&self, name: &str) -> Vec<BlockReplica> {
        Api::<BlockReplica>::all(self.client.clone())
            .list(&ListParams::default().labels(&format!("{}={name}", api::LABEL_VOLUME)))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }
}

async fn create_namespace(client: &Client) -> Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

impl AgentProcess {
    /// `GET path` on the agent's metrics endpoint (`/metrics`, `/healthz`, `/readyz`):
    /// the HTTP status code and the body. Needs [`AgentOptions::metrics`].
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_address.ok_or_else(|| Error::Timeout {
            what: format!("agent {}: metrics are not enabled", self.node),
            waited_ms: 0,
        })?;
        let context = format!("GET http://{addr}{path}");
        let mut c = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Error::io(context.clone(), e))?;
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| Error::io(context.clone(), e))?;
        let mut out = String::new();
        c.read_to_string(&mut out)
            .await
            .map_err(|e| Error::io(context.clone(), e))?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }
}

impl TestCluster {
    /// Creates the BlockVolume `name` and waits until it is Ready with all `replicas`
    /// in sync.
    pub async fn create_ready_volume(
        &self,
        name: &str,
        size: &str,
        replicas: u8,
        timeout: Duration,
    ) -> Result<BlockVolume> {
        let spec = api::BlockVolumeSpec {
            replicas,
            ..api::BlockVolumeSpec::with_size(size)
        };
        Api::<BlockVolume>::all(self.client.clone())
            .create(&PostParams::default(), &BlockVolume::new(name, spec))
            .await?;
        wait_for(
            &format!("volume {name} Ready with {replicas} in sync"),
            timeout,
            || async {
                self.volume(name).await.filter(|v| {
                    v.status.as_ref().is_some_and(|s| {
                        s.phase == api::VolumePhase::Ready && s.in_sync_count == u32::from(replicas)
                    })
                })
            },
        )
        .await
    }
}
