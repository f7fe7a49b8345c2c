//! blockvol's own daemons as processes for scenario tests: node agents (one per simulated
//! node, each with its own data directory, data port, NBD socket and attach socket),
//! operators, and the CSI driver (controller with the pinned sidecars, a node plugin per
//! node, driven by a [`Kubelet`] player), started against a [`ControlPlane`]. They can be killed (SIGKILL, like a
//! crash), stopped (SIGTERM) and restarted with the same directories and ports. Dropping
//! a handle kills its process group and reaps it, so nothing outlives the test; when the
//! test is panicking, the tail of each log is printed; dropping the cluster first
//! unmounts what is mounted under its directory and detaches its loop devices.
//!
//! The binaries are the workspace's own (`blockvol-agent`, `blockvol-operator`,
//! `blockvol-csi`), found in
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
use crate::kubelet::{Kubelet, KubeletSettings};
use crate::{ControlPlane, ControlPlaneOptions};
use testkit::process::LOG_TAIL_LINES;

/// Namespace of the agents' and the operator's Leases.
pub const NAMESPACE: &str = "blockvol-system";
/// Name of the agent's NBD unix socket inside its socket directory.
pub const NBD_SOCKET_NAME: &str = "nbd.sock";
pub use testkit::POLL_INTERVAL;
use testkit::Wait;
/// How long a CSI process may take to serve its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a workspace binary is: next to the running program (a workspace binary such
/// as `blockvol-bench`), else next to the running test's `deps/` directory.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the test binary", e))?;
    let own_dir = exe.parent();
    if let Some(beside) = own_dir.map(|dir| dir.join(name)).filter(|p| p.is_file()) {
        return Ok(beside);
    }
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = own_dir
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

/// [`testkit::wait_for`] with the harness's error: polls `f` every [`POLL_INTERVAL`]
/// until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    Ok(testkit::wait_for(what, timeout, f).await?)
}

/// A restartable daemon: the command line is kept so a restart reuses every path/port.
/// [`AgentProcess`], [`OperatorProcess`] and [`CsiProcess`] dereference to theirs.
pub struct Restartable {
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, like a crash (processes it spawned, such as attach proxies, are left
    /// alone).
    pub fn kill(&mut self) {
        self.signal_and_reap(libc::SIGKILL);
    }

    /// Starts it again with the same command line: the same identity, directories,
    /// sockets and ports (no-op if running).
    pub fn restart(&mut self) -> Result<()> {
        self.start()
    }

    /// Whether the process is running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
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
    /// processes it spawned, such as attach proxies, to outlive it) and reaps it.
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

    /// The file the process logs to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self) -> String {
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
    /// A client of this agent's attach service (calls may wait two minutes: an attach
    /// waits for the volume's primary).
    pub fn attach_client(&self) -> csi::agent::Agent {
        csi::agent::Agent::new(&csi::agent::AgentSettings {
            socket_path: self.agent_socket.clone(),
            agent_call_timeout_ms: 120_000,
        })
        .expect("agent client")
    }

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

    /// SIGTERM and wait for the agent to exit.
    pub fn terminate(&mut self) {
        self.process.signal_and_reap(libc::SIGTERM);
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
            format!("--lease-duration-seconds={}", opts.lease_duration_s),
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
}

/// Settings of the CSI driver processes of a [`TestCluster`].
#[derive(Clone, Debug)]
pub struct CsiOptions {
    /// Bound on each sidecar's CSI calls, in seconds.
    pub sidecar_timeout_s: u64,
    /// `RUST_LOG` of the blockvol-csi processes.
    pub log_filter: String,
}

impl Default for CsiOptions {
    fn default() -> Self {
        CsiOptions {
            sidecar_timeout_s: 90,
            log_filter: "info,csi=debug".into(),
        }
    }
}

/// One CSI process: the blockvol-csi controller or node plugin, or a sidecar.
pub struct CsiProcess {
    /// `controller`, `node-<node>` or the sidecar's name.
    pub name: String,
    /// The CSI socket it serves (the controller's for a sidecar).
    pub socket: PathBuf,
    /// For a node plugin: the kubelet directory the plugin accepts paths under.
    pub kubelet_dir: Option<PathBuf>,
    process: Restartable,
}

/// Each process handle reaches its daemon's pid, kill, restart and log through
/// [`Restartable`].
macro_rules! restartable_handle {
    ($($t:ty),*) => {$(
        impl std::ops::Deref for $t {
            type Target = Restartable;
            fn deref(&self) -> &Restartable {
                &self.process
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Restartable {
                &mut self.process
            }
        }
    )*};
}

restartable_handle!(AgentProcess, OperatorProcess, CsiProcess);

/// Waits until a unix socket accepts connections (the CSI server is up).
async fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<()> {
    Ok(Wait {
        timeout,
        poll: POLL_INTERVAL,
    }
    .socket(socket)
    .await?)
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
    /// Directory the processes' scratch directory is made in (volume files live there,
    /// so it decides the disk); the system temp dir when `None`.
    pub root_parent: Option<PathBuf>,
    pub csi: CsiOptions,
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
            root_parent: None,
            csi: CsiOptions::default(),
        }
    }
}

/// A control plane with the CRDs, the `blockvol-system` namespace, a Node object and an
/// agent process per node, and operator processes. Fields are public so a test can
/// kill, restart or add processes; everything stops when it is dropped (processes
/// before the control plane: fields drop in declaration order).
pub struct TestCluster {
    /// CSI controller, sidecars and node plugins ([`TestCluster::start_csi`]).
    pub csi: Vec<CsiProcess>,
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
        let mut root = tempfile::Builder::new();
        root.prefix("blockvol-cluster-");
        let root = match &options.root_parent {
            Some(dir) => root.tempdir_in(dir),
            None => root.tempdir(),
        }
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
            csi: Vec::new(),
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

