//! The agent's liveness Lease (`coordination.k8s.io`, named after the node, the kubelet
//! pattern). The operator promotes away from a primary only after this Lease expired,
//! and a primary serves IO only while its own renewals are recent: [`LeaseRenewer`]
//! exposes the moment of the last successful renewal for that read fence.
//!
//! A lapse latches the fence. Once the renewals have lapsed (the first renewal of a
//! process counts as following a lapse), the operator may have promoted another replica
//! and demoted this node's primaries in the API while this agent could not hear it. A
//! renewal that succeeds again therefore does not reopen IO by itself: the fence stays
//! shut until the agent has read its `BlockReplica`s afresh from the API server and
//! fenced every local primary they no longer name ([`LeaseRenewer::confirm`]). Without
//! the latch, a deposed primary whose renewals resume before its watch delivers the
//! demotion would serve reads of pre-failover data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub node_name: String,
    /// How long the Lease holds without renewal, in seconds.
    pub lease_duration_s: u32,
    /// How often it is renewed, in milliseconds (well under the duration).
    pub renew_interval_ms: u64,
}

impl LeaseSettings {
    pub fn new(namespace: impl Into<String>, node_name: impl Into<String>) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            node_name: node_name.into(),
            lease_duration_s: 10,
            renew_interval_ms: 2_000,
        }
    }
}

pub struct LeaseRenewer {
    api: Api<Lease>,
    settings: LeaseSettings,
    fence: RenewalFence,
}

/// The IO fence kept by the renewals: open while the last renewal is younger than the
/// Lease and every lapse has been confirmed (see the module documentation).
pub struct RenewalFence {
    lease: Duration,
    last_renewed: watch::Sender<Option<Instant>>,
    /// Lapses seen so far, and the highest one whose aftermath was confirmed against
    /// the API. IO is fenced while they differ.
    lapses: AtomicU64,
    confirmed: AtomicU64,
}

impl RenewalFence {
    pub fn new(lease: Duration) -> Self {
        RenewalFence {
            lease,
            last_renewed: watch::channel(None).0,
            lapses: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
        }
    }

    /// A renewal sent at `started` succeeded. If the previous renewal is older than the
    /// Lease (or there is none), the fence was shut for a while and another node may
    /// have been promoted meanwhile: latch, before this renewal makes the Lease look
    /// fresh again. Returns the lapse number when it latched.
    pub fn renewed(&self, started: Instant) -> Option<u64> {
        self.renewed_at(started, Instant::now())
    }

    fn renewed_at(&self, started: Instant, now: Instant) -> Option<u64> {
        let lapsed = self
            .last_renewed
            .borrow()
            .is_none_or(|prev| now.saturating_duration_since(prev) >= self.lease);
        let n = lapsed.then(|| self.lapses.fetch_add(1, Ordering::AcqRel) + 1);
        // The renewal counts from when it was sent: the server may have stamped it
        // any time after that.
        self.last_renewed.send_replace(Some(started));
        n
    }

    /// The lapse whose aftermath is not confirmed yet, if any.
    pub fn unconfirmed_lapse(&self) -> Option<u64> {
        let n = self.lapses.load(Ordering::Acquire);
        (n != self.confirmed.load(Ordering::Acquire)).then_some(n)
    }

    /// Lapse `n` (and every earlier one) is confirmed.
    pub fn confirm(&self, n: u64) {
        self.confirmed.fetch_max(n, Ordering::AcqRel);
    }

    /// True while the last renewal is younger than the Lease and no lapse awaits
    /// confirmation.
    pub fn is_open(&self) -> bool {
        self.is_open_at(Instant::now())
    }

    fn is_open_at(&self, now: Instant) -> bool {
        self.unconfirmed_lapse().is_none()
            && self
                .last_renewed
                .borrow()
                .is_some_and(|t| now.saturating_duration_since(t) < self.lease)
    }

