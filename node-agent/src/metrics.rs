//! The agent's Prometheus metrics and its health endpoints. NBD traffic is counted by
//! [`MeteredBackend`], a wrapper around each export's backend, so the IO path gains a
//! few atomic adds and one histogram observation per request and nothing else.
//! Replica, replication, WAL, Lease and disk gauges are sampled when scraped, so they
//! cost nothing between scrapes and always equal what the engine reports right then.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::{ReplicaRole, ReplicaState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets_range};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::k8s::{LeaseRenewer, disk_usage};
use crate::nbd::{BackendError, BlockBackend};
use crate::runtime::{EngineRuntime, ReplicaSample};

/// Prefix of every agent metric.
pub const METRIC_PREFIX: &str = "blockvol_agent";
/// Largest HTTP request head the endpoint reads, in bytes.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a client may take to send its request, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Smallest and largest finite latency bucket bound, in seconds, and the bucket count.
/// 50 µs is a page-cache hit; 10 s is far past any timeout a client would wait out.
pub const LATENCY_BUCKET_MIN_S: f64 = 50e-6;
pub const LATENCY_BUCKET_MAX_S: f64 = 10.0;
pub const LATENCY_BUCKETS: u16 = 18;

/// The NBD operations a backend sees. FUA writes count as `write` (their latency
/// includes the flush they imply).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum NbdOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl NbdOp {
    pub const ALL: [NbdOp; 5] = [
        NbdOp::Read,
        NbdOp::Write,
        NbdOp::Flush,
        NbdOp::Trim,
        NbdOp::WriteZeroes,
    ];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            NbdOp::Read => "read",
            NbdOp::Write => "write",
            NbdOp::Flush => "flush",
            NbdOp::Trim => "trim",
            NbdOp::WriteZeroes => "write_zeroes",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
    replica: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    volume: String,
    replica: String,
    role: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    volume: String,
    replica: String,
    role: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    volume: String,
    replica: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStateLabels {
    volume: String,
    replica: String,
    peer: String,
    state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(
        LATENCY_BUCKET_MIN_S,
        LATENCY_BUCKET_MAX_S,
        LATENCY_BUCKETS,
    ))
}

/// The NBD counters of every export; cheap to clone (the families are shared).
#[derive(Clone)]
pub struct NbdMetrics {
    requests: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    latency: HistogramFamily<OpLabels>,
    read_bytes: Family<VolumeLabels, Counter>,
    written_bytes: Family<VolumeLabels, Counter>,
    /// Live wrappers per label set: a volume's series go when its last export does, so
    /// volumes deleted or moved away do not stay in every scrape.
    live: Arc<std::sync::Mutex<std::collections::HashMap<VolumeLabels, usize>>>,
}

impl Default for NbdMetrics {
    fn default() -> Self {
        NbdMetrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            live: Arc::default(),
        }
    }
}

