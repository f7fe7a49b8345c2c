//! Listeners, the fixed newstyle handshake and the transmission loop.
//!
//! Per connection, one task reads requests in order, validates them, and hands each to
//! the blocking pool, except small READs and WRITEs that need not wait, which it serves
//! itself (a page-cache copy costs less than the hand-off to another thread); a second
//! task writes replies in completion order. The number and
//! payload bytes of requests in flight are bounded, so a fast client cannot make the
//! server buffer without limit. A reply is only sent after the backend call returned, so
//! a FLUSH covers every write already acknowledged on any connection (given a
//! volume-wide backend flush).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use super::backend::{BackendError, BlockBackend};
use super::proto::{self, RequestHeader};
use super::registry::{Export, ExportRegistry};
use super::{Error, Result};

/// Where the TCP listener binds unless configured otherwise: loopback only, because NBD
/// has no authentication.
pub const DEFAULT_TCP_ADDR: &str = "127.0.0.1:10809";

/// Bounds and advertised geometry of the server. Every limit is per connection unless
/// named otherwise.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests being executed or waiting for their reply to be written.
    pub max_in_flight_requests: usize,
    /// READ/WRITE payload bytes held by requests in flight, including READ data
    /// waiting to be written to the socket.
    pub max_in_flight_bytes: u32,
    /// Largest READ/WRITE payload accepted (advertised as the maximum block size).
    pub max_payload_bytes: u32,
    /// Advertised preferred block size (raised to the backend's block size if smaller).
    pub preferred_block_size_bytes: u32,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout_ms: u64,
    /// Options a client may send before it must enter transmission.
    pub max_options_per_handshake: u32,
    /// Largest option payload read; longer options end the connection.
    pub max_option_bytes: u32,
    /// Time one reply may take to be written before the client is considered gone.
    pub reply_write_timeout_ms: u64,
    /// Connections across all listeners of this server.
    pub max_connections: usize,
    /// Export served to clients that ask for the empty name (`nbd://host:port`).
    pub default_export: Option<String>,
    /// READs, and WRITEs without FUA, up to this many bytes run on the connection's own
    /// task instead of the blocking pool: no thread hand-off per request, at the price
    /// of blocking that task (and its runtime worker) for the copy. A WRITE goes to the
    /// pool anyway when the backend would have to wait (`BlockBackend::try_write`).
    /// 0 sends every request to the pool.
    pub inline_request_max_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight_requests: 64,
            max_in_flight_bytes: 64 << 20,
            max_payload_bytes: 32 << 20,
            preferred_block_size_bytes: 4096,
            handshake_timeout_ms: 10_000,
            max_options_per_handshake: 64,
            max_option_bytes: 16 << 10,
            reply_write_timeout_ms: 30_000,
            max_connections: 256,
            default_export: None,
            inline_request_max_bytes: 128 << 10,
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.max_in_flight_requests == 0 {
            return bad("max_in_flight_requests must be at least 1".into());
        }
        if self.max_payload_bytes < 65536 || !self.max_payload_bytes.is_multiple_of(65536) {
            return bad(format!(
                "max_payload_bytes {} must be a positive multiple of 65536",
                self.max_payload_bytes
            ));
        }
        if self.max_in_flight_bytes < self.max_payload_bytes {
            return bad(format!(
                "max_in_flight_bytes {} is smaller than max_payload_bytes {}",
                self.max_in_flight_bytes, self.max_payload_bytes
            ));
        }
        if !self.preferred_block_size_bytes.is_power_of_two()
            || self.preferred_block_size_bytes > self.max_payload_bytes
        {
            return bad(format!(
                "preferred_block_size_bytes {} must be a power of two ≤ max_payload_bytes",
                self.preferred_block_size_bytes
            ));
        }
        if self.max_connections == 0 || self.max_options_per_handshake == 0 {
            return bad("max_connections and max_options_per_handshake must be at least 1".into());
        }
        Ok(())
    }
}

struct Shared {
    registry: ExportRegistry,
    config: ServerConfig,
    shutdown: watch::Sender<bool>,
    connections: Arc<Semaphore>,
}

/// An NBD server over one registry; listeners are added with `listen_*`. Dropping the
/// server (or `shutdown`) stops the listeners and closes every connection.
pub struct NbdServer {
    shared: Arc<Shared>,
    unix_paths: std::sync::Mutex<Vec<PathBuf>>,
}

