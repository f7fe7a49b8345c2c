//! The operator's reconciler run inside the test process against a control plane, for
//! tests that drive the API and play (or run) the node agents themselves. Dropping the
//! returned [`Task`] stops it without releasing its leader Lease, like a crash.

use std::sync::Arc;

use kube::Client;
use kube::api::Api;
use operator::replacement::ReplacementSettings;
use operator::{Context, ControllerSettings, LeaderElector, LeaderSettings, Metrics};
use testkit::Task;

/// Name of the operators' leader-election Lease.
pub const OPERATOR_LEASE_NAME: &str = "blockvol-operator";

/// One in-process operator: its identity, the namespace of the node and leader Leases,
/// its controller settings and its leader-election timing.
#[derive(Debug, Clone)]
pub struct InProcessOperator {
    pub identity: String,
    pub settings: ControllerSettings,
    pub namespace: String,
    pub lease_duration_s: u32,
    pub renew_interval_ms: u64,
}

impl InProcessOperator {
    /// Identity `identity` watching node Leases in `namespace` with [`test_settings`], a
    /// 3 s leader Lease renewed every 500 ms.
    pub fn new(identity: &str, namespace: &str) -> InProcessOperator {
        InProcessOperator {
            identity: identity.into(),
            settings: test_settings(namespace),
            namespace: namespace.into(),
            lease_duration_s: 3,
            renew_interval_ms: 500,
        }
    }

    pub fn settings(mut self, settings: ControllerSettings) -> InProcessOperator {
        self.settings = settings;
        self
    }

    pub fn leader_lease(mut self, duration_s: u32, renew_interval_ms: u64) -> InProcessOperator {
        self.lease_duration_s = duration_s;
        self.renew_interval_ms = renew_interval_ms;
        self
    }

    /// Starts the reconciler (with leader election) on the current runtime. An error
    /// that stops it is logged.
    pub fn start(self, client: &Client) -> (Task, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let ctx = Arc::new(Context::new(
            client.clone(),
            self.settings,
            metrics.clone(),
            Some(self.identity.clone()),
        ));
        let elector = LeaderElector::new(
            Api::namespaced(client.clone(), &self.namespace),
            LeaderSettings {
                lease_name: OPERATOR_LEASE_NAME.into(),
                identity: self.identity,
                lease_duration_s: self.lease_duration_s,
                renew_interval_ms: self.renew_interval_ms,
            },
        );
        let task = Task::spawn(async move {
            if let Err(e) = operator::run(ctx, elector, std::future::pending()).await {
                tracing::warn!(error = %e, "operator stopped");
            }
        });
        (task, metrics)
    }
}

/// Controller settings for tests: quick resyncs and backoff, replacement of failed
/// replicas and gone nodes held off (600 s) so only what a test does moves replicas.
pub fn test_settings(namespace: &str) -> ControllerSettings {
    ControllerSettings {
        node_lease_namespace: namespace.into(),
        replacement: ReplacementSettings {
            replica_failure_grace_ms: 600_000,
            node_gone_grace_ms: 600_000,
            max_rebuilds_per_node: 2,
            ..ReplacementSettings::default()
        },
        resync_interval_ms: 1_000,
        error_backoff_initial_ms: 100,
        error_backoff_max_ms: 2_000,
        deletion_poll_ms: 200,
        concurrency: 2,
        moves: Default::default(),
        ..Default::default()
    }
}
