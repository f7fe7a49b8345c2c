//! Long runs of unflushed writes through real agent processes: a client writing 3x the
//! WAL without FLUSH (like `dd` to the device) must not get EIO on replicated volumes.
//! The primary asks its replicas for barriers on its own, so their retention holds (and
//! the WAL behind them) move on without a client flush.

use std::time::{Duration, Instant};

use e2e::cluster::{TestCluster, TestClusterOptions};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The agent's WAL is capped to the volume size, so a 16 MiB volume has a 16 MiB WAL.
const SIZE_MIB: u64 = 16;
const PASSES: u64 = 3;

fn pattern(pass: u64, mib: u64) -> u8 {
    (1 + pass * SIZE_MIB + mib) as u8
}

/// Runs qemu-io with `commands` against `uri`; returns its output or why it failed.
async fn qemu_io(uri: &str, commands: &[String]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("qemu-io");
    // qemu-io defaults to writethrough (a FLUSH after every write); writeback sends
    // none until the explicit `flush` command.
    cmd.args(["-f", "raw", "-t", "writeback"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = cmd.output().await.map_err(|e| format!("qemu-io: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 even when a command fails; failed commands print their error.
    if !out.status.success() || text.contains("failed") || text.contains("error") {
        return Err(text);
    }
    Ok(text)
}

/// Writes, flushes and reads back through the primary of a new volume; returns what it
/// measured, or what went wrong (the caller stops the cluster before failing).
async fn unflushed_writes_of_3x_the_wal(
    cluster: &TestCluster,
    volume: &str,
    replicas: u8,
) -> Result<String, String> {
    let v = cluster
        .create_ready_volume(volume, &format!("{SIZE_MIB}Mi"), replicas, TIMEOUT)
        .await
        .map_err(|e| format!("volume {volume} not Ready: {e}"))?;
    let primary_node = v
        .status
        .and_then(|s| s.primary_node)
        .ok_or("no primary node")?;
    let primary = cluster
        .agents
        .iter()
        .find(|a| a.node == primary_node)
        .ok_or("no agent on the primary node")?;
    let uri = primary.nbd_uri(volume);
    // One connection, 1 MiB writes, no flush until every pass is written.
    let writes: Vec<String> = (0..PASSES)
        .flat_map(|p| (0..SIZE_MIB).map(move |m| format!("write -P {} {m}M 1M", pattern(p, m))))
        .collect();
    let start = Instant::now();
    if let Err(out) = qemu_io(&uri, &writes).await {
        return Err(format!(
            "RF{replicas}: unflushed writes failed:\n{out}\nprimary log:\n{}",
            primary.log_tail()
        ));
    }
    let elapsed = start.elapsed();
    qemu_io(&uri, &["flush".to_string()])
        .await
        .map_err(|out| format!("RF{replicas}: flush after the unflushed run failed:\n{out}"))?;
    let last = PASSES - 1;
    let reads: Vec<String> = (0..SIZE_MIB)
        .map(|m| format!("read -P {} {m}M 1M", pattern(last, m)))
        .collect();
    if let Err(out) = qemu_io(&uri, &reads).await {
        return Err(format!("RF{replicas}: read-back differs:\n{out}"));
    }
    Ok(format!(
        "RF{replicas}: {} MiB unflushed through a {SIZE_MIB} MiB WAL in {elapsed:?}, flush ok, read-back ok",
        PASSES * SIZE_MIB
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unflushed_writes_of_3x_the_wal_succeed_on_rf2_and_rf3_agents() {
    let cluster = TestCluster::start(TestClusterOptions::nodes(3))
        .await
        .expect("cluster starts");
    let rf2 = unflushed_writes_of_3x_the_wal(&cluster, "walp-rf2", 2).await;
    let rf3 = match rf2 {
        Ok(_) => unflushed_writes_of_3x_the_wal(&cluster, "walp-rf3", 3).await,
        Err(_) => Err("not run".into()),
    };
    // Stop every process before failing: a panic while the cluster is alive can leave
    // the control plane running.
    drop(cluster);
    for r in [rf2, rf3] {
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => panic!("{e}"),
        }
    }
}