impl NbdMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "nbd_requests",
            "NBD requests that reached the volume backend, by operation",
            self.requests.clone(),
        );
        registry.register(
            "nbd_request_errors",
            "NBD requests the volume backend failed, by operation",
            self.errors.clone(),
        );
        registry.register(
            "nbd_request_duration_seconds",
            "Time the volume backend took for one NBD request, by operation",
            self.latency.clone(),
        );
        registry.register(
            "nbd_read_bytes",
            "Bytes returned by NBD READ requests",
            self.read_bytes.clone(),
        );
        registry.register(
            "nbd_written_bytes",
            "Payload bytes of NBD WRITE requests that succeeded",
            self.written_bytes.clone(),
        );
    }

    /// Wraps `inner` so every request through it is counted under these labels. Every
    /// series is created here, so a volume shows zeroes before its first request.
    pub fn wrap(
        &self,
        volume: &str,
        replica: &str,
        role: ReplicaRole,
        inner: Arc<dyn BlockBackend>,
    ) -> Arc<dyn BlockBackend> {
        let labels = VolumeLabels {
            volume: volume.to_string(),
            replica: replica.to_string(),
            role: role_label(role).to_string(),
        };
        self.wrap_labels(labels, inner)
    }

    /// Wraps the forwarding export of `volume` (the one every attached device uses):
    /// its series carry `role="forwarding"` and an empty `replica`, wherever the
    /// primary serves, so a device's IO stays in one series across failovers.
    pub fn wrap_forwarding(
        &self,
        volume: &str,
        inner: Arc<dyn BlockBackend>,
    ) -> Arc<dyn BlockBackend> {
        let labels = VolumeLabels {
            volume: volume.to_string(),
            replica: String::new(),
            role: FORWARDING_ROLE.to_string(),
        };
        self.wrap_labels(labels, inner)
    }

    fn wrap_labels(
        &self,
        labels: VolumeLabels,
        inner: Arc<dyn BlockBackend>,
    ) -> Arc<dyn BlockBackend> {
        *self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(labels.clone())
            .or_default() += 1;
        let op = |op: NbdOp| {
            let l = op_labels(&labels, op);
            OpMeter {
                requests: self.requests.get_or_create_owned(&l),
                errors: self.errors.get_or_create_owned(&l),
                latency: self.latency.get_or_create_owned(&l),
            }
        };
        Arc::new(MeteredBackend {
            read: op(NbdOp::Read),
            write: op(NbdOp::Write),
            flush: op(NbdOp::Flush),
            trim: op(NbdOp::Trim),
            write_zeroes: op(NbdOp::WriteZeroes),
            read_bytes: self.read_bytes.get_or_create_owned(&labels),
            written_bytes: self.written_bytes.get_or_create_owned(&labels),
            inner,
            owner: self.clone(),
            labels,
        })
    }

    /// Forgets one wrapper of `labels`; the last one removes the series.
    fn release(&self, labels: &VolumeLabels) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = live.get_mut(labels) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        live.remove(labels);
        for op in NbdOp::ALL {
            let l = op_labels(labels, op);
            self.requests.remove(&l);
            self.errors.remove(&l);
            self.latency.remove(&l);
        }
        self.read_bytes.remove(labels);
        self.written_bytes.remove(labels);
    }
}

fn op_labels(v: &VolumeLabels, op: NbdOp) -> OpLabels {
    OpLabels {
        volume: v.volume.clone(),
        replica: v.replica.clone(),
        role: v.role.clone(),
        op: op.label().to_string(),
    }
}

/// The handles of one operation's series, resolved once so requests never touch the
/// families' locks.
struct OpMeter {
    requests: Counter,
    errors: Counter,
    latency: Histogram,
}

impl OpMeter {
    fn time<T>(&self, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
        let started = Instant::now();
        let r = f();
        self.record(started, r.is_ok());
        r
    }

    fn record(&self, started: Instant, ok: bool) {
        self.latency.observe(started.elapsed().as_secs_f64());
        self.requests.inc();
        if !ok {
            self.errors.inc();
        }
    }
}

/// A [`BlockBackend`] that counts and times every request and forwards it unchanged.
pub struct MeteredBackend {
    inner: Arc<dyn BlockBackend>,
    read: OpMeter,
    write: OpMeter,
    flush: OpMeter,
    trim: OpMeter,
    write_zeroes: OpMeter,
    read_bytes: Counter,
    written_bytes: Counter,
    owner: NbdMetrics,
    labels: VolumeLabels,
}

impl Drop for MeteredBackend {
    fn drop(&mut self) {
        // The export is gone and its connections closed (the registry held the last
        // reference), so nothing counts under these labels any more.
        self.owner.release(&self.labels);
    }
}

