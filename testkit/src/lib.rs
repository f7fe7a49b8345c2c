//! What blockvol's tests share: a bounded wait for a condition, a task guard that aborts
//! on drop, a seeded generator and, with the `kube` feature, a local Kubernetes control
//! plane (etcd + kube-apiserver from pinned binaries, torn down on drop) with node agents
//! the test plays itself. It depends on no blockvol crate but `api`, so every crate's
//! tests can use it.

pub mod child;
pub mod http;
pub mod output;
pub mod rng;
pub mod task;
pub mod wait;

#[cfg(feature = "kube")]
pub mod agent;
#[cfg(feature = "kube")]
pub mod apiserver;
#[cfg(feature = "kube")]
pub mod controlplane;
#[cfg(feature = "kube")]
pub mod error;
#[cfg(feature = "kube")]
pub mod pki;
#[cfg(feature = "kube")]
pub mod process;
#[cfg(feature = "kube")]
pub mod tools;

pub use output::{stdout_lines, stdout_of};
pub use rng::SeededRng;
pub use task::Task;
pub use wait::{POLL_INTERVAL, Timeout, Wait, wait_for};

#[cfg(feature = "kube")]
pub use controlplane::{
    CRD_ESTABLISHED_TIMEOUT_MS, ControlPlane, ControlPlaneOptions, EXTERNAL_KUBECONFIG_ENV,
    FIELD_MANAGER, KEEP_DIR_ENV,
};
#[cfg(feature = "kube")]
pub use error::{Error, Result};
#[cfg(feature = "kube")]
pub use process::Paused;
#[cfg(feature = "kube")]
pub use tools::{TOOLS_BIN_ENV, tool, tool_in, tools_bin_dir};

/// The repository's `deploy/crds` directory, where the generated CRD manifests live.
pub fn crds_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}

/// A command that runs the test `test` of this test binary alone (output shown), for a
/// test whose child process is another test of the same binary.
pub fn this_binarys_test(test: &str) -> std::process::Command {
    let exe = std::env::current_exe().expect("the running test binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    cmd
}

/// A multi-threaded tokio runtime with `worker_threads` workers and every driver on,
/// for a test (or the child process a test starts) that is not itself async.
pub fn runtime(worker_threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sends the test's tracing output (filtered by `RUST_LOG`, else `default_filter`) to the
/// test harness's captured output; later calls in the same binary do nothing.
pub fn init_tracing(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_test_writer()
        .try_init();
}
