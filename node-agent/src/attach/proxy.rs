//! The attach proxy (`blockvol-agent attach-proxy`): a small long-lived process that
//! serves one volume to the kernel as a file on its own FUSE mount (`MOUNT/disk`, see
//! [`super::fuse_export`]) and forwards every request to the agent's NBD socket. A loop
//! device on that file is the attached block device. When the agent's connection breaks
//! the proxy re-dials (the restarted agent re-creates its socket and export) and retries
//! the requests that were in flight, so the device only pauses across an agent restart.
//!
//! # Why retrying loses no acknowledged write
//! A write the agent acknowledged is durable only once a FLUSH covering it succeeded
//! (the NBD contract). Until then it may exist nowhere but in the process that
//! acknowledged it: the agent's forwarding export keeps its own replay log in memory,
//! and the primary may still hold it only in a send queue. If that agent process dies
//! and the volume fails over while it is down, the restarted agent routes to a new
//! primary that never received the write. A FLUSH answered by that agent would then
//! claim a write the volume no longer holds. So the proxy keeps the guarantee itself:
//! - Every WRITE (FUA or not), TRIM and WRITE_ZEROES the agent acknowledged is kept in
//!   the proxy's replay log, in acknowledgement order, with its data. A successful
//!   FLUSH drops the operations acknowledged before that FLUSH was sent.
//! - A connection may reach a different agent process than the connection before it
//!   (an agent restart is invisible at the socket), so every dialled connection is a
//!   new upstream incarnation: before any request uses it, the whole replay log is
//!   sent on it in acknowledgement order, and then a FLUSH (which, when it succeeds,
//!   empties the log). Dialling and replaying run exclusively: no other request is in
//!   flight, so no new request is overtaken by an older replayed operation, and a
//!   later TRIM or FUA write stays later than an older WRITE of the same block.
//! - Requests hold the upstream shared for their whole round trip, including the
//!   replay-log update after the answer, so an operation acknowledged on the old
//!   incarnation is always either in the log when a replay starts or not yet
//!   acknowledged (and then retried on the new connection).
//! - Hence a FLUSH answered on a connection covers every operation the proxy
//!   acknowledged before sending it: each one was acknowledged by the process behind
//!   that connection or replayed to it before the connection was used.
//! - The log is bounded by `replay_bytes_max`: a write that would overflow it first
//!   sends a FLUSH. Concurrent writers may overshoot by the requests in flight.
//! - If the replay cannot complete before a request's `reconnect_timeout_ms`, that
//!   request fails with EIO and the log is kept: a later FLUSH still succeeds only on a
//!   connection that received all of it.
//!
//! Assumptions: one agent process serves the socket at a time (a replaced process no
//! longer answers: its connections are closed); one writer per volume (ReadWriteOnce),
//! so replaying old operations overwrites nobody else's data; and the block layer above
//! never has two overlapping writes in flight whose order matters, so acknowledgement
//! order is the order that counts. A retried request either never ran or ran on the
//! old process; READ, WRITE, TRIM, WRITE_ZEROES and FLUSH give the same result when
//! run twice.
//!
//! Requests wait for the agent at most `reconnect_timeout_ms`; after that they fail
//! with EIO. Up to `upstream_connections` requests are in flight to the agent at once,
//! each on its own connection (one when the export does not promise volume-wide FLUSH).
//! The pool is dialled to that size at once, so requests never wait for each other to
//! open a connection while the agent is up.
//!
//! Online growth: the proxy listens on a control socket (`control.sock` in the volume's
//! attach directory). A client writes the line `resize`; the proxy asks the agent for
//! the export's size, sets the file to it, drops the kernel's cached attributes and
//! answers `ok SIZE` (or `error MESSAGE`). Growing the loop device on top is then the
//! caller's job (`losetup -c`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::fuse_export::{FuseExport, FuseExportConfig, SizeNotifier};

