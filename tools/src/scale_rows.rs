//! The scale rows: for each volume count a fresh local cluster (3 agents, one operator)
//! gets that many small RF3 volumes created at once; the row measures the time until
//! they are Ready, the idle cost of the cluster, a mass failover (SIGKILL of the agent
//! holding the most primaries, with the lost-write checker on a few of its volumes) and
//! the time to delete them all. Results go into [`crate::scale::ScaleRows`].
//!
//! Only one cluster runs at a time: each row's cluster is dropped (every process
//! stopped, its directory removed) before the next starts. A row stops early, with the
//! reason in the report, when free space on the work directory's disk falls under
//! `disk_free_min_gib`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{BlockReplica, BlockVolume, BlockVolumeSpec, ReplicaState, VolumePhase};
use e2e::api_requests::{growth, request_counts};
use e2e::checker::{Checker, CheckerConfig, Ledger, Target, verify_ledger};
use e2e::cluster::{TestCluster, TestClusterOptions};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::bench;
use crate::error::{Error, Result};
use crate::scale::{
    IdleCost, MassFailover, Percentiles, ReadyTimes, SampleCheck, ScaleRow, ScaleRows,
    ScaleSettings,
};

/// Replicas per volume.
const REPLICAS: u8 = 3;
/// Agents (nodes) of each row's cluster.
const AGENTS: usize = 3;
/// Size of every volume: the agent sizes the WAL as min(64 MiB, volume size) with a floor
/// of 1 MiB, so a 1 MiB volume has the smallest WAL and 1,500 replicas take about 1.5 GB.
const VOLUME_SIZE: &str = "1Mi";
const VOLUME_SIZE_BYTES: u64 = 1 << 20;
/// The agent's Lease: as in the failover rows, so promotions compare.
const AGENT_LEASE_DURATION_S: u32 = 3;
/// The agent's and operator's product defaults (the harness's are shorter, for tests).
const AGENT_STATUS_INTERVAL_MS: u64 = 2_000;
const AGENT_REGISTRATION_INTERVAL_MS: u64 = 30_000;
const OPERATOR_RESYNC_INTERVAL_MS: u64 = 30_000;
const OPERATOR_LEASE_DURATION_S: u32 = 15;
const OPERATOR_RENEW_INTERVAL_MS: u64 = 2_000;
/// How often readiness, deletion and promotions are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often a progress line is logged while waiting.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on every volume becoming Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(900);
/// Bound on every primary of the killed agent being replaced.
const PROMOTION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on deleting every volume.
const DELETE_TIMEOUT: Duration = Duration::from_secs(900);
/// Bound on the checker's writes reaching their warm-up count before the kill.
const CHECKER_WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Flushes each checker must have acknowledged before the kill.
const CHECKER_WARMUP_FLUSHES: u64 = 20;
/// Writes a checker is told to make: more than it can before the kill breaks it.
const CHECKER_WRITES_MAX: u64 = 1_000_000;
/// LBAs (4 KiB) the checker spreads its writes over: the whole 1 MiB volume.
const CHECKER_LBAS: u64 = VOLUME_SIZE_BYTES / 4096;
/// Creates and deletes in flight at once.
const API_CONCURRENCY: usize = 32;

/// What to run.
#[derive(Clone, Debug)]
pub struct ScaleRunSettings {
    /// Volume counts, one row (and one fresh cluster) each.
    pub volumes: Vec<usize>,
    /// The clusters' directories go here (volume files included).
    pub work_dir: PathBuf,
    pub idle_window_s: u64,
    pub checker_sample: usize,
    pub disk_free_min_gib: f64,
}

fn fail(message: impl Into<String>) -> Error {
    Error::Bench(message.into())
}

