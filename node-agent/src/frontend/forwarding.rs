//! Forwarding frontend: serves a volume over NBD by sending every request to the
//! volume's primary — over the data port (engine `replication::forward`) when the primary
//! is on another node, in process through the same [`ForwardHandler`] when it serves on
//! this node (the fast path: no TCP round trip to our own data port). Every attached
//! device goes through such an export, so a failover or a planned move of the primary,
//! also away from this node, pauses the device instead of breaking it.
//!
//! # Guarantees
//! - A request is answered only by an agent serving the primary at the epoch the
//!   forwarder resolved; "not primary", "stale epoch" and connection loss pause IO,
//!   re-resolve the primary (with bounded backoff, for at most `failover_wait_ms`), and
//!   retry the request there.
//! - No acknowledged write is lost by a failover while this agent process lives. A write
//!   acknowledged to the NBD client is durable only once a forwarded FLUSH covering it
//!   succeeded; until then the old primary may lose it when it dies. So every
//!   acknowledged-but-unflushed WRITE (FUA included), TRIM and WRITE_ZEROES is kept here
//!   (offset and data, in acknowledgement order) and, after switching to a new primary,
//!   replayed there before any other request — in particular before the next FLUSH — is
//!   forwarded. A successful FLUSH drops the entries acknowledged before it was sent. A
//!   WRITE_FUA is already durable, but it is kept all the same: replaying an older kept
//!   write of the same block without it would put the older data back.
//! - The replay log is in memory and dies with the agent process. Across an agent
//!   restart the guarantee comes from the NBD client: a broken connection tells it that
//!   writes no FLUSH covered may be lost. The attach proxy (`attach::proxy`), which
//!   serves every device attached through it, keeps its own replay log for exactly this
//!   and replays it to the restarted agent before any other request, so a FLUSH through
//!   the new process covers what the old one acknowledged even if the primary failed
//!   over meanwhile. A client that reconnects by itself and sends only a FLUSH gets no
//!   such promise for writes acknowledged on its old connection.
//! - An `Io` answer is final: the request fails with EIO and is not retried. The
//!   primary's agent answers so ("fenced: not the attached node") to a node the volume
//!   is not attached to, and ("fenced: stale attachment") to an export of an older
//!   attachment of the volume than the current one ([`Attachments`]; the export sends
//!   the attachment generation it was opened with on every request); and the data port
//!   never runs a request of a connection this export gave up on after a request sent
//!   later (engine `replication::forward`, fence of forwarded requests).
//! - The replay buffer is bounded by `replay_bytes_max`: a write that would overflow it
//!   first forwards a FLUSH. Concurrent writers may overshoot by at most the requests in
//!   flight (the NBD server bounds those).
//!
//! # Assumptions
//! - One forwarding export per volume per node, and one writer node per volume
//!   (ReadWriteOnce): replaying old writes on a new primary is correct only if nobody
//!   else wrote the same blocks in between.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::Epoch;
use engine::forward::{ForwardClient, ForwardHandler, ForwardOutcome, ForwardSource};
use engine::net::NetConfig;
use engine::replication::wire::FORWARD_DATA_BYTES_MAX;
use engine::replication::{
    AttachmentGeneration, ForwardOp, ForwardPayload, ForwardStatus, VolumeId,
};
use futures::future::BoxFuture;

use crate::frontend::nbd::{BackendError, BlockBackend};

/// Settings of a forwarding export (units last).
#[derive(Clone, Debug)]
pub struct ForwardSettings {
    /// Bound of the acknowledged-but-unflushed writes kept for replay, in bytes.
    pub replay_bytes_max: u64,
    /// A forwarded request without a reply for this long ends its connection.
    pub request_timeout_ms: u64,
    /// First wait between re-resolve attempts; doubled up to `reconnect_backoff_max_ms`.
    pub reconnect_backoff_initial_ms: u64,
    /// Longest wait between re-resolve attempts. A promotion is noticed at most this
    /// long after it is written, so it stays well below the Lease duration; each
    /// attempt costs two reads from the API server.
    pub reconnect_backoff_max_ms: u64,
    /// How long one request waits for a reachable primary before failing with EIO.
    pub failover_wait_ms: u64,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        ForwardSettings {
            replay_bytes_max: 64 << 20,
            request_timeout_ms: 30_000,
            reconnect_backoff_initial_ms: 50,
            reconnect_backoff_max_ms: 250,
            failover_wait_ms: 120_000,
        }
    }
}

/// Where a volume's primary serves, as the control plane says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryTarget {
    /// Node of the primary (for logs).
    pub node: String,
    /// The primary agent's data port.
    pub addr: SocketAddr,
    pub epoch: Epoch,
}

/// Why a volume's primary could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The control plane knows no replica of the volume.
    #[error("volume {0} has no replicas")]
    UnknownVolume(String),
    /// The volume exists but no replica is assigned the primary role (yet).
    #[error("volume {0} has no primary assigned")]
    NoPrimary(String),
    /// The API or the primary's node record could not be read.
    #[error("{0}")]
    Lookup(String),
}

/// Finds a volume's current primary. During IO, errors are logged and retried.
pub trait PrimaryResolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, volume: &'a str)
    -> BoxFuture<'a, Result<PrimaryTarget, ResolveError>>;
}

