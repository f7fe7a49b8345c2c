//! The driver's error type. Each variant is one CSI-specified outcome, so the mapping
//! to a gRPC code at the edge is a table, not a guess; messages name the field or
//! object at fault and what would be accepted.

use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed, or a parameter is unknown.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named volume or node does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object with this name exists but is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the volume's state forbids it now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A requested size cannot be satisfied.
    #[error("{0}")]
    OutOfRange(String),
    /// Another call for the same volume is running, or a write raced another writer.
    #[error("{0}")]
    Aborted(String),
    /// The operation was started but did not finish in its bounded time; retry.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A dependency (API server, node agent) cannot be reached now; retry.
    #[error("{0}")]
    Unavailable(String),
    /// Not enough capacity for the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The Kubernetes API answered with an error.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The node agent answered with an error.
    #[error("node agent {call}: {status}")]
    Agent {
        call: &'static str,
        status: Box<Status>,
    },
    /// A host command (mkfs, mount, ...) failed.
    #[error("{program} {args}: {detail}")]
    Command {
        program: String,
        args: String,
        detail: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A bug or an unexpected state; the message says which.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn agent(call: &'static str, status: Status) -> Self {
        Error::Agent {
            call,
            status: Box::new(status),
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Kube(e) => kube_code(e),
            Error::Agent { status, .. } => match status.code() {
                // The agent's own contract (agent.proto) uses these codes with the CSI
                // meaning; anything else is the agent failing, which the CO retries.
                c @ (Code::NotFound
                | Code::FailedPrecondition
                | Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted) => c,
                _ => Code::Internal,
            },
            Error::Command { .. } | Error::Io { .. } | Error::Internal(_) => Code::Internal,
        }
    }
}

fn kube_code(e: &kube::Error) -> Code {
    match e {
        kube::Error::Api(status) => match status.code {
            404 => Code::NotFound,
            409 => Code::Aborted,
            400 | 422 => Code::InvalidArgument,
            401 | 403 => Code::PermissionDenied,
            429 | 500..=599 => Code::Unavailable,
            _ => Code::Internal,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// Whether a Kubernetes error is the API server saying the object does not exist.
pub fn is_kube_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether a Kubernetes error is a write conflict (exists already, or stale version).
pub fn is_kube_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_its_csi_code_and_keeps_the_message() {
        let s: Status = Error::InvalidArgument("parameter \"replicas\": bad".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "parameter \"replicas\": bad");
        let s: Status = Error::Aborted("busy".into()).into();
        assert_eq!(s.code(), Code::Aborted);
        let s: Status = Error::OutOfRange("too big".into()).into();
        assert_eq!(s.code(), Code::OutOfRange);
    }

    #[test]
    fn agent_errors_keep_contract_codes_and_hide_the_rest_as_internal() {
        let e = Error::agent("Attach", Status::not_found("no such volume"));
        assert_eq!(e.code(), Code::NotFound);
        let e = Error::agent("Attach", Status::unavailable("starting"));
        assert_eq!(e.code(), Code::Unavailable);
        let e = Error::agent("Attach", Status::invalid_argument("volume_id"));
        assert_eq!(e.code(), Code::Internal);
        assert!(e.to_string().contains("Attach"), "{e}");
    }
}
