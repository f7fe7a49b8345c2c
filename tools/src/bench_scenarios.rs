//! The benchmark rows that run real devices and faults against a [`TestCluster`]: fio
//! on ext4 through an RF3 volume attached with the agent's Attach API against ext4 on a
//! loop device over an image file on the same disk; failover of the primary under the
//! lost-write checker; replica rebuild against the disk's sequential write rate; and a
//! CPU profile of the agents. `blockvol-bench` puts the results into its report
//! (`bench::Ext4Rows`, `FailoverRows`, `RebuildRows`, `Profile`).
//!
//! Every wait is a poll with a named bound; a row that cannot finish records the reason
//! in the report instead of a number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{BlockVolume, ReplicaState};
use csi::agent::{Agent, AgentSettings};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

use crate::bench::{
    self, EXT4_JOBS, Ext4Rows, FailoverRows, FailoverTrial, FioResult, Profile, RebuildRows,
    RebuildRun, Sample,
};
use crate::error::{Error, Result};
use e2e::checker::{CheckerConfig, Ledger, NbdClient, Target, make_block, verify_ledger};
use e2e::cluster::{TestCluster, wait_for};
use e2e::devices::{AttachmentGuard, run};
use testkit::SeededRng;

/// Bound on a volume becoming Ready with every replica in sync.
pub const VOLUME_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on an agent's gRPC call (Attach waits for the device).
const AGENT_CALL_TIMEOUT_MS: u64 = 120_000;
/// Bound on the writer's first write after the primary's agent was killed.
pub const FAILOVER_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Flushed writes before the kill, so the writer is known to be running.
const FAILOVER_WARMUP_FLUSHES: u64 = 20;
/// Flushed writes on the new primary before a trial's writer stops.
const FAILOVER_AFTER_FLUSHES: u64 = 20;
/// LBAs (4 KiB) the failover writer spreads its writes over.
const FAILOVER_LBAS: u64 = 4096;
/// Bound on a lagging replica being escalated to NeedsRebuild after its agent died
/// (beyond the retention budget the cluster was started with).
const ESCALATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one rebuild, from the agent's restart to "rebuild finished".
pub const REBUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the rebuilt replica's log is read for the start and end lines.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The node added for the failover writer: it holds no replica, so its agent and the
/// writer's connection survive every kill.
pub const WRITER_NODE: &str = "node-writer";

fn fail(message: impl Into<String>) -> Error {
    Error::Bench(message.into())
}

/// Runs fio with `args` (JSON output) and parses the result.
pub async fn fio(args: &[String]) -> Result<FioResult> {
    let out = tokio::process::Command::new("fio")
        .arg("--output-format=json")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::io("running fio (hack/deps.sh installs it)", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("fio {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: format!("{}{}", String::from_utf8_lossy(&out.stderr), stdout),
        });
    }
    bench::parse_fio(&stdout).map_err(|e| fail(format!("fio output: {e}")))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn agent_client(cluster: &mut TestCluster, node: &str) -> Result<Agent> {
    let a = cluster
        .agent(node)
        .ok_or_else(|| fail(format!("no agent for node {node}")))?;
    Agent::new(&AgentSettings {
        socket_path: a.agent_socket.clone(),
        agent_call_timeout_ms: AGENT_CALL_TIMEOUT_MS,
    })
    .map_err(|e| fail(format!("agent client for {node}: {e}")))
}

/// The primary's node of `volume` once it is Ready with `replicas` in sync and its
/// primary serves at the volume's epoch; also the epoch.
pub async fn ready_primary(
    cluster: &TestCluster,
    volume: &str,
    replicas: u32,
    min_epoch: u64,
) -> Result<(String, u64)> {
    Ok(cluster
        .wait_serving(volume, replicas, min_epoch, VOLUME_READY_TIMEOUT)
        .await?)
}

