//! A local blockvol cluster for `hack/up.sh` and the local e2e scenarios: the control plane
//! (with kube-controller-manager), the CRDs, simulated Node objects with topology labels,
//! the `blockvol-system` namespace and a peer secret file. Everything it starts stops when
//! the [`LocalCluster`] is dropped.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{Error, Result};
use crate::kubelet::{Kubelet, KubeletSettings};
use crate::{ControlPlane, ControlPlaneOptions};

/// Namespace the operator, node agents and CSI driver run in.
pub const SYSTEM_NAMESPACE: &str = "blockvol-system";
/// Label spreading the simulated nodes over zones, one zone per node.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Bytes of random key material in the peer secret file.
pub const PEER_SECRET_BYTES: usize = 32;

/// What [`LocalCluster::start`] creates.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// Where the kubeconfig and peer secret are written; created if missing.
    pub state_dir: PathBuf,
    /// Names of the simulated nodes.
    pub nodes: Vec<String>,
    /// Options of the control plane itself (the controller manager is always on).
    pub control_plane: ControlPlaneOptions,
}

impl LocalClusterOptions {
    /// Three nodes `node-1..3` with state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        LocalClusterOptions {
            state_dir: state_dir.into(),
            nodes: (1..=3).map(|i| format!("node-{i}")).collect(),
            control_plane: ControlPlaneOptions::default(),
        }
    }
}

/// A running local cluster; drop stops the control plane.
pub struct LocalCluster {
    control_plane: ControlPlane,
    kubeconfig: PathBuf,
    peer_secret_file: PathBuf,
    nodes: Vec<String>,
}

impl LocalCluster {
    /// Starts the control plane and prepares it for blockvol.
    pub async fn start(opts: LocalClusterOptions) -> Result<LocalCluster> {
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(|e| Error::io(format!("creating {}", opts.state_dir.display()), e))?;
        let cp_opts = ControlPlaneOptions {
            controller_manager: true,
            ..opts.control_plane.clone()
        };
        let control_plane = ControlPlane::start(cp_opts).await?;
        control_plane.apply_crds(&crate::crds_dir()).await?;
        for (i, node) in opts.nodes.iter().enumerate() {
            let labels = BTreeMap::from([(ZONE_LABEL.to_owned(), format!("zone-{}", i + 1))]);
            control_plane.create_node(node, &labels).await?;
        }
        let namespaces: Api<Namespace> = Api::all(control_plane.client());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(SYSTEM_NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces.create(&PostParams::default(), &ns).await?;

        let kubeconfig = opts.state_dir.join("kubeconfig");
        std::fs::copy(control_plane.kubeconfig(), &kubeconfig)
            .map_err(|e| Error::io(format!("writing {}", kubeconfig.display()), e))?;
        let peer_secret_file = opts.state_dir.join("peer-secret");
        write_peer_secret(&peer_secret_file)?;
        Ok(LocalCluster {
            control_plane,
            kubeconfig,
            peer_secret_file,
            nodes: opts.nodes,
        })
    }

    /// The control plane underneath.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// Admin kubeconfig copied into the state dir (valid while the cluster runs).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// File holding the node agents' shared peer secret (hex).
    pub fn peer_secret_file(&self) -> &Path {
        &self.peer_secret_file
    }

    /// Names of the simulated nodes.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }
}

/// Writes a fresh random secret readable only by its owner.
fn write_peer_secret(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; PEER_SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| Error::io("reading /dev/urandom for the peer secret", e))?;
    let mut hex = String::with_capacity(PEER_SECRET_BYTES * 2);
    for b in key {
        use std::fmt::Write;
        // Writing into a String cannot fail.
        let _ = write!(hex, "{b:02x}");
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    std::io::Write::write_all(&mut file, hex.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The layout `hack/up.sh` gives a running local cluster's state directory: the
/// kubeconfig, each node's CSI node plugin socket at `run/<node>/csi.sock`, and the
/// directory the kubelet player uses for a node at `kubelet/<node>`.
#[derive(Clone, Debug)]
pub struct LocalState {
    dir: PathBuf,
}

impl LocalState {
    /// The state directory `dir`, made absolute against the current directory: the
    /// kubelet paths built from it go to the CSI driver, which accepts only absolute
    /// ones (`--state-dir .local-cluster` works as the README writes it).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        LocalState {
            dir: std::path::absolute(&dir).unwrap_or(dir),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Socket of `node`'s CSI node plugin.
    pub fn csi_socket(&self, node: &str) -> PathBuf {
        self.dir.join("run").join(node).join("csi.sock")
    }

    /// The kubelet directory of `node`.
    pub fn kubelet_dir(&self, node: &str) -> PathBuf {
        self.dir.join("kubelet").join(node)
    }

    /// Nodes whose node plugin has a socket in this state directory.
    pub fn kubelet_nodes(&self) -> Result<Vec<String>> {
        let run = self.dir.join("run");
        let entries = match std::fs::read_dir(&run) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", run.display()), e)),
        };
        let mut nodes: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("csi.sock").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// A kubelet player for `node`, talking to the cluster named by the kubeconfig.
    pub async fn kubelet(&self, node: &str) -> Result<Kubelet> {
        let kubeconfig = self.kubeconfig();
        if !kubeconfig.is_file() {
            return Err(Error::Volume(format!(
                "no local cluster runs under {}: {} is missing (start one with hack/up.sh)",
                self.dir.display(),
                kubeconfig.display()
            )));
        }
        let socket = self.csi_socket(node);
        if !socket.exists() {
            return Err(Error::Volume(format!(
                "node {node:?} has no CSI node plugin in this cluster ({} is missing)",
                socket.display()
            )));
        }
        let client = ControlPlane::external(&kubeconfig).await?.client();
        Ok(Kubelet::new(
            client,
            node,
            &socket,
            &self.kubelet_dir(node),
            KubeletSettings::default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_state_dir_gives_absolute_kubelet_paths() {
        let state = LocalState::new(".local-cluster");
        let kubelet = state.kubelet_dir("node-1");
        assert!(kubelet.is_absolute(), "{}", kubelet.display());
        assert!(
            kubelet.starts_with(std::env::current_dir().unwrap().join(".local-cluster")),
            "{}",
            kubelet.display()
        );
        assert!(state.csi_socket("node-1").is_absolute());
    }
}
