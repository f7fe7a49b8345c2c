//! The API server load of an idle cluster must not grow with the number of volumes: the
//! operator and the agents read from watch-fed caches, so once every volume is Ready the
//! only steady requests are Lease renewals and node registration, whatever the count.
//!
//! Counts requests by verb and resource from kube-apiserver's own
//! `apiserver_request_total` over an idle window, first with `SMALL` volumes, then with
//! `LARGE` = 4 × `SMALL`, and asserts the second count is at most 1.1 × the first plus a
//! small constant. No timing is asserted: a per-volume cost shows as a 4× count.
//!
//! The daemons are the workspace binaries; build them first:
//! `cargo build -p node-agent -p operator --bins && cargo test -p e2e --test api_request_rate`.

use std::time::Duration;

use api::{BlockVolume, BlockVolumeSpec, VolumePhase};
use e2e::api_requests::{RequestCounts, growth, request_counts};
use e2e::cluster::{TestCluster, TestClusterOptions, wait_for};
use kube::api::{Api, PostParams};

const NODES: usize = 3;
/// Replicas per volume: more than one, so every primary has peers to resolve.
const REPLICAS: u8 = 2;
const SMALL: usize = 6;
const LARGE: usize = 4 * SMALL;
const VOLUME_SIZE: &str = "8Mi";
/// Length of each idle measurement.
const WINDOW: Duration = Duration::from_secs(10);
/// Allowance for requests that do not depend on the volume count but may fall unevenly
/// into the two windows (Lease renewals, node registration, watch restarts).
const SLACK_REQUESTS: f64 = 40.0;
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Requests made during an idle `WINDOW`, by (verb, resource).
async fn idle_requests(c: &TestCluster, label: &str) -> RequestCounts {
    let before = request_counts(c).await.expect("apiserver /metrics");
    tokio::time::sleep(WINDOW).await;
    let after = request_counts(c).await.expect("apiserver /metrics");
    let delta = growth(&before, &after);
    let total: f64 = delta.values().sum();
    println!("{label}: {total} requests in {} s idle", WINDOW.as_secs());
    for ((verb, resource), n) in &delta {
        println!("  {verb:<7} {resource:<32} {n}");
    }
    delta
}

async fn create_volumes(c: &TestCluster, range: std::ops::Range<usize>) {
    let api = Api::<BlockVolume>::all(c.client.clone());
    for i in range.clone() {
        let spec = BlockVolumeSpec {
            replicas: REPLICAS,
            ..BlockVolumeSpec::with_size(VOLUME_SIZE)
        };
        api.create(
            &PostParams::default(),
            &BlockVolume::new(&format!("vol-{i}"), spec),
        )
        .await
        .expect("create volume");
    }
    let want = range.end;
    wait_for(
        &format!("{want} volumes Ready with {REPLICAS} in sync"),
        READY_TIMEOUT,
        || async {
            let vols = api.list(&Default::default()).await.ok()?.items;
            let ready = vols
                .iter()
                .filter(|v| {
                    v.status.as_ref().is_some_and(|s| {
                        s.phase == VolumePhase::Ready && s.in_sync_count == u32::from(REPLICAS)
                    })
                })
                .count();
            (ready == want).then_some(())
        },
    )
    .await
    .expect("volumes Ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_api_requests_do_not_grow_with_the_volume_count() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
    let c = TestCluster::start(TestClusterOptions::nodes(NODES))
        .await
        .expect("cluster starts");

    create_volumes(&c, 0..SMALL).await;
    let small = idle_requests(&c, &format!("{SMALL} volumes")).await;
    create_volumes(&c, SMALL..LARGE).await;
    let large = idle_requests(&c, &format!("{LARGE} volumes")).await;

    let small_total: f64 = small.values().sum();
    let large_total: f64 = large.values().sum();
    assert!(
        large_total <= 1.1 * small_total + SLACK_REQUESTS,
        "idle API requests grow with the volume count: {large_total} with {LARGE} volumes, \
         {small_total} with {SMALL} (allowed: 1.1 × {small_total} + {SLACK_REQUESTS})"
    );
}
