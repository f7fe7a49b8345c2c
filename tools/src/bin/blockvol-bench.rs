//! The benchmark suite behind `bench/run.sh`: fio against blockvol volumes served by
//! real node agent processes (RF1, RF2 syncAll, RF3 syncAll, RF3 async on a local
//! control plane, NBD over loopback TCP), against `nbdkit file` on a plain file, and
//! directly against a local file (libaio, O_DIRECT) as the physical reference. Targets
//! run interleaved per repetition; the report (JSON and markdown) has medians, ranges,
//! ratios and the agents' CPU time per I/O. Further rows (`--rows`): fio on ext4 through
//! an attached RF3 device against ext4 on a local loop device, failover time under a
//! lost-write checker, replica rebuild rate against the disk, and optionally a CPU
//! profile of the agents (`tools::bench_scenarios`); only when `--rows` names it, the
//! scale rows: hundreds of volumes per fresh cluster (`tools::scale_rows`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use api::{BlockVolume, BlockVolumeSpec, Durability, VolumePhase};
use clap::{Parser, ValueEnum};
use e2e::cluster::{TestCluster, TestClusterOptions, free_port, wait_for};
use kube::api::{Api, PostParams};
use tools::bench::{self, FioResult, Machine, PATTERNS, Pattern, Report, RunSettings, Sample};
use tools::bench_scenarios::{self as scenarios, Ext4Settings, ProfileSettings, RebuildSettings};
use tools::scale_rows::ScaleRunSettings;

/// Every target, in the order a repetition starts with.
const TARGETS: &[&str] = &[
    "nbdkit",
    "local",
    "rf1",
    "rf2-sync",
    "rf3-sync",
    "rf3-async",
];
/// Row groups: the fio matrix over the targets, then the rows of `tools::bench_scenarios`.
const ROWS: &[&str] = &["fio", "ext4", "failover", "rebuild", "scale"];
/// Row groups that run only when `--rows` names them (they take many minutes).
const ROWS_ON_REQUEST: &[&str] = &["scale"];
/// WAL retention budget of the agents of the scenario rows: the rebuild rows wait for
/// the primary to give a dead replica up, so the budget bounds their set-up time.
const SCENARIO_WAL_RETENTION_TIMEOUT_MS: u64 = 5_000;
/// Longest unix socket path the kernel accepts (sun_path, with its NUL).
const UNIX_SOCKET_PATH_BYTES_MAX: usize = 108;
/// Functions listed per table of the profile.
const PROFILE_TOP: usize = 15;
/// Bound on a volume becoming Ready with every replica in sync.
const VOLUME_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on an NBD server answering after its process or export appeared.
const NBD_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// One short run per pattern on nbdkit, the local file and RF1: checks the suite
    /// works (about a minute), numbers mean little.
    Smoke,
    /// 3 repetitions of 5 s, 256 MiB per target.
    Quick,
    /// 5 repetitions of 10 s, 1 GiB per target.
    Full,
}