/// Executes forwarded operations on this node's serving primaries (the agent's
/// `LocalPrimaries`): the same handler the data port runs forwarded requests on, so the
/// epoch, writability and Lease checks are identical on both paths.
pub trait LocalExecutor: ForwardHandler {
    /// Whether a primary of `volume` serves on this node right now.
    fn serves(&self, volume: &str) -> bool;
}

/// Lets a forwarding export run requests in process when the resolved primary is this
/// node (compared by node name) and it serves the volume here.
#[derive(Clone)]
pub struct LocalPath {
    /// This node's name, as `PrimaryTarget::node` spells it.
    pub node: String,
    pub primaries: Arc<dyn LocalExecutor>,
}

/// How the current route reaches its primary. Both variants answer with the primary's
/// `ForwardOutcome`, so re-routing and replay do not care which one is in use.
enum RouteClient {
    /// The primary's data port on another node (or ours, when no local primary serves).
    Tcp(Arc<ForwardClient>),
    /// This node's primary, called in process (as a request from this node, of the
    /// export's attachment).
    Local(Arc<dyn LocalExecutor>, String, Option<AttachmentGeneration>),
}

impl RouteClient {
    /// Runs `op` on the primary; an `Err` is a connection-level failure (re-route).
    async fn call(
        &self,
        volume: &VolumeId,
        epoch: Epoch,
        op: ForwardOp,
    ) -> Result<ForwardOutcome, String> {
        match self {
            RouteClient::Tcp(c) => c.call(volume, epoch, op).await.map_err(|e| e.to_string()),
            RouteClient::Local(h, node, attachment) => {
                let from = ForwardSource::in_process(node).with_attachment(*attachment);
                // The handler is synchronous and may block on fsync and replication
                // barriers: keep it off the runtime's workers. NBD requests arrive on
                // blocking-pool threads, where `block_in_place` runs it right there
                // (no thread hop); a current-thread runtime cannot do that, so it gets
                // a blocking task.
                let flavor = tokio::runtime::Handle::current().runtime_flavor();
                if flavor == tokio::runtime::RuntimeFlavor::MultiThread {
                    return Ok(tokio::task::block_in_place(|| {
                        h.handle(&from, volume, epoch, op)
                    }));
                }
                let h = h.clone();
                let volume = volume.clone();
                tokio::task::spawn_blocking(move || h.handle(&from, &volume, epoch, op))
                    .await
                    .map_err(|e| format!("local primary call: {e}"))
            }
        }
    }

    /// For logs: how requests reach the primary.
    fn path(&self) -> &'static str {
        match self {
            RouteClient::Tcp(_) => "data-port",
            RouteClient::Local(..) => "in-process",
        }
    }
}

/// One operation kept for replay.
#[derive(Debug)]
struct Kept {
    seq: u64,
    op: ForwardOp,
}

/// Acknowledged-but-unflushed operations in acknowledgement order.
#[derive(Default, Debug)]
struct ReplayLog {
    ops: VecDeque<Kept>,
    bytes: u64,
    next_seq: u64,
}

/// Bytes an operation costs in the replay buffer (trims and zeroes cost their header).
fn kept_bytes(op: &ForwardOp) -> u64 {
    match op {
        ForwardOp::Write { data, .. } | ForwardOp::WriteFua { data, .. } => data.len() as u64 + 32,
        _ => 32,
    }
}

impl ReplayLog {
    fn push(&mut self, op: ForwardOp) {
        self.bytes += kept_bytes(&op);
        self.ops.push_back(Kept {
            seq: self.next_seq,
            op,
        });
        self.next_seq += 1;
    }
    /// Drops every operation acknowledged before sequence `upto` (a FLUSH sent then
    /// succeeded).
    fn drop_before(&mut self, upto: u64) {
        while self.ops.front().is_some_and(|k| k.seq < upto) {
            if let Some(k) = self.ops.pop_front() {
                self.bytes -= kept_bytes(&k.op);
            }
        }
    }
}

/// The connection requests currently go to; `generation` grows on every switch.
#[derive(Default)]
struct Route {
    generation: u64,
    target: Option<PrimaryTarget>,
    client: Option<Arc<RouteClient>>,
}