/// Deletes `volume` and waits until the object is gone (its agents then delete the
/// replica files).
async fn delete_volume(cluster: &TestCluster, volume: &str) -> Result<()> {
    Api::<BlockVolume>::all(cluster.client.clone())
        .delete(volume, &DeleteParams::default())
        .await?;
    wait_for(
        &format!("{volume} deleted"),
        VOLUME_READY_TIMEOUT,
        || async { cluster.volume(volume).await.is_none().then_some(()) },
    )
    .await?;
    Ok(())
}

/// Settings of the ext4 rows.
#[derive(Clone, Debug)]
pub struct Ext4Settings {
    pub file_size_mib: u64,
    pub reps: u32,
    pub runtime_s: u32,
    pub ramp_s: u32,
    /// Profile the agents during one extra run of the RF3 4 KiB write job.
    pub profile: Option<ProfileSettings>,
}

/// Where `perf` writes and how many functions the report keeps.
#[derive(Clone, Debug)]
pub struct ProfileSettings {
    pub scratch: PathBuf,
    /// The `perf report` text is written here (next to the report).
    pub report_text: PathBuf,
    pub top: usize,
}

/// ext4 on a loop device over an image file; unmounted and detached on drop.
struct LocalExt4 {
    device: String,
    mount: PathBuf,
    mounted: bool,
}

