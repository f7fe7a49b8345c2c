//! Test harness and cluster scenarios for blockvol: blockvol's own daemons run as
//! processes against a local Kubernetes control plane (from `testkit`, torn down on drop)
//! or an existing cluster named by `BLOCKVOL_E2E_KUBECONFIG`.

pub mod api_requests;
pub mod chart;
pub mod checker;
pub mod cluster;
pub mod devices;
pub mod error;
pub mod faultfs;
pub mod faults;
pub mod in_process;
pub mod kubelet;
pub mod local;
pub mod openmetrics;
pub mod realnodes;

pub use error::{Error, Result};
pub use testkit::{
    CRD_ESTABLISHED_TIMEOUT_MS, ControlPlane, ControlPlaneOptions, EXTERNAL_KUBECONFIG_ENV,
    FIELD_MANAGER, KEEP_DIR_ENV, TOOLS_BIN_ENV, crds_dir, tool, tool_in, tools_bin_dir,
};