struct Inner {
    volume: VolumeId,
    net: NetConfig,
    settings: ForwardSettings,
    resolver: Arc<dyn PrimaryResolver>,
    local: Option<LocalPath>,
    /// The attachment this export serves, sent with every request.
    attachment: Option<AttachmentGeneration>,
    /// Requests hold it shared for their whole round trip (and the replay-log update
    /// after it); a switch holds it exclusively, so it never misses a write acknowledged
    /// on the old route.
    route: tokio::sync::RwLock<Route>,
    replay: Mutex<ReplayLog>,
    switches: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What happened to one attempt.
enum Attempt {
    Done(ForwardPayload),
    Failed(BackendError),
    /// Re-resolve and retry, for this reason.
    Reroute(String),
}

fn classify(o: ForwardOutcome) -> Attempt {
    match o.status {
        ForwardStatus::Ok => Attempt::Done(o.payload),
        ForwardStatus::NotPrimary => Attempt::Reroute(format!(
            "not primary (serving epoch {}): {}",
            o.epoch.0, o.detail
        )),
        ForwardStatus::StaleEpoch => {
            Attempt::Reroute(format!("stale epoch (primary is at {})", o.epoch.0))
        }
        ForwardStatus::Io => Attempt::Failed(BackendError::Io(o.detail)),
        ForwardStatus::Invalid => Attempt::Failed(BackendError::Invalid(o.detail)),
        ForwardStatus::NoSpace => Attempt::Failed(BackendError::NoSpace(o.detail)),
        ForwardStatus::ReadOnly => Attempt::Failed(BackendError::ReadOnly(o.detail)),
    }
}

impl Inner {
    /// Forwards `op` once on the current route; on success runs `after` while the route
    /// is still held (so a switch cannot slip between the acknowledgement and it).
    async fn attempt(
        &self,
        op: &ForwardOp,
        after: impl FnOnce(&ReplayLog) -> Option<u64>,
    ) -> (u64, Attempt, Option<u64>) {
        let route = self.route.read().await;
        let generation = route.generation;
        let (Some(client), Some(target)) = (route.client.clone(), route.target.clone()) else {
            return (
                generation,
                Attempt::Reroute("no primary resolved yet".into()),
                None,
            );
        };
        let mark = after(&lock(&self.replay));
        match client.call(&self.volume, target.epoch, op.clone()).await {
            Ok(o) => {
                let a = classify(o);
                if let Attempt::Done(_) = &a {
                    self.on_success(op, mark);
                }
                (generation, a, mark)
            }
            Err(e) => (generation, Attempt::Reroute(e), mark),
        }
    }

    /// Replay-log bookkeeping of a forwarded operation that succeeded.
    fn on_success(&self, op: &ForwardOp, flush_mark: Option<u64>) {
        let mut log = lock(&self.replay);
        match op {
            ForwardOp::Write { .. }
            | ForwardOp::WriteFua { .. }
            | ForwardOp::Trim { .. }
            | ForwardOp::WriteZeroes { .. } => log.push(op.clone()),
            ForwardOp::Flush => {
                if let Some(m) = flush_mark {
                    log.drop_before(m);
                }
            }
            ForwardOp::Read { .. } | ForwardOp::Geometry => {}
        }
    }

