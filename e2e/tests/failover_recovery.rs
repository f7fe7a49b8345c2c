//! Recovery after a primary failover, on real processes (kube-apiserver, the operator,
//! three `blockvol-agent`s): an RF3 volume of 1 GiB under a paced 4 KiB writer (a FLUSH
//! every 16 writes) loses its primary's agent to SIGKILL; the operator promotes another
//! member and the writer moves to it; the killed agent restarts 10 s after the kill,
//! well within the WAL retention budget.
//!
//! Asserted: no member that was in sync at the failover is rebuilt (the new primary's
//! `peer_rebuild_bytes_total` stays 0 for both the returning member and the surviving
//! one), the returning member is caught up from the WAL (its catch-up bytes are above 0
//! and far below the volume size), and all three members are in sync again (the
//! BlockVolume commits three, the primary sees both peers InSync) within
//! [`IN_SYNC_BOUND`] of the restart. The bound is generous on purpose: the property is
//! "no rebuild", not a timing target; the measured numbers are printed (run with
//! `--nocapture`; they are recorded in docs/benchmarks.md). An ignored measurement runs
//! the same failover with a retention budget shorter than the absence, for the numbers
//! of a rebuild next to those of a catch-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::{BlockReplica, BlockVolumeStatus};
use e2e::checker::{NbdClient, Target};
use e2e::cluster::{
    AgentProcess, TestCluster, TestClusterOptions, all_members_in_sync, primary_serving, wait_for,
};
use e2e::openmetrics::{self, Exposition};
use kube::ResourceExt;

const VOLUME: &str = "failover-recovery";
const VOLUME_SIZE: &str = "1Gi";
const VOLUME_BYTES: u64 = 1 << 30;
const BLOCK_BYTES: usize = 4096;
/// Writes between FLUSHes, and the time each such group may take at most: about 500
/// writes (2 MiB) a second, so the writes a member misses stay far inside the WAL.
const WRITES_PER_FLUSH: u64 = 16;
const GROUP_INTERVAL: Duration = Duration::from_millis(32);
/// How long the writer runs on the first primary before its agent is killed.
const BEFORE_KILL: Duration = Duration::from_secs(3);
/// The killed agent restarts this long after the kill.
const DOWN: Duration = Duration::from_secs(10);
/// All three members must be in sync again within this long after the restart.
const IN_SYNC_BOUND: Duration = Duration::from_secs(30);
/// Bound on setup waits (cluster, volume, promotion) on a busy 2-core host.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);
const METRIC_CATCH_UP: &str = "blockvol_agent_peer_catch_up_bytes_total";
const METRIC_REBUILD: &str = "blockvol_agent_peer_rebuild_bytes_total";

/// What one writer run did.
#[derive(Debug, Default)]
struct WriterRun {
    writes: u64,
    flushes: u64,
    /// Why it stopped, when not asked to.
    error: Option<String>,
}

/// Writes 4 KiB blocks at random LBAs of the whole volume through `target`, a FLUSH
/// after every [`WRITES_PER_FLUSH`], paced to one group per [`GROUP_INTERVAL`], until
/// `stop` is set (then it flushes once more) or a request fails.
async fn write_until(target: Target, seed: u64, stop: Arc<AtomicBool>) -> WriterRun {
    let mut run = WriterRun::default();
    let mut client = match NbdClient::connect(&target).await {
        Ok(c) => c,
        Err(e) => {
            run.error = Some(format!("connect: {e}"));
            return run;
        }
    };
    let blocks = VOLUME_BYTES / BLOCK_BYTES as u64;
    let mut x = seed | 1;
    let mut pace = tokio::time::interval(GROUP_INTERVAL);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut data = vec![0u8; BLOCK_BYTES];
    loop {
        pace.tick().await;
        let stopping = stop.load(Ordering::Acquire);
        if !stopping {
            for _ in 0..WRITES_PER_FLUSH {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data[..8].copy_from_slice(&x.to_le_bytes());
                data[8..16].copy_from_slice(&run.writes.to_le_bytes());
                if let Err(e) = client.write((x % blocks) * BLOCK_BYTES as u64, &data).await {
                    run.error = Some(format!("write: {e}"));
                    return run;
                }
                run.writes += 1;
            }
        }
        if let Err(e) = client.flush().await {
            run.error = Some(format!("flush: {e}"));
            return run;
        }
        run.flushes += 1;
        if stopping {
            client.disconnect().await;
            return run;
        }
    }
}

/// A writer in the background; [`Writer::stop`] ends it after a last FLUSH.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WriterRun>,
}

impl Writer {
    fn start(agent: &AgentProcess, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Target::Unix {
            path: agent.nbd_socket.clone(),
            export: VOLUME.into(),
        };
        let task = tokio::spawn(write_until(target, seed, stop.clone()));
        Writer { stop, task }
    }

    /// Waits for the writer to end by itself (its agent died).
    async fn ended(self) -> WriterRun {
        self.task.await.expect("writer task")
    }

    async fn stop(self) -> WriterRun {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("writer task")
    }
}

