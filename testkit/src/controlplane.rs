//! A real Kubernetes control plane for tests: etcd, kube-apiserver and optionally
//! kube-controller-manager on free loopback ports in a private temp dir, with RBAC on and
//! an admin client. Dropping the [`ControlPlane`] kills every daemon it started and
//! removes the dir, also when the test panics; parallel tests never share ports or dirs.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, NodeCondition, NodeStatus, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::pki::Pki;
use crate::process::{Daemon, LOG_TAIL_LINES};
use crate::tools::tool;

/// Environment variable naming a kubeconfig of an existing cluster to test against
/// instead of starting a local control plane (see [`ControlPlane::from_env`]).
pub const EXTERNAL_KUBECONFIG_ENV: &str = "BLOCKVOL_E2E_KUBECONFIG";
/// Environment variable that, when set to anything, keeps the control plane's directory
/// (logs, certificates, etcd data) after drop for post-mortems.
pub const KEEP_DIR_ENV: &str = "BLOCKVOL_E2E_KEEP_DIR";

/// Field manager the harness uses for server-side apply.
pub const FIELD_MANAGER: &str = "blockvol-e2e";

/// How a [`ControlPlane`] is started.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Also run kube-controller-manager (namespaces, garbage collection, service
    /// accounts, node lifecycle, ...). Off by default: most tests only need the API.
    pub controller_manager: bool,
    /// How long start-up may take before it is reported as a failure.
    pub ready_timeout_ms: u64,
    /// How many times to retry start-up when a daemon loses the race for its port.
    pub start_attempts: u32,
    /// kube-apiserver and kube-controller-manager log verbosity (`-v`).
    pub log_verbosity: u8,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            controller_manager: false,
            ready_timeout_ms: 120_000,
            start_attempts: 3,
            log_verbosity: 1,
        }
    }
}

/// How long one readiness probe waits between attempts.
const POLL_INTERVAL_MS: u64 = 100;
/// How long [`ControlPlane::apply_crds`] waits for each CRD to become Established.
pub const CRD_ESTABLISHED_TIMEOUT_MS: u64 = 30_000;

/// The processes and files of a control plane this harness started.
struct Local {
    /// Daemons in start order; stopped in reverse.
    daemons: Vec<Daemon>,
    /// `None` once the dir has been handed over (kept on request).
    dir: Option<TempDir>,
    etcd_url: String,
}

/// A running Kubernetes API to test against: either started here ([`ControlPlane::start`])
/// or an existing cluster named by `BLOCKVOL_E2E_KUBECONFIG` ([`ControlPlane::from_env`]).
pub struct ControlPlane {
    client: Client,
    kubeconfig: PathBuf,
    server_url: String,
    local: Option<Local>,
}

impl ControlPlane {
    /// The cluster named by `BLOCKVOL_E2E_KUBECONFIG` if set, otherwise a fresh local
    /// control plane started with `opts`.
    pub async fn from_env(opts: ControlPlaneOptions) -> Result<ControlPlane> {
        match std::env::var_os(EXTERNAL_KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => ControlPlane::external(Path::new(&path)).await,
            None => ControlPlane::start(opts).await,
        }
    }

    /// Connects to an existing cluster through `kubeconfig` (its current context). Drop
    /// leaves that cluster running.
    pub async fn external(kubeconfig: &Path) -> Result<ControlPlane> {
        let config = read_config(kubeconfig).await?;
        let server_url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let client = Client::try_from(config)?;
        Ok(ControlPlane {
            client,
            kubeconfig: kubeconfig.to_owned(),
            server_url,
            local: None,
        })
    }