impl BlockBackend for MeteredBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read.time(|| self.inner.read(offset, buf))?;
        self.read_bytes.inc_by(buf.len() as u64);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write.time(|| self.inner.write(offset, data))?;
        self.written_bytes.inc_by(data.len() as u64);
        Ok(())
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write.time(|| self.inner.write_fua(offset, data))?;
        self.written_bytes.inc_by(data.len() as u64);
        Ok(())
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        // Counted only when it happened; a `None` is followed by a counted `write`.
        let started = Instant::now();
        let r = self.inner.try_write(offset, data)?;
        self.write.record(started, r.is_ok());
        if r.is_ok() {
            self.written_bytes.inc_by(data.len() as u64);
        }
        Some(r)
    }
    fn runs_inline(&self) -> bool {
        self.inner.runs_inline()
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.flush.time(|| self.inner.flush())
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.trim.time(|| self.inner.trim(offset, length))
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.write_zeroes
            .time(|| self.inner.write_zeroes(offset, length))
    }
    fn flush_is_volume_wide(&self) -> bool {
        self.inner.flush_is_volume_wide()
    }
    fn resize(&self, new_size_bytes: u64) -> Result<(), BackendError> {
        self.inner.resize(new_size_bytes)
    }
}

/// `role` label of a forwarding export's NBD series.
pub const FORWARDING_ROLE: &str = "forwarding";

fn role_label(role: ReplicaRole) -> &'static str {
    match role {
        ReplicaRole::Primary => "primary",
        ReplicaRole::Replica => "replica",
    }
}

/// Every replica state, so the one-hot state gauges always carry all values.
const STATES: [ReplicaState; 10] = [
    ReplicaState::Pending,
    ReplicaState::Disconnected,
    ReplicaState::Connecting,
    ReplicaState::CatchingUp,
    ReplicaState::InSync,
    ReplicaState::Degraded,
    ReplicaState::NeedsRebuild,
    ReplicaState::Rebuilding,
    ReplicaState::Serving,
    ReplicaState::Failed,
];

fn state_label(s: ReplicaState) -> String {
    format!("{s:?}")
}

/// What readiness depends on besides the Lease: both flip once, at start.
#[derive(Default)]
pub struct Readiness {
    registered: AtomicBool,
    data_port: std::sync::OnceLock<SocketAddr>,
}

impl Readiness {
    /// The `BlockNode` was applied at least once.
    pub fn set_registered(&self) {
        self.registered.store(true, Ordering::Release);
    }
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }
    /// The replication data port is bound at `addr`.
    pub fn set_data_port(&self, addr: SocketAddr) {
        let _ = self.data_port.set(addr);
    }
}

/// Everything the endpoint reads: the static families and the sources sampled per scrape.
pub struct AgentMetrics {
    registry: Registry,
    nbd: NbdMetrics,
    runtime: Arc<EngineRuntime>,
    lease: Arc<LeaseRenewer>,
    readiness: Arc<Readiness>,
    data_dir: PathBuf,
}

impl AgentMetrics {
    pub fn new(
        nbd: NbdMetrics,
        runtime: Arc<EngineRuntime>,
        lease: Arc<LeaseRenewer>,
        readiness: Arc<Readiness>,
        data_dir: PathBuf,
    ) -> Self {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        nbd.register(&mut registry);
        AgentMetrics {
            registry,
            nbd,
            runtime,
            lease,
            readiness,
            data_dir,
        }
    }

    pub fn nbd(&self) -> &NbdMetrics {
        &self.nbd
    }

