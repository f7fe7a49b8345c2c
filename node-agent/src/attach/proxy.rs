//! The attach proxy (`blockvol-agent attach-proxy`): a small long-lived process between
//! the kernel-facing NBD client (nbdfuse) and the agent's NBD socket. nbdfuse does not
//! reconnect when its server goes away, so without the proxy an agent restart leaves a
//! dead device. The proxy serves nbdfuse on its own unix socket and forwards every
//! request to the agent; when the agent's connection breaks it re-dials (the restarted
//! agent re-creates its socket and export) and retries the requests that were in
//! flight, so the device only pauses.
//!
//! Why retrying loses no acknowledged write:
//! - A request is answered to nbdfuse only after the agent answered it.
//! - A write the old agent process acknowledged was appended to its volume's WAL with
//!   `pwrite`: the bytes sit in the kernel's page cache, which outlives the process (a
//!   SIGKILL included), and the restarted agent recovers them from the volume file and
//!   ships them to its replicas on reconnect. The next FLUSH through the new process
//!   fsyncs the file (the page cache holds the old process's writes too) and waits for
//!   the in-sync set, so it covers them.
//! - On a power loss, writes that no acknowledged FLUSH covered may be lost; that is
//!   exactly the NBD contract (only FLUSH and FUA promise durability). Everything a
//!   FLUSH acknowledged is fsynced on every member of the committed in-sync set.
//! - A retried request either never ran or ran on the old process. READ, WRITE, TRIM,
//!   WRITE_ZEROES and FLUSH give the same result when run twice, and the block layer
//!   above never has two overlapping writes in flight whose order matters.
//!
//! Requests wait for the agent at most `reconnect_timeout_ms`; after that they fail
//! with EIO, as they would have without the proxy.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nbd::client::{ClientError, Connection, ExportInfo};
use crate::nbd::proto::{
    CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, ENOSPC,
    EPERM, ESHUTDOWN, TFLAG_CAN_MULTI_CONN,
};
use crate::nbd::{BackendError, BlockBackend, ExportRegistry, NbdServer, ServerConfig};

/// Command-line settings of `blockvol-agent attach-proxy`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "blockvol-agent attach-proxy",
    about = "Serves one volume to nbdfuse and reconnects to the agent across agent restarts"
)]
pub struct ProxySettings {
    /// Unix socket nbdfuse connects to.
    #[arg(long)]
    pub listen: PathBuf,
    /// The agent's NBD unix socket.
    #[arg(long)]
    pub upstream: PathBuf,
    /// Export (volume) name, the same on both sides.
    #[arg(long)]
    pub export: String,
    /// How long a request waits for the agent to come back before it fails with EIO.
    #[arg(long, default_value_t = 60_000)]
    pub reconnect_timeout_ms: u64,
    /// Pause between attempts to reach the agent.
    #[arg(long, default_value_t = 100)]
    pub reconnect_interval_ms: u64,
    /// Longest a single socket read or write to the agent may block (a hung agent
    /// counts as gone after this and the request is retried).
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
}

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("--{flag}: {reason}")]
    Setting { flag: &'static str, reason: String },
    #[error(
        "agent NBD socket {socket}: export {export:?} not reachable within {timeout_ms} ms: {last}"
    )]
    Unreachable {
        socket: PathBuf,
        export: String,
        timeout_ms: u64,
        last: ClientError,
    },
    #[error("NBD server: {0}")]
    Nbd(#[from] crate::nbd::Error),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl ProxySettings {
    pub fn validate(&self) -> Result<(), ProxyError> {
        let bad = |flag, reason: &str| {
            Err(ProxyError::Setting {
                flag,
                reason: reason.into(),
            })
        };
        if self.export.is_empty() {
            return bad("export", "is empty");
        }
        if self.listen == self.upstream {
            return bad("listen", "must differ from --upstream");
        }
        if self.reconnect_interval_ms == 0 || self.io_timeout_ms == 0 {
            return bad(
                "reconnect-interval-ms",
                "intervals and timeouts must be above 0",
            );
        }
        Ok(())
    }
}

/// A [`BlockBackend`] that forwards to the agent's export over pooled connections and
/// re-dials on failure (see the module docs).
pub struct ProxyBackend {
    settings: ProxySettings,
    info: ExportInfo,
    /// Idle negotiated connections; a request takes one or dials a new one.
    idle: Mutex<Vec<Connection>>,
}

/// Whether an answer from the agent means "try again": ESHUTDOWN is what a stopping
/// agent answers in-flight requests with; EIO is also what a restarted agent answers
/// until its Lease is renewed (IO fence), so it is retried until the deadline too.
fn retryable(errno: u32) -> bool {
    errno == ESHUTDOWN || errno == EIO
}

fn backend_error(errno: u32, what: &str) -> BackendError {
    let msg = format!("{what}: the agent answered errno {errno}");
    match errno {
        EPERM => BackendError::ReadOnly(msg),
        EINVAL => BackendError::Invalid(msg),
        ENOSPC => BackendError::NoSpace(msg),
        _ => BackendError::Io(msg),
    }
}