use crate::frontend::nbd::client::{ClientError, Connection, ExportInfo};
use crate::frontend::nbd::proto::{
    CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, ENOSPC,
    EPERM, ESHUTDOWN, TFLAG_CAN_MULTI_CONN,
};
use crate::frontend::nbd::{BackendError, BlockBackend};

/// Command-line settings of `blockvol-agent attach-proxy`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "blockvol-agent attach-proxy",
    about = "Serves one volume as a file on a FUSE mount and reconnects to the agent across agent restarts"
)]
pub struct ProxySettings {
    /// Existing directory to mount on; the volume appears as the file `disk` in it.
    #[arg(long)]
    pub mount: PathBuf,
    /// Unix socket for control commands (`resize`).
    #[arg(long)]
    pub control: PathBuf,
    /// The agent's NBD unix socket.
    #[arg(long)]
    pub upstream: PathBuf,
    /// Export (volume) name on the agent.
    #[arg(long)]
    pub export: String,
    /// How long a request waits for the agent to come back before it fails with EIO
    /// (0: fail at once, the device dies with the agent process).
    #[arg(long, default_value_t = 60_000)]
    pub reconnect_timeout_ms: u64,
    /// Pause between attempts to reach the agent.
    #[arg(long, default_value_t = 100)]
    pub reconnect_interval_ms: u64,
    /// Longest a single socket read or write to the agent may block (a hung agent
    /// counts as gone after this and the request is retried).
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
    /// Requests in flight to the agent at once, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub upstream_connections: u32,
    /// Bound of the acknowledged operations no FLUSH covered yet that the proxy keeps to
    /// replay to a restarted agent, in bytes (data plus 32 per operation). A write that
    /// would pass it first sends a FLUSH.
    #[arg(long, default_value_t = 64 << 20)]
    pub replay_bytes_max: u64,
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
    #[error("mounting the volume file on {mount}: {source}")]
    Mount {
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        if self.control == self.upstream {
            return bad("control", "must differ from --upstream");
        }
        if self.upstream_connections == 0 {
            return bad("upstream-connections", "must be at least 1");
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

/// A [`BlockBackend`] that forwards to the agent's export over pooled connections,
/// re-dials on failure and replays what no FLUSH covered yet (see the module docs).
pub struct ProxyBackend {
    settings: ProxySettings,
    info: ExportInfo,
    /// The export's size as last learned from the agent; only grows.
    size_bytes: AtomicU64,
    /// Connections the pool holds when the agent is up.
    pool_size: usize,
    /// Held shared by a request for its round trip and its replay-log update; held
    /// exclusively to dial and replay, so nothing is in flight then.
    upstream: RwLock<()>,
    /// Idle negotiated connections, each replayed to when it was dialled.
    idle: Mutex<Vec<Connection>>,
    /// Acknowledged operations no FLUSH covered yet.
    replay: Mutex<ReplayLog>,
}

/// An operation the agent acknowledged that no FLUSH covered yet, as it was sent.
#[derive(Debug)]
struct Kept {
    seq: u64,
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

/// Bytes one kept operation costs in the replay log.
fn kept_bytes(payload_len: usize) -> u64 {
    payload_len as u64 + 32
}

/// Acknowledged, not yet flushed operations in acknowledgement order.
#[derive(Debug, Default)]
struct ReplayLog {
    ops: VecDeque<Kept>,
    bytes: u64,
    next_seq: u64,
}

impl ReplayLog {
    fn push(&mut self, req: &Request<'_>) {
        self.bytes += kept_bytes(req.payload.len());
        self.ops.push_back(Kept {
            seq: self.next_seq,
            command: req.command,
            flags: req.flags,
            offset: req.offset,
            length: req.length,
            payload: req.payload.to_vec(),
        });
        self.next_seq += 1;
    }

    /// Drops the operations acknowledged before sequence `upto` (a FLUSH sent when the
    /// log ended there succeeded).
    fn drop_before(&mut self, upto: u64) {
        while let Some(k) = self.ops.pop_front() {
            if k.seq >= upto {
                self.ops.push_front(k);
                break;
            }
            self.bytes -= kept_bytes(k.payload.len());
        }
    }
}

/// Why one attempt at a request did not succeed.
enum Failure {
    /// The answer to give the kernel.
    Final(BackendError),
    /// Try again after `reconnect_interval_ms`, for this reason.
    Retry(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an answer from the agent means "try again": ESHUTDOWN is what a stopping
/// agent answers in-flight requests with (its connections are dropped); EIO is also
/// what a restarted agent answers until its Lease is renewed (IO fence), so it is
/// retried on the same connection until the deadline.
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
    /// Nothing was acknowledged yet, so the first connections need no replay.
    pub fn connect(settings: ProxySettings) -> Result<Self, ProxyError> {
        settings.validate()?;
        let conn = Self::dial_until_deadline(&settings)?;
        let info = conn.info();
        let pool_size = if info.transmission_flags & TFLAG_CAN_MULTI_CONN != 0 {
            settings.upstream_connections as usize
        } else {
            1
        };
        let mut idle = vec![conn];
        // The rest of the pool; whatever fails here is dialled by the first request
        // that finds no idle connection.
        while idle.len() < pool_size {
            match Self::dial(&settings) {
                Ok(c) => idle.push(c),
                Err(_) => break,
            }
        }
        Ok(ProxyBackend {
            info,
            size_bytes: AtomicU64::new(info.size_bytes),
            pool_size,
            upstream: RwLock::new(()),
            idle: Mutex::new(idle),
            replay: Mutex::new(ReplayLog::default()),
            settings,
        })
    }

    /// A fresh connection (so a fresh handshake), retried for `reconnect_timeout_ms`.
    fn dial_until_deadline(settings: &ProxySettings) -> Result<Connection, ProxyError> {
        let deadline = Instant::now() + Duration::from_millis(settings.reconnect_timeout_ms);
        loop {
            match Self::dial(settings) {
                Ok(c) => return Ok(c),
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
        }
    }

    /// Asks the agent for the export's current size (a new handshake) and adopts it
    /// when it grew. Returns the size in effect.
    pub fn refresh_size(&self) -> Result<u64, ProxyError> {
        // Used for the handshake only: a connection joins the pool only after a replay.
        let learned = Self::dial_until_deadline(&self.settings)?.info().size_bytes;
        let before = self.size_bytes.fetch_max(learned, Ordering::AcqRel);
        if learned < before {
            tracing::warn!(
                learned,
                kept = before,
                "attach proxy: the agent reports a smaller export; keeping the larger size"
            );
        }
        Ok(self.size_bytes.load(Ordering::Acquire))
    }

    /// Whether one FLUSH covers writes sent on every connection (NBD multi-conn).
    pub fn multi_conn(&self) -> bool {
        self.info.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }

    fn dial(settings: &ProxySettings) -> Result<Connection, ClientError> {
        Connection::connect(
            &settings.upstream,
            &settings.export,
            Duration::from_millis(settings.io_timeout_ms),
        )
    }

    /// Bytes of acknowledged operations no FLUSH covered yet, kept for replay.
    pub fn unflushed_bytes(&self) -> u64 {
        lock(&self.replay).bytes
    }

    fn give_back(&self, c: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.pool_size {
            idle.push(c);
        }
    }

    /// Runs one request, re-dialing and retrying until the deadline (module docs).
    fn call(&self, req: Request<'_>, mut read_into: Option<&mut [u8]>) -> Result<(), BackendError> {
        let what = req.what;
        let timeout_ms = self.settings.reconnect_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut attempt = 0u32;
        loop {
            let failure = match self.attempt(&req, read_into.as_deref_mut(), deadline) {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(
                            what,
                            attempt,
                            "attach proxy: request succeeded after reconnecting"
                        );
                    }
                    return Ok(());
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Retry(reason)) => reason,
            };
            if attempt == 0 {
                tracing::warn!(what, error = %failure, "attach proxy: agent unavailable, retrying");
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

    /// Sends `req` once on an idle connection; when there is none, first fills the pool
    /// (dialling and replaying exclusively).
    fn attempt(
        &self,
        req: &Request<'_>,
        mut read_into: Option<&mut [u8]>,
        deadline: Instant,
    ) -> Result<(), Failure> {
        loop {
            {
                let _shared = self.upstream.read().unwrap_or_else(|e| e.into_inner());
                let pooled = lock(&self.idle).pop();
                if let Some(mut c) = pooled {
                    // A FLUSH covers what was acknowledged before it was sent.
                    let flush_mark = lock(&self.replay).next_seq;
                    let answer = c.request(
                        req.command,
                        req.flags,
                        req.offset,
                        req.length,
                        req.payload,
                        read_into.as_deref_mut(),
                    );
                    return match answer {
                        Ok(0) => {
                            // Still shared: a replay cannot start before this is logged.
                            self.acknowledged(req, flush_mark);
                            self.give_back(c);
                            Ok(())
                        }
                        Ok(EIO) => {
                            self.give_back(c);
                            Err(Failure::Retry(backend_error(EIO, req.what).to_string()))
                        }
                        Ok(errno) if retryable(errno) => {
                            self.drop_connections();
                            Err(Failure::Retry(backend_error(errno, req.what).to_string()))
                        }
                        Ok(errno) => {
                            self.give_back(c);
                            Err(Failure::Final(backend_error(errno, req.what)))
                        }
                        Err(e) => {
                            self.drop_connections();
                            Err(Failure::Retry(e.to_string()))
                        }
                    };
                }
            }
            // Every connection is busy or gone: wait for the requests in flight, then
            // dial what is missing.
            let _exclusive = self.upstream.write().unwrap_or_else(|e| e.into_inner());
            self.fill_pool(deadline)?;
        }
    }

    /// The connections of a process that failed one request: the idle ones go (the
    /// busy ones fail on their own or come back).
    fn drop_connections(&self) {
        lock(&self.idle).clear();
    }

    /// Replay-log bookkeeping of an operation the agent acknowledged.
    fn acknowledged(&self, req: &Request<'_>, flush_mark: u64) {
        let mut log = lock(&self.replay);
        match req.command {
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => log.push(req),
            CMD_FLUSH => log.drop_before(flush_mark),
            _ => {}
        }
    }

    /// Dials the connections the pool lacks, replaying the log to each before it joins.
    /// Call with the upstream held exclusively. Succeeds when at least one connection
    /// is idle afterwards.
    fn fill_pool(&self, deadline: Instant) -> Result<(), Failure> {
        while lock(&self.idle).len() < self.pool_size {
            let dialled = Self::dial(&self.settings)
                .map_err(|e| Failure::Retry(e.to_string()))
                .and_then(|mut c| self.replay_onto(&mut c, deadline).map(|()| c));
            match dialled {
                Ok(c) => lock(&self.idle).push(c),
                Err(_) if !lock(&self.idle).is_empty() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends every kept operation on a freshly dialled connection (a possibly new agent
    /// process) in acknowledgement order, then a FLUSH; a successful FLUSH empties the
    /// log. EIO answers (a restarted agent before its Lease is renewed) are retried on
    /// the same connection until `deadline`.
    fn replay_onto(&self, c: &mut Connection, deadline: Instant) -> Result<(), Failure> {
        let mut log = lock(&self.replay);
        if log.ops.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let send = |c: &mut Connection, command, flags, offset, length, payload: &[u8]| loop {
            match c.request(command, flags, offset, length, payload, None) {
                Ok(0) => return Ok(()),
                Ok(EIO) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(self.settings.reconnect_interval_ms))
                }
                Ok(errno) if retryable(errno) => {
                    return Err(Failure::Retry(backend_error(errno, "replay").to_string()));
                }
                Ok(errno) => return Err(Failure::Final(backend_error(errno, "replay"))),
                Err(e) => return Err(Failure::Retry(format!("replay: {e}"))),
            }
        };
        for k in &log.ops {
            send(c, k.command, k.flags, k.offset, k.length, &k.payload)?;
        }
        let (ops, bytes) = (log.ops.len(), log.bytes);
        // Not needed for correctness (the log stays and is replayed again), but it spares
        // the next connection the replay. A FLUSH the agent refused leaves the log and
        // the connection as they are; a broken connection does not join the pool.
        let flushed = match send(c, CMD_FLUSH, 0, 0, 0, &[]) {
            Ok(()) => {
                let end = log.next_seq;
                log.drop_before(end);
                true
            }
            Err(Failure::Final(_)) => false,
            Err(retry) => return Err(retry),
        };
        tracing::info!(
            replayed_ops = ops,
            replayed_bytes = bytes,
            flushed,
            pause_ms = started.elapsed().as_millis() as u64,
            "attach proxy: replayed unflushed operations to the agent"
        );
        Ok(())
    }

    /// Sends a write-like request, flushing first if keeping it would overflow the
    /// replay log.
    fn write_like(&self, req: Request<'_>) -> Result<(), BackendError> {
        let over = {
            let log = lock(&self.replay);
            !log.ops.is_empty()
                && log.bytes + kept_bytes(req.payload.len()) > self.settings.replay_bytes_max
        };
        if over {
            self.flush()?;
        }
        self.call(req, None)
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
        self.size_bytes.load(Ordering::Acquire)
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
        self.write_like(Request::new("write", CMD_WRITE, offset, n).with_payload(data, 0))
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let n = len32(data.len() as u64)?;
        let req = Request::new("write", CMD_WRITE, offset, n).with_payload(data, CMD_FLAG_FUA);
        // Kept like any write: replaying an older write of the same block without it
        // would put the older data back.
        self.write_like(req)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.call(Request::new("flush", CMD_FLUSH, 0, 0), None)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.write_like(Request::new("trim", CMD_TRIM, offset, len32(length)?))
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let req = Request::new("write_zeroes", CMD_WRITE_ZEROES, offset, len32(length)?);
        self.write_like(req)
    }
    fn flush_is_volume_wide(&self) -> bool {
        self.multi_conn()
    }
}

/// A running proxy: the mounted volume file and its control socket.
pub struct Proxy {
    export: FuseExport,
    control: ControlServer,
    pub mount: PathBuf,
}

impl Proxy {
    /// Reaches the agent (blocking, bounded), mounts the volume file and opens the
    /// control socket.
    pub async fn start(settings: ProxySettings) -> Result<Proxy, ProxyError> {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || Self::start_blocking(s))
            .await
            .map_err(|e| ProxyError::Setting {
                flag: "upstream",
                reason: format!("start task failed: {e}"),
            })?
    }

    fn start_blocking(settings: ProxySettings) -> Result<Proxy, ProxyError> {
        let backend = Arc::new(ProxyBackend::connect(settings.clone())?);
        let workers = if backend.multi_conn() {
            settings.upstream_connections as usize
        } else {
            1
        };
        let config = FuseExportConfig {
            workers,
            fs_name: format!("blockvol:{}", settings.export),
            ..FuseExportConfig::default()
        };
        let export =
            FuseExport::mount(backend.clone(), &settings.mount, config).map_err(|source| {
                ProxyError::Mount {
                    mount: settings.mount.clone(),
                    source,
                }
            })?;
        let control = match ControlServer::start(&settings.control, backend, export.size_notifier())
        {
            Ok(c) => c,
            Err(e) => {
                let _ = export.unmount();
                return Err(e);
            }
        };
        tracing::info!(mount = %settings.mount.display(), control = %settings.control.display(), upstream = %settings.upstream.display(), export = %settings.export, workers, "attach proxy serving");
        Ok(Proxy {
            export,
            control,
            mount: settings.mount,
        })
    }

    /// The volume file.
    pub fn file(&self) -> PathBuf {
        self.export.file()
    }

    /// Resolves once the volume file is no longer served (unmounted from outside).
    /// Only the first call waits; later calls resolve at once.
    pub async fn ended(&mut self) {
        if let Some(rx) = self.export.take_ended() {
            let _ = rx.await;
        }
    }

    /// Closes the control socket and unmounts the volume file (lazily while a loop
    /// device still uses it).
    pub fn shutdown(self) -> std::io::Result<()> {
        self.control.stop();
        self.export.unmount()
    }
}

/// Answers `resize` on the control socket from a thread of its own.
struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Longest a control client may take to send its command or read the answer.
const CONTROL_IO_TIMEOUT_MS: u64 = 5_000;

impl ControlServer {
    fn start(
        path: &Path,
        backend: Arc<ProxyBackend>,
        notifier: SizeNotifier,
    ) -> Result<Self, ProxyError> {
        let err = |source| ProxyError::Control {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("attach-proxy-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    match conn {
                        Ok(c) => serve_control(c, &backend, &notifier),
                        Err(e) => tracing::warn!(error = %e, "attach proxy: control accept"),
                    }
                }
            })
            .map_err(err)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_control(mut conn: UnixStream, backend: &ProxyBackend, notifier: &SizeNotifier) {
    let timeout = Some(Duration::from_millis(CONTROL_IO_TIMEOUT_MS));
    let _ = conn.set_read_timeout(timeout);
    let _ = conn.set_write_timeout(timeout);
    let mut line = String::new();
    let read = BufReader::new(&mut conn)
        .take(CONTROL_LINE_BYTES_MAX)
        .read_line(&mut line);
    let answer = match (read, line.trim()) {
        (Err(e), _) => format!("error reading the command: {e}"),
        (Ok(_), "resize") => match backend.refresh_size() {
            Ok(size) => match notifier.size_changed() {
                Ok(()) => {
                    tracing::info!(
                        size_bytes = size,
                        "attach proxy: volume file size refreshed"
                    );
                    format!("ok {size}")
                }
                Err(e) => format!("error invalidating the kernel's attributes: {e}"),
            },
            Err(e) => format!("error {e}"),
        },
        (Ok(_), other) => format!(
            "error unknown command {:?}; the only command is `resize`",
            other.chars().take(64).collect::<String>()
        ),
    };
    let _ = conn.write_all(format!("{answer}\n").as_bytes());
}

/// Longest control command line read, in bytes.
const CONTROL_LINE_BYTES_MAX: u64 = 256;

/// Asks the attach proxy listening on `control` to re-read the export's size and set
/// its volume file to it; returns the new size in bytes.
pub fn request_resize(control: &Path) -> Result<u64, String> {
    let timeout = Some(Duration::from_millis(CONTROL_IO_TIMEOUT_MS * 2));
    let mut c = UnixStream::connect(control)
        .map_err(|e| format!("connecting to {}: {e}", control.display()))?;
    let _ = c.set_read_timeout(timeout);
    let _ = c.set_write_timeout(timeout);
    c.write_all(b"resize\n")
        .map_err(|e| format!("sending to {}: {e}", control.display()))?;
    let mut line = String::new();
    BufReader::new(&mut c)
        .take(CONTROL_LINE_BYTES_MAX)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer from {}: {e}", control.display()))?;
    let line = line.trim();
    if let Some(size) = line.strip_prefix("ok ") {
        return size
            .parse()
            .map_err(|_| format!("unexpected answer {line:?} from {}", control.display()));
    }
    Err(line
        .strip_prefix("error ")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("unexpected answer {line:?} from {}", control.display())))
}

/// Runs the proxy until SIGTERM or Ctrl-C, or until its mount is removed from outside.
pub async fn run(settings: ProxySettings) -> Result<(), ProxyError> {
    let mut proxy = Proxy::start(settings).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ProxyError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = proxy.ended() => {
            tracing::info!(mount = %proxy.mount.display(), "attach proxy: volume file unmounted, exiting");
        }
    }
    if let Err(e) = proxy.shutdown() {
        tracing::warn!(error = %e, "attach proxy: unmounting the volume file");
    }
    Ok(())
}

/// The proxy's control socket for a volume's attach directory.
pub fn control_socket_in(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}
