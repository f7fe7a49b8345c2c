//! Errors of the control plane and its tools; each names the step and, for a daemon that
//! died, the tail of its log so a failed start explains itself.

use std::path::PathBuf;

use crate::wait::Timeout;

/// Everything that can go wrong while starting, using or stopping a control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{binary} not found in {dir}: build the pinned Kubernetes tools with `hack/tools/build.sh` \
         and `source hack/tools/env.sh` (or set BLOCKVOL_TOOLS_BIN to their directory)"
    )]
    ToolMissing { binary: String, dir: PathBuf },

    #[error(
        "no Kubernetes tools found: BLOCKVOL_TOOLS_BIN is not set and `{script} --print-bin` \
         did not name a directory; run `hack/tools/build.sh` and `source hack/tools/env.sh`"
    )]
    ToolsNotLocated { script: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("generating certificates: {0}")]
    Certificate(#[from] rcgen::Error),

    #[error("{name} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    DaemonExited {
        name: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout { what: String, waited_ms: u64 },

    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("parsing {path}: {message}")]
    Manifest { path: PathBuf, message: String },

    #[error("`kubectl {args}` failed ({status}): {stderr}")]
    Kubectl {
        args: String,
        status: String,
        stderr: String,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Timeout> for Error {
    fn from(t: Timeout) -> Self {
        Error::Timeout {
            what: t.what,
            waited_ms: t.waited_ms,
        }
    }
}

/// Result alias for the control plane.
pub type Result<T, E = Error> = std::result::Result<T, E>;