    pub fn last_renewed(&self) -> watch::Receiver<Option<Instant>> {
        self.last_renewed.subscribe()
    }
}

impl LeaseRenewer {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaseRenewer {
            api: Api::namespaced(client, &settings.namespace),
            fence: RenewalFence::new(Duration::from_secs(u64::from(settings.lease_duration_s))),
            settings,
        }
    }

    /// The lapse whose aftermath is not confirmed yet, if any: the caller reads the
    /// node's assignments afresh and then calls [`LeaseRenewer::confirm`] with it.
    pub fn unconfirmed_lapse(&self) -> Option<u64> {
        self.fence.unconfirmed_lapse()
    }

    /// The assignments were read from the API server after lapse `n` ended and every
    /// local primary they no longer name is fenced: IO may resume while renewals stay
    /// fresh.
    pub fn confirm(&self, n: u64) {
        self.fence.confirm(n)
    }

    /// When the Lease was last renewed (local monotonic clock), for the IO fence.
    pub fn last_renewed(&self) -> watch::Receiver<Option<Instant>> {
        self.fence.last_renewed()
    }

    /// Renews once.
    pub async fn renew(&self) -> Result<()> {
        let started = Instant::now();
        let name = &self.settings.node_name;
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(api::LABEL_NODE.to_string(), name.clone())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.settings.lease_duration_s).unwrap_or(i32::MAX),
                ),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let body = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": lease.metadata,
            "spec": lease.spec,
        });
        self.api
            .patch(
                name,
                &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(Error::Kube)?;
        if let Some(n) = self.fence.renewed(started) {
            tracing::info!(node = %name, lapse = n, "lease renewed after a lapse; IO stays fenced until the assignments are re-read");
        }
        Ok(())
    }

    /// Renews every `renew_interval_ms` until dropped; failures are logged and retried.
    pub async fn run(&self) {
        loop {
            if let Err(e) = self.renew().await {
                tracing::warn!(node = %self.settings.node_name, error = %e, "lease renewal failed");
            }
            tokio::time::sleep(Duration::from_millis(self.settings.renew_interval_ms)).await;
        }
    }

    /// True while the last renewal is younger than the lease duration and no lapse
    /// awaits confirmation.
    pub fn is_fresh(&self) -> bool {
        self.fence.is_open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_after_a_lapse_keeps_the_fence_shut_until_confirmed() {
        let f = RenewalFence::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!f.is_open_at(at(0)), "no renewal yet");
        // The first renewal of a process follows an unknown gap: it latches.
        assert_eq!(f.renewed_at(at(0), at(0)), Some(1));
        assert!(!f.is_open_at(at(0)));
        f.confirm(1);
        assert!(f.is_open_at(at(0)));

        // Renewals within the Lease keep it open without any confirmation.
        assert_eq!(f.renewed_at(at(9), at(9)), None);
        assert!(f.is_open_at(at(18)));

        // Renewals stop: the fence shuts when the Lease runs out...
        assert!(!f.is_open_at(at(19)));
        // ...and a renewal that finally succeeds does not reopen it by itself.
        assert_eq!(f.renewed_at(at(25), at(25)), Some(2));
        assert!(!f.is_open_at(at(25)));
        // A confirmation of an older lapse does not count for the newer one.
        f.confirm(1);
        assert!(!f.is_open_at(at(25)));
        f.confirm(2);
        assert!(f.is_open_at(at(25)));
    }

    #[test]
    fn a_renewal_whose_answer_came_after_the_lease_ran_out_latches() {
        let f = RenewalFence::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        f.renewed_at(at(0), at(0));
        f.confirm(1);
        // Sent in time, answered after the Lease ran out: the fence was shut meanwhile.
        assert!(!f.is_open_at(at(11)));
        assert_eq!(f.renewed_at(at(8), at(11)), Some(2));
        assert!(!f.is_open_at(at(11)));
    }
}