#[derive(Parser, Debug)]
#[command(about = "blockvol benchmark suite: fio against blockvol, nbdkit and a local file")]
struct Args {
    #[arg(long, value_enum, default_value = "quick")]
    mode: Mode,
    /// Repetitions per (pattern, target); overrides the mode's.
    #[arg(long)]
    reps: Option<u32>,
    /// Measured seconds per fio run; overrides the mode's.
    #[arg(long)]
    runtime_s: Option<u32>,
    /// Bytes per target in MiB (volume size, file size); overrides the mode's.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Comma-separated subset of: nbdkit, local, rf1, rf2-sync, rf3-sync, rf3-async.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Comma-separated subset of the pattern names (see the report or README).
    #[arg(long, value_delimiter = ',')]
    patterns: Option<Vec<String>>,
    /// Directory for the report files (`<timestamp>.json`, `<timestamp>.md`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Scratch directory for the nbdkit image, the local file and the agents' volume
    /// files; it decides which disk is measured. Emptied of this run's files at exit.
    #[arg(long, default_value = "/var/tmp/blockvol-bench")]
    work_dir: PathBuf,
    /// How the agent binary was built, recorded in the report.
    #[arg(long, default_value = "debug profile")]
    agent_build: String,
    /// Comma-separated row groups to run: fio (the targets × patterns matrix), ext4,
    /// failover, rebuild, scale. Default: all but scale (smoke mode: fio only; smoke
    /// mode never runs scale).
    #[arg(long, value_delimiter = ',')]
    rows: Option<Vec<String>>,
    /// Comma-separated row groups to leave out.
    #[arg(long, value_delimiter = ',')]
    skip_rows: Vec<String>,
    /// Profile the agents with `perf record -e cpu-clock -g` during one extra run of
    /// the RF3 ext4 4 KiB write job and put the top functions into the report.
    #[arg(long)]
    perf: bool,
    /// Failover trials (default 10).
    #[arg(long, default_value_t = 10)]
    failover_trials: u32,
    /// Comma-separated volume sizes of the rebuild rows, MiB (quick: 256,1024; full:
    /// 1024,4096).
    #[arg(long, value_delimiter = ',')]
    rebuild_sizes_mib: Option<Vec<u64>>,
    /// Comma-separated volume counts of the scale rows, one fresh cluster each.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    scale_volumes: Vec<usize>,
    /// Seconds of the scale rows' idle measurement.
    #[arg(long, default_value_t = 30)]
    scale_idle_s: u64,
    /// Volumes of the killed agent the lost-write checker writes to in the scale rows.
    #[arg(long, default_value_t = 3)]
    scale_checker_sample: usize,
    /// A scale row stops when the work directory's disk has less free space, GiB.
    #[arg(long, default_value_t = 5.0)]
    scale_disk_free_min_gib: f64,
}

struct Plan {
    mode: &'static str,
    /// Row groups to run, in `ROWS` order.
    rows: Vec<&'static str>,
    /// Row groups left out, each with the reason.
    skipped: Vec<String>,
    rebuild_sizes_mib: Vec<u64>,
    reps: u32,
    runtime_s: u32,
    ramp_s: u32,
    size_mib: u64,
    targets: Vec<String>,
    patterns: Vec<&'static Pattern>,
}

impl Plan {
    fn from_args(a: &Args) -> anyhow::Result<Plan> {
        let (mode, reps, runtime_s, ramp_s, size_mib, targets) = match a.mode {
            Mode::Smoke => ("smoke", 1, 1, 0, 64, vec!["nbdkit", "local", "rf1"]),
            Mode::Quick => ("quick", 3, 5, 1, 256, TARGETS.to_vec()),
            Mode::Full => ("full", 5, 10, 2, 1024, TARGETS.to_vec()),
        };
        let targets: Vec<String> = match &a.targets {
            Some(t) => t.clone(),
            None => targets.into_iter().map(String::from).collect(),
        };
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown target {t:?}; known: {}", TARGETS.join(", "));
            }
        }
        let patterns = match &a.patterns {
            Some(p) => p
                .iter()
                .map(|n| bench::pattern(n))
                .collect::<Result<Vec<_>, _>>()?,
            None => PATTERNS.iter().collect(),
        };
        let (rows, skipped, rebuild_sizes) = select_rows(a)?;
        let plan = Plan {
            mode,
            rows,
            skipped,
            rebuild_sizes_mib: rebuild_sizes,
            reps: a.reps.unwrap_or(reps),
            runtime_s: a.runtime_s.unwrap_or(runtime_s),
            ramp_s,
            size_mib: a.size_mib.unwrap_or(size_mib),
            targets,
            patterns,
        };
        if plan.reps == 0 || plan.runtime_s == 0 || plan.size_mib < 16 {
            bail!("--reps and --runtime-s must be at least 1 and --size-mib at least 16");
        }
        if plan.runs("failover") && a.failover_trials == 0 {
            bail!("--failover-trials must be at least 1");
        }
        if plan.rebuild_sizes_mib.iter().any(|s| *s < 16) {
            bail!("--rebuild-sizes-mib: every size must be at least 16");
        }
        if plan.runs("scale") {
            if a.scale_volumes.is_empty() || a.scale_volumes.contains(&0) {
                bail!("--scale-volumes: give at least one count, each at least 1");
            }
            if a.scale_checker_sample == 0 || a.scale_idle_s == 0 {
                bail!("--scale-checker-sample and --scale-idle-s must be at least 1");
            }
        }
        let mut plan = plan;
        if !plan.runs("fio") {
            plan.targets.clear();
            plan.patterns.clear();
        }
        Ok(plan)
    }

    fn runs(&self, row: &str) -> bool {
        self.rows.contains(&row)
    }

    /// Replica count of the largest blockvol target (0: no cluster needed).
    fn nodes(&self) -> usize {
        self.targets
            .iter()
            .filter_map(|t| replicas_of(t).map(|(r, _)| r as usize))
            .max()
            .unwrap_or(0)
    }
}

