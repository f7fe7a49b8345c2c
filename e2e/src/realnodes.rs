//! The real-node cluster of `hack/cluster.sh` for tests: three kubelets with their own
//! containerd, network and mount namespaces, the control plane, and the Helm chart
//! installed with the locally built images. [`RealCluster::up`] starts it (or, when
//! `BLOCKVOL_REAL_CLUSTER_KUBECONFIG` names a kubeconfig, uses that running cluster and
//! leaves it up); dropping a cluster it started runs `hack/cluster.sh down`, also when the
//! test panics. [`HostTraces`] records what the cluster could leave behind on the machine
//! (processes, mounts, loop devices, cgroups, sysctls, directories, iptables chains) so
//! a test can assert that `down` removed all of it. The images are made from the binaries already built
//! (`cargo build --bins -p operator -p node-agent -p csi`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ControlPlane;
use crate::error::{Error, Result};

/// Environment variable naming the kubeconfig of a running `hack/cluster.sh` cluster to
/// use instead of starting one.
pub const REAL_CLUSTER_KUBECONFIG_ENV: &str = "BLOCKVOL_REAL_CLUSTER_KUBECONFIG";
/// The cluster's directory unless `BLOCKVOL_CLUSTER_DIR` says otherwise.
pub const DEFAULT_CLUSTER_DIR: &str = "/tmp/blockvol-cluster";
/// The busybox test image `hack/images.sh` loads into every node.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:dev";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory `hack/cluster.sh` uses.
pub fn cluster_dir() -> PathBuf {
    std::env::var_os("BLOCKVOL_CLUSTER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CLUSTER_DIR))
}

fn run_script(args: &[&str]) -> Result<String> {
    let script = repo().join("hack/cluster.sh");
    // Under `cargo test` the binaries are built already, and a nested cargo would wait
    // for the build lock the test run holds.
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("BLOCKVOL_IMAGES_NO_CARGO", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io(format!("running {}", script.display()), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("hack/cluster.sh {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: "see the output above".into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running real-node cluster.
pub struct RealCluster {
    api: ControlPlane,
    kubeconfig: PathBuf,
    /// Started here, so taken down here.
    owned: bool,
    down: bool,
}

impl RealCluster {
    /// Starts the cluster with the chart (`hack/cluster.sh up`), or connects to the one
    /// named by `BLOCKVOL_REAL_CLUSTER_KUBECONFIG`. Blocks for the start-up (a few
    /// minutes on a cold build).
    pub async fn up() -> Result<RealCluster> {
        if let Some(path) = std::env::var_os(REAL_CLUSTER_KUBECONFIG_ENV).filter(|p| !p.is_empty())
        {
            let kubeconfig = PathBuf::from(path);
            let api = ControlPlane::external(&kubeconfig).await?;
            return Ok(RealCluster {
                api,
                kubeconfig,
                owned: false,
                down: false,
            });
        }
        let out = tokio::task::spawn_blocking(|| run_script(&["up"]))
            .await
            .map_err(|e| Error::Volume(format!("cluster start-up task failed: {e}")))??;
        let kubeconfig = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        // The cluster exists from here on: a failure to connect must still take it down.
        let api = match ControlPlane::external(&kubeconfig).await {
            Ok(api) => api,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(|| run_script(&["down"])).await;
                return Err(e.into());
            }
        };
        Ok(RealCluster {
            api,
            kubeconfig,
            owned: true,
            down: false,
        })
    }

    /// The admin client and kubectl of the cluster.
    pub fn api(&self) -> &ControlPlane {
        &self.api
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Whether this cluster was started here (and is taken down here).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// The containerd socket of `node` (`bv-node-N`) of a `hack/cluster.sh` cluster on
    /// this machine; None for other clusters (their nodes' runtimes are not reachable
    /// from here).
    pub fn containerd_socket(&self, node: &str) -> Option<PathBuf> {
        let n: u32 = node.strip_prefix("bv-node-")?.parse().ok()?;
        let socket = cluster_dir().join(format!("node-{n}/containerd.sock"));
        (self.kubeconfig.starts_with(cluster_dir()) && socket.exists()).then_some(socket)
    }

    /// Runs `ctr -n k8s.io ARGS` against `node`'s containerd (a cluster started here).
    pub async fn ctr(&self, node: &str, args: &[&str]) -> Result<String> {
        let socket = self.containerd_socket(node).ok_or_else(|| {
            Error::Volume(format!(
                "no containerd of {node} reachable from this machine"
            ))
        })?;
        let out = tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io("running ctr", e))?;
        Error::stdout_of(format!("ctr {}", args.join(" ")), &out)
    }

    /// Runs the pinned helm against the cluster, with the repository as the working
    /// directory (so `charts/blockvol` names the chart) and helm's own state in a
    /// directory of the cluster's.
    pub async fn helm(&self, args: &[&str]) -> Result<String> {
        let helm = crate::tool("helm")?;
        let state = cluster_dir().join("helm");
        let out = tokio::process::Command::new(&helm)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .current_dir(repo())
            .env("HELM_CACHE_HOME", state.join("cache"))
            .env("HELM_CONFIG_HOME", state.join("config"))
            .env("HELM_DATA_HOME", state.join("data"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io(format!("running {}", helm.display()), e))?;
        Error::stdout_of(format!("helm {}", args.join(" ")), &out)
    }

    /// Takes the cluster down now (`hack/cluster.sh down`); a cluster not started here
    /// is left alone.
    pub fn down(&mut self) -> Result<()> {
        if !self.owned || self.down {
            return Ok(());
        }
        self.down = true;
        run_script(&["down"]).map(|_| ())
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("taking the real-node cluster down failed: {e}");
        }
    }
}

/// What a real-node cluster could leave on the machine, read from the machine itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTraces {
    /// Processes whose command line names the cluster dir or a node path.
    pub processes: Vec<String>,
    /// Mount points (this mount namespace) under the cluster dir or the node paths.
    pub mounts: Vec<String>,
    /// Loop devices whose backing file is under the cluster dir or the node paths.
    pub loop_devices: Vec<String>,
    /// The cluster's cgroups (any v1 hierarchy).
    pub cgroups: Vec<String>,
    /// The sysctls the kubelet changes, with their values.
    pub sysctls: Vec<(String, String)>,
    /// Which of the directories the kubelet and containerd create exist.
    pub host_dirs: Vec<String>,
    /// Whether the cluster dir exists.
    pub cluster_dir: bool,
    /// The kubelet's and CNI's iptables chains in this network namespace.
    pub iptables_chains: Vec<String>,
}

const NODE_PATHS: [&str; 2] = ["/var/lib/kubelet", "/var/lib/blockvol"];
const KUBELET_SYSCTLS: [&str; 3] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
];
const HOST_DIRS: [&str; 6] = [
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/netns",
    "/opt/containerd",
];

impl HostTraces {
    /// Reads the machine now.
    pub fn read() -> HostTraces {
        let dir = cluster_dir();
        let dir = dir.to_string_lossy().into_owned();
        // The dir as a path prefix: other clusters' dirs may share its name's prefix.
        let dir_prefix = format!("{dir}/");
        let ours = |s: &str| {
            s == dir
                || s.starts_with(&dir_prefix)
                || NODE_PATHS
                    .iter()
                    .any(|p| s == *p || s.starts_with(&format!("{p}/")))
        };
        let mut processes = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            let me = std::process::id().to_string();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                    continue;
                }
                let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                    continue;
                };
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                // The script itself names the dir only while it runs `down`.
                if cmd.contains(&dir_prefix) && !cmd.contains("cluster.sh") {
                    processes.push(format!("{name}: {}", cmd.trim()));
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| ours(m))
            .map(str::to_owned)
            .collect();
        let loop_devices = Command::new("losetup")
            .args(["-n", "-l", "-O", "NAME,BACK-FILE"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.split_whitespace().nth(1).is_some_and(ours))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut cgroups = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let p = e.path().join("blockvol-cluster");
                if p.exists() {
                    cgroups.push(p.to_string_lossy().into_owned());
                }
            }
        }
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .map(|k| {
                let v = std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default();
                (k.replace('/', "."), v.trim().to_owned())
            })
            .collect();
        let host_dirs = HOST_DIRS
            .iter()
            .filter(|d| Path::new(d).exists())
            .map(|d| d.to_string())
            .collect();
        let iptables_chains = ["iptables-save", "ip6tables-save"]
            .iter()
            .filter_map(|tool| Command::new(tool).output().ok())
            .flat_map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with(':') && (l.contains("KUBE-") || l.contains("CNI-")))
                    .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        HostTraces {
            iptables_chains,
            processes,
            mounts,
            loop_devices,
            cgroups,
            sysctls,
            host_dirs,
            cluster_dir: Path::new(&dir).exists(),
        }
    }
}
