//! What the agent's telemetry endpoint answers: the Prometheus exposition and readiness.
//! NBD traffic is counted as it happens ([`crate::frontend::metered`]); replica,
//! replication, WAL, Lease and disk gauges are sampled when scraped, so they cost nothing
//! between scrapes and always equal what the engine reports right then.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::ReplicaState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::frontend::metered::{NbdMetrics, VolumeClaims, VolumeLabels, role_label};
use crate::k8s::{LeaseRenewer, disk_usage};
use crate::replicas::{EngineRuntime, ReplicaSample};

/// Prefix of every agent metric.
pub const METRIC_PREFIX: &str = "blockvol_agent";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    volume: String,
    pvc: String,
    pvc_namespace: String,
    replica: String,
    role: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    volume: String,
    pvc: String,
    pvc_namespace: String,
    replica: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStateLabels {
    volume: String,
    pvc: String,
    pvc_namespace: String,
    replica: String,
    peer: String,
    state: String,
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
        replica_gauges(&mut r, samples, self.nbd.claims());
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

/// `/healthz` answers 200 whenever the process can answer at all; `/readyz` answers 503
/// with the reason while the agent cannot safely serve IO.
impl telemetry::http::Probes for AgentMetrics {
    async fn metrics(&self) -> Option<String> {
        Some(self.render().await)
    }

    async fn readyz(&self) -> Option<Result<(), String>> {
        Some(self.not_ready().map_or(Ok(()), Err))
    }
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Per-replica and per-peer gauges from one sample of every local replica, and the
/// recovery byte counters each local primary keeps per peer (they count from the start
/// of its primary term on this node, so they reset when the term or the process does).
fn replica_gauges(r: &mut Registry, samples: &[ReplicaSample], claims: &VolumeClaims) {
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
    let peer_rebuild_remaining = Family::<PeerLabels, Gauge>::default();
    for s in samples {
        let st = &s.status;
        let l = claims.volume_labels(
            &s.volume,
            &s.replica_id,
            role_label(st.role.unwrap_or_default()),
        );
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
                    pvc: l.pvc.clone(),
                    pvc_namespace: l.pvc_namespace.clone(),
                    replica: l.replica.clone(),
                    role: l.role.clone(),
                    state: state_label(candidate),
                })
                .set(i64::from(candidate == st.state));
        }
        for (peer, bytes) in &s.peer_recovery_bytes {
            let pl = PeerLabels {
                volume: l.volume.clone(),
                pvc: l.pvc.clone(),
                pvc_namespace: l.pvc_namespace.clone(),
                replica: l.replica.clone(),
                peer: peer.clone(),
            };
            peer_catch_up.get_or_create(&pl).inc_by(bytes.catch_up);
            peer_rebuild.get_or_create(&pl).inc_by(bytes.rebuild);
        }
        for (peer, progress) in &s.peer_rebuild_progress {
            let pl = PeerLabels {
                volume: l.volume.clone(),
                pvc: l.pvc.clone(),
                pvc_namespace: l.pvc_namespace.clone(),
                replica: l.replica.clone(),
                peer: peer.clone(),
            };
            peer_rebuild_remaining
                .get_or_create(&pl)
                .set(gauge_i64(progress.remaining()));
        }
        for p in &st.peers {
            let pl = PeerLabels {
                volume: l.volume.clone(),
                pvc: l.pvc.clone(),
                pvc_namespace: l.pvc_namespace.clone(),
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
                        pvc: pl.pvc.clone(),
                        pvc_namespace: pl.pvc_namespace.clone(),
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
    r.register(
        "peer_rebuild_remaining_bytes",
        "Base bytes the local primary still has to send the peer it is rebuilding (only blocks holding data are sent; absent when no rebuild runs)",
        peer_rebuild_remaining,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::ReplicaRole;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        encode_registry(&mut out, registry).expect("encode");
        out
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
                    lag: None,
                    replica_id: "v-r1".into(),
                    state: ReplicaState::CatchingUp,
                    flushed_lsn: 70,
                    last_error: None,
                },
                api::PeerStatus {
                    lag: None,
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
            peer_rebuild_progress: [(
                "v-r2".to_string(),
                engine::replication::RebuildProgress {
                    bytes_done: 1 << 20,
                    bytes_total: 4 << 20,
                },
            )]
            .into(),
        }];
        let claims = VolumeClaims::default();
        claims.set(
            "v",
            Some(&api::PvcReference {
                name: "data".into(),
                namespace: "prod".into(),
            }),
        );
        let mut r = Registry::with_prefix(METRIC_PREFIX);
        replica_gauges(&mut r, &samples, &claims);
        let text = render(&r);
        let l = r#"volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",role="primary""#;
        for line in [
            format!(r#"blockvol_agent_replica_epoch{{{l}}} 4"#),
            format!(r#"blockvol_agent_replica_flushed_lsn{{{l}}} 90"#),
            format!(r#"blockvol_agent_wal_fill_ratio{{{l}}} 0.25"#),
            format!(r#"blockvol_agent_replica_state{{{l},state="Serving"}} 1"#),
            format!(r#"blockvol_agent_replica_state{{{l},state="InSync"}} 0"#),
            r#"blockvol_agent_peer_lag_lsn{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r1"} 30"#.into(),
            r#"blockvol_agent_peer_lag_bytes{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r1"} 120"#.into(),
            r#"blockvol_agent_peer_state{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r1",state="CatchingUp"} 1"#.into(),
            r#"blockvol_agent_peer_catch_up_bytes_total{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r1"} 4160"#.into(),
            r#"blockvol_agent_peer_rebuild_bytes_total{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r1"} 0"#.into(),
            // A peer never recovered has its counters at zero.
            r#"blockvol_agent_peer_catch_up_bytes_total{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r2"} 0"#.into(),
            r#"blockvol_agent_peer_rebuild_bytes_total{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r2"} 0"#.into(),
            // The peer being rebuilt has 3 of its 4 MiB of base still to come.
            r#"blockvol_agent_peer_rebuild_remaining_bytes{volume="v",pvc="data",pvc_namespace="prod",replica="v-r0",peer="v-r2"} 3145728"#.into(),
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