/// The row groups to run and the reasons for the others; the rebuild sizes.
fn select_rows(a: &Args) -> anyhow::Result<(Vec<&'static str>, Vec<String>, Vec<u64>)> {
    let known = |r: &String| -> anyhow::Result<()> {
        if !ROWS.contains(&r.as_str()) {
            bail!("unknown row {r:?}; known: {}", ROWS.join(", "));
        }
        Ok(())
    };
    for r in a.rows.iter().flatten().chain(&a.skip_rows) {
        known(r)?;
    }
    let mut skipped = Vec::new();
    let mut rows = Vec::new();
    for &r in ROWS {
        if a.skip_rows.iter().any(|s| s == r) {
            skipped.push(format!("{r}: left out (--skip-rows)"));
        } else if matches!(a.mode, Mode::Smoke) && ROWS_ON_REQUEST.contains(&r) {
            skipped.push(format!(
                "{r}: smoke mode never runs it (fresh clusters with hundreds of volumes, \
                 many minutes); run --mode quick --rows {r}"
            ));
        } else if let Some(chosen) = &a.rows {
            if chosen.iter().any(|c| c == r) {
                rows.push(r);
            } else {
                skipped.push(format!("{r}: not selected (--rows)"));
            }
        } else if ROWS_ON_REQUEST.contains(&r) {
            skipped.push(format!(
                "{r}: runs only when --rows names it (fresh clusters with hundreds of \
                 volumes, many minutes)"
            ));
        } else if matches!(a.mode, Mode::Smoke) && r != "fio" {
            skipped.push(format!(
                "{r}: smoke mode skips it (it needs a 3-node cluster and minutes); \
                 run --mode quick or --rows {r}"
            ));
        } else {
            rows.push(r);
        }
    }
    if a.perf && !rows.contains(&"ext4") {
        skipped.push("perf: the profile is taken during the ext4 rows, which do not run".into());
    } else if !a.perf && rows.contains(&"ext4") {
        skipped.push("perf: not asked for (--perf)".into());
    }
    let sizes = match (&a.rebuild_sizes_mib, a.mode) {
        (Some(s), _) => s.clone(),
        (None, Mode::Full) => vec![1024, 4096],
        (None, _) => vec![256, 1024],
    };
    Ok((rows, skipped, sizes))
}

/// (replicas, durability) of a blockvol target; `None` for the baselines.
fn replicas_of(target: &str) -> Option<(u8, Durability)> {
    match target {
        "rf1" => Some((1, Durability::SyncAll)),
        "rf2-sync" => Some((2, Durability::SyncAll)),
        "rf3-sync" => Some((3, Durability::SyncAll)),
        "rf3-async" => Some((3, Durability::Async)),
        _ => None,
    }
}

/// How fio reaches a target, and which processes serve it (for CPU accounting).
struct Endpoint {
    fio_args: Vec<String>,
    server_pids: Vec<u32>,
}

