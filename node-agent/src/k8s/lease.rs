//! The agent's liveness Lease (`coordination.k8s.io`, named after the node, the kubelet
//! pattern). The operator promotes away from a primary only after this Lease expired,
//! and a primary serves IO only while its own renewals are recent: [`LeaseRenewer`]
//! exposes the moment of the last successful renewal for that read fence.

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
    last_renewed: watch::Sender<Option<Instant>>,
}

impl LeaseRenewer {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaseRenewer {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            last_renewed: watch::channel(None).0,
        }
    }

    /// When the Lease was last renewed (local monotonic clock), for the IO fence.
    pub fn last_renewed(&self) -> watch::Receiver<Option<Instant>> {
        self.last_renewed.subscribe()
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
        // The renewal counts from when it was sent: the server may have stamped it
        // any time after that.
        self.last_renewed.send_replace(Some(started));
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

    /// True while the last renewal is younger than the lease duration.
    pub fn is_fresh(&self) -> bool {
        let lease = Duration::from_secs(u64::from(self.settings.lease_duration_s));
        self.last_renewed
            .borrow()
            .is_some_and(|t| t.elapsed() < lease)
    }
}