impl NbdServer {
    pub fn new(registry: ExportRegistry, config: ServerConfig) -> Result<Self> {
        config.validate()?;
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                registry,
                connections: Arc::new(Semaphore::new(config.max_connections)),
                config,
                shutdown,
            }),
            unix_paths: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn registry(&self) -> &ExportRegistry {
        &self.shared.registry
    }

    /// Starts accepting TCP connections; returns the bound address (useful with port 0).
    /// Must be called inside a tokio runtime.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<SocketAddr> {
        let listen_err = |source| Error::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        let listener = Arc::new(listener);
        spawn_accept_loop(self.shared.clone(), "tcp", local.to_string(), move || {
            let listener = listener.clone();
            async move {
                let (stream, peer) = listener.accept().await?;
                // Small replies (flush, write acks) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Ok((stream, peer.to_string()))
            }
        });
        info!(%local, "nbd: listening on tcp");
        Ok(local)
    }

    /// Starts accepting connections on a unix socket at `path`. A stale socket file left
    /// by an earlier process is replaced; any other existing file is an error.
    pub async fn listen_unix(&self, path: &Path) -> Result<()> {
        let listen_err = |source| Error::Listen {
            addr: path.display().to_string(),
            source,
        };
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(listen_err)?;
            } else {
                return Err(listen_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                )));
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        self.unix_paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
        let shown = path.display().to_string();
        let listener = Arc::new(listener);
        spawn_accept_loop(self.shared.clone(), "unix", shown.clone(), move || {
            let listener = listener.clone();
            let shown = shown.clone();
            async move { Ok((listener.accept().await?.0, shown)) }
        });
        info!(path = %path.display(), "nbd: listening on unix socket");
        Ok(())
    }

    /// Stops the listeners and tells every connection to finish its in-flight requests
    /// and close.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        for p in self
            .unix_paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts connections with `accept` (a stream and the peer's name) until the server
/// shuts down; a failed accept is logged and retried after a short pause.
fn spawn_accept_loop<S, F, Fut>(
    shared: Arc<Shared>,
    kind: &'static str,
    listener: String,
    mut accept: F,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<(S, String)>> + Send,
{
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = accept() => a,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            match accepted {
                Ok((stream, peer)) => spawn_connection(shared.clone(), stream, peer),
                Err(e) => {
                    warn!(error = %e, "nbd: {kind} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        debug!(%listener, "nbd: {kind} listener stopped");
    });
}

fn spawn_connection<S>(shared: Arc<Shared>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let permit = match shared.connections.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            warn!(%peer, limit = shared.config.max_connections, "nbd: connection limit reached, refusing");
            return;
        }
    };
    tokio::spawn(async move {
        let _permit = permit;
        serve_connection(shared, stream, &peer).await;
    });
}

/// Why a connection ended early; logged, never sent to the client.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("client flags {0:#x} include bits this server did not offer")]
    UnknownClientFlags(u32),
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("option {option} carries {length} bytes, more than the {max}-byte limit")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("more than {0} options without entering transmission")]
    TooManyOptions(u32),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("handshake did not finish within {0} ms")]
    HandshakeTimeout(u64),
    #[error("{0}")]
    BadRequestMagic(#[from] proto::BadRequestMagic),
    #[error("WRITE payload of {length} bytes exceeds the {max}-byte maximum")]
    WriteTooLarge { length: u32, max: u32 },
}

async fn serve_connection<S>(shared: Arc<Shared>, stream: S, peer: &str)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let limit_ms = shared.config.handshake_timeout_ms;
    let mut shutdown = shared.shutdown.subscribe();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(Duration::from_millis(limit_ms), handshake(&shared, &mut rd, &mut wr)) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout(limit_ms)))
        }
        _ = shutdown.wait_for(|s| *s) => Ok(None),
    };
    let export = match negotiated {
        Ok(Some(export)) => export,
        Ok(None) => return,
        Err(e) => {
            warn!(%peer, error = %e, "nbd: handshake failed, closing connection");
            return;
        }
    };
    debug!(%peer, export = export.name(), "nbd: entering transmission");
    match transmission(&shared, &export, rd, wr).await {
        Ok(()) => debug!(%peer, export = export.name(), "nbd: connection closed"),
        Err(e) => warn!(%peer, export = export.name(), error = %e, "nbd: closing connection"),
    }
}