/// A child process killed (and reaped) on drop.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn run_fio(
    endpoint: &Endpoint,
    size_mib: u64,
    extra: &[String],
) -> anyhow::Result<FioResult> {
    let out = tokio::process::Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--size={size_mib}M"))
        .arg("--output-format=json")
        .args(&endpoint.fio_args)
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running fio (hack/deps.sh installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio {:?} {:?} failed ({}): {}{}",
            endpoint.fio_args,
            extra,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    Ok(bench::parse_fio(&stdout)?)
}

fn total_cpu(pids: &[u32]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for &pid in pids {
        sum += bench::cpu_seconds(pid)?;
    }
    Ok(sum)
}

/// One measured fio run; server CPU is read when the ramp ends and when fio exits.
async fn measure(
    plan: &Plan,
    endpoint: &Endpoint,
    pattern: &Pattern,
) -> anyhow::Result<(FioResult, Option<f64>)> {
    let mut extra: Vec<String> = pattern.args.iter().map(|s| s.to_string()).collect();
    extra.push("--time_based".into());
    extra.push(format!("--runtime={}", plan.runtime_s));
    extra.push(format!("--ramp_time={}", plan.ramp_s));
    let fio = run_fio(endpoint, plan.size_mib, &extra);
    tokio::pin!(fio);
    let ramp = tokio::time::sleep(Duration::from_secs(u64::from(plan.ramp_s)));
    let cpu_start = tokio::select! {
        r = &mut fio => { r?; bail!("fio ended before its ramp time was over"); }
        _ = ramp => total_cpu(&endpoint.server_pids)?,
    };
    let result = fio.await?;
    let cpu = if endpoint.server_pids.is_empty() {
        None
    } else {
        Some(total_cpu(&endpoint.server_pids)? - cpu_start)
    };
    Ok((result, cpu))
}

async fn nbd_answers(uri: &str) -> bool {
    tokio::process::Command::new("nbdinfo")
        .args(["--size", uri])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn nbd_endpoint(uri: String, server_pids: Vec<u32>) -> Endpoint {
    Endpoint {
        fio_args: vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
        server_pids,
    }
}

async fn start_nbdkit(dir: &Path, size_mib: u64) -> anyhow::Result<(Child, Endpoint)> {
    let image = dir.join("nbdkit.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size_mib << 20))
        .with_context(|| format!("creating {}", image.display()))?;
    let port = free_port();
    let log = std::fs::File::create(dir.join("nbdkit.log")).context("nbdkit log")?;
    let child = tokio::process::Command::new("nbdkit")
        .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting nbdkit (hack/deps.sh installs it)")?;
    let pid = child.id().context("nbdkit pid")?;
    let child = Child(child);
    let uri = format!("nbd://127.0.0.1:{port}/");
    wait_for("nbdkit to answer", NBD_READY_TIMEOUT, || async {
        nbd_answers(&uri).await.then_some(())
    })
    .await?;
    Ok((child, nbd_endpoint(uri, vec![pid])))
}

fn local_endpoint(dir: &Path) -> Endpoint {
    Endpoint {
        fio_args: vec![
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            format!("--filename={}", dir.join("local.img").display()),
        ],
        server_pids: Vec::new(),
    }
}

/// Creates the volume for `target`, waits until it is Ready with its replicas in sync,
/// and returns its primary's NBD TCP endpoint. CPU is counted for every agent: the
/// other volumes on them are idle while this one is measured.
async fn blockvol_endpoint(
    cluster: &TestCluster,
    target: &str,
    size_mib: u64,
) -> anyhow::Result<Endpoint> {
    let (replicas, durability) = replicas_of(target).context("not a blockvol target")?;
    let name = format!("bench-{target}");
    let mut spec = BlockVolumeSpec::with_size(format!("{size_mib}Mi"));
    spec.replicas = replicas;
    spec.durability = durability;
    Api::<BlockVolume>::all(cluster.client.clone())
        .create(&PostParams::default(), &BlockVolume::new(&name, spec))
        .await
        .with_context(|| format!("creating BlockVolume {name}"))?;
    let what = format!("{name} Ready with {replicas} replicas in sync");
    let status = wait_for(&what, VOLUME_READY_TIMEOUT, || async {
        let v = cluster.volume(&name).await?;
        let s = v.status?;
        (s.phase == VolumePhase::Ready && s.in_sync_count >= u32::from(replicas)).then_some(s)
    })
    .await?;
    let node = status
        .primary_node
        .context("Ready volume without a primary node")?;
    let agent = cluster
        .agents
        .iter()
        .find(|a| a.node == node)
        .with_context(|| format!("no agent for primary node {node}"))?;
    let addr = agent
        .nbd_tcp
        .context("agents run without an NBD TCP listener")?;
    let uri = format!("nbd://{addr}/{name}");
    wait_for(&format!("{uri} to answer"), NBD_READY_TIMEOUT, || async {
        nbd_answers(&uri).await.then_some(())
    })
    .await?;
    let pids = cluster.agents.iter().filter_map(|a| a.pid()).collect();
    Ok(nbd_endpoint(uri, pids))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn load_average() -> f64 {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0)
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine(work_dir: &Path) -> Machine {
    let dir = work_dir.display().to_string();
    let mount = command_output("findmnt", &["-no", "SOURCE,FSTYPE", "--target", &dir]);
    let mut parts = mount.split_whitespace();
    let source = parts.next().unwrap_or("unknown").to_string();
    let fs = parts.next().unwrap_or("unknown").to_string();
    let dev = source.trim_start_matches("/dev/").to_string();
    let rotational = read_trimmed(&format!("/sys/block/{dev}/queue/rotational"));
    let disk = match rotational.as_str() {
        "0" => format!("{source}, non-rotational"),
        "1" => format!("{source}, rotational"),
        _ => source,
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        cpu_model: read_trimmed("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        disk,
        filesystem: fs,
        load_before: load_average(),
        load_after: 0.0,
    }
}

fn utc_now(format: &str) -> String {
    command_output("date", &["-u", format])
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::from_args(&args)?;
    let mut tools = vec!["fio", "nbdkit", "nbdinfo"];
    if plan.runs("ext4") {
        tools.extend(["mkfs.ext4", "losetup", "mount"]);
    }
    if args.perf && plan.runs("ext4") {
        tools.push("perf");
    }
    for tool in tools {
        if command_output("sh", &["-c", &format!("command -v {tool}")]).is_empty() {
            bail!(
                "{tool} is not installed (hack/deps.sh installs it; perf: apt-get install linux-perf)"
            );
        }
    }
    if plan.runs("ext4") || plan.runs("failover") || plan.runs("rebuild") || plan.runs("scale") {
        check_work_dir(&args.work_dir)?;
    }
    let started = utc_now("+%Y-%m-%dT%H:%M:%SZ");
    let stamp = utc_now("+%Y%m%dT%H%M%SZ");
    let scratch = args.work_dir.join(&stamp);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let _remove_scratch = RemoveOnDrop(scratch.clone());
    let machine = machine(&scratch);

    // The cluster's directories (volume files included) go under the scratch dir, so
    // every target lives on the same disk.
    let cluster = if plan.nodes() > 0 {
        tracing::info!(
            nodes = plan.nodes(),
            "starting the control plane and node agents"
        );
        let mut opts = TestClusterOptions::nodes(plan.nodes());
        opts.agent.nbd_tcp = true;
        opts.agent.log_filter = "info".into();
        opts.operator.log_filter = "info".into();
        opts.root_parent = Some(scratch.clone());
        Some(TestCluster::start(opts).await?)
    } else {
        None
    };
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    for t in &plan.targets {
        let ep = match t.as_str() {
            "nbdkit" => {
                let (child, ep) = start_nbdkit(&scratch, plan.size_mib).await?;
                servers.push(child);
                ep
            }
            "local" => local_endpoint(&scratch),
            rf => {
                let c = cluster.as_ref().context("cluster")?;
                blockvol_endpoint(c, rf, plan.size_mib).await?
            }
        };
        endpoints.push((t.clone(), ep));
    }

    if !endpoints.is_empty() {
        tracing::info!("preconditioning: one sequential fill of every target, so reads hit data");
    }
    for (t, ep) in &endpoints {
        // A flush every 16 MiB: replicated volumes return EIO to long runs of writes
        // without a flush once their WAL is full (see docs/performance.md).
        let fill: Vec<String> = ["--rw=write", "--bs=1M", "--iodepth=4", "--fsync=16"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        run_fio(ep, plan.size_mib, &fill)
            .await
            .with_context(|| format!("filling {t}"))?;
    }

    let mut samples = Vec::new();
    for pattern in &plan.patterns {
        for rep in 1..=plan.reps {
            // Rotate the start so no target always runs right after the same one.
            let n = endpoints.len();
            for k in 0..n {
                let (t, ep) = &endpoints[(k + rep as usize) % n];
                let (result, cpu) = match measure(&plan, ep, pattern).await {
                    Ok(r) => r,
                    Err(e) => {
                        // A failed run is a result (e.g. EIO from a full WAL): record
                        // it and go on with the others.
                        tracing::warn!(pattern = pattern.name, target = %t, rep, error = %e, "run failed");
                        samples.push(Sample {
                            pattern: pattern.name.to_string(),
                            target: t.clone(),
                            rep,
                            result: FioResult::default(),
                            server_cpu_s: None,
                            error: Some(format!("{e:#}")),
                        });
                        continue;
                    }
                };
                tracing::info!(
                    pattern = pattern.name,
                    target = %t,
                    rep,
                    iops = result.iops as u64,
                    mib_s = format!("{:.1}", result.mib_s),
                    p99_us = result.clat_us[1] as u64,
                    server_cpu_s = cpu.map(|c| format!("{c:.2}")),
                    "run"
                );
                samples.push(Sample {
                    pattern: pattern.name.to_string(),
                    target: t.clone(),
                    rep,
                    result,
                    server_cpu_s: cpu,
                    error: None,
                });
            }
        }
    }

    // The fio matrix's servers and cluster stop before the scenario rows start theirs.
    drop(endpoints);
    drop(servers);
    drop(cluster);
    let mut scenario = Scenarios::default();
    if plan.runs("ext4") || plan.runs("failover") || plan.runs("rebuild") {
        scenario = run_scenarios(&plan, &args, &scratch, &stamp).await?;
    }
    // After the scenario rows' cluster stopped: one cluster at a time.
    let scale = if plan.runs("scale") {
        Some(
            tools::scale_rows::scale_rows(&ScaleRunSettings {
                volumes: args.scale_volumes.clone(),
                work_dir: args.work_dir.clone(),
                idle_window_s: args.scale_idle_s,
                checker_sample: args.scale_checker_sample,
                disk_free_min_gib: args.scale_disk_free_min_gib,
            })
            .await,
        )
    } else {
        None
    };

    let summary = bench::summarize(&samples);
    let ratios = bench::ratios(&summary);
    let mut skipped = plan.skipped.clone();
    skipped.extend(scenario.errors.iter().cloned());
    let mut report = Report {
        started_utc: started,
        finished_utc: utc_now("+%Y-%m-%dT%H:%M:%SZ"),
        machine: Machine {
            load_after: load_average(),
            ..machine
        },
        settings: RunSettings {
            mode: plan.mode.into(),
            reps: plan.reps,
            runtime_s: plan.runtime_s,
            ramp_s: plan.ramp_s,
            size_mib: plan.size_mib,
            targets: plan.targets.clone(),
            patterns: plan.patterns.iter().map(|p| p.name.to_string()).collect(),
            agent_build: args.agent_build.clone(),
        },
        samples,
        summary,
        ratios,
        ext4: scenario.ext4,
        failover: scenario.failover,
        rebuild: scenario.rebuild,
        profile: scenario.profile,
        scale,
        skipped,
        targets_missed: Vec::new(),
    };
    report.judge_targets();
    let json = args.out.join(format!("{stamp}.json"));
    let md = args.out.join(format!("{stamp}.md"));
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let text = report.markdown();
    std::fs::write(&md, &text).with_context(|| format!("writing {}", md.display()))?;
    println!("{text}");
    println!("report: {} and {}", json.display(), md.display());

    let lost = report.failover.as_ref().map_or(0, |f| f.lost);
    if lost > 0 {
        bail!(
            "FAILOVER LOST {lost} ACKNOWLEDGED WRITES (see the failover table in {})",
            md.display()
        );
    }
    if !scenario.errors.is_empty() {
        bail!("rows failed: {}", scenario.errors.join("; "));
    }
    let scale_errors: Vec<String> = report
        .scale
        .iter()
        .flat_map(|s| &s.rows)
        .filter_map(|r| {
            Some(format!(
                "scale {} volumes: {}",
                r.volumes,
                r.error.as_ref()?
            ))
        })
        .collect();
    if !scale_errors.is_empty() {
        bail!("rows failed: {}", scale_errors.join("; "));
    }
    Ok(())
}

/// Fails when the scenario rows' attach sockets under `work_dir` would exceed the unix
/// socket path limit (checked before anything runs).
fn check_work_dir(work_dir: &Path) -> anyhow::Result<()> {
    // The cluster directory's name, the node, the attach directory of the longest
    // volume name and the socket (see `tools::bench_scenarios`).
    let longest = work_dir.join(format!(
        "blockvol-cluster-XXXXXX/{}/data/attach/bench-failover/proxy.sock",
        scenarios::WRITER_NODE
    ));
    if longest.as_os_str().len() >= UNIX_SOCKET_PATH_BYTES_MAX {
        bail!(
            "--work-dir {} is too long for the scenario rows: their attach sockets \
             ({}) must stay under {UNIX_SOCKET_PATH_BYTES_MAX} bytes; use a shorter path",
            work_dir.display(),
            longest.display()
        );
    }
    Ok(())
}

/// Results of the scenario rows; a row that failed is named in `errors`.
#[derive(Default)]
struct Scenarios {
    ext4: Option<bench::Ext4Rows>,
    failover: Option<bench::FailoverRows>,
    rebuild: Option<bench::RebuildRows>,
    profile: Option<bench::Profile>,
    errors: Vec<String>,
}

/// Starts a 3-node cluster (a fourth, replica-less node joins for the failover writer)
/// and runs the selected scenario rows on it, in the order ext4, failover, rebuild.
async fn run_scenarios(
    plan: &Plan,
    args: &Args,
    scratch: &Path,
    stamp: &str,
) -> anyhow::Result<Scenarios> {
    tracing::info!(rows = ?plan.rows, "starting the cluster of the scenario rows");
    let mut opts = TestClusterOptions::nodes(3);
    opts.agent.nbd_tcp = true;
    opts.agent.log_filter = "info".into();
    opts.agent.extra_args = vec![format!(
        "--wal-retention-timeout-ms={SCENARIO_WAL_RETENTION_TIMEOUT_MS}"
    )];
    opts.operator.log_filter = "info".into();
    // Directly in the work directory (same disk as the scratch directory): attach
    // sockets live under the agents' data directories, and a unix socket path must
    // stay shorter than 108 bytes.
    opts.root_parent = Some(args.work_dir.clone());
    let lease_s = opts.agent.lease_duration_s;
    let mut cluster = TestCluster::start(opts).await?;
    let mut out = Scenarios::default();
    if plan.runs("ext4") {
        let settings = Ext4Settings {
            file_size_mib: plan.size_mib,
            reps: plan.reps,
            runtime_s: plan.runtime_s,
            ramp_s: plan.ramp_s,
            profile: args.perf.then(|| ProfileSettings {
                scratch: scratch.to_path_buf(),
                report_text: args.out.join(format!("{stamp}.perf.txt")),
                top: PROFILE_TOP,
            }),
        };
        match scenarios::ext4_rows(&mut cluster, scratch, &settings).await {
            Ok((rows, profile)) => {
                out.ext4 = Some(rows);
                out.profile = profile;
            }
            Err(e) => {
                tracing::error!(error = %e, "ext4 rows failed");
                out.errors.push(format!("ext4: failed: {e}"));
            }
        }
    }
    if plan.runs("failover") {
        match scenarios::failover_rows(&mut cluster, args.failover_trials, lease_s).await {
            Ok(rows) => out.failover = Some(rows),
            Err(e) => {
                tracing::error!(error = %e, "failover rows failed");
                out.errors.push(format!("failover: failed: {e}"));
            }
        }
    }
    if plan.runs("rebuild") {
        let settings = RebuildSettings {
            sizes_mib: plan.rebuild_sizes_mib.clone(),
            disk_runtime_s: plan.runtime_s.max(5) * 2,
        };
        match scenarios::rebuild_rows(&mut cluster, scratch, &settings).await {
            Ok(rows) => out.rebuild = Some(rows),
            Err(e) => {
                tracing::error!(error = %e, "rebuild rows failed");
                out.errors.push(format!("rebuild: failed: {e}"));
            }
        }
    }
    Ok(out)
}

/// Removes the run's scratch directory, also when the run fails or is interrupted
/// (declared before the servers and the cluster, so it is dropped after them).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "could not remove the scratch directory");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The default filter hides the Kubernetes client's connection errors while the
    // control plane is still coming up (it retries).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,kube_client=off".into()),
        )
        .init();
    let args = Args::parse();
    // Ctrl-C and SIGTERM end the run through the normal drop path, which stops every
    // process the run started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every started process was stopped"),
        _ = term.recv() => bail!("terminated; every started process was stopped"),
    }
}
