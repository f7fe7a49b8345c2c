//! NBD frontend: serves the node's volumes to block-device clients (the kernel NBD
//! client, nbdfuse, qemu, fio) over unix and TCP sockets. Fixed newstyle handshake with
//! simple replies; requests on one connection run concurrently (bounded) and are
//! answered as they complete. Protocol violations close only the offending connection.

mod backend;
pub mod client;
mod engine_backend;
pub mod proto;
mod registry;
mod server;

pub use backend::{BackendError, BlockBackend, MemBackend};
pub use registry::{EXPORT_NAME_BYTES_MAX, Export, ExportRegistry};
pub use server::{DEFAULT_TCP_ADDR, NbdServer, ServerConfig};

/// Errors of the NBD frontend's management API (per-connection protocol errors are
/// logged and end only that connection).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("export {0:?} already exists")]
    ExportExists(String),
    #[error("export {0:?} does not exist")]
    ExportNotFound(String),
    #[error("export {name:?} is invalid: {reason}")]
    InvalidExport { name: String, reason: String },
    #[error("export {name:?} was removed but {connections} connection(s) are still finishing")]
    ExportBusy { name: String, connections: usize },
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("invalid NBD server config: {0}")]
    InvalidConfig(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