    /// Why the agent is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if self.readiness.data_port.get().is_none() {
            return Some("the replication data port is not bound".into());
        }
        if !self.readiness.registered() {
            return Some("the BlockNode is not registered with the API server yet".into());
        }
        if !self.lease.is_fresh() {
            return Some(match self.lease_age() {
                Some(age) => format!(
                    "the node Lease was last renewed {:.1} s ago, longer than its duration; IO is fenced",
                    age.as_secs_f64()
                ),
                None => "the node Lease has not been renewed yet".into(),
            });
        }
        None
    }

    fn lease_age(&self) -> Option<Duration> {
        let last = *self.lease.last_renewed().borrow();
        last.map(|t| t.elapsed())
    }

    /// The whole exposition (OpenMetrics text): counters, then gauges sampled now.
    pub async fn render(&self) -> String {
        let samples = self.runtime.samples().await;
        let sampled = self.sampled_registry(&samples);
        let mut out = String::new();
        let ok = encode_registry(&mut out, &self.registry).is_ok()
            && encode_registry(&mut out, &sampled).is_ok()
            && encode_eof(&mut out).is_ok();
        if !ok {
            // Writing into a String cannot fail; a half exposition is worse than none.
            out.clear();
        }
        out
    }

    fn sampled_registry(&self, samples: &[ReplicaSample]) -> Registry {
        let mut r = Registry::with_prefix(METRIC_PREFIX);
        self.agent_gauges(&mut r);
        replica_gauges(&mut r, samples);
        r
    }

    fn agent_gauges(&self, r: &mut Registry) {
        let up = Gauge::<i64>::default();
        up.set(1);
        r.register("up", "1 while the agent process serves this endpoint", up);
        let ready = Gauge::<i64>::default();
        ready.set(i64::from(self.not_ready().is_none()));
        r.register("ready", "1 while /readyz answers 200", ready);
        let exports = Gauge::<i64>::default();
        exports.set(i64::try_from(self.runtime.exports().names().len()).unwrap_or(i64::MAX));
        r.register("exports", "NBD exports served by this agent", exports);
        let fresh = Gauge::<i64>::default();
        fresh.set(i64::from(self.lease.is_fresh()));
        r.register(
            "lease_fresh",
            "1 while the node Lease was renewed within its duration (IO is allowed)",
            fresh,
        );
        if let Some(age) = self.lease_age() {
            let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            g.set(age.as_secs_f64());
            r.register(
                "lease_last_renew_age_seconds",
                "Time since the last successful node Lease renewal was sent",
                g,
            );
        }
        match disk_usage(&self.data_dir) {
            Ok((capacity, free)) => {
                let c = Gauge::<i64>::default();
                c.set(i64::try_from(capacity).unwrap_or(i64::MAX));
                r.register(
                    "data_dir_capacity_bytes",
                    "Size of the filesystem holding the data directory",
                    c,
                );
                let f = Gauge::<i64>::default();
                f.set(i64::try_from(free).unwrap_or(i64::MAX));
                r.register(
                    "data_dir_free_bytes",
                    "Bytes of the data directory's filesystem available to the agent",
                    f,
                );
            }
            Err(e) => tracing::warn!(error = %e, "data directory usage for metrics"),
        }
    }
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Per-replica and per-peer gauges from one sample of every local replica, and the
/// recovery byte counters each local primary keeps per peer (they count from the start
/// of its primary term on this node, so they reset when the term or the process does).
fn replica_gauges(r: &mut Registry, samples: &[ReplicaSample]) {
    let epoch = Family::<VolumeLabels, Gauge>::default();
    let head = Family::<VolumeLabels, Gauge>::default();
    let flushed = Family::<VolumeLabels, Gauge>::default();
    let checkpoint = Family::<VolumeLabels, Gauge>::default();
    let wal_used = Family::<VolumeLabels, Gauge>::default();
    let wal_capacity = Family::<VolumeLabels, Gauge>::default();
    let wal_fill = Family::<VolumeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let state = Family::<StateLabels, Gauge>::default();
    let peer_flushed = Family::<PeerLabels, Gauge>::default();
    let peer_lag = Family::<PeerLabels, Gauge>::default();
    let peer_lag_bytes = Family::<PeerLabels, Gauge>::default();
    let peer_state = Family::<PeerStateLabels, Gauge>::default();
    let peer_catch_up = Family::<PeerLabels, Counter>::default();
    let peer_rebuild = Family::<PeerLabels, Counter>::default();
    for s in samples {
        let st = &s.status;
        let l = VolumeLabels {
            volume: s.volume.clone(),
            replica: s.replica_id.clone(),
            role: role_label(st.role.unwrap_or_default()).to_string(),
        };
        epoch.get_or_create(&l).set(gauge_i64(st.epoch));
        head.get_or_create(&l).set(gauge_i64(st.head_lsn));
        flushed.get_or_create(&l).set(gauge_i64(st.flushed_lsn));
        checkpoint
            .get_or_create(&l)
            .set(gauge_i64(st.checkpoint_lsn));
        wal_used.get_or_create(&l).set(gauge_i64(s.wal_used_bytes));
        wal_capacity
            .get_or_create(&l)
            .set(gauge_i64(s.wal_size_bytes));
        if s.wal_size_bytes > 0 {
            wal_fill
                .get_or_create(&l)
                .set(s.wal_used_bytes as f64 / s.wal_size_bytes as f64);
        }
        for candidate in STATES {
            state
                .get_or_create(&StateLabels {
                    volume: l.volume.clone(),
                    replica: l.replica.clone(),
                    role: l.role.clone(),
                    state: state_label(candidate),
                })
                .set(i64::from(candidate == st.state));
        }
        for (peer, bytes) in &s.peer_recovery_bytes {
            let pl = PeerLabels {
                volume: l.volume.clone(),
                replica: l.replica.clone(),
                peer: peer.clone(),
            };
            peer_catch_up.get_or_create(&pl).inc_by(bytes.catch_up);
            peer_rebuild.get_or_create(&pl).inc_by(bytes.rebuild);
        }
        for p in &st.peers {
            let pl = PeerLabels {
                volume: l.volume.clone(),
                replica: l.replica.clone(),
                peer: p.replica_id.clone(),
            };
            // Zero until the first recovery, so rates and stall alerts see the series
            // from the start (counters created on first use hide their first step).
            let _ = peer_catch_up.get_or_create(&pl);
            let _ = peer_rebuild.get_or_create(&pl);
            peer_flushed
                .get_or_create(&pl)
                .set(gauge_i64(p.flushed_lsn));
            peer_lag
                .get_or_create(&pl)
                .set(gauge_i64(st.head_lsn.saturating_sub(p.flushed_lsn)));
            if let Some(bytes) = s.peer_lag_bytes.get(&p.replica_id) {
                peer_lag_bytes.get_or_create(&pl).set(gauge_i64(*bytes));
            }
            for candidate in STATES {
                peer_state
                    .get_or_create(&PeerStateLabels {
                        volume: pl.volume.clone(),
                        replica: pl.replica.clone(),
                        peer: pl.peer.clone(),
                        state: state_label(candidate),
                    })
                    .set(i64::from(candidate == p.state));
            }
        }
    }
    r.register(
        "replica_epoch",
        "Epoch persisted in the replica's volume",
        epoch,
    );
    r.register("replica_head_lsn", "Highest LSN in the replica's WAL", head);
    r.register(
        "replica_flushed_lsn",
        "Highest LSN the replica has fsynced",
        flushed,
    );
    r.register(
        "replica_checkpoint_lsn",
        "LSN up to which the WAL has been written back to the extent",
        checkpoint,
    );
    r.register("wal_used_bytes", "WAL bytes holding entries", wal_used);
    r.register("wal_capacity_bytes", "WAL size", wal_capacity);
    r.register(
        "wal_fill_ratio",
        "WAL used bytes divided by its size (1 means writes wait for the flusher)",
        wal_fill,
    );
    r.register(
        "replica_state",
        "1 for the replica's current state, 0 for every other state",
        state,
    );
    r.register(
        "peer_flushed_lsn",
        "A peer's durable LSN as the local primary last heard it",
        peer_flushed,
    );
    r.register(
        "peer_lag_lsn",
        "The local primary's head LSN minus the peer's flushed LSN",
        peer_lag,
    );
    r.register(
        "peer_lag_bytes",
        "WAL bytes after the peer's flushed LSN (absent once they left the WAL)",
        peer_lag_bytes,
    );
    r.register(
        "peer_state",
        "1 for the peer's state as the local primary sees it, 0 for every other state",
        peer_state,
    );
    r.register(
        "peer_catch_up_bytes",
        "Bytes of WAL entries the local primary sent the peer to catch it up",
        peer_catch_up,
    );
    r.register(
        "peer_rebuild_bytes",
        "Bytes of base blocks and WAL entries the local primary sent the peer to rebuild it",
        peer_rebuild,
    );
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
/// `/healthz` answers 200 whenever the process can answer at all; `/readyz` answers
/// 503 with the reason while the agent cannot safely serve IO.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move { answer(conn, peer, &metrics).await });
    }
}