impl LocalExt4 {
    fn create(image: &Path, size_mib: u64, mount: &Path) -> Result<LocalExt4> {
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(|e| Error::io(format!("creating {}", image.display()), e))?;
        let device = run(
            "losetup",
            &[
                "--direct-io=on",
                "-f",
                "--show",
                &image.display().to_string(),
            ],
        )?
        .trim()
        .to_string();
        let mut me = LocalExt4 {
            device,
            mount: mount.to_path_buf(),
            mounted: false,
        };
        run("mkfs.ext4", &["-q", "-F", &me.device])?;
        mount_at(&me.device, mount)?;
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for LocalExt4 {
    fn drop(&mut self) {
        let m = self.mount.display().to_string();
        if self.mounted
            && let Err(e) = run("umount", &[&m]).or_else(|_| run("umount", &["-l", &m]))
        {
            tracing::warn!(error = %e, "unmounting the local ext4");
        }
        if let Err(e) = run("losetup", &["-d", &self.device]) {
            tracing::warn!(error = %e, "detaching the local loop device");
        }
    }
}

fn mount_at(device: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    run("mount", &[device, &dir.display().to_string()])?;
    Ok(())
}

fn psync_args(file: &Path, size_mib: u64) -> Vec<String> {
    vec![
        "--name=ext4".into(),
        "--ioengine=psync".into(),
        "--direct=1".into(),
        format!("--filename={}", file.display()),
        format!("--size={size_mib}M"),
    ]
}

/// The ext4 rows (and the profile, if asked for): an RF3 volume attached on its
/// primary's node through Attach (a real block device), ext4 on it and on a loop
/// device over an image file in `scratch`, the same fio jobs on a file in each,
/// interleaved per repetition.
pub async fn ext4_rows(
    cluster: &mut TestCluster,
    scratch: &Path,
    s: &Ext4Settings,
) -> Result<(Ext4Rows, Option<Profile>)> {
    const VOLUME: &str = "bench-ext4";
    // Room for ext4's metadata and journal around the file.
    let fs_mib = s.file_size_mib + s.file_size_mib / 4 + 64;
    cluster
        .create_ready_volume(VOLUME, &format!("{fs_mib}Mi"), 3, VOLUME_READY_TIMEOUT)
        .await?;
    let (node, _) = ready_primary(cluster, VOLUME, 3, 1).await?;
    let data_dir = cluster
        .agent(&node)
        .ok_or_else(|| fail(format!("no agent for {node}")))?
        .data_dir
        .clone();
    let rf3_mount = scratch.join("mnt-rf3");
    let _guard = AttachmentGuard {
        data_dir,
        volume: VOLUME.into(),
        mount_point: rf3_mount.clone(),
    };
    let client = agent_client(cluster, &node)?;
    let device = client
        .attach(VOLUME, false)
        .await
        .map_err(|e| fail(format!("Attach of {VOLUME} on {node}: {e}")))?
        .device_path;
    run("mkfs.ext4", &["-q", "-F", &device])?;
    mount_at(&device, &rf3_mount)?;
    let local = LocalExt4::create(
        &scratch.join("local-ext4.img"),
        fs_mib,
        &scratch.join("mnt-local"),
    )?;
    let targets = [
        ("rf3-ext4", rf3_mount.join("bench.dat")),
        ("local-ext4", local.mount.join("bench.dat")),
    ];
    tracing::info!(%device, local = %local.device, "ext4 rows: filling the files");
    for (_, file) in &targets {
        let mut a = psync_args(file, s.file_size_mib);
        a.extend(strings(&["--rw=write", "--bs=1M", "--end_fsync=1"]));
        fio(&a).await?;
    }
    let pids: Vec<u32> = cluster.agents.iter().filter_map(|a| a.pid()).collect();
    let mut samples = Vec::new();
    for job in EXT4_JOBS {
        for rep in 1..=s.reps {
            for k in 0..targets.len() {
                let (t, file) = &targets[(k + rep as usize) % targets.len()];
                let mut a = psync_args(file, s.file_size_mib);
                a.extend(job.args.iter().map(|x| x.to_string()));
                a.extend([
                    "--time_based".into(),
                    format!("--runtime={}", s.runtime_s),
                    format!("--ramp_time={}", s.ramp_s),
                ]);
                let (result, error) = match fio(&a).await {
                    Ok(r) => (r, None),
                    Err(e) => (FioResult::default(), Some(e.to_string())),
                };
                tracing::info!(job = job.name, target = %t, rep, iops = result.iops as u64,
                    mib_s = format!("{:.1}", result.mib_s), error = error.as_deref(), "ext4 run");
                samples.push(Sample {
                    pattern: job.name.to_string(),
                    target: t.to_string(),
                    rep,
                    result,
                    server_cpu_s: None,
                    error,
                });
            }
        }
    }
    let profile = match &s.profile {
        Some(p) => Some(profile_run(&pids, &targets[0].1, s, p).await?),
        None => None,
    };
    let mut rows = Ext4Rows {
        device: format!(
            "{device} from the agent's Attach on the primary's node {node} (whatever \
             device the agent's attach path makes on this host), ext4"
        ),
        local: "ext4 on a loop device (--direct-io=on) over an image file in the work \
                directory, same disk"
            .into(),
        file_size_mib: s.file_size_mib,
        samples,
        ..Ext4Rows::default()
    };
    rows.summarize();
    run("umount", &[&rf3_mount.display().to_string()])?;
    drop(local);
    let _ = std::fs::remove_file(scratch.join("local-ext4.img"));
    client
        .detach(VOLUME)
        .await
        .map_err(|e| fail(format!("Detach of {VOLUME}: {e}")))?;
    delete_volume(cluster, VOLUME).await?;
    Ok((rows, profile))
}

/// One more run of the RF3 4 KiB write job with `perf record -e cpu-clock -g` on every
/// agent process; returns the top functions by self and by children.
async fn profile_run(
    pids: &[u32],
    file: &Path,
    s: &Ext4Settings,
    p: &ProfileSettings,
) -> Result<Profile> {
    let job = &EXT4_JOBS[0];
    let data = p.scratch.join("perf.data");
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let record_args = vec![
        "record".to_string(),
        "-e".into(),
        "cpu-clock".into(),
        "-g".into(),
        "-p".into(),
        pid_list,
        "-o".into(),
        data.display().to_string(),
        "--".into(),
        "sleep".into(),
        s.runtime_s.to_string(),
    ];
    let perf = tokio::process::Command::new("perf")
        .args(&record_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io("starting perf (apt-get install linux-perf)", e))?;
    let mut a = psync_args(file, s.file_size_mib);
    a.extend(job.args.iter().map(|x| x.to_string()));
    a.extend([
        "--time_based".into(),
        format!("--runtime={}", s.runtime_s + 1),
    ]);
    let (perf_out, fio_out) = tokio::join!(perf.wait_with_output(), fio(&a));
    fio_out?;
    let perf_out = perf_out.map_err(|e| Error::io("waiting for perf record", e))?;
    if !perf_out.status.success() {
        return Err(Error::Command {
            command: format!("perf {}", record_args.join(" ")),
            status: perf_out.status.to_string(),
            stderr: String::from_utf8_lossy(&perf_out.stderr).into_owned(),
        });
    }
    let data_s = data.display().to_string();
    let text = run(
        "perf",
        &[
            "report",
            "-i",
            &data_s,
            "--stdio",
            "--children",
            "--sort",
            "symbol",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ],
    )?;
    // perf pads every line to its widest symbol (kilobytes per line); keep the
    // comment header and one `children% self% symbol` line per entry.
    let mut compact: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter(|l| !l.contains("...."))
        .map(|l| format!("{}\n", l.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    for e in bench::parse_perf_report(&text) {
        compact.push_str(&format!(
            "{:6.2}% {:6.2}% {}\n",
            e.children_pct, e.self_pct, e.symbol
        ));
    }
    std::fs::write(&p.report_text, compact)
        .map_err(|e| Error::io(format!("writing {}", p.report_text.display()), e))?;
    Ok(Profile::from_report(
        &format!("{} on rf3-ext4", job.name),
        &format!(
            "perf {}",
            record_args[..4]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        &p.report_text.display().to_string(),
        &text,
        p.top,
    ))
}

/// Adds [`WRITER_NODE`] (a node without replicas) to the cluster if it is missing.
pub async fn ensure_writer_node(cluster: &mut TestCluster) -> Result<()> {
    if cluster.agent(WRITER_NODE).is_some() {
        return Ok(());
    }
    cluster
        .control_plane
        .create_node(WRITER_NODE, &BTreeMap::new())
        .await?;
    cluster.add_agent(WRITER_NODE)?;
    Ok(cluster.wait_registered(VOLUME_READY_TIMEOUT).await?)
}

/// One connection writing checker blocks (see `checker`), each write followed by a
/// FLUSH, until told to stop; the ledger records every write sent and every write a
/// flush covered, so `verify_ledger` can judge what reads back. Unlike
/// `Checker::run_writes` it runs until stopped and stops between two writes, so the
/// ledger is never read while a write is in flight.
struct FlushedWriter {
    ledger: Arc<Mutex<Ledger>>,
    /// Flushes acknowledged so far.
    progress: tokio::sync::watch::Sender<u64>,
}

impl FlushedWriter {
    fn new(ledger: Ledger) -> FlushedWriter {
        FlushedWriter {
            ledger: Arc::new(Mutex::new(ledger)),
            progress: tokio::sync::watch::channel(0).0,
        }
    }

    fn ledger(&self) -> Ledger {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes until `stop` turns true; the error says why it stopped early.
    fn start(
        &self,
        target: Target,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<std::result::Result<(), String>> {
        let ledger = self.ledger.clone();
        let progress = self.progress.clone();
        tokio::spawn(async move {
            let mut c = NbdClient::connect(&target)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let cfg = ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config
                .clone();
            let bs = u64::from(cfg.block_size_bytes);
            let mut rng = SeededRng::new(cfg.seed ^ *progress.borrow());
            while !*stop.borrow_and_update() {
                let lba = cfg.lba_start + rng.next_u64() % cfg.lba_count;
                let seq = {
                    let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    let s = l.next_seq;
                    l.next_seq += 1;
                    l.blocks.entry(lba).or_default().sent_seq = s;
                    s
                };
                let block = make_block(&cfg.volume_id, bs as usize, lba, seq);
                c.write(lba * bs, &block)
                    .await
                    .map_err(|e| format!("write of LBA {lba}: {e}"))?;
                c.flush().await.map_err(|e| format!("flush: {e}"))?;
                {
                    let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    let r = l.blocks.entry(lba).or_default();
                    r.durable_seq = r.durable_seq.max(seq);
                }
                progress.send_modify(|n| *n += 1);
            }
            c.disconnect().await;
            Ok(())
        })
    }
}

/// Waits until the checker has acknowledged `n` flushes in all; `None` if the writer
/// stopped or `timeout` passed first.
async fn flushes_reach(
    progress: &mut tokio::sync::watch::Receiver<u64>,
    n: u64,
    timeout: Duration,
) -> Option<Instant> {
    let reached = tokio::time::timeout(timeout, progress.wait_for(|v| *v >= n)).await;
    matches!(reached, Ok(Ok(_))).then(Instant::now)
}

/// Failover trials on an RF3 volume: a checker writes (one write, then its FLUSH, at a
/// time) through the forwarding export of [`WRITER_NODE`], the export an attached device
/// there uses; the primary's agent is SIGKILLed, and the time to the first write sent
/// after the kill and acknowledged with its flush is measured. After each trial every
/// flushed write is read back, the killed agent restarted and three replicas in sync
/// awaited. The volume must exist on the three other nodes before the writer node joins.
pub async fn failover_rows(
    cluster: &mut TestCluster,
    trials: u32,
    lease_duration_s: u32,
) -> Result<FailoverRows> {
    const VOLUME: &str = "bench-failover";
    cluster
        .create_ready_volume(VOLUME, "64Mi", 3, VOLUME_READY_TIMEOUT)
        .await?;
    ensure_writer_node(cluster).await?;
    let writer = cluster
        .agent(WRITER_NODE)
        .ok_or_else(|| fail("writer node's agent"))?;
    let data_dir = writer.data_dir.clone();
    let target = Target::Unix {
        path: writer.nbd_socket.with_file_name("forward.sock"),
        export: VOLUME.into(),
    };
    let _guard = AttachmentGuard {
        data_dir,
        volume: VOLUME.into(),
        mount_point: PathBuf::from("/nonexistent-bench-mount"),
    };
    let client = agent_client(cluster, WRITER_NODE)?;
    client
        .attach(VOLUME, false)
        .await
        .map_err(|e| fail(format!("Attach of {VOLUME} on {WRITER_NODE}: {e}")))?;
    let writer = FlushedWriter::new(
        Ledger::new(CheckerConfig {
            volume_id: VOLUME.into(),
            seed: 0xb10c_f00d,
            workers: 1,
            block_size_bytes: 4096,
            lba_start: 0,
            lba_count: FAILOVER_LBAS,
            flush_every_writes: 1,
        })
        .map_err(|e| fail(format!("checker: {e}")))?,
    );
    let mut rows = FailoverRows {
        lease_duration_s,
        writer: format!(
            "the lost-write checker (4 KiB writes, a FLUSH after each, QD1) through the \
             forwarding export of {WRITER_NODE}, which holds no replica (the export its \
             attached device uses)"
        ),
        ..FailoverRows::default()
    };
    let mut epoch = 1;
    for trial in 1..=trials {
        let (primary, e) = ready_primary(cluster, VOLUME, 3, epoch).await?;
        epoch = e;
        let t = failover_trial(cluster, &writer, &target, trial, &primary, epoch).await;
        tracing::info!(
            trial,
            seconds = t.seconds,
            lost = t.lost,
            verified = t.writes_verified,
            error = t.error.as_deref(),
            "failover trial"
        );
        rows.trials.push(t);
        cluster
            .agent(&primary)
            .ok_or_else(|| fail(format!("agent {primary}")))?
            .restart()?;
    }
    rows.summarize();
    client
        .detach(VOLUME)
        .await
        .map_err(|e| fail(format!("Detach of {VOLUME}: {e}")))?;
    ready_primary(cluster, VOLUME, 3, epoch).await?;
    delete_volume(cluster, VOLUME).await?;
    Ok(rows)
}

async fn failover_trial(
    cluster: &mut TestCluster,
    writer: &FlushedWriter,
    target: &Target,
    trial: u32,
    primary: &str,
    epoch: u64,
) -> FailoverTrial {
    let mut t = FailoverTrial {
        trial,
        killed_node: primary.to_string(),
        ..FailoverTrial::default()
    };
    let mut progress = writer.progress.subscribe();
    let base = *progress.borrow();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let running = writer.start(target.clone(), stop_rx);
    let stop = |running: tokio::task::JoinHandle<std::result::Result<(), String>>| async move {
        let _ = stop_tx.send(true);
        match running.await {
            Ok(Ok(())) => String::new(),
            Ok(Err(e)) => e,
            Err(e) => format!("writer task: {e}"),
        }
    };
    if flushes_reach(
        &mut progress,
        base + FAILOVER_WARMUP_FLUSHES,
        FAILOVER_WRITE_TIMEOUT,
    )
    .await
    .is_none()
    {
        t.error = Some(format!("writer did not start: {}", stop(running).await));
        return t;
    }
    let killed = Instant::now();
    match cluster.agent(primary) {
        Some(a) => a.kill(),
        None => {
            t.error = Some(format!("no agent for {primary}"));
            stop(running).await;
            return t;
        }
    }
    // Read after the kill: flush `at_kill + 1` is acknowledged after this read, so
    // write `at_kill + 2` was sent after the kill, and its flush is the first one that
    // surely covers a write the dead primary never saw.
    let at_kill = *progress.borrow();
    let Some(resumed) = flushes_reach(&mut progress, at_kill + 2, FAILOVER_WRITE_TIMEOUT).await
    else {
        t.error = Some(format!(
            "no write acknowledged within {:?} of the kill: {}",
            FAILOVER_WRITE_TIMEOUT,
            stop(running).await
        ));
        return t;
    };
    t.seconds = Some((resumed - killed).as_secs_f64());
    let more = flushes_reach(
        &mut progress,
        at_kill + 2 + FAILOVER_AFTER_FLUSHES,
        FAILOVER_WRITE_TIMEOUT,
    )
    .await;
    let why = stop(running).await;
    if more.is_none() || !why.is_empty() {
        t.error = Some(format!("writer stalled after the failover: {why}"));
    }
    t.writes_durable = *progress.borrow() - base;
    match wait_for("a new primary", VOLUME_READY_TIMEOUT, || async {
        let s = cluster.volume("bench-failover").await?.status?;
        (s.epoch > epoch).then_some(s.primary_node?)
    })
    .await
    {
        Ok(n) => t.new_primary_node = n,
        Err(e) => t.error = Some(e.to_string()),
    }
    let ledger = writer.ledger();
    match verify_ledger(target, &ledger).await {
        Ok(r) => {
            t.writes_verified = r.writes_verified;
            t.lost = r.findings.len() as u64;
            if !r.is_clean() {
                t.error = Some(format!("LOST WRITES: {r}"));
            }
        }
        Err(e) => t.error = Some(format!("verify: {e}")),
    }
    t
}

/// Settings of the rebuild rows.
#[derive(Clone, Debug)]
pub struct RebuildSettings {
    pub sizes_mib: Vec<u64>,
    /// Length of the disk measurement.
    pub disk_runtime_s: u32,
}

/// The primary's view of `replica_id` (its peer state), if reported.
async fn peer_state(cluster: &TestCluster, volume: &str, replica_id: &str) -> Option<ReplicaState> {
    let s = cluster.volume(volume).await?.status?;
    let rs = cluster.replicas(volume).await;
    let p = rs.iter().find(|r| Some(r.name_any()) == s.primary)?;
    p.status
        .as_ref()?
        .peers
        .iter()
        .find(|p| p.replica_id == replica_id)
        .map(|p| p.state)
}

/// Byte length of a file (0 if missing).
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Polls `log` from byte `from` for a line with every one of `words`.
async fn log_line(log: &Path, from: u64, words: &[&str], timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
        if tail.lines().any(|l| words.iter().all(|w| l.contains(w))) {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(LOG_POLL_INTERVAL).await;
    }
}

/// fio against an NBD URI, stopped with SIGINT (fio then reports what it did).
struct BackgroundFio {
    child: tokio::process::Child,
}

impl BackgroundFio {
    fn start(uri: &str, args: &[&str]) -> Result<BackgroundFio> {
        let child = tokio::process::Command::new("fio")
            .args(["--name=writer", "--ioengine=nbd", "--output-format=json"])
            .arg(format!("--uri={uri}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io("starting fio", e))?;
        Ok(BackgroundFio { child })
    }

    async fn stop(self) -> Result<FioResult> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGINT);
            }
        }
        let out = self
            .child
            .wait_with_output()
            .await
            .map_err(|e| Error::io("waiting for fio", e))?;
        bench::parse_fio(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
            fail(format!(
                "background fio: {e}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }
}

/// The concurrent writer during a rebuild.
const REBUILD_WRITER_ARGS: &[&str] = &[
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=4",
    "--fsync=32",
    "--time_based",
    "--runtime=3600",
];

/// Rebuild rows: the disk's sequential write rate, then for each size an RF2 volume
/// filled end to end whose replica is made to need a rebuild twice (idle, then under a
/// concurrent writer). The cluster's agents must run with a short
/// `--wal-retention-timeout-ms` so the primary gives the dead replica up soon.
pub async fn rebuild_rows(
    cluster: &mut TestCluster,
    scratch: &Path,
    s: &RebuildSettings,
) -> Result<RebuildRows> {
    let disk_mib = s.sizes_mib.iter().copied().max().unwrap_or(256).min(1024);
    let disk_file = scratch.join("disk-seq.img");
    let mut disk_args = strings(&[
        "--name=disk",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=write",
        "--bs=1M",
        "--iodepth=4",
        "--time_based",
    ]);
    disk_args.extend([
        format!("--filename={}", disk_file.display()),
        format!("--size={disk_mib}M"),
        format!("--runtime={}", s.disk_runtime_s),
    ]);
    let disk = fio(&disk_args).await?;
    let _ = std::fs::remove_file(&disk_file);
    tracing::info!(
        mib_s = format!("{:.0}", disk.mib_s),
        "disk sequential write"
    );
    let mut rows = RebuildRows {
        replicas: 2,
        disk_seq_write_mib_s: disk.mib_s,
        disk_job: format!(
            "fio 1 MiB sequential write, libaio QD4, O_DIRECT, {disk_mib} MiB local file, {} s",
            s.disk_runtime_s
        ),
        writer_job: format!(
            "fio nbd engine on the primary, {}",
            REBUILD_WRITER_ARGS[..4].join(" ")
        ),
        ..RebuildRows::default()
    };
    for &size in &s.sizes_mib {
        let volume = format!("bench-rebuild-{size}");
        cluster
            .create_ready_volume(&volume, &format!("{size}Mi"), 2, VOLUME_READY_TIMEOUT)
            .await?;
        let (primary, _) = ready_primary(cluster, &volume, 2, 1).await?;
        let uri = cluster
            .agent(&primary)
            .ok_or_else(|| fail("primary agent"))?
            .nbd_uri(&volume);
        tracing::info!(%volume, "rebuild rows: filling the volume");
        let mut fill = strings(&[
            "--name=fill",
            "--ioengine=nbd",
            "--rw=write",
            "--bs=1M",
            "--iodepth=4",
            "--fsync=16",
        ]);
        fill.extend([format!("--uri={uri}"), format!("--size={size}M")]);
        fio(&fill).await?;
        for concurrent in [false, true] {
            let run = rebuild_once(cluster, &volume, size, concurrent).await;
            tracing::info!(
                size,
                concurrent,
                seconds = run.seconds,
                error = run.error.as_deref(),
                "rebuild"
            );
            let failed = run.error.is_some();
            rows.runs.push(run);
            if failed {
                break;
            }
        }
        delete_volume(cluster, &volume).await?;
    }
    rows.summarize();
    Ok(rows)
}

async fn rebuild_once(
    cluster: &mut TestCluster,
    volume: &str,
    size_mib: u64,
    concurrent: bool,
) -> RebuildRun {
    let mut run = RebuildRun {
        size_mib,
        concurrent_writes: concurrent,
        ..RebuildRun::default()
    };
    if let Err(e) = rebuild_measure(cluster, volume, concurrent, &mut run).await {
        run.error = Some(e.to_string());
    }
    run
}

async fn rebuild_measure(
    cluster: &mut TestCluster,
    volume: &str,
    concurrent: bool,
    run: &mut RebuildRun,
) -> Result<()> {
    let (primary, epoch) = ready_primary(cluster, volume, 2, 1).await?;
    let victim = cluster
        .replicas(volume)
        .await
        .into_iter()
        .find(|r| r.spec.node != primary)
        .ok_or_else(|| fail(format!("{volume} has no replica besides the primary")))?;
    let (node, id) = (victim.spec.node.clone(), victim.spec.replica_id.clone());
    let uri = cluster
        .agent(&primary)
        .ok_or_else(|| fail("primary agent"))?
        .nbd_uri(volume);
    let agent = cluster
        .agent(&node)
        .ok_or_else(|| fail(format!("agent {node}")))?;
    let log = agent.dir.join("agent.log");
    agent.kill();
    // A flushed write the dead replica misses, so the primary holds WAL for it until the
    // retention budget runs out and escalates it to NeedsRebuild.
    let mut lag = strings(&[
        "--name=lag",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1M",
        "--size=4M",
        "--fsync=4",
    ]);
    lag.push(format!("--uri={uri}"));
    fio(&lag).await?;
    wait_for(
        &format!("the primary of {volume} escalating {id} to NeedsRebuild"),
        ESCALATION_TIMEOUT,
        || async {
            peer_state(cluster, volume, &id)
                .await
                .filter(|s| matches!(s, ReplicaState::NeedsRebuild | ReplicaState::Rebuilding))
        },
    )
    .await?;
    let writer = if concurrent {
        Some(BackgroundFio::start(&uri, REBUILD_WRITER_ARGS)?)
    } else {
        None
    };
    let from = file_len(&log);
    cluster
        .agent(&node)
        .ok_or_else(|| fail(format!("agent {node}")))?
        .restart()?;
    let started = log_line(&log, from, &["rebuild started", volume], REBUILD_TIMEOUT)
        .await
        .ok_or_else(|| {
            fail(format!(
                "{node} never logged \"rebuild started\" for {volume}"
            ))
        })?;
    let finished = log_line(&log, from, &["rebuild finished", volume], REBUILD_TIMEOUT)
        .await
        .ok_or_else(|| {
            fail(format!(
                "{node} did not log \"rebuild finished\" for {volume} within {REBUILD_TIMEOUT:?}"
            ))
        })?;
    run.seconds = Some((finished - started).as_secs_f64());
    if let Some(w) = writer {
        match w.stop().await {
            Ok(r) => run.client_iops = Some(r.iops),
            Err(e) => run.error = Some(format!("concurrent writer: {e}")),
        }
    }
    ready_primary(cluster, volume, 2, epoch).await?;
    Ok(())
}
