//! Prometheus metrics of the operator, served by the shared telemetry endpoint
//! ([`telemetry::http`]) in the OpenMetrics text format with its content type.
//!
//! Besides reconcile counters it exports each volume's health as the leader last wrote
//! it to the volume's status (phase, desired and in-sync replicas, whether a primary is
//! set), so alerts can name the volume. Only the leader holds these series: they are
//! dropped when leadership is lost, when the volume is deleted, and while it is being
//! deleted (a deleting volume is expected to lose its primary and replicas).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use api::{BlockVolumeStatus, VolumePhase};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{Error, Result};

type Labels = Vec<(String, String)>;

/// Every `result` of a reconcile and every `reason` of a failed one (the values of
/// `Error::metric_label`): their series exist from the start, at zero, so a rate over
/// them works from the first failure on.
pub const RECONCILE_RESULTS: [&str; 2] = ["ok", "error"];
pub const RECONCILE_ERROR_REASONS: [&str; 6] = [
    "KubeApi",
    "Finalizer",
    "MissingField",
    "Waiting",
    "LostLeadership",
    "Metrics",
];

pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    volumes: Family<Labels, Gauge>,
    leader: Gauge,
    volume_phase: Family<Labels, Gauge>,
    volume_desired: Family<Labels, Gauge>,
    volume_in_sync: Family<Labels, Gauge>,
    volume_has_primary: Family<Labels, Gauge>,
    phases: Mutex<BTreeMap<String, VolumePhase>>,
}

fn volume_label(volume: &str) -> Labels {
    vec![("volume".to_string(), volume.to_string())]
}

fn volume_phase_label(volume: &str, phase: VolumePhase) -> Labels {
    vec![
        ("volume".to_string(), volume.to_string()),
        ("phase".to_string(), format!("{phase:?}")),
    ]
}