/// Free space of the filesystem holding `dir`, GiB.
pub fn disk_free_gib(dir: &Path) -> Result<f64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // SAFETY: statvfs writes into the zeroed struct we own and reads the NUL-terminated
    // path, which outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(
            format!("statvfs {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail as f64 * st.f_frsize as f64 / f64::from(1u32 << 30))
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Resident set size of a process, MiB (0 if it is gone).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn settings(s: &ScaleRunSettings) -> ScaleSettings {
    ScaleSettings {
        replicas: REPLICAS,
        volume_size: VOLUME_SIZE.into(),
        agents: AGENTS,
        agent_lease_duration_s: AGENT_LEASE_DURATION_S,
        agent_status_interval_ms: AGENT_STATUS_INTERVAL_MS,
        agent_registration_interval_ms: AGENT_REGISTRATION_INTERVAL_MS,
        operator_resync_interval_ms: OPERATOR_RESYNC_INTERVAL_MS,
        idle_window_s: s.idle_window_s,
        poll_interval_ms: POLL_INTERVAL.as_millis() as u64,
        checker_sample: s.checker_sample,
        disk_free_min_gib: s.disk_free_min_gib,
    }
}

/// Runs one row per volume count, one cluster at a time.
pub async fn scale_rows(s: &ScaleRunSettings) -> ScaleRows {
    let mut out = ScaleRows {
        settings: settings(s),
        rows: Vec::new(),
    };
    for &n in &s.volumes {
        let mut row = ScaleRow {
            volumes: n,
            load_avg_1m: load_average(),
            nproc: std::thread::available_parallelism().map_or(0, |c| c.get()),
            ..ScaleRow::default()
        };
        tracing::info!(
            volumes = n,
            load_avg_1m = row.load_avg_1m,
            nproc = row.nproc,
            "scale row"
        );
        if let Err(e) = scale_row(s, &mut row).await {
            tracing::error!(volumes = n, error = %e, "scale row failed");
            row.error = Some(e.to_string());
        }
        out.rows.push(row);
    }
    out
}

/// Tracks free disk space; fails once it falls under the floor.
struct DiskWatch<'a> {
    dir: &'a Path,
    min_gib: f64,
}

impl DiskWatch<'_> {
    fn check(&self, row: &mut ScaleRow) -> Result<()> {
        let free = disk_free_gib(self.dir)?;
        row.disk_free_gib_min = row.disk_free_gib_min.min(free);
        if free < self.min_gib {
            return Err(fail(format!(
                "stopped: {free:.1} GiB free on the disk of {} (floor {} GiB)",
                self.dir.display(),
                self.min_gib
            )));
        }
        Ok(())
    }
}

async fn scale_row(s: &ScaleRunSettings, row: &mut ScaleRow) -> Result<()> {
    let disk = DiskWatch {
        dir: &s.work_dir,
        min_gib: s.disk_free_min_gib,
    };
    row.disk_free_gib_start = disk_free_gib(&s.work_dir)?;
    row.disk_free_gib_min = row.disk_free_gib_start;
    disk.check(row)?;
    let mut opts = TestClusterOptions::nodes(AGENTS);
    opts.agent.nbd_tcp = true;
    opts.agent.log_filter = "info".into();
    opts.agent.lease_duration_s = AGENT_LEASE_DURATION_S;
    opts.agent.status_interval_ms = AGENT_STATUS_INTERVAL_MS;
    opts.agent.registration_interval_ms = AGENT_REGISTRATION_INTERVAL_MS;
    opts.operator.log_filter = "info".into();
    opts.operator.resync_interval_ms = OPERATOR_RESYNC_INTERVAL_MS;
    opts.operator.lease_duration_s = OPERATOR_LEASE_DURATION_S;
    opts.operator.renew_interval_ms = OPERATOR_RENEW_INTERVAL_MS;
    opts.root_parent = Some(s.work_dir.clone());
    let mut cluster = TestCluster::start(opts).await?;
    let empty_rss: BTreeMap<String, f64> = cluster
        .agents
        .iter()
        .map(|a| (a.node.clone(), a.pid().map_or(0.0, rss_mib)))
        .collect();
    let names: Vec<String> = (0..row.volumes).map(|i| format!("scale-{i:04}")).collect();

    if let Err(e) = measure(&mut cluster, s, &names, &disk, empty_rss, row).await {
        row.error = Some(e.to_string());
    }
    // Deleting is measured with every agent up, so replicas are cleaned up too.
    for a in &mut cluster.agents {
        if !a.is_running() {
            a.restart()?;
        }
    }
    match delete_all(&cluster, &names, &disk, row).await {
        Ok(s) => row.delete_s = Some(s),
        Err(e) if row.error.is_none() => row.error = Some(format!("deleting: {e}")),
        Err(e) => tracing::warn!(error = %e, "deleting the volumes"),
    }
    drop(cluster);
    Ok(())
}