async fn status(c: &TestCluster) -> Option<BlockVolumeStatus> {
    c.volume(VOLUME).await.and_then(|v| v.status)
}

/// The status once all three members are in sync at `epoch`: three committed, the
/// primary Serving at `epoch` and seeing both peers InSync, every replica at `epoch`.
async fn all_in_sync(c: &TestCluster, epoch: u64) -> Option<BlockVolumeStatus> {
    let st = status(c).await?;
    let rs: Vec<BlockReplica> = c.replicas(VOLUME).await;
    (st.epoch == epoch && all_members_in_sync(&st, &rs, 3)).then_some(st)
}

/// A primary other than `old` Serving above `epoch`.
async fn promoted(c: &TestCluster, old: &str, epoch: u64) -> Option<BlockVolumeStatus> {
    let st = status(c).await?;
    let p = st.primary.clone()?;
    if st.epoch <= epoch || p == old {
        return None;
    }
    let rs = c.replicas(VOLUME).await;
    primary_serving(&st, &rs).then_some(st)
}

async fn scrape(agent: &AgentProcess) -> Exposition {
    let (code, body) = agent.http_get("/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    openmetrics::parse(&body).unwrap_or_else(|e| panic!("exposition invalid: {e}\n{body}"))
}

/// The bytes one peer was sent by catch-ups and by rebuilds, as the primary counts
/// them; `None` for a peer the primary never had to recover.
fn recovery_bytes(e: &Exposition, primary: &str, peer: &str) -> Option<(u64, u64)> {
    let labels = [("volume", VOLUME), ("replica", primary), ("peer", peer)];
    let get = |name: &str| {
        e.value(name, &labels)
            .expect("one series per peer")
            .map(|v| v as u64)
    };
    match (get(METRIC_CATCH_UP), get(METRIC_REBUILD)) {
        (None, None) => None,
        (c, r) => Some((c.unwrap_or_default(), r.unwrap_or_default())),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// What one failover-and-restart run measured.
#[derive(Debug)]
struct Measured {
    /// The writer on the first primary, cut by the kill, and on the promoted one.
    before: WriterRun,
    after: WriterRun,
    promoted_after: Duration,
    in_sync_after: Duration,
    /// (catch-up, rebuild) bytes the new primary sent the returning member (`None`:
    /// it never recovered it) and the surviving member (absent counts as zero).
    returning: Option<(u64, u64)>,
    surviving: (u64, u64),
}

/// The scenario: an RF3 volume in sync, the writer on its primary, SIGKILL of the
/// primary's agent after [`BEFORE_KILL`], the writer moved to the promoted member, the
/// killed agent restarted [`DOWN`] after the kill; waits until all three members are in
/// sync again (up to [`SETUP_TIMEOUT`], so a slow run still reports its numbers), then
/// reads the new primary's recovery counters. Agents run with `agent_args`. Prints what
/// it measured.
async fn failover_and_restart(agent_args: &[String]) -> Measured {
    let mut options = TestClusterOptions::nodes(3);
    options.agent.metrics = true;
    options.agent.extra_args = agent_args.to_vec();
    let mut c = TestCluster::start(options).await.expect("cluster");
    c.create_ready_volume(VOLUME, VOLUME_SIZE, 3, SETUP_TIMEOUT)
        .await
        .expect("RF3 volume ready");
    let st = wait_for("three in-sync members", SETUP_TIMEOUT, || async {
        let st = status(&c).await?;
        all_in_sync(&c, st.epoch).await
    })
    .await
    .expect("volume in sync");
    let (old_primary, old_node) = (
        st.primary.clone().expect("primary"),
        st.primary_node.clone().expect("primary node"),
    );
    let members: Vec<String> = c
        .replicas(VOLUME)
        .await
        .into_iter()
        .map(|r| r.name_any())
        .collect();

    // The writer runs on the first primary, whose agent is then killed under it.
    let writer = Writer::start(c.agent(&old_node).expect("agent"), 1);
    tokio::time::sleep(BEFORE_KILL).await;
    c.agent(&old_node).expect("agent").kill();
    let killed = Instant::now();
    let before = writer.ended().await;
    assert!(
        before.error.is_some() && before.flushes > 0,
        "the writer ran and the kill cut it: {before:?}"
    );

    // The operator promotes another member; the writer moves to it.
    let new = wait_for(
        "a new primary serving above the old epoch",
        SETUP_TIMEOUT,
        || promoted(&c, &old_primary, st.epoch),
    )
    .await
    .expect("promotion");
    let promoted_after = killed.elapsed();
    let (new_primary, new_node) = (
        new.primary.clone().expect("primary"),
        new.primary_node.clone().expect("primary node"),
    );
    let other = members
        .iter()
        .find(|id| **id != new_primary && **id != old_primary)
        .cloned()
        .expect("the third member");
    // The export can be registered a moment after the status says Serving.
    let nbd = c.agent(&new_node).expect("agent").nbd_socket.clone();
    wait_for("the new primary's NBD export", SETUP_TIMEOUT, || async {
        let t = Target::Unix {
            path: nbd.clone(),
            export: VOLUME.into(),
        };
        NbdClient::connect(&t).await.ok()?.disconnect().await;
        Some(())
    })
    .await
    .expect("new primary exports the volume");
    let writer = Writer::start(c.agent(&new_node).expect("agent"), 2);

    // The scenario's own timing: the agent comes back DOWN after the kill.
    tokio::time::sleep_until((killed + DOWN).into()).await;
    c.agent(&old_node)
        .expect("agent")
        .restart()
        .expect("restart");
    let restarted = Instant::now();
    let synced = wait_for(
        "all three members in sync after the restart",
        SETUP_TIMEOUT,
        || all_in_sync(&c, new.epoch),
    )
    .await;
    let in_sync_after = restarted.elapsed();
    let after = writer.stop().await;
    let synced = synced.unwrap_or_else(|e| panic!("{e} (writer: {after:?})"));
    assert_eq!(
        synced.primary.as_deref(),
        Some(new_primary.as_str()),
        "one failover, and the same primary term throughout (its counters never restarted)"
    );
    assert!(
        after.error.is_none(),
        "the writer on the new primary failed: {after:?}"
    );

    let metrics = scrape(c.agent(&new_node).expect("agent")).await;
    for family in [
        "blockvol_agent_peer_catch_up_bytes",
        "blockvol_agent_peer_rebuild_bytes",
    ] {
        assert_eq!(
            metrics.types.get(family).map(String::as_str),
            Some("counter"),
            "{family} is exported"
        );
    }
    let m = Measured {
        promoted_after,
        in_sync_after,
        returning: recovery_bytes(&metrics, &new_primary, &old_primary),
        surviving: recovery_bytes(&metrics, &new_primary, &other).unwrap_or_default(),
        before,
        after,
    };
    println!(
        "failover recovery, RF3 {VOLUME_SIZE}, 4 KiB writes + FLUSH/{WRITES_PER_FLUSH}, agents {agent_args:?}: \
         {} writes on {old_primary} before the kill, {} on {new_primary} after the promotion; \
         promoted {:.2} s after the kill, {old_primary} restarted {:.2} s after the kill",
        m.before.writes,
        m.after.writes,
        m.promoted_after.as_secs_f64(),
        (restarted - killed).as_secs_f64()
    );
    for (role, id, bytes) in [
        (
            "returning old primary",
            &old_primary,
            m.returning.unwrap_or_default(),
        ),
        ("surviving member", &other, m.surviving),
    ] {
        println!(
            "  {role} {id}: catch-up {} bytes ({:.2} MiB), rebuild {} bytes ({:.2} MiB)",
            bytes.0,
            mib(bytes.0),
            bytes.1,
            mib(bytes.1)
        );
    }
    println!(
        "  new primary {new_primary}: the source; all three in sync {:.2} s after the restart",
        m.in_sync_after.as_secs_f64()
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_member_back_within_the_retention_budget_is_caught_up_not_rebuilt() {
    assert!(
        DOWN.as_millis()
            < u128::from(engine::replication::PrimaryConfig::default().wal_retention_timeout_ms),
        "the restart must come within the agents' retention time budget"
    );
    let m = failover_and_restart(&[]).await;
    let (catch_up, rebuild) = m.returning.expect(
        "the returning member missed the writes after the promotion, so the new primary must have recovered it",
    );
    assert_eq!(rebuild, 0, "the returning member was rebuilt");
    assert_eq!(m.surviving.1, 0, "the surviving member was rebuilt");
    assert!(
        catch_up > 0 && catch_up < VOLUME_BYTES / 4,
        "the returning member was caught up from the WAL, not sent the volume: {catch_up} bytes"
    );
    assert!(
        m.in_sync_after <= IN_SYNC_BOUND,
        "all three in sync only {:.1} s after the restart (bound {} s)",
        m.in_sync_after.as_secs_f64(),
        IN_SYNC_BOUND.as_secs()
    );
}

/// The same failover with a retention time budget shorter than the time the member is
/// away, for comparison: the returning member is rebuilt (the blocks the new primary
/// holds data for are sent, not the whole volume), the surviving one still is not. A measurement, run on demand:
/// `cargo test -p e2e --test failover_recovery -- --ignored --nocapture`.
#[ignore = "measurement for docs/benchmarks.md; the rebuild path is covered by chaos.rs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn measure_failover_member_back_beyond_the_retention_budget_is_rebuilt() {
    const BUDGET_MS: u64 = 3_000;
    let m = failover_and_restart(&[format!("--wal-retention-timeout-ms={BUDGET_MS}")]).await;
    let (_, rebuild) = m.returning.expect("the returning member was recovered");
    assert!(
        rebuild > 0,
        "the member away longer than the budget was not rebuilt"
    );
    // The writer touched a small part of the volume; a rebuild skips what was never
    // written.
    assert!(
        rebuild < VOLUME_BYTES / 4,
        "the rebuild sent {rebuild} bytes of a {VOLUME_BYTES}-byte volume"
    );
    assert_eq!(m.surviving.1, 0, "the surviving member was rebuilt");
}