    /// Forwards `op`, re-routing and retrying until it gets a definite answer or the
    /// failover wait is over.
    async fn execute(&self, op: ForwardOp) -> Result<ForwardPayload, BackendError> {
        let deadline = Instant::now() + Duration::from_millis(self.settings.failover_wait_ms);
        let is_flush = matches!(op, ForwardOp::Flush);
        let mut backoff = 0;
        loop {
            // A FLUSH covers what was acknowledged before it was sent: remember where
            // the replay log ended at that moment.
            let (generation, a, _) = self
                .attempt(&op, |log| is_flush.then_some(log.next_seq))
                .await;
            let reason = match a {
                Attempt::Done(p) => return Ok(p),
                Attempt::Failed(e) => return Err(e),
                Attempt::Reroute(reason) => reason,
            };
            // A primary that connects but keeps failing this request must not make the
            // retry loop spin: back off between attempts and give up at the deadline.
            if backoff > 0 {
                if Instant::now() + Duration::from_millis(backoff) > deadline {
                    return Err(BackendError::Io(format!(
                        "volume {}: {} kept failing for failover_wait_ms {} (last: {reason})",
                        self.volume,
                        engine::forward::op_name(&op),
                        self.settings.failover_wait_ms
                    )));
                }
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            backoff = (backoff * 2).clamp(
                self.settings.reconnect_backoff_initial_ms.max(1),
                self.settings.reconnect_backoff_max_ms.max(1),
            );
            self.switch(generation, &reason, deadline).await?;
        }
    }

    /// Replaces the route of `failed_generation` (no-op if another request already did):
    /// re-resolves the primary, connects, replays the unflushed operations there, and
    /// only then lets requests through again.
    async fn switch(
        &self,
        failed_generation: u64,
        reason: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let mut route = self.route.write().await;
        if route.generation != failed_generation {
            return Ok(());
        }
        let started = Instant::now();
        let old = route.target.clone();
        route.client = None;
        let mut backoff = self.settings.reconnect_backoff_initial_ms.max(1);
        let mut last: String;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.try_route().await {
                Ok((target, client, replayed)) => {
                    tracing::info!(
                        volume = %self.volume,
                        old_primary = old.as_ref().map(|t| t.node.as_str()).unwrap_or("-"),
                        new_primary = %target.node,
                        new_address = %target.addr,
                        path = client.path(),
                        epoch = target.epoch.0,
                        pause_ms = started.elapsed().as_millis() as u64,
                        attempts,
                        replayed_ops = replayed.0,
                        replayed_bytes = replayed.1,
                        reason,
                        "forwarding re-routed"
                    );
                    route.target = Some(target);
                    route.client = Some(Arc::new(client));
                    route.generation += 1;
                    self.switches.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, attempt = attempts, error = %e, "re-resolving the primary failed");
                    last = e;
                }
            }
            if Instant::now() + Duration::from_millis(backoff) > deadline {
                return Err(BackendError::Io(format!(
                    "volume {}: no primary reachable within failover_wait_ms {} ({attempts} attempts; last: {last})",
                    self.volume, self.settings.failover_wait_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            backoff = (backoff * 2).min(self.settings.reconnect_backoff_max_ms.max(1));
        }
    }

    /// One resolve + connect + replay round. Returns the replayed (ops, bytes).
    async fn try_route(&self) -> Result<(PrimaryTarget, RouteClient, (u64, u64)), String> {
        let target = self
            .resolver
            .resolve(self.volume.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let client = match &self.local {
            Some(l) if l.node == target.node && l.primaries.serves(self.volume.as_str()) => {
                RouteClient::Local(l.primaries.clone(), l.node.clone(), self.attachment)
            }
            _ => RouteClient::Tcp(Arc::new(
                ForwardClient::connect(target.addr, &self.net, self.settings.request_timeout_ms)
                    .await
                    .map_err(|e| e.to_string())?
                    .with_attachment(self.attachment),
            )),
        };
        // The log cannot change while the route is held exclusively; copy it out so no
        // lock is held across the network round trips.
        let ops: Vec<ForwardOp> = lock(&self.replay)
            .ops
            .iter()
            .map(|k| k.op.clone())
            .collect();
        let mut bytes = 0;
        for op in &ops {
            let o = client
                .call(&self.volume, target.epoch, op.clone())
                .await
                .map_err(|e| format!("replay on {}: {e}", target.node))?;
            if o.status != ForwardStatus::Ok {
                return Err(format!(
                    "replay on {}: {:?}: {}",
                    target.node, o.status, o.detail
                ));
            }
            bytes += kept_bytes(op);
        }
        Ok((target, client, (ops.len() as u64, bytes)))
    }

    /// Forwards a write-like operation, flushing first if the replay buffer would
    /// overflow.
    async fn write_op(&self, op: ForwardOp) -> Result<(), BackendError> {
        let over = {
            let log = lock(&self.replay);
            log.bytes + kept_bytes(&op) > self.settings.replay_bytes_max && !log.ops.is_empty()
        };
        if over {
            self.execute(ForwardOp::Flush).await?;
        }
        self.execute(op).await.map(drop)
    }
}

/// An NBD backend that forwards to the volume's primary, on another agent over the data
/// port or on this one in process (see the module docs for the guarantees).
pub struct ForwardingBackend {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    size_bytes: AtomicU64,
    block_size: u32,
}

impl ForwardingBackend {
    /// Resolves the primary, connects and reads the geometry. Fails if no primary is
    /// reachable within `failover_wait_ms`. Always goes over the data port.
    pub async fn open(
        volume: &str,
        net: NetConfig,
        settings: ForwardSettings,
        resolver: Arc<dyn PrimaryResolver>,
    ) -> Result<Self, BackendError> {
        Self::open_with_local(volume, net, settings, resolver, None).await
    }

    /// Like [`ForwardingBackend::open`], with the in-process fast path to this node's
    /// primaries when `local` is given.
    pub async fn open_with_local(
        volume: &str,
        net: NetConfig,
        settings: ForwardSettings,
        resolver: Arc<dyn PrimaryResolver>,
        local: Option<LocalPath>,
    ) -> Result<Self, BackendError> {
        Self::open_attached(volume, net, settings, resolver, local, None).await
    }

    /// Like [`ForwardingBackend::open_with_local`], for the attachment of generation
    /// `attachment` (from ControllerPublish): every request carries it, and the primary
    /// refuses it for good once a newer attachment of the volume exists.
    pub async fn open_attached(
        volume: &str,
        net: NetConfig,
        settings: ForwardSettings,
        resolver: Arc<dyn PrimaryResolver>,
        local: Option<LocalPath>,
        attachment: Option<AttachmentGeneration>,
    ) -> Result<Self, BackendError> {
        let volume = VolumeId::new(volume.to_string())
            .map_err(|e| BackendError::Invalid(format!("volume name: {e}")))?;
        let inner = Arc::new(Inner {
            volume,
            net,
            settings,
            resolver,
            local,
            attachment,
            route: tokio::sync::RwLock::new(Route::default()),
            replay: Mutex::new(ReplayLog::default()),
            switches: AtomicU64::new(0),
        });
        let (size_bytes, block_size) = geometry(&inner).await?;
        Ok(ForwardingBackend {
            inner,
            rt: tokio::runtime::Handle::current(),
            size_bytes: AtomicU64::new(size_bytes),
            block_size,
        })
    }

    /// The attachment generation this export was opened with.
    pub fn attachment(&self) -> Option<AttachmentGeneration> {
        self.inner.attachment
    }

    /// Re-reads the size from the primary (after an expansion); returns it.
    pub async fn refresh_size(&self) -> Result<u64, BackendError> {
        let (size, _) = geometry(&self.inner).await?;
        self.size_bytes.fetch_max(size, Ordering::AcqRel);
        Ok(self.size_bytes.load(Ordering::Acquire))
    }

    /// The primary requests currently go to.
    pub async fn current_primary(&self) -> Option<PrimaryTarget> {
        self.inner.route.read().await.target.clone()
    }

    /// Whether requests currently run in process on this node's primary.
    pub async fn is_local(&self) -> bool {
        matches!(
            self.inner.route.read().await.client.as_deref(),
            Some(RouteClient::Local(..))
        )
    }

    /// How many times the route was switched (first connection included).
    pub fn switches(&self) -> u64 {
        self.inner.switches.load(Ordering::Relaxed)
    }

    /// Bytes of acknowledged-but-unflushed operations kept for replay.
    pub fn unflushed_bytes(&self) -> u64 {
        lock(&self.inner.replay).bytes
    }

    /// Runs `f` on the runtime from the NBD server's blocking pool.
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Splits `[offset, offset+len)` into pieces a forward frame can carry.
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> {
        (0..len)
            .step_by(FORWARD_DATA_BYTES_MAX)
            .map(move |s| (offset + s as u64, s..(s + FORWARD_DATA_BYTES_MAX).min(len)))
    }

    /// Forwards `data` at `offset` piece by piece, each piece as the write `op` makes of
    /// its offset and bytes; stops at the first piece that fails.
    fn write_pieces(
        &self,
        offset: u64,
        data: &[u8],
        op: fn(u64, Vec<u8>) -> ForwardOp,
    ) -> Result<(), BackendError> {
        for (off, range) in Self::pieces(offset, data.len()) {
            self.block_on(self.inner.write_op(op(off, data[range].to_vec())))?;
        }
        Ok(())
    }
}

async fn geometry(inner: &Inner) -> Result<(u64, u32), BackendError> {
    match inner.execute(ForwardOp::Geometry).await? {
        ForwardPayload::Geometry {
            size_bytes,
            block_size,
        } => Ok((size_bytes, block_size)),
        other => Err(BackendError::Io(format!(
            "primary answered GEOMETRY with {other:?}"
        ))),
    }
}

impl BlockBackend for ForwardingBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let len = buf.len();
        for (off, range) in Self::pieces(offset, len) {
            let length = (range.end - range.start) as u32;
            let p = self.block_on(self.inner.execute(ForwardOp::Read {
                offset: off,
                length,
            }))?;
            match p {
                ForwardPayload::Data(d) if d.len() == range.len() => buf[range].copy_from_slice(&d),
                other => {
                    return Err(BackendError::Io(format!(
                        "primary answered READ of {length} bytes with {}",
                        match other {
                            ForwardPayload::Data(d) => format!("{} bytes", d.len()),
                            _ => "no data".into(),
                        }
                    )));
                }
            }
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write_pieces(offset, data, |offset, data| ForwardOp::Write {
            offset,
            data,
        })
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write_pieces(offset, data, |offset, data| ForwardOp::WriteFua {
            offset,
            data,
        })
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.block_on(self.inner.execute(ForwardOp::Flush))
            .map(drop)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.block_on(self.inner.write_op(ForwardOp::Trim { offset, length }))
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.block_on(
            self.inner
                .write_op(ForwardOp::WriteZeroes { offset, length }),
        )
    }
    /// Every connection of the export shares this backend, its replay log and its
    /// route, and the primary's flush is volume-wide.
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

/// Runs one forwarded operation on a backend (the serving side of forwarding).
pub fn execute_on(b: &dyn BlockBackend, op: ForwardOp) -> Result<ForwardPayload, BackendError> {
    match op {
        ForwardOp::Geometry => Ok(ForwardPayload::Geometry {
            size_bytes: b.size_bytes(),
            block_size: b.block_size(),
        }),
        ForwardOp::Read { offset, length } => {
            let mut buf = vec![0u8; length as usize];
            b.read(offset, &mut buf)?;
            Ok(ForwardPayload::Data(buf))
        }
        ForwardOp::Write { offset, data } => b.write(offset, &data).map(|_| ForwardPayload::None),
        ForwardOp::WriteFua { offset, data } => {
            b.write_fua(offset, &data).map(|_| ForwardPayload::None)
        }
        ForwardOp::Flush => b.flush().map(|_| ForwardPayload::None),
        ForwardOp::Trim { offset, length } => b.trim(offset, length).map(|_| ForwardPayload::None),
        ForwardOp::WriteZeroes { offset, length } => {
            b.write_zeroes(offset, length).map(|_| ForwardPayload::None)
        }
    }
}

/// Resolves a volume's primary from the API: the `BlockReplica` of the volume with role
/// Primary and the highest epoch (the assignment its agent acts on), and the data
/// address of that node's `BlockNode`.
pub struct KubeResolver {
    client: kube::Client,
}

impl KubeResolver {
    pub fn new(client: kube::Client) -> Self {
        KubeResolver { client }
    }
}

impl PrimaryResolver for KubeResolver {
    fn resolve<'a>(
        &'a self,
        volume: &'a str,
    ) -> BoxFuture<'a, Result<PrimaryTarget, ResolveError>> {
        Box::pin(async move {
            let replicas: kube::Api<api::BlockReplica> = kube::Api::all(self.client.clone());
            let lp =
                kube::api::ListParams::default().labels(&format!("{}={volume}", api::LABEL_VOLUME));
            let list = replicas.list(&lp).await.map_err(|e| {
                ResolveError::Lookup(format!("listing the replicas of {volume}: {e}"))
            })?;
            let mine: Vec<_> = list
                .items
                .iter()
                .filter(|r| r.spec.volume == volume)
                .collect();
            if mine.is_empty() {
                return Err(ResolveError::UnknownVolume(volume.to_string()));
            }
            let primary = mine
                .into_iter()
                .filter(|r| r.spec.role == api::ReplicaRole::Primary)
                .max_by_key(|r| r.spec.epoch)
                .ok_or_else(|| ResolveError::NoPrimary(volume.to_string()))?;
            let nodes: kube::Api<api::BlockNode> = kube::Api::all(self.client.clone());
            let node = nodes
                .get_opt(&primary.spec.node)
                .await
                .map_err(|e| {
                    ResolveError::Lookup(format!("reading BlockNode {}: {e}", primary.spec.node))
                })?
                .ok_or_else(|| {
                    ResolveError::Lookup(format!("BlockNode {} does not exist", primary.spec.node))
                })?;
            let addr: SocketAddr = node.spec.data_address.parse().map_err(|e| {
                ResolveError::Lookup(format!(
                    "BlockNode {} data address {:?}: {e}",
                    primary.spec.node, node.spec.data_address
                ))
            })?;
            Ok(PrimaryTarget {
                node: primary.spec.node.clone(),
                addr,
                epoch: Epoch(primary.spec.epoch),
            })
        })
    }
}

/// What the attachment of a volume says about a forwarded request from a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachmentCheck {
    /// The volume is attached to the sending node (at the generation the request
    /// carries, if it carries one), or attached nowhere.
    Allowed,
    /// The volume is attached to another node, or to this node by a newer attachment
    /// than the request's: refuse for good (the forwarder answers EIO and does not
    /// retry).
    Fenced(String),
    /// The attachment could not be learnt (API unreachable before the first sync), or
    /// the request names a newer attachment than the API server knows: refuse for now;
    /// the forwarder re-resolves and retries.
    Unknown(String),
}

/// Where a volume is attached: the node, and the attachment's generation when the CSI
/// controller recorded one ([`api::ANNOTATION_ATTACHMENT_GENERATION`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub node: String,
    pub generation: Option<AttachmentGeneration>,
}

impl Attachment {
    /// Attached to `node`, with no generation recorded.
    pub fn on(node: &str) -> Self {
        Attachment {
            node: node.to_string(),
            generation: None,
        }
    }