/// Creation to Ready, the idle window and the mass failover; the first step that fails
/// ends the row's measurements (the volumes are deleted either way).
async fn measure(
    cluster: &mut TestCluster,
    s: &ScaleRunSettings,
    names: &[String],
    disk: &DiskWatch<'_>,
    empty_rss: BTreeMap<String, f64>,
    row: &mut ScaleRow,
) -> Result<()> {
    let ready = create_all(cluster, names, disk, row).await?;
    let all_ready = ready.all_s.is_some();
    row.ready = Some(ready);
    if !all_ready {
        return Err(fail(format!(
            "not every volume was Ready within {READY_TIMEOUT:?}; idle and failover not measured"
        )));
    }
    row.idle = Some(idle_cost(cluster, s.idle_window_s, empty_rss).await?);
    disk.check(row)?;
    let f = mass_failover(cluster, s.checker_sample).await?;
    let failed: Vec<String> = f
        .checks
        .iter()
        .filter_map(|c| Some(format!("{}: {}", c.volume, c.error.as_ref()?)))
        .collect();
    row.failover = Some(f);
    if !failed.is_empty() {
        return Err(fail(format!(
            "lost-write checker failed: {}",
            failed.join("; ")
        )));
    }
    Ok(())
}

/// Runs `f` over `items` with at most [`API_CONCURRENCY`] calls in flight.
async fn each_concurrently<F, Fut>(items: &[String], f: F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        if set.len() >= API_CONCURRENCY
            && let Some(r) = set.join_next().await
        {
            r.map_err(|e| fail(format!("task: {e}")))??;
        }
        set.spawn(f(item.clone()));
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| fail(format!("task: {e}")))??;
    }
    Ok(())
}

fn is_ready(v: &BlockVolume) -> bool {
    v.status
        .as_ref()
        .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count >= u32::from(REPLICAS))
}

