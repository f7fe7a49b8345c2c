//! Counts NBD traffic per export: [`MeteredBackend`] wraps each export's backend, so the
//! IO path gains a few atomic adds and one histogram observation per request and nothing
//! else. A volume's series exist from its first wrapper (at zero) until its last one is
//! dropped, so volumes deleted or moved away do not stay in every scrape.

use std::sync::Arc;
use std::time::Instant;

use api::{PvcReference, ReplicaRole};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets_range};
use prometheus_client::registry::Registry;

use super::nbd::{BackendError, BlockBackend};

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
pub(crate) struct VolumeLabels {
    pub(crate) volume: String,
    pub(crate) pvc: String,
    pub(crate) pvc_namespace: String,
    pub(crate) replica: String,
    pub(crate) role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    volume: String,
    pvc: String,
    pvc_namespace: String,
    replica: String,
    role: String,
    op: String,
}

/// The claim each volume with a replica on this node serves (from its `BlockReplica`
/// spec), for the `pvc` and `pvc_namespace` labels of its series; both are empty for a
/// volume without a claim or one this node holds no replica of. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct VolumeClaims(Arc<std::sync::RwLock<std::collections::BTreeMap<String, PvcReference>>>);

impl VolumeClaims {
    /// Records the claim of `volume` (`None`: it has none, or no replica here any more).
    pub fn set(&self, volume: &str, pvc: Option<&PvcReference>) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        match pvc {
            Some(p) => {
                if m.get(volume) != Some(p) {
                    m.insert(volume.to_string(), p.clone());
                }
            }
            None => {
                m.remove(volume);
            }
        }
    }

    /// The `pvc` and `pvc_namespace` label values of `volume`.
    pub fn labels(&self, volume: &str) -> (String, String) {
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        m.get(volume)
            .map(|p| (p.name.clone(), p.namespace.clone()))
            .unwrap_or_default()
    }

    pub(crate) fn volume_labels(&self, volume: &str, replica: &str, role: &str) -> VolumeLabels {
        let (pvc, pvc_namespace) = self.labels(volume);
        VolumeLabels {
            volume: volume.to_string(),
            pvc,
            pvc_namespace,
            replica: replica.to_string(),
            role: role.to_string(),
        }
    }
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
    claims: VolumeClaims,
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
            claims: VolumeClaims::default(),
        }
    }
}

impl NbdMetrics {
    /// The claims the series of each volume are labelled with (taken when an export is
    /// wrapped, so a changed claim shows on the volume's next export).
    pub fn claims(&self) -> &VolumeClaims {
        &self.claims
    }

    /// Registers the NBD families in `registry` (once, at start).
    pub(crate) fn register(&self, registry: &mut Registry) {
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
        let labels = self.claims.volume_labels(volume, replica, role_label(role));
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
        let labels = self.claims.volume_labels(volume, "", FORWARDING_ROLE);
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
        pvc: v.pvc.clone(),
        pvc_namespace: v.pvc_namespace.clone(),
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

pub(crate) fn role_label(role: ReplicaRole) -> &'static str {
    match role {
        ReplicaRole::Primary => "primary",
        ReplicaRole::Replica => "replica",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::MemBackend;
    use prometheus_client::encoding::text::encode_registry;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        encode_registry(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn metered_backend_counts_requests_bytes_and_errors_by_op() {
        let m = NbdMetrics::default();
        m.claims().set(
            "v1",
            Some(&PvcReference {
                name: "data".into(),
                namespace: "prod".into(),
            }),
        );
        let mut registry = Registry::with_prefix("blockvol_agent");
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
        let l = r#"volume="v1",pvc="data",pvc_namespace="prod",replica="v1-r0",role="primary""#;
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
        let mut registry = Registry::with_prefix("blockvol_agent");
        m.register(&mut registry);
        let inner = Arc::new(MemBackend::new(8192, 512).expect("backend"));
        let b = m.wrap_forwarding("v1", inner);
        b.write(0, &[1u8; 1024]).expect("write");
        b.flush().expect("flush");
        let text = render(&registry);
        // A volume without a claim: both claim labels empty.
        let l = r#"volume="v1",pvc="",pvc_namespace="",replica="",role="forwarding""#;
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
}