    /// Starts etcd and kube-apiserver (and kube-controller-manager if asked) on free
    /// loopback ports and waits until the API server reports ready.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane> {
        let mut attempt = 1;
        loop {
            match ControlPlane::start_once(&opts).await {
                Err(Error::DaemonExited { tail, .. })
                    if attempt < opts.start_attempts && tail.contains("address already in use") =>
                {
                    tracing::info!(
                        attempt,
                        "a port was taken between probing and binding; retrying"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// [`ControlPlane::start`], then blockvol's CRDs applied and `namespace` created:
    /// where a test of the operator or an agent against a real API server begins.
    pub async fn start_with_crds(
        opts: ControlPlaneOptions,
        namespace: &str,
    ) -> Result<ControlPlane> {
        let cp = ControlPlane::start(opts).await?;
        cp.apply_crds(&crate::crds_dir()).await?;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(cp.client())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(cp)
    }

    async fn start_once(opts: &ControlPlaneOptions) -> Result<ControlPlane> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(opts.ready_timeout_ms);
        let etcd_bin = tool("etcd")?;
        let apiserver_bin = tool("kube-apiserver")?;
        let kcm_bin = if opts.controller_manager {
            Some(tool("kube-controller-manager")?)
        } else {
            None
        };

        let dir = tempfile::Builder::new()
            .prefix("blockvol-e2e-")
            .tempdir()
            .map_err(|e| Error::io("creating control plane dir", e))?;
        let root = dir.path().to_owned();
        let pki = Pki::generate(&root)?;
        let [etcd_client_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client_port}");
        let server_url = format!("https://127.0.0.1:{apiserver_port}");

        let mut local = Local {
            daemons: Vec::new(),
            dir: Some(dir),
            etcd_url: etcd_url.clone(),
        };

        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        local.daemons.push(Daemon::spawn(
            "etcd",
            &etcd_bin,
            &strings([
                "--name=e2e",
                &format!("--data-dir={}", root.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=e2e={peer_url}"),
                // Test data is thrown away with the dir; fsync only costs time here.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]),
            root.join("etcd.log"),
        )?);

        let v = format!("-v={}", opts.log_verbosity);
        local.daemons.push(Daemon::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &strings([
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={apiserver_port}"),
                &format!("--cert-dir={}", root.join("apiserver-certs").display()),
                &format!("--tls-cert-file={}", pki.serving.cert.display()),
                &format!("--tls-private-key-file={}", pki.serving.key.display()),
                &format!("--client-ca-file={}", pki.ca.cert.display()),
                &format!(
                    "--service-account-key-file={}",
                    pki.service_account_pub.display()
                ),
                &format!(
                    "--service-account-signing-key-file={}",
                    pki.service_account_key.display()
                ),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                // As in every real cluster: the CSI node plugin and the node agent
                // run privileged, and their DaemonSet must be accepted.
                "--allow-privileged=true",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--profiling=false",
                // The node DaemonSet runs privileged (loop devices, mounts).
                "--allow-privileged=true",
                // The default reconciler tries to publish 127.0.0.1 as the kubernetes
                // Service endpoint, which the API rejects as loopback.
                "--endpoint-reconciler-type=none",
                &v,
            ]),
            root.join("kube-apiserver.log"),
        )?);

        let admin_kubeconfig = root.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server_url,
            &pki.ca.cert,
            &pki.admin.cert,
            &pki.admin.key,
        )?;
        let client = client_for(&admin_kubeconfig).await?;
        wait_ready(
            &client,
            &mut local.daemons,
            deadline,
            "kube-apiserver /readyz",
        )
        .await?;

        if let Some(kcm_bin) = kcm_bin {
            let kcm_kubeconfig = root.join("controller-manager.kubeconfig");
            write_kubeconfig(
                &kcm_kubeconfig,
                &server_url,
                &pki.ca.cert,
                &pki.controller_manager.cert,
                &pki.controller_manager.key,
            )?;
            local.daemons.push(Daemon::spawn(
                "kube-controller-manager",
                &kcm_bin,
                &strings([
                    &format!("--kubeconfig={}", kcm_kubeconfig.display()),
                    "--bind-address=127.0.0.1",
                    // The health endpoint is not used; readiness is judged by its work.
                    "--secure-port=0",
                    "--leader-elect=false",
                    "--use-service-account-credentials=true",
                    &format!(
                        "--service-account-private-key-file={}",
                        pki.service_account_key.display()
                    ),
                    &format!("--root-ca-file={}", pki.ca.cert.display()),
                    &format!("--cluster-signing-cert-file={}", pki.ca.cert.display()),
                    &format!("--cluster-signing-key-file={}", pki.ca.key.display()),
                    &v,
                ]),
                root.join("kube-controller-manager.log"),
            )?);
            wait_controllers(&client, &mut local.daemons, deadline).await?;
        }

        tracing::info!(
            server = %server_url,
            dir = %root.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "control plane ready"
        );
        Ok(ControlPlane {
            client,
            kubeconfig: admin_kubeconfig,
            server_url,
            local: Some(local),
        })
    }

    /// A client authenticated as cluster admin (`system:masters` on a local control plane).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Path of an admin kubeconfig for this cluster (for kubectl, helm, or the binaries
    /// under test).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` of the API server.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// Whether this is an existing cluster rather than one started here.
    pub fn is_external(&self) -> bool {
        self.local.is_none()
    }

    /// The private dir (certificates, logs, etcd data) of a local control plane.
    pub fn dir(&self) -> Option<&Path> {
        self.local
            .as_ref()
            .and_then(|l| l.dir.as_ref())
            .map(|d| d.path())
    }

    /// The etcd client URL of a local control plane.
    pub fn etcd_url(&self) -> Option<&str> {
        self.local.as_ref().map(|l| l.etcd_url.as_str())
    }

    /// Process ids of the daemons of a local control plane, as `(name, pid)`.
    pub fn daemon_pids(&self) -> Vec<(&'static str, u32)> {
        self.local
            .iter()
            .flat_map(|l| l.daemons.iter().map(|d| (d.name(), d.pid())))
            .collect()
    }

    /// Process id of the local control plane's daemon `name` (e.g. "kube-apiserver").
    pub fn daemon_pid(&self, name: &str) -> Option<u32> {
        self.daemon_pids()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, pid)| pid)
    }

    /// Runs the pinned kubectl against this cluster and returns its stdout.
    pub async fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let kubectl = tool("kubectl")?;
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = tokio::process::Command::new(&kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io(format!("running {}", kubectl.display()), e))?;
        if !out.status.success() {
            return Err(Error::Kubectl {
                args: args
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Server-side applies every CRD in `dir/*.yaml` and waits until each is
    /// Established. Returns the CRD names in file order.
    pub async fn apply_crds(&self, dir: &Path) -> Result<Vec<String>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(OsStr::to_str), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        for file in &files {
            for crd in read_crds(file)? {
                let name = crd.metadata.name.clone().ok_or_else(|| Error::Manifest {
                    path: file.clone(),
                    message: "a CustomResourceDefinition has no metadata.name".into(),
                })?;
                api.patch(&name, &params, &Patch::Apply(&crd)).await?;
                names.push(name);
            }
        }
        for name in &names {
            let established = await_condition(api.clone(), name, conditions::is_crd_established());
            match tokio::time::timeout(
                Duration::from_millis(CRD_ESTABLISHED_TIMEOUT_MS),
                established,
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(Error::Timeout {
                        what: format!("CRD {name} to be Established ({e})"),
                        waited_ms: CRD_ESTABLISHED_TIMEOUT_MS,
                    });
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("CRD {name} to be Established"),
                        waited_ms: CRD_ESTABLISHED_TIMEOUT_MS,
                    });
                }
            }
        }
        Ok(names)
    }

    /// Creates a Node object with `labels` (plus `kubernetes.io/hostname`) and a Ready
    /// status, standing in for a kubelet that is not running.
    pub async fn create_node(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<Node> {
        let mut all_labels = labels.clone();
        all_labels
            .entry("kubernetes.io/hostname".into())
            .or_insert_with(|| name.to_owned());
        let api: Api<Node> = Api::all(self.client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(all_labels),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        api.create(&PostParams::default(), &node).await?;
        let status = Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: Some("SimulatedByTest".into()),
                    message: Some("node object created by the e2e harness".into()),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let node = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(node)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let Some(local) = self.local.as_mut() else {
            return;
        };
        let panicking = std::thread::panicking();
        for daemon in local.daemons.iter_mut().rev() {
            if panicking {
                eprintln!(
                    "--- last lines of {} ({}) ---\n{}",
                    daemon.name(),
                    daemon.log_path().display(),
                    daemon.log_tail(LOG_TAIL_LINES)
                );
            }
            daemon.stop();
        }
        if std::env::var_os(KEEP_DIR_ENV).is_some()
            && let Some(dir) = local.dir.take()
        {
            eprintln!("control plane dir kept at {}", dir.keep().display());
        }
    }
}

/// Probes `n` distinct free loopback ports. The listeners are held until all are chosen so
/// one call never returns the same port twice; another process may still take one before
/// the daemon binds it, which [`ControlPlane::start`] retries.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::io("probing a free loopback port", e))?;
        *port = l
            .local_addr()
            .map_err(|e| Error::io("probing a free loopback port", e))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

fn strings<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, cert: &Path, key: &Path) -> Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: e2e
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: e2e
  context:
    cluster: e2e
    user: e2e
current-context: e2e
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

async fn read_config(path: &Path) -> Result<Config> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

async fn client_for(path: &Path) -> Result<Client> {
    let config = read_config(path).await?;
    Client::try_from(config).map_err(Error::Kube)
}

/// Fails with the daemon's log if any daemon has died.
fn check_alive(daemons: &mut [Daemon]) -> Result<()> {
    for d in daemons.iter_mut() {
        if let Some(status) = d.exited() {
            return Err(d.exited_error(status));
        }
    }
    Ok(())
}

async fn wait_ready(
    client: &Client,
    daemons: &mut [Daemon],
    deadline: Instant,
    what: &str,
) -> Result<()> {
    let started = Instant::now();
    loop {
        check_alive(daemons)?;
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::io("building /readyz request", std::io::Error::other(e)))?;
        if let Ok(body) = client.request_text(req).await
            && body.trim() == "ok"
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// The controller manager is working once its service-account controller has created
/// the `default` ServiceAccount in the `default` namespace.
async fn wait_controllers(
    client: &Client,
    daemons: &mut [Daemon],
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    loop {
        check_alive(daemons)?;
        if let Ok(Some(_)) = api.get_opt("default").await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "kube-controller-manager to create the default ServiceAccount".into(),
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// Reads every CustomResourceDefinition document of one YAML file.
fn read_crds(path: &Path) -> Result<Vec<CustomResourceDefinition>> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut crds = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let crd = serde_json::from_value(value).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            message: format!("not a CustomResourceDefinition: {e}"),
        })?;
        crds.push(crd);
    }
    Ok(crds)
}