impl ProxyBackend {
    /// Connects once (retrying for `reconnect_timeout_ms`) to learn the geometry.
    pub fn connect(settings: ProxySettings) -> Result<Self, ProxyError> {
        settings.validate()?;
        let deadline = Instant::now() + Duration::from_millis(settings.reconnect_timeout_ms);
        let conn = loop {
            match Self::dial(&settings) {
                Ok(c) => break c,
                Err(last) if Instant::now() >= deadline => {
                    return Err(ProxyError::Unreachable {
                        socket: settings.upstream.clone(),
                        export: settings.export.clone(),
                        timeout_ms: settings.reconnect_timeout_ms,
                        last,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(settings.reconnect_interval_ms)),
            }
        };
        Ok(ProxyBackend {
            info: conn.info(),
            idle: Mutex::new(vec![conn]),
            settings,
        })
    }

    fn dial(settings: &ProxySettings) -> Result<Connection, ClientError> {
        Connection::connect(
            &settings.upstream,
            &settings.export,
            Duration::from_millis(settings.io_timeout_ms),
        )
    }

    fn take(&self) -> Result<Connection, ClientError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => Self::dial(&self.settings),
        }
    }

    fn give_back(&self, c: Connection) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Runs one request, re-dialing and retrying until the deadline (module docs).
    fn call(&self, req: Request<'_>, mut read_into: Option<&mut [u8]>) -> Result<(), BackendError> {
        let what = req.what;
        let timeout_ms = self.settings.reconnect_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut attempt = 0u32;
        loop {
            let outcome = self.take().and_then(|mut c| {
                let r = c.request(
                    req.command,
                    req.flags,
                    req.offset,
                    req.length,
                    req.payload,
                    read_into.as_deref_mut(),
                )?;
                Ok((c, r))
            });
            let failure = match outcome {
                Ok((c, 0)) => {
                    self.give_back(c);
                    if attempt > 0 {
                        tracing::info!(
                            what,
                            attempt,
                            "attach proxy: request succeeded after reconnecting"
                        );
                    }
                    return Ok(());
                }
                Ok((c, errno)) if !retryable(errno) => {
                    self.give_back(c);
                    return Err(backend_error(errno, what));
                }
                // The connection that answered a retryable error may belong to a
                // stopping agent: drop it and dial again.
                Ok((_, errno)) => backend_error(errno, what).to_string(),
                Err(e) => e.to_string(),
            };
            if attempt == 0 {
                tracing::warn!(what, error = %failure, "attach proxy: agent unavailable, retrying");
                // Every idle connection went to the same agent process: drop them all.
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(BackendError::Io(format!(
                    "{what}: the agent did not answer within {timeout_ms} ms: {failure}"
                )));
            }
            std::thread::sleep(Duration::from_millis(self.settings.reconnect_interval_ms));
        }
    }
}

/// One NBD request as the proxy forwards it; `what` names it in logs and errors.
struct Request<'a> {
    what: &'static str,
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: &'a [u8],
}

impl<'a> Request<'a> {
    fn new(what: &'static str, command: u16, offset: u64, length: u32) -> Self {
        Request {
            what,
            command,
            flags: 0,
            offset,
            length,
            payload: &[],
        }
    }
    fn with_payload(mut self, payload: &'a [u8], flags: u16) -> Self {
        self.payload = payload;
        self.flags = flags;
        self
    }
}

fn len32(n: u64) -> Result<u32, BackendError> {
    u32::try_from(n).map_err(|_| BackendError::Invalid(format!("request of {n} bytes")))
}

impl BlockBackend for ProxyBackend {
    fn size_bytes(&self) -> u64 {
        self.info.size_bytes
    }
    fn block_size(&self) -> u32 {
        self.info.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let n = len32(buf.len() as u64)?;
        self.call(Request::new("read", CMD_READ, offset, n), Some(buf))
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let n = len32(data.len() as u64)?;
        let req = Request::new("write", CMD_WRITE, offset, n).with_payload(data, 0);
        self.call(req, None)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let n = len32(data.len() as u64)?;
        let req = Request::new("write", CMD_WRITE, offset, n).with_payload(data, CMD_FLAG_FUA);
        self.call(req, None)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.call(Request::new("flush", CMD_FLUSH, 0, 0), None)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.call(Request::new("trim", CMD_TRIM, offset, len32(length)?), None)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let req = Request::new("write_zeroes", CMD_WRITE_ZEROES, offset, len32(length)?);
        self.call(req, None)
    }
    fn flush_is_volume_wide(&self) -> bool {
        self.info.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }
}

/// A running proxy: its NBD server and the socket it listens on.
pub struct Proxy {
    server: NbdServer,
    pub listen: PathBuf,
}

impl Proxy {
    /// Reaches the agent (blocking, bounded), then serves the export on `listen`.
    pub async fn start(settings: ProxySettings) -> Result<Proxy, ProxyError> {
        let s = settings.clone();
        let backend = tokio::task::spawn_blocking(move || ProxyBackend::connect(s))
            .await
            .map_err(|e| ProxyError::Setting {
                flag: "upstream",
                reason: format!("connect task failed: {e}"),
            })??;
        let registry = ExportRegistry::new();
        registry.add(&settings.export, Arc::new(backend) as Arc<dyn BlockBackend>)?;
        let server = NbdServer::new(registry, ServerConfig::default())?;
        server.listen_unix(&settings.listen).await?;
        tracing::info!(listen = %settings.listen.display(), upstream = %settings.upstream.display(), export = %settings.export, "attach proxy serving");
        Ok(Proxy {
            server,
            listen: settings.listen,
        })
    }

    /// Stops serving (in-flight requests finish first) and removes the socket.
    pub fn shutdown(&self) {
        self.server.shutdown();
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C.
pub async fn run(settings: ProxySettings) -> Result<(), ProxyError> {
    let proxy = Proxy::start(settings).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ProxyError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    proxy.shutdown();
    Ok(())
}

/// The proxy's socket for a volume's attach directory.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join("proxy.sock")
}