/// Creates every volume at once and waits until all are Ready (or the bound passes:
/// the times reached so far are returned with `all_s` empty).
async fn create_all(
    cluster: &TestCluster,
    names: &[String],
    disk: &DiskWatch<'_>,
    row: &mut ScaleRow,
) -> Result<ReadyTimes> {
    let api = Api::<BlockVolume>::all(cluster.client.clone());
    let n = names.len();
    let start = Instant::now();
    let creating = {
        let api = api.clone();
        each_concurrently(names, move |name| {
            let api = api.clone();
            async move {
                let spec = BlockVolumeSpec {
                    replicas: REPLICAS,
                    ..BlockVolumeSpec::with_size(VOLUME_SIZE)
                };
                api.create(&PostParams::default(), &BlockVolume::new(&name, spec))
                    .await?;
                Ok(())
            }
        })
    };
    creating.await?;
    let mut t = ReadyTimes {
        created_s: start.elapsed().as_secs_f64(),
        ..ReadyTimes::default()
    };
    tracing::info!(volumes = n, seconds = t.created_s, "creates accepted");
    let mut last_progress = Instant::now();
    loop {
        let vols = api.list(&ListParams::default().match_any()).await?.items;
        let ready = vols.iter().filter(|v| is_ready(v)).count();
        let now = start.elapsed().as_secs_f64();
        t.ready = ready;
        if ready * 2 >= n && t.half_s.is_none() {
            t.half_s = Some(now);
        }
        if ready * 10 >= n * 9 && t.p90_s.is_none() {
            t.p90_s = Some(now);
        }
        if ready == n {
            t.all_s = Some(now);
            tracing::info!(volumes = n, seconds = now, "all Ready");
            return Ok(t);
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            disk.check(row)?;
            tracing::info!(
                ready,
                of = n,
                seconds = format!("{now:.0}"),
                disk_free_gib = format!("{:.1}", row.disk_free_gib_min),
                load_avg_1m = load_average(),
                "waiting for Ready"
            );
        }
        if start.elapsed() >= READY_TIMEOUT {
            tracing::warn!(ready, of = n, "not all Ready within {READY_TIMEOUT:?}");
            return Ok(t);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// CPU seconds of every component, by name.
fn cpu_by_component(cluster: &TestCluster) -> BTreeMap<String, f64> {
    let mut pids: Vec<(String, u32)> = cluster
        .control_plane
        .daemon_pids()
        .into_iter()
        .map(|(n, p)| (n.to_string(), p))
        .collect();
    pids.extend(
        cluster
            .operators
            .iter()
            .filter_map(|o| Some(("operator".to_string(), o.pid()?))),
    );
    pids.extend(
        cluster
            .agents
            .iter()
            .filter_map(|a| Some((format!("agent {}", a.node), a.pid()?))),
    );
    pids.into_iter()
        .filter_map(|(n, p)| Some((n, bench::cpu_seconds(p).ok()?)))
        .collect()
}

/// The idle window: CPU per component, agent RSS, API requests by verb and resource.
async fn idle_cost(
    cluster: &TestCluster,
    window_s: u64,
    empty_rss: BTreeMap<String, f64>,
) -> Result<IdleCost> {
    tracing::info!(window_s, "measuring the idle cluster");
    let requests_before = request_counts(cluster).await?;
    let cpu_before = cpu_by_component(cluster);
    let start = Instant::now();
    // The measurement window itself: nothing is awaited, the counters accumulate.
    tokio::time::sleep(Duration::from_secs(window_s)).await;
    let cpu_after = cpu_by_component(cluster);
    let elapsed = start.elapsed().as_secs_f64();
    let requests_after = request_counts(cluster).await?;
    let cpu_ms_per_s: BTreeMap<String, f64> = cpu_after
        .iter()
        .filter_map(|(n, after)| {
            let before = cpu_before.get(n)?;
            Some((n.clone(), (after - before) * 1000.0 / elapsed))
        })
        .collect();
    let judged_cpu_ms_per_s = cpu_ms_per_s
        .iter()
        .filter(|(n, _)| n.as_str() != "etcd")
        .map(|(_, v)| v)
        .sum();
    let api_requests_per_s: BTreeMap<String, f64> = growth(&requests_before, &requests_after)
        .into_iter()
        .map(|((verb, resource), n)| (format!("{verb} {resource}"), n / elapsed))
        .collect();
    let api_total_per_s = api_requests_per_s.values().sum();
    let agent_rss_mib: BTreeMap<String, f64> = cluster
        .agents
        .iter()
        .map(|a| (a.node.clone(), a.pid().map_or(0.0, rss_mib)))
        .collect();
    let replicas = Api::<BlockReplica>::all(cluster.client.clone())
        .list(&ListParams::default().match_any())
        .await?
        .items;
    let mut agent_replicas: BTreeMap<String, usize> =
        cluster.agents.iter().map(|a| (a.node.clone(), 0)).collect();
    for r in &replicas {
        *agent_replicas.entry(r.spec.node.clone()).or_default() += 1;
    }
    let hosted: usize = agent_replicas.values().sum();
    let grown: f64 = agent_rss_mib
        .iter()
        .map(|(n, rss)| rss - empty_rss.get(n).copied().unwrap_or(0.0))
        .sum();
    Ok(IdleCost {
        window_s: elapsed,
        cpu_ms_per_s,
        judged_cpu_ms_per_s,
        agent_rss_mib,
        agent_rss_empty_mib: empty_rss,
        agent_replicas,
        rss_per_replica_mib: (hosted > 0).then(|| grown / hosted as f64),
        api_requests_per_s,
        api_total_per_s,
    })
}

/// A volume whose primary was on the killed node: its epoch then, and when a new
/// primary was seen serving.
struct Affected {
    epoch: u64,
    promoted_s: Option<f64>,
}

/// Kills the agent holding the most primaries (the checker writing to a sample of its
/// volumes) and times each volume until a new primary serves at a higher epoch; then
/// reads the checker's ledgers back from the new primaries.
async fn mass_failover(cluster: &mut TestCluster, sample: usize) -> Result<MassFailover> {
    let vapi = Api::<BlockVolume>::all(cluster.client.clone());
    let rapi = Api::<BlockReplica>::all(cluster.client.clone());
    let vols = vapi.list(&ListParams::default().match_any()).await?.items;
    let mut by_node: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for v in &vols {
        if let Some(s) = &v.status
            && let Some(node) = &s.primary_node
        {
            by_node
                .entry(node.clone())
                .or_default()
                .push((v.name_any(), s.epoch));
        }
    }
    let (node, primaries) = by_node
        .into_iter()
        .max_by_key(|(_, v)| v.len())
        .ok_or_else(|| fail("no volume has a primary"))?;
    let agent = cluster
        .agent(&node)
        .ok_or_else(|| fail(format!("no agent for {node}")))?;
    let addr = agent
        .nbd_tcp
        .ok_or_else(|| fail("agents run without an NBD TCP listener"))?;
    // The checker: one writer per sampled volume, a FLUSH after each write, through the
    // doomed primary's NBD export; the kill breaks the connections mid-run.
    let mut writers = Vec::new();
    for (volume, _) in primaries.iter().take(sample) {
        let checker = Checker::new(
            Ledger::new(CheckerConfig {
                volume_id: volume.clone(),
                seed: 0x5ca1e,
                workers: 1,
                block_size_bytes: 4096,
                lba_start: 0,
                lba_count: CHECKER_LBAS,
                flush_every_writes: 1,
            })
            .map_err(|e| fail(format!("checker: {e}")))?,
        );
        let target = Target::Tcp {
            addr,
            export: volume.clone(),
        };
        let mut progress = checker.flush_progress();
        let running = {
            let checker = checker.clone();
            tokio::spawn(async move { checker.run_writes(&target, CHECKER_WRITES_MAX).await })
        };
        let warm = tokio::time::timeout(
            CHECKER_WARMUP_TIMEOUT,
            progress.wait_for(|n| *n >= CHECKER_WARMUP_FLUSHES),
        )
        .await;
        if !matches!(warm, Ok(Ok(_))) {
            running.abort();
            return Err(fail(format!(
                "the checker on {volume} did not reach {CHECKER_WARMUP_FLUSHES} flushes \
                 within {CHECKER_WARMUP_TIMEOUT:?}"
            )));
        }
        writers.push((volume.clone(), checker, running));
    }
    let mut affected: BTreeMap<String, Affected> = primaries
        .iter()
        .map(|(v, e)| {
            (
                v.clone(),
                Affected {
                    epoch: *e,
                    promoted_s: None,
                },
            )
        })
        .collect();
    tracing::info!(%node, primaries = affected.len(), "SIGKILL of the agent with the most primaries");
    let killed = Instant::now();
    cluster
        .agent(&node)
        .ok_or_else(|| fail(format!("no agent for {node}")))?
        .kill();
    let mut last_progress = Instant::now();
    loop {
        let vols = vapi.list(&ListParams::default().match_any()).await?.items;
        let reps = rapi.list(&ListParams::default().match_any()).await?.items;
        let serving: BTreeSet<(String, u64)> = reps
            .iter()
            .filter_map(|r| {
                let st = r.status.as_ref()?;
                (st.state == ReplicaState::Serving).then(|| (r.name_any(), st.epoch))
            })
            .collect();
        let now = killed.elapsed().as_secs_f64();
        for v in &vols {
            let Some(a) = affected.get_mut(&v.name_any()) else {
                continue;
            };
            let Some(s) = &v.status else { continue };
            if a.promoted_s.is_none()
                && s.epoch > a.epoch
                && s.primary_node.as_deref().is_some_and(|n| n != node)
                && s.primary
                    .as_ref()
                    .is_some_and(|p| serving.contains(&(p.clone(), s.epoch)))
            {
                a.promoted_s = Some(now);
            }
        }
        let done = affected.values().filter(|a| a.promoted_s.is_some()).count();
        if done == affected.len() || killed.elapsed() >= PROMOTION_TIMEOUT {
            break;
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            tracing::info!(
                promoted = done,
                of = affected.len(),
                seconds = format!("{now:.0}"),
                "waiting for promotions"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let seconds: Vec<f64> = affected.values().filter_map(|a| a.promoted_s).collect();
    let mut out = MassFailover {
        killed_node: node.clone(),
        primaries: affected.len(),
        seconds: Percentiles::of(&seconds),
        not_promoted: affected
            .iter()
            .filter(|(_, a)| a.promoted_s.is_none())
            .map(|(v, _)| v.clone())
            .collect(),
        checks: Vec::new(),
    };
    tracing::info!(
        promoted = seconds.len(),
        of = out.primaries,
        p50 = out.seconds.map(|p| p.p50),
        max = out.seconds.map(|p| p.max),
        "promotions"
    );
    for (volume, checker, running) in writers {
        out.checks
            .push(check_sample(cluster, &volume, &checker, running).await);
    }
    Ok(out)
}

/// Ends a checker's run (the kill broke its connection) and reads its ledger back from
/// the volume's new primary.
async fn check_sample(
    cluster: &TestCluster,
    volume: &str,
    checker: &Arc<Checker>,
    running: tokio::task::JoinHandle<e2e::checker::WriteSummary>,
) -> SampleCheck {
    let mut c = SampleCheck {
        volume: volume.to_string(),
        ..SampleCheck::default()
    };
    match tokio::time::timeout(CHECKER_WARMUP_TIMEOUT, running).await {
        Ok(Ok(w)) => c.writes_durable = w.writes_made_durable,
        Ok(Err(e)) => {
            c.error = Some(format!("checker task: {e}"));
            return c;
        }
        Err(_) => {
            c.error = Some(format!(
                "the checker still wrote {CHECKER_WARMUP_TIMEOUT:?} after the kill \
                 (its connection to the killed primary never broke)"
            ));
            return c;
        }
    }
    let Some(node) = cluster
        .volume(volume)
        .await
        .and_then(|v| v.status?.primary_node)
    else {
        c.error = Some("no primary to read the ledger back from".into());
        return c;
    };
    let Some(addr) = cluster
        .agents
        .iter()
        .find(|a| a.node == node)
        .and_then(|a| a.nbd_tcp)
    else {
        c.error = Some(format!("no NBD listener on {node}"));
        return c;
    };
    let target = Target::Tcp {
        addr,
        export: volume.to_string(),
    };
    match verify_ledger(&target, &checker.ledger()).await {
        Ok(r) => {
            c.writes_verified = r.writes_verified;
            c.lost = r.findings.len() as u64;
            if !r.is_clean() {
                c.error = Some(format!("LOST WRITES: {r}"));
            }
        }
        Err(e) => c.error = Some(format!("verify on {node}: {e}")),
    }
    c
}

/// Deletes every volume at once and waits until no volume object is left; seconds.
async fn delete_all(
    cluster: &TestCluster,
    names: &[String],
    disk: &DiskWatch<'_>,
    row: &mut ScaleRow,
) -> Result<f64> {
    let api = Api::<BlockVolume>::all(cluster.client.clone());
    let start = Instant::now();
    {
        let api = api.clone();
        each_concurrently(names, move |name| {
            let api = api.clone();
            async move {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .await?;
    }
    let mut last_progress = Instant::now();
    loop {
        let left = api
            .list(&ListParams::default().match_any())
            .await?
            .items
            .len();
        if left == 0 {
            let s = start.elapsed().as_secs_f64();
            tracing::info!(volumes = names.len(), seconds = s, "all deleted");
            return Ok(s);
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            // The floor is only recorded here: a row past its measurements still
            // cleans up.
            let _ = disk.check(row);
            tracing::info!(left, "waiting for deletion");
        }
        if start.elapsed() >= DELETE_TIMEOUT {
            return Err(fail(format!(
                "{left} volumes still exist {DELETE_TIMEOUT:?} after the deletes"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
