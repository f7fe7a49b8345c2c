//! Errors the harness reports; each names the step. The control plane's own errors
//! (`testkit::Error`: a missing tool, a daemon that died with the tail of its log) pass
//! through unchanged.

use std::path::PathBuf;

/// Everything that can go wrong while starting, using or stopping the harness's daemons.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not built: run `cargo build --workspace --bins` (or `cargo test --workspace`, \
         which builds it) first"
    )]
    BinaryMissing { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout { what: String, waited_ms: u64 },

    #[error(transparent)]
    ControlPlane(#[from] testkit::Error),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{0}")]
    Volume(String),

    #[error("{call} on node {node}: {message}")]
    Csi {
        call: &'static str,
        node: String,
        message: String,
    },

    #[error("API server metrics: {0}")]
    Metrics(String),

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl Error {
    /// The stdout of a finished command; [`Error::Command`] with its stderr when it did
    /// not exit successfully (`command` names it in the error).
    pub(crate) fn stdout_of(command: String, out: &std::process::Output) -> Result<String> {
        if !out.status.success() {
            return Err(Error::Command {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<testkit::Timeout> for Error {
    fn from(t: testkit::Timeout) -> Self {
        Error::Timeout {
            what: t.what,
            waited_ms: t.waited_ms,
        }
    }
}

/// Result alias for the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;