    /// Creates the Node `node`, starts its agent and waits until every agent registered.
    pub async fn add_node(&mut self, node: &str, timeout: Duration) -> Result<()> {
        self.control_plane
            .create_node(node, &BTreeMap::new())
            .await?;
        self.add_agent(node)?;
        self.wait_registered(timeout).await
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

    /// Starts the CSI driver the way the chart deploys it: the blockvol-csi controller
    /// with csi-provisioner, csi-attacher and csi-resizer on its socket, and a node
    /// plugin next to every agent. Needs the controller manager (PVCs bind through it)
    /// and the pinned sidecars (`hack/tools/build.sh`).
    pub async fn start_csi(&mut self) -> Result<()> {
        let csi_binary = workspace_binary("blockvol-csi")?;
        let kubeconfig = self.control_plane.kubeconfig().display().to_string();
        let dir = self.root.path().join("csi-controller");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let socket = dir.join("csi.sock");
        let controller = self.spawn_csi(
            "controller",
            &csi_binary,
            vec![
                "--mode=controller".into(),
                format!("--endpoint=unix://{}", socket.display()),
            ],
            vec![("KUBECONFIG".into(), kubeconfig.clone())],
            &socket,
            None,
        )?;
        self.csi.push(controller);
        wait_for_socket(&socket, SOCKET_TIMEOUT).await?;
        for (name, extra) in [
            ("csi-provisioner", "--extra-create-metadata"),
            ("csi-attacher", ""),
            ("csi-resizer", "--handle-volume-inuse-error=false"),
        ] {
            let mut args = vec![
                format!("--csi-address={}", socket.display()),
                format!("--kubeconfig={kubeconfig}"),
                "--leader-election=false".into(),
                format!("--timeout={}s", self.options.csi.sidecar_timeout_s),
            ];
            if !extra.is_empty() {
                args.push(extra.into());
            }
            let sidecar =
                self.spawn_csi(name, &crate::tool(name)?, args, Vec::new(), &socket, None)?;
            self.csi.push(sidecar);
        }
        let nodes: Vec<String> = self.agents.iter().map(|a| a.node.clone()).collect();
        for node in nodes {
            self.add_csi_node(&node).await?;
        }
        Ok(())
    }

    /// Starts the CSI node plugin of `node` (its agent must run), waits for its socket
    /// and registers it as the kubelet would (CSINode entry, topology labels); kubelet
    /// paths are accepted under `<node dir>/kubelet` only.
    pub async fn add_csi_node(&mut self, node: &str) -> Result<&mut CsiProcess> {
        let csi_binary = workspace_binary("blockvol-csi")?;
        let agent =
            self.agents.iter().find(|a| a.node == node).ok_or_else(|| {
                Error::Volume(format!("node {node:?} has no agent in this cluster"))
            })?;
        let socket = agent.dir.join("csi.sock");
        let kubelet_dir = agent.dir.join("kubelet");
        std::fs::create_dir_all(&kubelet_dir)
            .map_err(|e| Error::io(format!("creating {}", kubelet_dir.display()), e))?;
        let args = vec![
            "--mode=node".into(),
            format!("--node-id={node}"),
            format!("--endpoint=unix://{}", socket.display()),
            format!("--agent-socket={}", agent.agent_socket.display()),
            format!("--kubelet-dir={}", kubelet_dir.display()),
        ];
        let plugin = self.spawn_csi(
            &format!("node-{node}"),
            &csi_binary,
            args,
            Vec::new(),
            &socket,
            Some(kubelet_dir),
        )?;
        self.csi.push(plugin);
        wait_for_socket(&socket, SOCKET_TIMEOUT).await?;
        self.kubelet(node)?.register().await?;
        Ok(self.csi.last_mut().expect("just pushed"))
    }

    fn spawn_csi(
        &self,
        name: &str,
        program: &Path,
        args: Vec<String>,
        mut env: Vec<(String, String)>,
        socket: &Path,
        kubelet_dir: Option<PathBuf>,
    ) -> Result<CsiProcess> {
        env.push(("RUST_LOG".into(), self.options.csi.log_filter.clone()));
        let mut process = Restartable {
            name: format!("csi {name}"),
            program: program.to_path_buf(),
            args,
            env,
            log: self.root.path().join(format!("csi-{name}.log")),
            child: None,
        };
        process.start()?;
        Ok(CsiProcess {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            kubelet_dir,
            process,
        })
    }

    /// The CSI process named `name` (`controller`, `node-<node>`, a sidecar's name).
    pub fn csi_process(&mut self, name: &str) -> Option<&mut CsiProcess> {
        self.csi.iter_mut().find(|c| c.name == name)
    }

    /// A kubelet player for `node`, using its node plugin ([`TestCluster::start_csi`]).
    pub fn kubelet(&self, node: &str) -> Result<Kubelet> {
        let plugin = self
            .csi
            .iter()
            .find(|c| c.name == format!("node-{node}"))
            .ok_or_else(|| Error::Volume(format!("node {node:?} has no CSI node plugin")))?;
        let dir = plugin
            .kubelet_dir
            .clone()
            .unwrap_or_else(|| self.root.path().join(node).join("kubelet"));
        Ok(Kubelet::new(
            self.client.clone(),
            node,
            &plugin.socket,
            &dir,
            KubeletSettings::default(),
        ))
    }

    /// Releases what a failed test may have left on the host under the cluster's
    /// directory, in the only safe order: filesystems and bind mounts (deepest first),
    /// loop devices backed by files there (while their FUSE mount still shows the
    /// path), the FUSE mounts, and the attach proxies (or an earlier version's nbdfuse)
    /// serving them. Runs before the processes stop.
    fn release_host_resources(&self) {
        let root = self.root.path().display().to_string();
        let mounts: Vec<(String, String)> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let target = l.split(' ').nth(4)?.to_string();
                let fs_type = l.split_once(" - ")?.1.split(' ').next()?.to_string();
                target.starts_with(&root).then_some((target, fs_type))
            })
            .collect();
        let is_fuse = |fs: &str| fs.starts_with("fuse");
        unmount_all(mounts.iter().filter(|(_, fs)| !is_fuse(fs)).map(|(t, _)| t));
        for entry in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(entry.path().join("loop/backing_file"));
            if name.starts_with("loop") && backing.is_ok_and(|b| b.trim().starts_with(&root)) {
                tracing::warn!(device = %name, "detaching a leftover loop device");
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{name}"))
                    .status();
            }
        }
        unmount_all(mounts.iter().filter(|(_, fs)| is_fuse(fs)).map(|(t, _)| t));
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let server = cmdline.starts_with("nbdfuse")
                || cmdline.split('\0').nth(1) == Some("attach-proxy");
            if server && cmdline.contains(&root) {
                tracing::warn!(pid, "stopping a leftover attach proxy or nbdfuse");
                // SAFETY: kill(2) on a pid read from /proc; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
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

/// Whether the replica `st` names as primary is among `replicas`, in the Primary role
/// and Serving at the volume's epoch.
pub fn primary_serving(st: &api::BlockVolumeStatus, replicas: &[BlockReplica]) -> bool {
    use kube::ResourceExt;
    let Some(p) = st.primary.as_deref() else {
        return false;
    };
    replicas
        .iter()
        .find(|r| r.name_any() == p)
        .is_some_and(|r| {
            r.spec.role == api::ReplicaRole::Primary
                && r.status
                    .as_ref()
                    .is_some_and(|s| s.state == api::ReplicaState::Serving && s.epoch == st.epoch)
        })
}

/// Whether volume status `st` and its `replicas` show `n` members settled: Ready with all
/// `n` in sync, the primary Serving at the volume's epoch and seeing every peer InSync
/// and none unreachable, and every replica at that epoch.
pub fn all_members_in_sync(
    st: &api::BlockVolumeStatus,
    replicas: &[BlockReplica],
    n: usize,
) -> bool {
    use api::{ReplicaRole, ReplicaState};
    use kube::ResourceExt;
    let Some(primary) = replicas.iter().find(|r| Some(r.name_any()) == st.primary) else {
        return false;
    };
    let Some(ps) = primary.status.as_ref() else {
        return false;
    };
    st.phase == api::VolumePhase::Ready
        && st.in_sync_count as usize == n
        && primary.spec.role == ReplicaRole::Primary
        && ps.state == ReplicaState::Serving
        && ps.epoch == st.epoch
        && ps.unreachable.is_empty()
        && ps.peers.len() == n - 1
        && ps.peers.iter().all(|p| p.state == ReplicaState::InSync)
        && replicas.len() == n
        && replicas
            .iter()
            .all(|r| r.status.as_ref().is_some_and(|s| s.epoch == st.epoch))
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.release_host_resources();
    }
}

/// Unmounts each target, deepest first, lazily when a plain unmount fails.
fn unmount_all<'a>(targets: impl Iterator<Item = &'a String>) {
    let mut targets: Vec<&String> = targets.collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        tracing::warn!(target = %t, "unmounting a leftover mount");
        let ok = Command::new("umount")
            .arg(t)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(t).status();
        }
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
    /// Starts a cluster with `options` and creates the BlockVolume `name` of `size` with
    /// `replicas` replicas in it (placed on the agents started so far).
    pub async fn start_with_volume(
        options: TestClusterOptions,
        name: &str,
        size: &str,
        replicas: u8,
    ) -> Result<TestCluster> {
        let cluster = TestCluster::start(options).await?;
        cluster.create_volume(name, size, replicas).await?;
        Ok(cluster)
    }

    /// Creates the BlockVolume `name` of `size` with `replicas` replicas.
    pub async fn create_volume(&self, name: &str, size: &str, replicas: u8) -> Result<()> {
        let spec = api::BlockVolumeSpec {
            replicas,
            ..api::BlockVolumeSpec::with_size(size)
        };
        Api::<BlockVolume>::all(self.client.clone())
            .create(&PostParams::default(), &BlockVolume::new(name, spec))
            .await?;
        Ok(())
    }

    /// The `reason` of every Event about the object `name` (empty when listing fails).
    pub async fn event_reasons(&self, name: &str) -> Vec<String> {
        Api::<k8s_openapi::api::core::v1::Event>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
            .unwrap_or_default()
    }

    /// Waits until volume `name` is Ready with at least `in_sync` members in sync at an
    /// epoch of at least `min_epoch`, its primary Serving at that epoch; returns the
    /// primary's node and the epoch.
    pub async fn wait_serving(
        &self,
        name: &str,
        in_sync: u32,
        min_epoch: u64,
        timeout: Duration,
    ) -> Result<(String, u64)> {
        use api::{ReplicaRole, ReplicaState};
        wait_for(
            &format!("volume {name} Ready with {in_sync} in sync and its primary serving"),
            timeout,
            || async {
                let s = self.volume(name).await?.status?;
                let rs = self.replicas(name).await;
                let serving = rs.iter().any(|r| {
                    r.spec.role == ReplicaRole::Primary
                        && r.status
                            .as_ref()
                            .is_some_and(|x| x.state == ReplicaState::Serving && x.epoch == s.epoch)
                });
                (s.phase == api::VolumePhase::Ready
                    && s.in_sync_count >= in_sync
                    && s.epoch >= min_epoch
                    && serving)
                    .then(|| Some((s.primary_node?, s.epoch)))
                    .flatten()
            },
        )
        .await
    }

    /// Waits until a member of volume `name` not on `dead_node` was promoted above
    /// `old_epoch` and serves; returns its node and epoch.
    pub async fn wait_promoted_away_from(
        &self,
        name: &str,
        dead_node: &str,
        old_epoch: u64,
        timeout: Duration,
    ) -> Result<(String, u64)> {
        use kube::ResourceExt;
        wait_for("another member promoted and serving", timeout, || async {
            let s = self.volume(name).await?.status?;
            let node = s.primary_node.clone()?;
            let rs = self.replicas(name).await;
            let serving = rs.iter().any(|r| {
                r.name_any() == s.primary.clone().unwrap_or_default()
                    && r.status.as_ref().is_some_and(|x| {
                        x.state == api::ReplicaState::Serving && x.epoch == s.epoch
                    })
            });
            (s.epoch > old_epoch && node != dead_node && serving).then_some((node, s.epoch))
        })
        .await
    }

    /// Creates the BlockVolume `name` and waits until it is Ready with all `replicas`
    /// in sync.
    pub async fn create_ready_volume(
        &self,
        name: &str,
        size: &str,
        replicas: u8,
        timeout: Duration,
    ) -> Result<BlockVolume> {
        self.create_volume(name, size, replicas).await?;
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
