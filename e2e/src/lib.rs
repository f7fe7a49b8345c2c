//! Test harness and cluster scenarios for blockvol: a local Kubernetes control plane
//! built from pinned binaries (etcd, kube-apiserver, kube-controller-manager, kubectl),
//! torn down on drop, or an existing cluster named by `BLOCKVOL_E2E_KUBECONFIG`.

pub mod bench;
pub mod bench_scenarios;
pub mod chart;
pub mod checker;
pub mod cluster;
pub mod controlplane;
pub mod devices;
pub mod error;
pub mod faultfs;
pub mod faults;
pub mod kubelet;
pub mod local;
pub mod openmetrics;
pub mod pki;
mod process;
pub mod realnodes;
pub mod tools;

pub use controlplane::{
    CRD_ESTABLISHED_TIMEOUT_MS, ControlPlane, ControlPlaneOptions, EXTERNAL_KUBECONFIG_ENV,
    FIELD_MANAGER, KEEP_DIR_ENV,
};
pub use error::{Error, Result};
pub use tools::{TOOLS_BIN_ENV, tool, tool_in, tools_bin_dir};

/// The repository's `deploy/crds` directory, where the generated CRD manifests live.
pub fn crds_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}
