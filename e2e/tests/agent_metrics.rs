//! The node agent's metrics and health endpoints, scraped over HTTP from real agent
//! processes: NBD counters move by exactly the requests sent, latency histogram counts
//! match, replication and WAL gauges describe an RF2 volume, the exposition parses
//! strictly, and /readyz answers 503 with the reason while the agent's Lease cannot
//! be renewed (the kube-apiserver is stopped), then 200 again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use e2e::cluster::{AgentProcess, TestCluster, TestClusterOptions, wait_for};
use e2e::openmetrics::{self, Exposition};
use node_agent::frontend::nbd::client::Connection;
use node_agent::frontend::nbd::proto::{
    CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};
use testkit::Paused;

const TIMEOUT: Duration = Duration::from_secs(90);
const VOLUME: &str = "vol-metrics";
const OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

async fn scrape(agent: &AgentProcess) -> Exposition {
    let (code, body) = agent.http_get("/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    openmetrics::parse(&body).unwrap_or_else(|e| panic!("exposition invalid: {e}\n{body}"))
}

fn value(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.value(name, labels)
        .expect("unambiguous")
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// The requests the test sends, counted per op, and the bytes.
#[derive(Debug, Default, PartialEq)]
struct Sent {
    requests: BTreeMap<&'static str, u64>,
    read_bytes: u64,
    written_bytes: u64,
}

/// Sends a fixed mix of every NBD operation through a fresh connection.
fn send_io(socket: PathBuf) -> Sent {
    let mut c = Connection::connect(&socket, VOLUME, Duration::from_secs(30)).expect("connect");
    let mut sent = Sent::default();
    let mut ok = |c: &mut Connection, op: &'static str, cmd, flags, off, len: u32, data: &[u8]| {
        let mut buf = vec![0u8; if cmd == CMD_READ { len as usize } else { 0 }];
        let read_into = (cmd == CMD_READ).then_some(buf.as_mut_slice());
        let errno = c
            .request(cmd, flags, off, len, data, read_into)
            .expect("request answered");
        assert_eq!(errno, 0, "{op} at {off} failed");
        *sent.requests.entry(op).or_default() += 1;
        match cmd {
            CMD_READ => sent.read_bytes += u64::from(len),
            CMD_WRITE => sent.written_bytes += u64::from(len),
            _ => {}
        }
    };
    let chunk = vec![0x5a; 64 << 10];
    for i in 0..5u64 {
        ok(
            &mut c,
            "write",
            CMD_WRITE,
            0,
            i * (64 << 10),
            64 << 10,
            &chunk,
        );
    }
    ok(
        &mut c,
        "write",
        CMD_WRITE,
        CMD_FLAG_FUA,
        1 << 20,
        4096,
        &chunk[..4096],
    );
    for i in 0..3u64 {
        ok(&mut c, "read", CMD_READ, 0, i * (16 << 10), 16 << 10, &[]);
    }
    ok(&mut c, "flush", CMD_FLUSH, 0, 0, 0, &[]);
    ok(&mut c, "trim", CMD_TRIM, 0, 2 << 20, 64 << 10, &[]);
    ok(
        &mut c,
        "write_zeroes",
        CMD_WRITE_ZEROES,
        0,
        3 << 20,
        64 << 10,
        &[],
    );
    ok(&mut c, "flush", CMD_FLUSH, 0, 0, 0, &[]);
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_count_nbd_io_exactly_and_readyz_follows_the_lease() {
    let mut options = TestClusterOptions::nodes(2);
    options.agent.metrics = true;
    let cluster = TestCluster::start(options).await.expect("cluster starts");
    let v = cluster
        .create_ready_volume(VOLUME, "32Mi", 2, TIMEOUT)
        .await
        .expect("volume Ready");
    let st = v.status.expect("status");
    let primary_node = st.primary_node.expect("primary node");
    let primary_replica = st.primary.expect("primary replica");
    let primary = cluster
        .agents
        .iter()
        .find(|a| a.node == primary_node)
        .expect("primary agent");
    let secondary = cluster
        .agents
        .iter()
        .find(|a| a.node != primary_node)
        .expect("secondary agent");

    for a in [primary, secondary] {
        wait_for("agent /readyz 200", TIMEOUT, || async {
            (a.http_get("/readyz").await.ok()?.0 == 200).then_some(())
        })
        .await
        .expect("ready");
        assert_eq!(a.http_get("/healthz").await.expect("healthz").0, 200);
        assert_eq!(a.http_get("/nope").await.expect("404").0, 404);
    }

    let labels = |op: &'static str| {
        [
            ("volume", VOLUME),
            ("replica", primary_replica.as_str()),
            ("role", "primary"),
            ("op", op),
        ]
    };
    let before = scrape(primary).await;
    let socket = primary.nbd_socket.clone();
    let sent = tokio::task::spawn_blocking(move || send_io(socket))
        .await
        .expect("io");
    let after = scrape(primary).await;

    let delta = |name: &str, l: &[(&str, &str)]| value(&after, name, l) - value(&before, name, l);
    let mut requests = BTreeMap::new();
    for op in OPS {
        let moved = delta("blockvol_agent_nbd_requests_total", &labels(op));
        requests.insert(op, moved as u64);
        assert_eq!(
            delta(
                "blockvol_agent_nbd_request_duration_seconds_count",
                &labels(op)
            ),
            moved,
            "{op}: histogram count moves with the request counter"
        );
        assert_eq!(
            delta("blockvol_agent_nbd_request_errors_total", &labels(op)),
            0.0,
            "{op}"
        );
    }
    let vol_labels = &labels("read")[..3];
    let measured = Sent {
        requests,
        read_bytes: delta("blockvol_agent_nbd_read_bytes_total", vol_labels) as u64,
        written_bytes: delta("blockvol_agent_nbd_written_bytes_total", vol_labels) as u64,
    };
    println!("sent {sent:?}\nmeasured {measured:?}");
    assert_eq!(measured, sent);

    // Replication and WAL gauges: the peer catches up to the primary's head.
    let peer_lag = wait_for("the peer's lag to reach 0 LSNs", TIMEOUT, || async {
        let e = scrape(primary).await;
        let lag = e
            .samples
            .iter()
            .find(|s| s.name == "blockvol_agent_peer_lag_lsn")
            .map(|s| s.value)?;
        (lag == 0.0).then_some(e)
    })
    .await
    .expect("peer in sync");
    let pl = [("volume", VOLUME), ("replica", primary_replica.as_str())];
    let one_hot = |e: &Exposition, name: &str, l: &[(&str, &str)]| -> Vec<String> {
        e.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.value == 1.0
                    && l.iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.labels["state"].clone())
            .collect()
    };
    assert_eq!(
        one_hot(&peer_lag, "blockvol_agent_peer_state", &pl),
        vec!["InSync"]
    );
    assert_eq!(
        one_hot(&peer_lag, "blockvol_agent_replica_state", &pl),
        vec!["Serving"]
    );
    let head = value(&peer_lag, "blockvol_agent_replica_head_lsn", vol_labels);
    assert!(head >= 8.0, "head LSN {head} counts the 8 mutations");
    assert_eq!(
        value(&peer_lag, "blockvol_agent_peer_flushed_lsn", &pl),
        head
    );
    assert_eq!(value(&peer_lag, "blockvol_agent_peer_lag_bytes", &pl), 0.0);
    let fill = value(&peer_lag, "blockvol_agent_wal_fill_ratio", vol_labels);
    assert!((0.0..=1.0).contains(&fill), "WAL fill {fill}");
    assert!(value(&peer_lag, "blockvol_agent_replica_epoch", vol_labels) >= 1.0);
    assert!(value(&peer_lag, "blockvol_agent_data_dir_capacity_bytes", &[]) > 0.0);
    assert_eq!(value(&peer_lag, "blockvol_agent_up", &[]), 1.0);
    assert_eq!(value(&peer_lag, "blockvol_agent_lease_fresh", &[]), 1.0);
    assert_eq!(value(&peer_lag, "blockvol_agent_exports", &[]), 1.0);
    let age = value(
        &peer_lag,
        "blockvol_agent_lease_last_renew_age_seconds",
        &[],
    );
    assert!(
        age < f64::from(cluster.options.agent.lease_duration_s),
        "{age}"
    );

    // The secondary reports its replica with role="replica" and the flushed head.
    let s = scrape(secondary).await;
    let flushed = s
        .samples
        .iter()
        .find(|x| {
            x.name == "blockvol_agent_replica_flushed_lsn"
                && x.labels.get("role").map(String::as_str) == Some("replica")
        })
        .map(|x| x.value)
        .expect("secondary replica gauge");
    assert!(
        flushed >= head,
        "replica flushed {flushed} < primary head {head}"
    );
    assert_eq!(value(&s, "blockvol_agent_exports", &[]), 0.0);

    // Readiness follows the Lease: freeze the apiserver so renewals cannot succeed.
    let apiserver = cluster
        .control_plane
        .daemon_pid("kube-apiserver")
        .expect("local apiserver");
    let frozen = Paused::stop(apiserver);
    let reason = wait_for("/readyz 503 while the Lease is stale", TIMEOUT, || async {
        let (code, body) = primary.http_get("/readyz").await.ok()?;
        (code == 503).then_some(body)
    })
    .await
    .expect("not ready");
    assert!(reason.contains("Lease"), "{reason}");
    assert_eq!(primary.http_get("/healthz").await.expect("healthz").0, 200);
    let stale = scrape(primary).await;
    assert_eq!(value(&stale, "blockvol_agent_lease_fresh", &[]), 0.0);
    assert_eq!(value(&stale, "blockvol_agent_ready", &[]), 0.0);
    drop(frozen);
    wait_for(
        "/readyz 200 after the apiserver resumes",
        TIMEOUT,
        || async { (primary.http_get("/readyz").await.ok()?.0 == 200).then_some(()) },
    )
    .await
    .expect("ready again");
    println!("readyz while stale: {}", reason.trim());
}