    /// The same attachment, of generation `g`.
    pub fn at(mut self, g: u64) -> Self {
        self.generation = Some(AttachmentGeneration(g));
        self
    }
}

/// Reads the attachment of a volume afresh from the API server (`Ok(None)`: attached
/// nowhere, or no such `BlockVolume`). Called on a blocking thread.
pub type AttachmentLookup = Box<dyn Fn(&str) -> Result<Option<Attachment>, String> + Send + Sync>;

#[derive(Default)]
struct AttachmentState {
    /// Whether a full list has been seen since the watch (re)started.
    synced: bool,
    /// Attachment per volume, as the watch last said.
    attached: std::collections::BTreeMap<String, Attachment>,
    /// The list being received while the watch (re)starts.
    relist: std::collections::BTreeMap<String, Attachment>,
}

/// The primary's view of where each volume is attached (the `BlockVolume` annotations
/// [`api::ANNOTATION_ATTACHED_NODE`] and [`api::ANNOTATION_ATTACHMENT_GENERATION`] that
/// the CSI controller writes on ControllerPublish; it removes the node on
/// ControllerUnpublish), fed by a watch of the `BlockVolume`s ([`watch_attachments`]).
///
/// Decision for a forwarded request of `node` on `volume`, carrying the attachment
/// generation `g` of its export (if any) ([`Attachments::check`]):
/// - attached to `node` (at generation `g`, when both the request and the attachment
///   name one), or attached nowhere: allowed. A volume attached nowhere has no single
///   writer to protect (the TCP NBD export, tools, CSI sanity checks use it); once a
///   node's attachment is known, every other node is refused.
/// - otherwise the cached view may lag (a new attachment just written): it is re-read
///   from the API server first, and only a fresh answer naming another node refuses
///   ([`AttachmentCheck::Fenced`], "fenced: not the attached node"), or one naming
///   this node at a newer generation than `g` ("fenced: stale attachment": an export
///   left over by an earlier attachment to the same node, such as a force-detach and
///   re-attach, whose requests may still be retrying). So detaching A and attaching B
///   refuses A from the moment B's attachment is known here or in the API server, and
///   B is never refused because the watch has not caught up. A request naming a newer
///   generation than even the fresh answer is refused retryably (`Unknown`).
/// - a request without a generation (a tool's export, an older build) or an attachment
///   recorded without one (an older CSI controller) is decided by the node alone.
/// - before the watch's first full list, every request is checked against the API
///   server; if that fails the request is refused as [`AttachmentCheck::Unknown`].
pub struct Attachments {
    state: Mutex<AttachmentState>,
    lookup: AttachmentLookup,
}

/// How a request of `node` with generation `g` stands against `current`.
enum Standing {
    Allowed,
    OtherNode,
    Stale,
    Newer,
}

fn standing(current: Option<&Attachment>, node: &str, g: Option<AttachmentGeneration>) -> Standing {
    let Some(a) = current else {
        return Standing::Allowed;
    };
    if a.node != node {
        return Standing::OtherNode;
    }
    match (g, a.generation) {
        (Some(g), Some(cur)) if g < cur => Standing::Stale,
        (Some(g), Some(cur)) if g > cur => Standing::Newer,
        _ => Standing::Allowed,
    }
}

impl Attachments {
    pub fn new(lookup: AttachmentLookup) -> Self {
        Self {
            state: Mutex::new(AttachmentState::default()),
            lookup,
        }
    }