fn transmission_flags(backend: &dyn BlockBackend) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES;
    if backend.flush_is_volume_wide() {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// (minimum, preferred, maximum) block sizes advertised for a backend.
fn block_sizes(config: &ServerConfig, backend: &dyn BlockBackend) -> (u32, u32, u32) {
    let min = backend.block_size().max(1);
    let preferred = config.preferred_block_size_bytes.max(min);
    // Both are powers of two and min ≤ 65536 ≤ max_payload, so this is a multiple of min.
    let max = config.max_payload_bytes;
    (min, preferred, max)
}

async fn send_option_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply_type: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&proto::option_reply(option, reply_type, payload))
        .await
}

async fn handshake<R, W>(
    shared: &Shared,
    rd: &mut R,
    wr: &mut W,
) -> Result<Option<Arc<Export>>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &shared.config;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await?;
    wr.flush().await?;

    let client_flags = rd.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    for _ in 0..config.max_options_per_handshake {
        let mut hdr = [0u8; proto::OPTION_HEADER_BYTES];
        rd.read_exact(&mut hdr).await?;
        let hdr = proto::OptionHeader::decode(&hdr);
        if hdr.magic != proto::IHAVEOPT {
            return Err(ConnError::BadOptionMagic(hdr.magic));
        }
        if hdr.length > config.max_option_bytes {
            return Err(ConnError::OptionTooLong {
                option: hdr.option,
                length: hdr.length,
                max: config.max_option_bytes,
            });
        }
        // Bounded by max_option_bytes just above.
        let mut data = vec![0u8; hdr.length as usize];
        rd.read_exact(&mut data).await?;
        let option = hdr.option;
        match option {
            proto::OPT_EXPORT_NAME => {
                let export = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|n| lookup(shared, n))
                    .ok_or_else(|| {
                        ConnError::UnknownExport(String::from_utf8_lossy(&data).into_owned())
                    })?;
                let backend = export.backend();
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&backend.size_bytes().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(backend.as_ref()).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Ok(Some(export));
            }
            proto::OPT_ABORT => {
                // The client may already have hung up; the reply is a courtesy.
                let _ = send_option_reply(wr, option, proto::REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_option_reply(
                        wr,
                        option,
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                } else {
                    for name in shared.registry.names() {
                        send_option_reply(wr, option, proto::REP_SERVER, &proto::rep_server(&name))
                            .await?;
                    }
                    send_option_reply(wr, option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                match proto::InfoRequest::decode(&data) {
                    Err(e) => {
                        let msg = e.to_string();
                        send_option_reply(wr, option, proto::REP_ERR_INVALID, msg.as_bytes())
                            .await?;
                    }
                    Ok(req) => match lookup(shared, &req.name) {
                        None => {
                            let msg = format!("no export named {:?}", req.name);
                            send_option_reply(wr, option, proto::REP_ERR_UNKNOWN, msg.as_bytes())
                                .await?;
                        }
                        Some(export) => {
                            let backend = export.backend();
                            let info = proto::info_export(
                                backend.size_bytes(),
                                transmission_flags(backend.as_ref()),
                            );
                            send_option_reply(wr, option, proto::REP_INFO, &info).await?;
                            // Sent even when not requested: our minimum block size may
                            // exceed the protocol default of 1 and clients must know it.
                            let (min, pref, max) = block_sizes(config, backend.as_ref());
                            let bs = proto::info_block_size(min, pref, max);
                            send_option_reply(wr, option, proto::REP_INFO, &bs).await?;
                            if req.requests.contains(&proto::INFO_NAME) {
                                let name = proto::info_name(export.name());
                                send_option_reply(wr, option, proto::REP_INFO, &name).await?;
                            }
                            send_option_reply(wr, option, proto::REP_ACK, &[]).await?;
                            if option == proto::OPT_GO {
                                wr.flush().await?;
                                return Ok(Some(export));
                            }
                        }
                    },
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                let (kind, msg): (u32, &[u8]) = if data.is_empty() {
                    (
                        proto::REP_ERR_UNSUP,
                        b"structured replies are not supported; simple replies only",
                    )
                } else {
                    (
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                };
                send_option_reply(wr, option, kind, msg).await?;
            }
            proto::OPT_STARTTLS => {
                send_option_reply(
                    wr,
                    option,
                    proto::REP_ERR_POLICY,
                    b"TLS is not offered; connect over a local socket",
                )
                .await?;
            }
            _ => {
                let msg = format!("option {option} is not supported");
                send_option_reply(wr, option, proto::REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
        wr.flush().await?;
    }
    Err(ConnError::TooManyOptions(config.max_options_per_handshake))
}

fn lookup(shared: &Shared, name: &str) -> Option<Arc<Export>> {
    if name.is_empty() {
        return shared
            .config
            .default_export
            .as_deref()
            .and_then(|n| shared.registry.get(n));
    }
    shared.registry.get(name)
}

/// One reply for the writer task: a simple reply header plus READ data on success.
/// It carries the request's in-flight permits, so READ data waiting to be written
/// still counts against the bounds.
struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Checks a request against the export before any backend call. Returns the NBD error
/// value to reply with when the request is invalid.
pub(crate) fn check_request(
    h: &RequestHeader,
    size_bytes: u64,
    min_block_bytes: u32,
    max_payload_bytes: u32,
) -> Result<(), u32> {
    use proto::*;
    let allowed_flags = match h.command {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL),
    };
    if h.flags & !allowed_flags != 0 {
        return Err(EINVAL);
    }
    if h.command == CMD_FLUSH {
        return Ok(());
    }
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > max_payload_bytes {
        return Err(EINVAL);
    }
    let end = h.offset.checked_add(u64::from(h.length));
    if end.is_none_or(|e| e > size_bytes) {
        return Err(match h.command {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        });
    }
    let min = u64::from(min_block_bytes.max(1));
    if !h.offset.is_multiple_of(min) || !u64::from(h.length).is_multiple_of(min) {
        return Err(EINVAL);
    }
    Ok(())
}

/// Runs one validated request on the backend (blocking).
fn execute(
    backend: &dyn BlockBackend,
    h: &RequestHeader,
    payload: Vec<u8>,
) -> Result<Vec<u8>, BackendError> {
    let fua = h.flags & proto::CMD_FLAG_FUA != 0;
    let len = u64::from(h.length);
    match h.command {
        proto::CMD_READ => {
            // Bounded by max_payload_bytes in check_request.
            let mut buf = vec![0u8; h.length as usize];
            if len > 0 {
                backend.read(h.offset, &mut buf)?;
            }
            Ok(buf)
        }
        proto::CMD_WRITE => {
            if len > 0 {
                if fua {
                    backend.write_fua(h.offset, &payload)?;
                } else {
                    backend.write(h.offset, &payload)?;
                }
            }
            Ok(Vec::new())
        }
        proto::CMD_FLUSH => backend.flush().map(|_| Vec::new()),
        proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
            if len > 0 {
                if h.command == proto::CMD_TRIM {
                    backend.trim(h.offset, len)?;
                } else {
                    backend.write_zeroes(h.offset, len)?;
                }
                if fua {
                    backend.flush()?;
                }
            }
            Ok(Vec::new())
        }
        other => Err(BackendError::Invalid(format!(
            "command {other} reached execute"
        ))),
    }
}

async fn transmission<R, W>(
    shared: &Shared,
    export: &Arc<Export>,
    mut rd: R,
    wr: W,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let config = &shared.config;
    let backend = export.backend().clone();
    let (min_block, _, max_payload) = block_sizes(config, backend.as_ref());
    let runs_inline = backend.runs_inline();
    // `block_in_place` needs a multi-thread runtime.
    let can_block_in_place = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    // Held until this function returns, so `connection_count` covers the drain.
    let mut removed = export.removed();
    let mut shutdown = shared.shutdown.subscribe();
    let (tx, rx) = mpsc::channel::<Reply>(config.max_in_flight_requests);
    let writer = tokio::spawn(write_replies(
        wr,
        rx,
        Duration::from_millis(config.reply_write_timeout_ms),
    ));
    let requests = Arc::new(Semaphore::new(config.max_in_flight_requests));
    let bytes = Arc::new(Semaphore::new(config.max_in_flight_bytes as usize));

    let outcome: Result<(), ConnError> = loop {
        let mut raw = [0u8; proto::REQUEST_HEADER_BYTES];
        let read = tokio::select! {
            r = rd.read_exact(&mut raw) => r,
            _ = removed.wait_for(|r| *r) => {
                info!(export = export.name(), "nbd: export removed, closing connection");
                break Ok(());
            }
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
            _ = tx.closed() => break Ok(()),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(
                    export = export.name(),
                    "nbd: client hung up without NBD_CMD_DISC"
                );
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let h = match RequestHeader::decode(&raw) {
            Ok(h) => h,
            Err(e) => break Err(e.into()),
        };
        if h.command == proto::CMD_DISC {
            break Ok(());
        }
        if h.command == proto::CMD_WRITE && h.length > max_payload {
            // The payload cannot be skipped cheaply and the client broke a MUST.
            break Err(ConnError::WriteTooLarge {
                length: h.length,
                max: max_payload,
            });
        }
        let payload_bytes =
            if matches!(h.command, proto::CMD_READ | proto::CMD_WRITE) && h.length <= max_payload {
                h.length
            } else {
                0
            };
        let (Ok(req_permit), Ok(byte_permit)) = (
            requests.clone().acquire_owned().await,
            bytes.clone().acquire_many_owned(payload_bytes).await,
        ) else {
            break Ok(());
        };
        let mut payload = Vec::new();
        if h.command == proto::CMD_WRITE {
            let read = tokio::select! {
                r = read_payload(&mut rd, h.length) => r,
                _ = removed.wait_for(|r| *r) => break Ok(()),
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
            };
            match read {
                Ok(p) => payload = p,
                Err(e) => break Err(e.into()),
            }
        }
        if let Err(errno) = check_request(&h, backend.size_bytes(), min_block, max_payload) {
            debug!(
                export = export.name(),
                command = h.command,
                offset = h.offset,
                length = h.length,
                flags = h.flags,
                errno,
                "nbd: rejecting invalid request"
            );
            let reply = Reply {
                handle: h.handle,
                error: errno,
                data: Vec::new(),
                _permits: (req_permit, byte_permit),
            };
            if tx.send(reply).await.is_err() {
                break Ok(());
            }
            continue;
        }
        let inline = h.length <= config.inline_request_max_bytes && runs_inline;
        if inline
            && h.command == proto::CMD_WRITE
            && h.length > 0
            && h.flags & proto::CMD_FLAG_FUA == 0
        {
            let tried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backend.try_write(h.offset, &payload)
            }));
            let error = match tried {
                Ok(None) => None,
                Ok(Some(Ok(()))) => Some(0),
                Ok(Some(Err(e))) => {
                    warn!(export = export.name(), command = h.command, offset = h.offset,
                          length = h.length, error = %e, "nbd: backend request failed");
                    Some(e.nbd_errno())
                }
                Err(_) => {
                    warn!(
                        export = export.name(),
                        command = h.command,
                        offset = h.offset,
                        length = h.length,
                        "nbd: backend request panicked"
                    );
                    Some(proto::EIO)
                }
            };
            if let Some(error) = error {
                let reply = Reply {
                    handle: h.handle,
                    error,
                    data: Vec::new(),
                    _permits: (req_permit, byte_permit),
                };
                if tx.send(reply).await.is_err() {
                    break Ok(());
                }
                continue;
            }
        }
        // A FLUSH with nothing else in flight on this connection (a client waiting for
        // each reply, as at queue depth 1) runs on this task: nothing could overlap it
        // anyway, and it saves the hand-off to a pool thread and back.
        // `block_in_place` moves this worker's other tasks to another thread meanwhile.
        let (error, data) = if h.command == proto::CMD_FLUSH
            && can_block_in_place
            && requests.available_permits() + 1 == config.max_in_flight_requests
        {
            tokio::task::block_in_place(|| {
                run_request(backend.as_ref(), export.name(), &h, payload)
            })
        } else if inline && h.command == proto::CMD_READ {
            run_request(backend.as_ref(), export.name(), &h, payload)
        } else {
            let backend = backend.clone();
            let tx = tx.clone();
            let export = export.clone();
            // One blocking-pool task per request; it sends its own reply so nothing
            // else has to be scheduled on the way back.
            tokio::task::spawn_blocking(move || {
                let (error, data) = run_request(backend.as_ref(), export.name(), &h, payload);
                // A closed channel means the writer is gone; the connection is ending.
                let _ = tx.blocking_send(Reply {
                    handle: h.handle,
                    error,
                    data,
                    _permits: (req_permit, byte_permit),
                });
            });
            continue;
        };
        let reply = Reply {
            handle: h.handle,
            error,
            data,
            _permits: (req_permit, byte_permit),
        };
        if tx.send(reply).await.is_err() {
            break Ok(());
        }
    };
    // In-flight requests finish and their replies are written before the socket closes.
    drop(tx);
    let written = writer.await;
    outcome?;
    match written {
        Ok(r) => r.map_err(ConnError::from),
        Err(e) => Err(ConnError::Io(std::io::Error::other(e))),
    }
}

/// Executes a validated request and turns the outcome into (NBD error, READ data). A
/// panicking backend fails only its request.
fn run_request(
    backend: &dyn BlockBackend,
    export: &str,
    h: &RequestHeader,
    payload: Vec<u8>,
) -> (u32, Vec<u8>) {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(backend, h, payload)
    }));
    match run {
        Ok(Ok(data)) => (0, data),
        Ok(Err(e)) => {
            warn!(export, command = h.command, offset = h.offset,
                  length = h.length, error = %e, "nbd: backend request failed");
            (e.nbd_errno(), Vec::new())
        }
        Err(_) => {
            warn!(
                export,
                command = h.command,
                offset = h.offset,
                length = h.length,
                "nbd: backend request panicked"
            );
            (proto::EIO, Vec::new())
        }
    }
}

