//! Errors of the benchmark rows: the harness's own, or a step of a row that went wrong
//! (a command that failed, a file that could not be written, a row that cannot finish).

/// What stopped a benchmark row.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Harness(#[from] e2e::Error),

    #[error(transparent)]
    ControlPlane(#[from] testkit::Error),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("benchmark: {0}")]
    Bench(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the benchmark rows.
pub type Result<T, E = Error> = std::result::Result<T, E>;