    /// The watch (re)starts a full list.
    pub fn begin_list(&self) {
        lock(&self.state).relist.clear();
    }

    /// One volume of the full list.
    pub fn listed(&self, volume: &str, attachment: Option<Attachment>) {
        if let Some(a) = attachment {
            lock(&self.state).relist.insert(volume.to_string(), a);
        }
    }

    /// The full list is complete: it replaces the view.
    pub fn end_list(&self) {
        let mut st = lock(&self.state);
        st.attached = std::mem::take(&mut st.relist);
        st.synced = true;
    }

    /// A volume changed (`None`: attached nowhere, or deleted).
    pub fn set(&self, volume: &str, attachment: Option<Attachment>) {
        let mut st = lock(&self.state);
        match attachment {
            Some(a) => st.attached.insert(volume.to_string(), a),
            None => st.attached.remove(volume),
        };
    }

    /// Whether `node`, forwarding for the attachment of generation `generation`, may
    /// run IO on `volume` (see the type docs). May block on a read from the API server.
    pub fn check(
        &self,
        volume: &str,
        node: &str,
        generation: Option<AttachmentGeneration>,
    ) -> AttachmentCheck {
        {
            let st = lock(&self.state);
            if st.synced
                && matches!(
                    standing(st.attached.get(volume), node, generation),
                    Standing::Allowed
                )
            {
                return AttachmentCheck::Allowed;
            }
        }
        let fresh = match (self.lookup)(volume) {
            Ok(fresh) => fresh,
            Err(e) => {
                return AttachmentCheck::Unknown(format!(
                    "the attachment of volume {volume} is not known yet: {e}"
                ));
            }
        };
        self.set(volume, fresh.clone());
        let shown = |g: Option<AttachmentGeneration>| {
            g.map_or_else(|| "none".to_string(), |g| g.to_string())
        };
        match (standing(fresh.as_ref(), node, generation), fresh) {
            (Standing::Allowed, _) | (_, None) => AttachmentCheck::Allowed,
            (Standing::OtherNode, Some(a)) => AttachmentCheck::Fenced(format!(
                "fenced: not the attached node (volume {volume} is attached to {}, \
                 the request came from {node})",
                a.node
            )),
            (Standing::Stale, Some(a)) => AttachmentCheck::Fenced(format!(
                "fenced: stale attachment (volume {volume} is attached to {node} at \
                 generation {}, the request was sent for generation {})",
                shown(a.generation),
                shown(generation)
            )),
            (Standing::Newer, Some(a)) => AttachmentCheck::Unknown(format!(
                "the request names attachment generation {} of volume {volume}, the API \
                 server knows {}",
                shown(generation),
                shown(a.generation)
            )),
        }
    }
}

/// The attachment a `BlockVolume` records (an unparsable generation counts as none:
/// the node still decides).
fn attachment(bv: &api::BlockVolume) -> Option<Attachment> {
    let annotations = bv.metadata.annotations.as_ref()?;
    let node = annotations.get(api::ANNOTATION_ATTACHED_NODE)?;
    Some(Attachment {
        node: node.clone(),
        generation: annotations
            .get(api::ANNOTATION_ATTACHMENT_GENERATION)
            .and_then(|g| g.parse().ok())
            .map(AttachmentGeneration),
    })
}

/// Reads one volume's attachment afresh from the API server (for [`Attachments::new`]);
/// call only on a blocking thread.
pub fn kube_attachment_lookup(
    client: kube::Client,
    rt: tokio::runtime::Handle,
    timeout_ms: u64,
) -> AttachmentLookup {
    Box::new(move |volume: &str| {
        let api: kube::Api<api::BlockVolume> = kube::Api::all(client.clone());
        let got = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(timeout_ms), api.get_opt(volume)).await
        });
        match got {
            Ok(Ok(bv)) => Ok(bv.as_ref().and_then(attachment)),
            Ok(Err(e)) => Err(format!("reading BlockVolume {volume}: {e}")),
            Err(_) => Err(format!(
                "reading BlockVolume {volume} took over {timeout_ms} ms"
            )),
        }
    })
}