async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut len = 0;
    let read = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), async {
        while len < buf.len() {
            let n = conn.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    matches!(read, Ok(Ok(()))).then(|| String::from_utf8_lossy(&buf[..len]).into_owned())
}

async fn answer(mut conn: tokio::net::TcpStream, peer: SocketAddr, metrics: &AgentMetrics) {
    let Some(head) = read_head(&mut conn).await else {
        tracing::debug!(%peer, "metrics request not read in time");
        return;
    };
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    const TEXT: &str = "text/plain; charset=utf-8";
    let (code, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render().await,
        ),
        ("GET", "/healthz") => ("200 OK", TEXT, "ok\n".to_string()),
        ("GET", "/readyz") => match metrics.not_ready() {
            None => ("200 OK", TEXT, "ok\n".to_string()),
            Some(reason) => ("503 Service Unavailable", TEXT, format!("{reason}\n")),
        },
        ("GET", _) => ("404 Not Found", TEXT, "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            TEXT,
            "only GET is served\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {code}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::MemBackend;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        encode_registry(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn metered_backend_counts_requests_bytes_and_errors_by_op() {
        let m = NbdMetrics::default();
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        m.register(&mut registry);
        let inner = Arc::new(MemBackend::new(8192, 512).expect("backend"));
        let b = m.wrap("v1", "v1-r0", ReplicaRole::Primary, inner);
        b.write(0, &[1u8; 1024]).expect("write");
        b.write_fua(1024, &[2u8; 512]).expect("fua");
        let mut buf = [0u8; 2048];
        b.read(0, &mut buf).expect("read");
        b.flush().expect("flush");
        b.trim(0, 512).expect("trim");
        b.write_zeroes(512, 512).expect("zero");
        assert!(b.write(8192, &[0u8; 512]).is_err(), "out of range");
        let text = render(&registry);
        let l = r#"volume="v1",replica="v1-r0",role="primary""#;
        for line in [
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="write"}} 3"#),
            format!(r#"blockvol_agent_nbd_request_errors_total{{{l},op="write"}} 1"#),
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="read"}} 1"#),
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="flush"}} 1"#),
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="trim"}} 1"#),
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="write_zeroes"}} 1"#),
            format!(r#"blockvol_agent_nbd_request_errors_total{{{l},op="read"}} 0"#),
            format!(r#"blockvol_agent_nbd_written_bytes_total{{{l}}} 1536"#),
            format!(r#"blockvol_agent_nbd_read_bytes_total{{{l}}} 2048"#),
            format!(r#"blockvol_agent_nbd_request_duration_seconds_count{{{l},op="write"}} 3"#),
            format!(
                r#"blockvol_agent_nbd_request_duration_seconds_bucket{{le="+Inf",{l},op="read"}} 1"#
            ),
        ] {
            assert!(text.lines().any(|t| t == line), "missing {line}\n{text}");
        }
        // A second wrapper of the same volume (a new primary term) shares the series;
        // they go when the last wrapper does.
        let again = m.wrap(
            "v1",
            "v1-r0",
            ReplicaRole::Primary,
            Arc::new(MemBackend::new(8192, 512).expect("backend")),
        );
        drop(b);
        assert!(render(&registry).contains("volume=\"v1\""));
        drop(again);
        let text = render(&registry);
        assert!(!text.contains("volume=\"v1\""), "{text}");
    }

    #[test]
    fn forwarding_exports_count_under_their_own_role_until_dropped() {
        let m = NbdMetrics::default();
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        m.register(&mut registry);
        let inner = Arc::new(MemBackend::new(8192, 512).expect("backend"));
        let b = m.wrap_forwarding("v1", inner);
        b.write(0, &[1u8; 1024]).expect("write");
        b.flush().expect("flush");
        let text = render(&registry);
        let l = r#"volume="v1",replica="",role="forwarding""#;
        for line in [
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="write"}} 1"#),
            format!(r#"blockvol_agent_nbd_requests_total{{{l},op="flush"}} 1"#),
            format!(r#"blockvol_agent_nbd_written_bytes_total{{{l}}} 1024"#),
        ] {
            assert!(text.contains(&line), "missing {line}:\n{text}");
        }
        drop(b);
        assert!(
            !render(&registry).contains("role=\"forwarding\""),
            "a removed forwarding export's series must go"
        );
    }

    #[test]
    fn latency_buckets_span_50us_to_10s() {
        let b: Vec<f64> =
            exponential_buckets_range(LATENCY_BUCKET_MIN_S, LATENCY_BUCKET_MAX_S, LATENCY_BUCKETS)
                .collect();
        assert_eq!(b.len(), usize::from(LATENCY_BUCKETS));
        assert!((b[0] - 50e-6).abs() < 1e-12, "{b:?}");
        assert!((b[b.len() - 1] - 10.0).abs() < 1e-9, "{b:?}");
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
    }

    #[test]
    fn replica_gauges_are_one_hot_lag_is_head_minus_peer_flushed_and_recovery_bytes_count() {
        let status = api::BlockReplicaStatus {
            state: ReplicaState::Serving,
            role: Some(ReplicaRole::Primary),
            epoch: 4,
            head_lsn: 100,
            flushed_lsn: 90,
            checkpoint_lsn: 50,
            peers: vec![
                api::PeerStatus {
                    replica_id: "v-r1".into(),
                    state: ReplicaState::CatchingUp,
                    flushed_lsn: 70,
                    last_error: None,
                },
                api::PeerStatus {
                    replica_id: "v-r2".into(),
                    state: ReplicaState::InSync,
                    flushed_lsn: 100,
                    last_error: None,
                },
            ],
            ..Default::default()
        };
        let samples = [ReplicaSample {
            volume: "v".into(),
            replica_id: "v-r0".into(),
            status,
            wal_used_bytes: 256,
            wal_size_bytes: 1024,
            peer_lag_bytes: [("v-r1".to_string(), 120)].into(),
            peer_recovery_bytes: [(
                "v-r1".to_string(),
                engine::replication::RecoveryBytes {
                    catch_up: 4160,
                    rebuild: 0,
                },
            )]
            .into(),
        }];
        let mut r = Registry::with_prefix(METRIC_PREFIX);
        replica_gauges(&mut r, &samples);
        let text = render(&r);
        let l = r#"volume="v",replica="v-r0",role="primary""#;
        for line in [
            format!(r#"blockvol_agent_replica_epoch{{{l}}} 4"#),
            format!(r#"blockvol_agent_replica_flushed_lsn{{{l}}} 90"#),
            format!(r#"blockvol_agent_wal_fill_ratio{{{l}}} 0.25"#),
            format!(r#"blockvol_agent_replica_state{{{l},state="Serving"}} 1"#),
            format!(r#"blockvol_agent_replica_state{{{l},state="InSync"}} 0"#),
            r#"blockvol_agent_peer_lag_lsn{volume="v",replica="v-r0",peer="v-r1"} 30"#.into(),
            r#"blockvol_agent_peer_lag_bytes{volume="v",replica="v-r0",peer="v-r1"} 120"#.into(),
            r#"blockvol_agent_peer_state{volume="v",replica="v-r0",peer="v-r1",state="CatchingUp"} 1"#.into(),
            r#"blockvol_agent_peer_catch_up_bytes_total{volume="v",replica="v-r0",peer="v-r1"} 4160"#.into(),
            r#"blockvol_agent_peer_rebuild_bytes_total{volume="v",replica="v-r0",peer="v-r1"} 0"#.into(),
            // A peer never recovered has its counters at zero.
            r#"blockvol_agent_peer_catch_up_bytes_total{volume="v",replica="v-r0",peer="v-r2"} 0"#.into(),
            r#"blockvol_agent_peer_rebuild_bytes_total{volume="v",replica="v-r0",peer="v-r2"} 0"#.into(),
        ] {
            assert!(text.lines().any(|t| t == line), "missing {line}\n{text}");
        }
        let ones = text
            .lines()
            .filter(|t| t.starts_with("blockvol_agent_replica_state{") && t.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1, "{text}");
    }
}