const PHASES: [VolumePhase; 6] = [
    VolumePhase::Pending,
    VolumePhase::Creating,
    VolumePhase::Ready,
    VolumePhase::Degraded,
    VolumePhase::Failed,
    VolumePhase::Deleting,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("blockvol_operator");
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 12))) as fn() -> Histogram,
        );
        let volumes = Family::<Labels, Gauge>::default();
        let leader = Gauge::default();
        let volume_phase = Family::<Labels, Gauge>::default();
        let volume_desired = Family::<Labels, Gauge>::default();
        let volume_in_sync = Family::<Labels, Gauge>::default();
        let volume_has_primary = Family::<Labels, Gauge>::default();
        registry.register(
            "reconciles",
            "Volume reconciles by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed volume reconciles by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one volume reconcile took",
            duration.clone(),
        );
        registry.register("volumes", "Volumes by phase", volumes.clone());
        registry.register(
            "leader",
            "Whether this operator holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "volume_phase",
            "1 for the volume's phase in its status, 0 for every other phase",
            volume_phase.clone(),
        );
        registry.register(
            "volume_replicas_desired",
            "Replicas the volume's spec asks for",
            volume_desired.clone(),
        );
        registry.register(
            "volume_replicas_in_sync",
            "Replicas in the volume's in-sync set (they hold every acknowledged write)",
            volume_in_sync.clone(),
        );
        registry.register(
            "volume_has_primary",
            "1 while the volume's status names a primary replica",
            volume_has_primary.clone(),
        );
        for result in RECONCILE_RESULTS {
            let l = vec![("result".to_string(), result.to_string())];
            let _ = reconciles.get_or_create(&l);
            let _ = duration.get_or_create(&l);
        }
        for reason in RECONCILE_ERROR_REASONS {
            let _ = errors.get_or_create(&vec![("reason".to_string(), reason.to_string())]);
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            volumes,
            leader,
            volume_phase,
            volume_desired,
            volume_in_sync,
            volume_has_primary,
            phases: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, result: &str, seconds: f64) {
        let l = vec![("result".to_string(), result.to_string())];
        self.reconciles.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(seconds);
    }

    pub fn reconcile_failed(&self, reason: &str) {
        self.errors
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Records a volume's phase; `None` forgets the volume (it is gone) and `Deleting`
    /// drops its per-volume series (it keeps counting in `volumes{phase="Deleting"}`).
    pub fn set_phase(&self, volume: &str, phase: Option<VolumePhase>) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        match phase {
            Some(p) => phases.insert(volume.to_string(), p),
            None => phases.remove(volume),
        };
        match phase {
            Some(p) if p != VolumePhase::Deleting => {
                for candidate in PHASES {
                    self.volume_phase
                        .get_or_create(&volume_phase_label(volume, candidate))
                        .set(i64::from(candidate == p));
                }
            }
            _ => self.forget_volume(volume),
        }
        self.count_phases(&phases);
    }

    /// Records the status the leader just wrote for `volume` (spec asks for `desired`
    /// replicas): its phase and health gauges.
    pub fn set_volume(&self, volume: &str, desired: u8, status: &BlockVolumeStatus) {
        self.set_phase(volume, Some(status.phase));
        if status.phase == VolumePhase::Deleting {
            return;
        }
        let l = volume_label(volume);
        self.volume_desired
            .get_or_create(&l)
            .set(i64::from(desired));
        self.volume_in_sync
            .get_or_create(&l)
            .set(i64::from(status.in_sync_count));
        self.volume_has_primary
            .get_or_create(&l)
            .set(i64::from(status.primary.is_some()));
    }

    fn forget_volume(&self, volume: &str) {
        for p in PHASES {
            self.volume_phase.remove(&volume_phase_label(volume, p));
        }
        let l = volume_label(volume);
        self.volume_desired.remove(&l);
        self.volume_in_sync.remove(&l);
        self.volume_has_primary.remove(&l);
    }

    fn count_phases(&self, phases: &BTreeMap<String, VolumePhase>) {
        for p in PHASES {
            let n = phases.values().filter(|v| **v == p).count();
            self.volumes
                .get_or_create(&vec![("phase".to_string(), format!("{p:?}"))])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records leadership. Losing it forgets every volume: another operator reconciles
    /// them now, and stale series here would duplicate (or contradict) its own.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if leading {
            return;
        }
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        for volume in std::mem::take(&mut *phases).keys() {
            self.forget_volume(volume);
        }
        self.count_phases(&phases);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `/metrics` is the exposition; `/healthz` and `/readyz` answer 200 whenever the process
/// can answer at all (a follower is ready too: it takes over when the leader goes).
impl telemetry::http::Probes for Metrics {
    async fn metrics(&self) -> Option<String> {
        Some(self.render())
    }

    async fn readyz(&self) -> Option<Result<(), String>> {
        Some(Ok(()))
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(Error::Metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_by_phase_follow_set_and_forget() {
        let m = Metrics::default();
        m.set_phase("a", Some(VolumePhase::Ready));
        m.set_phase("b", Some(VolumePhase::Ready));
        m.set_phase("c", Some(VolumePhase::Degraded));
        let text = m.render();
        assert!(
            text.contains("blockvol_operator_volumes{phase=\"Ready\"} 2"),
            "{text}"
        );
        m.set_phase("b", None);
        m.set_phase("c", Some(VolumePhase::Ready));
        let text = m.render();
        assert!(
            text.contains("blockvol_operator_volumes{phase=\"Ready\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("blockvol_operator_volumes{phase=\"Degraded\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn reconcile_counters_are_labelled() {
        let m = Metrics::default();
        let text = m.render();
        assert!(
            text.contains("blockvol_operator_reconcile_errors_total{reason=\"Waiting\"} 0"),
            "every reason at zero before the first failure: {text}"
        );
        m.reconciled("ok", 0.01);
        m.reconcile_failed("Kube");
        let text = m.render();
        assert!(
            text.contains("blockvol_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("blockvol_operator_reconcile_errors_total{reason=\"Kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("blockvol_operator_reconcile_duration_seconds_count{result=\"ok\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn volume_health_follows_status_until_deleting_gone_or_leadership_lost() {
        let m = Metrics::default();
        let degraded = BlockVolumeStatus {
            phase: VolumePhase::Degraded,
            primary: Some("v-r0".into()),
            in_sync_count: 1,
            ..Default::default()
        };
        m.set_volume("v", 2, &degraded);
        let text = m.render();
        for line in [
            r#"blockvol_operator_volume_phase{volume="v",phase="Degraded"} 1"#,
            r#"blockvol_operator_volume_phase{volume="v",phase="Ready"} 0"#,
            r#"blockvol_operator_volume_replicas_desired{volume="v"} 2"#,
            r#"blockvol_operator_volume_replicas_in_sync{volume="v"} 1"#,
            r#"blockvol_operator_volume_has_primary{volume="v"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        let failed = BlockVolumeStatus {
            phase: VolumePhase::Failed,
            ..Default::default()
        };
        m.set_volume("w", 1, &failed);
        let text = m.render();
        assert!(
            text.contains(r#"blockvol_operator_volume_has_primary{volume="w"} 0"#),
            "{text}"
        );
        let ones = text
            .lines()
            .filter(|l| l.starts_with(r#"blockvol_operator_volume_phase{volume="w""#))
            .filter(|l| l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1, "one-hot phase\n{text}");
        // Deleting: no health series (a deleting volume loses its primary on purpose).
        m.set_phase("v", Some(VolumePhase::Deleting));
        let text = m.render();
        assert!(!text.contains(r#"volume="v""#), "{text}");
        assert!(
            text.contains(r#"blockvol_operator_volumes{phase="Deleting"} 1"#),
            "{text}"
        );
        // Leadership lost: another operator owns the volumes now.
        m.set_leader(false);
        let text = m.render();
        assert!(!text.contains(r#"volume="w""#), "{text}");
        assert!(
            text.contains(r#"blockvol_operator_volumes{phase="Failed"} 0"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_404s_other_paths() {
        use telemetry::http::{OPENMETRICS_CONTENT_TYPE, serve};
        let m = std::sync::Arc::new(Metrics::default());
        m.set_leader(true);
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l, m));
        let get = |path| testkit::http::get(addr, path);
        let body = get("/metrics").await;
        assert!(
            body.starts_with("HTTP/1.1 200") && body.contains("blockvol_operator_leader 1"),
            "{body}"
        );
        assert!(
            body.contains(&format!("\r\ncontent-type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