/// Keeps `view` in step with the `BlockVolume`s' attachments until the task is dropped.
/// Watch errors are logged and the watch restarts with backoff (a restart lists anew).
pub async fn watch_attachments(client: kube::Client, view: Arc<Attachments>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<api::BlockVolume> = kube::Api::all(client);
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Init) => view.begin_list(),
            Ok(watcher::Event::InitApply(bv)) => {
                view.listed(&kube::ResourceExt::name_any(&bv), attachment(&bv))
            }
            Ok(watcher::Event::InitDone) => view.end_list(),
            Ok(watcher::Event::Apply(bv)) => {
                view.set(&kube::ResourceExt::name_any(&bv), attachment(&bv))
            }
            Ok(watcher::Event::Delete(bv)) => view.set(&kube::ResourceExt::name_any(&bv), None),
            Err(e) => tracing::warn!(error = %e, "watching volume attachments"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attachment view whose API server says `api` (None: unreachable) and counts
    /// the reads.
    fn view(api: Arc<Mutex<Option<Option<Attachment>>>>, reads: Arc<AtomicU64>) -> Attachments {
        Attachments::new(Box::new(move |_v: &str| {
            reads.fetch_add(1, Ordering::Relaxed);
            lock(&api).clone().ok_or_else(|| "unreachable".to_string())
        }))
    }

    #[test]
    fn only_the_attached_node_may_forward_and_a_lagging_view_is_re_read() {
        let api = Arc::new(Mutex::new(None));
        let reads = Arc::new(AtomicU64::new(0));
        let v = view(api.clone(), reads.clone());
        // Before the first list, with the API unreachable: refused, retryably.
        assert!(matches!(
            v.check("vol", "a", None),
            AttachmentCheck::Unknown(_)
        ));
        v.begin_list();
        v.listed("vol", Some(Attachment::on("a")));
        v.listed("other", None);
        v.end_list();
        assert_eq!(v.check("vol", "a", None), AttachmentCheck::Allowed);
        assert_eq!(v.check("other", "b", None), AttachmentCheck::Allowed);
        assert_eq!(reads.load(Ordering::Relaxed), 1);

        // Force-detached from a and attached to b; the watch has not caught up yet:
        // b is allowed after a fresh read, which also updates the view.
        *lock(&api) = Some(Some(Attachment::on("b")));
        assert_eq!(v.check("vol", "b", None), AttachmentCheck::Allowed);
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        // From now on a is refused for good, b served without reading the API.
        match v.check("vol", "a", None) {
            AttachmentCheck::Fenced(d) => {
                assert!(d.starts_with("fenced: not the attached node"), "{d}")
            }
            other => panic!("a node no longer attached was not fenced: {other:?}"),
        }
        let before = reads.load(Ordering::Relaxed);
        assert_eq!(v.check("vol", "b", None), AttachmentCheck::Allowed);
        assert_eq!(reads.load(Ordering::Relaxed), before);

        // The watch says the attachment moved to c: b is refused at once (retryably
        // while the API server cannot be read, for good once it confirms).
        v.set("vol", Some(Attachment::on("c")));
        *lock(&api) = None;
        assert!(matches!(
            v.check("vol", "b", None),
            AttachmentCheck::Unknown(_)
        ));
        *lock(&api) = Some(Some(Attachment::on("c")));
        assert!(matches!(
            v.check("vol", "b", None),
            AttachmentCheck::Fenced(_)
        ));

        // Detached everywhere: anyone may forward (tools, the TCP export).
        v.set("vol", None);
        assert_eq!(v.check("vol", "b", None), AttachmentCheck::Allowed);
    }

    /// A re-attach to the same node bumps the generation: the node's export of the
    /// older attachment is refused for good, the current one served; a request naming
    /// a generation the API server does not know yet is refused retryably.
    #[test]
    fn an_older_attachment_of_the_same_node_is_fenced() {
        let api = Arc::new(Mutex::new(Some(Some(Attachment::on("b").at(1)))));
        let reads = Arc::new(AtomicU64::new(0));
        let v = view(api.clone(), reads.clone());
        v.begin_list();
        v.listed("vol", Some(Attachment::on("b").at(1)));
        v.end_list();
        let g = |n| Some(AttachmentGeneration(n));
        assert_eq!(v.check("vol", "b", g(1)), AttachmentCheck::Allowed);
        assert_eq!(v.check("vol", "b", None), AttachmentCheck::Allowed);
        assert_eq!(reads.load(Ordering::Relaxed), 0);

        // Unpublished and published again to b: generation 2, the watch lags.
        *lock(&api) = Some(Some(Attachment::on("b").at(2)));
        assert_eq!(v.check("vol", "b", g(2)), AttachmentCheck::Allowed);
        match v.check("vol", "b", g(1)) {
            AttachmentCheck::Fenced(d) => assert!(d.starts_with("fenced: stale attachment"), "{d}"),
            other => panic!("an export of an older attachment was not fenced: {other:?}"),
        }
        // Ahead of the API server: not refused for good.
        assert!(matches!(
            v.check("vol", "b", g(3)),
            AttachmentCheck::Unknown(_)
        ));
        // Another node stays fenced whatever generation it names.
        assert!(matches!(
            v.check("vol", "c", g(2)),
            AttachmentCheck::Fenced(_)
        ));
        // An attachment recorded without a generation: the node alone decides.
        v.set("vol", Some(Attachment::on("b")));
        *lock(&api) = Some(Some(Attachment::on("b")));
        assert_eq!(v.check("vol", "b", g(1)), AttachmentCheck::Allowed);
    }

    #[test]
    fn replay_log_drops_only_what_a_flush_covered() {
        let mut log = ReplayLog::default();
        log.push(ForwardOp::Write {
            offset: 0,
            data: vec![1; 4096],
        });
        let mark = log.next_seq;
        log.push(ForwardOp::Trim {
            offset: 4096,
            length: 4096,
        });
        assert_eq!(log.bytes, 4096 + 32 + 32);
        log.drop_before(mark);
        assert_eq!(log.ops.len(), 1);
        assert_eq!(log.bytes, 32);
        assert!(matches!(log.ops[0].op, ForwardOp::Trim { .. }));
    }

    #[test]
    fn large_requests_split_into_frame_sized_pieces() {
        let p: Vec<_> = ForwardingBackend::pieces(4096, FORWARD_DATA_BYTES_MAX * 2 + 512).collect();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], (4096, 0..FORWARD_DATA_BYTES_MAX));
        assert_eq!(p[2].0, 4096 + 2 * FORWARD_DATA_BYTES_MAX as u64);
        assert_eq!(p[2].1.len(), 512);
    }
}
