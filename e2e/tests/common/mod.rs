//! Shared by the tests that run the operator reconciler in process next to the CSI
//! controller: their wait bound, the node agents they play (BlockNode, renewed Lease,
//! every replica on the node reported healthy) and the operator's leader timing.

#![allow(dead_code)]

use e2e::in_process::InProcessOperator;
use kube::Client;
use testkit::agent::FakeAgent;
use testkit::{ControlPlane, ControlPlaneOptions, Wait};

pub use testkit::Task;

pub const NS: &str = "blockvol-system";
/// Longest any single expectation may take.
pub const WAIT_TIMEOUT_MS: u64 = 60_000;
const POLL_MS: u64 = 100;
pub const WAIT: Wait = Wait::millis(WAIT_TIMEOUT_MS, POLL_MS);
/// Lease duration the simulated node agents use.
const NODE_LEASE_S: i32 = 10;
const LEASE_RENEW_MS: u64 = 1_000;
pub const MIB: i64 = 1 << 20;

/// A simulated node agent: a BlockNode with space and a Lease renewed until dropped,
/// plus every replica placed on it reported healthy (primary Serving, others InSync).
pub async fn agent(client: &Client, name: &str) -> Task {
    FakeAgent::new(name, NS)
        .lease(NODE_LEASE_S, LEASE_RENEW_MS)
        .reporting_replicas_healthy()
        .start(client)
        .await
}

/// The operator reconciler in this process, stopped when dropped.
pub fn operator(client: &Client) -> Task {
    InProcessOperator::new("op", NS)
        .leader_lease(15, 1_000)
        .start(client)
        .0
}

/// A control plane with the CRDs and the release namespace.
pub async fn start(opts: ControlPlaneOptions) -> ControlPlane {
    ControlPlane::start_with_crds(opts, NS)
        .await
        .expect("control plane with the CRDs starts")
}