/// Reads a WRITE payload of exactly `len` bytes into a fresh buffer. The buffer is
/// filled straight from the socket, without zeroing it first (a 1 MiB memset per
/// request showed up in profiles of sequential writes).
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> std::io::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(len as usize);
    rd.take(u64::from(len)).read_to_end(&mut payload).await?;
    if payload.len() != len as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "client hung up after {} of {len} WRITE payload bytes",
                payload.len()
            ),
        ));
    }
    Ok(payload)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
    write_timeout: Duration,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let batch = async {
            // Write whatever is ready, then flush once: fewer syscalls under load.
            while let Some(r) = next.take() {
                w.write_all(&proto::simple_reply(r.error, r.handle)).await?;
                if r.error == 0 && !r.data.is_empty() {
                    w.write_all(&r.data).await?;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await
        };
        match tokio::time::timeout(write_timeout, batch).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("reply not written within {} ms", write_timeout.as_millis()),
                ));
            }
        }
    }
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::*;

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    #[test]
    fn in_range_aligned_requests_pass() {
        for cmd in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                check_request(&req(cmd, 0, 4096, 4096), 8192, 4096, 65536),
                Ok(())
            );
        }
        assert_eq!(
            check_request(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), 8192, 4096, 65536),
            Ok(())
        );
        assert_eq!(
            check_request(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 8192),
                8192,
                4096,
                65536
            ),
            Ok(())
        );
    }

    #[test]
    fn writes_past_the_end_get_enospc_and_reads_einval() {
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 8192, 4096), 8192, 512, 65536),
            Err(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, 0, 4096, 8192), 8192, 512, 65536),
            Err(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 8192, 512), 8192, 512, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, u64::MAX, 512), 8192, 512, 65536),
            Err(EINVAL)
        );
    }

    #[test]
    fn misaligned_oversize_unknown_and_badly_flagged_requests_get_einval() {
        assert_eq!(
            check_request(&req(CMD_READ, 0, 512, 4096), 1 << 20, 4096, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 0, 512), 1 << 20, 4096, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, 1 << 17), 1 << 20, 512, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(99, 0, 0, 512), 1 << 20, 512, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(5, 0, 0, 512), 1 << 20, 512, 65536),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(
                &req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512),
                1 << 20,
                512,
                65536
            ),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 1 << 8, 0, 512), 1 << 20, 512, 65536),
            Err(EINVAL)
        );
    }

    #[test]
    fn config_rejects_inconsistent_bounds() {
        assert!(ServerConfig::default().validate().is_ok());
        let c = ServerConfig {
            max_in_flight_bytes: 1 << 20,
            ..ServerConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ServerConfig {
            max_payload_bytes: 1000,
            ..ServerConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ServerConfig {
            max_in_flight_requests: 0,
            ..ServerConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
