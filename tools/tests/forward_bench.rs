//! What the in-process forwarding fast path costs: fio's nbd engine writes 4 KiB blocks
//! with a FLUSH after each one, alternately to the local primary's export (nbd.sock) and
//! to the forwarding export an attached device uses on the same node (forward.sock),
//! and prints the IOPS of both and their ratio. Informational: nothing is asserted about
//! the numbers (they are noisy on a shared machine), only that both paths work.

use std::process::Command;
use std::time::Duration;

use csi::agent::{Agent, AgentSettings};
use e2e::cluster::{TestCluster, TestClusterOptions};

const VOLUME: &str = "bench-vol";
const TIMEOUT: Duration = Duration::from_secs(90);
/// Interleaved runs per path and their length.
const ROUNDS: usize = 5;
const RUNTIME_S: u32 = 4;

/// One fio run: 4 KiB random writes, a flush after each, queue depth 1. Returns IOPS.
fn fio_iops(uri: &str) -> f64 {
    let out = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--fsync=1",
            "--iodepth=1",
            "--time_based",
            &format!("--runtime={RUNTIME_S}"),
            "--output-format=json",
        ])
        .output()
        .expect("fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio on {uri}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fio prints "connected to NBD server" lines before the JSON.
    let json = &text[text.find('{').expect("fio JSON output")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let iops = v["jobs"][0]["write"]["iops"].as_f64().expect("write iops");
    assert!(iops > 0.0, "fio wrote nothing through {uri}");
    iops
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_fast_path_cost_against_the_local_export() {
    let mut cluster = TestCluster::start(TestClusterOptions::nodes(1))
        .await
        .expect("cluster");
    cluster
        .create_ready_volume(VOLUME, "64Mi", 1, TIMEOUT)
        .await
        .expect("volume");
    let agent = cluster.agent("node-1").expect("agent");
    let (local, forwarded) = (agent.nbd_uri(VOLUME), agent.forward_uri(VOLUME));
    let client = Agent::new(&AgentSettings {
        socket_path: agent.agent_socket.clone(),
        agent_call_timeout_ms: 120_000,
    })
    .expect("agent client");
    // Attach creates the forwarding export (in process: the primary is on this node).
    client.attach(VOLUME, false).await.expect("attach");

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (l, f) = (local.clone(), forwarded.clone());
        let (x, y) = tokio::task::spawn_blocking(move || (fio_iops(&l), fio_iops(&f)))
            .await
            .expect("fio runs");
        a.push(x);
        b.push(y);
    }
    client.detach(VOLUME).await.expect("detach");
    let (ma, mb) = (median(a.clone()), median(b.clone()));
    println!(
        "4 KiB write + flush, QD 1, {ROUNDS} x {RUNTIME_S} s interleaved: local export median {ma:.0} IOPS {a:.0?}, \
         forwarding export (in-process) median {mb:.0} IOPS {b:.0?}, forwarding/local = {:.2}",
        mb / ma
    );
}
