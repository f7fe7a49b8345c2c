//! The parts of the benchmark suite (`blockvol-bench`, `bench/run.sh`) that do not run
//! processes: the fio workloads, parsing fio's JSON, CPU time from `/proc`, medians
//! and ranges, ratios, and the report (JSON plus a markdown table).
//!
//! Every number in a report comes from a measurement in the same invocation: targets
//! are run interleaved (each repetition runs every target once, rotating the start) so
//! load from other processes on the machine hits all targets alike, and ratios are
//! ratios of medians.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What went wrong while measuring or reporting.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("fio output has no JSON document: {0}")]
    FioNoJson(String),
    #[error("fio JSON: {0}")]
    FioJson(#[from] serde_json::Error),
    #[error("fio JSON has no field {0}")]
    FioField(&'static str),
    #[error("/proc/{pid}/stat: {message}")]
    ProcStat { pid: u32, message: String },
    #[error("unknown {what} {name:?}; known: {known}")]
    Unknown {
        what: &'static str,
        name: String,
        known: String,
    },
}

/// One fio workload: the rows of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub name: &'static str,
    pub summary: &'static str,
    /// fio arguments (besides target, size and time).
    pub args: &'static [&'static str],
    /// Whether the row's headline number is latency (else IOPS and MiB/s).
    pub latency_row: bool,
}

/// The workloads, in report order.
pub const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "randwrite-4k-qd1-fsync32",
        summary: "4 KiB random write, QD1, fsync every 32 writes",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=32"],
        latency_row: false,
    },
    Pattern {
        name: "randwrite-4k-qd16-fsync32",
        summary: "4 KiB random write, QD16, fsync every 32 writes",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=32"],
        latency_row: false,
    },
    Pattern {
        name: "randread-4k-qd16",
        summary: "4 KiB random read, QD16",
        args: &["--rw=randread", "--bs=4k", "--iodepth=16"],
        latency_row: false,
    },
    Pattern {
        name: "write-4k-fsync1-qd1",
        summary: "4 KiB random write + fsync after every write, QD1 (latency)",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"],
        latency_row: true,
    },
    Pattern {
        name: "seqwrite-1m-qd4",
        summary: "1 MiB sequential write, QD4",
        args: &["--rw=write", "--bs=1M", "--iodepth=4"],
        latency_row: false,
    },
    Pattern {
        name: "seqread-1m-qd4",
        summary: "1 MiB sequential read, QD4",
        args: &["--rw=read", "--bs=1M", "--iodepth=4"],
        latency_row: false,
    },
];

/// The pattern called `name`.
pub fn pattern(name: &str) -> Result<&'static Pattern, BenchError> {
    PATTERNS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| BenchError::Unknown {
            what: "pattern",
            name: name.to_string(),
            known: PATTERNS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The numbers taken from one fio run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FioResult {
    pub iops: f64,
    pub mib_s: f64,
    /// Read plus write I/Os completed (not counting fsyncs).
    pub ios: u64,
    /// Completion latency of reads/writes, microseconds: p50, p99, p99.9.
    pub clat_us: [f64; 3],
    /// Latency of fsyncs (FLUSH on NBD), microseconds: p50, p99, p99.9; zeros if none.
    pub sync_us: [f64; 3],
}

/// Parses fio's `--output-format=json` output; text before the JSON document (the
/// nbd engine prints "fio: connected to NBD server") is skipped.
pub fn parse_fio(output: &str) -> Result<FioResult, BenchError> {
    let start = output
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| output.starts_with('{').then_some(0))
        .ok_or_else(|| BenchError::FioNoJson(output.chars().take(200).collect()))?;
    let v: serde_json::Value = serde_json::from_str(&output[start..])?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or(BenchError::FioField("jobs[0]"))?;
    let num = |dir: &str, field: &'static str| -> Result<f64, BenchError> {
        job.get(dir)
            .and_then(|d| d.get(field))
            .and_then(serde_json::Value::as_f64)
            .ok_or(BenchError::FioField(field))
    };
    let pct = |section: &serde_json::Value| -> [f64; 3] {
        let p = section.get("lat_ns").or_else(|| section.get("clat_ns"));
        let get = |k: &str| {
            p.and_then(|p| p.get("percentile"))
                .and_then(|p| p.get(k))
                .and_then(serde_json::Value::as_f64)
                .map_or(0.0, |ns| ns / 1000.0)
        };
        [get("50.000000"), get("99.000000"), get("99.900000")]
    };
    let reads = num("read", "total_ios")?;
    let writes = num("write", "total_ios")?;
    // The direction that did the work carries the latency percentiles.
    let busy = if writes >= reads { "write" } else { "read" };
    let clat = job
        .get(busy)
        .and_then(|d| d.get("clat_ns"))
        .map(|c| {
            let get = |k: &str| {
                c.get("percentile")
                    .and_then(|p| p.get(k))
                    .and_then(serde_json::Value::as_f64)
                    .map_or(0.0, |ns| ns / 1000.0)
            };
            [get("50.000000"), get("99.000000"), get("99.900000")]
        })
        .unwrap_or_default();
    let sync = job.get("sync").map(pct).unwrap_or_default();
    Ok(FioResult {
        iops: num("read", "iops")? + num("write", "iops")?,
        mib_s: (num("read", "bw_bytes")? + num("write", "bw_bytes")?) / 1_048_576.0,
        ios: (reads + writes) as u64,
        clat_us: clat,
        sync_us: sync,
    })
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let err = |message: String| BenchError::ProcStat { pid, message };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| err(e.to_string()))?;
    cpu_seconds_from_stat(&stat, clock_ticks_per_second()).map_err(err)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
pub fn cpu_seconds_from_stat(stat: &str, ticks_per_s: f64) -> Result<f64, String> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("no ')' after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .ok_or_else(|| format!("only {} fields", fields.len() + 2))?
            .parse::<u64>()
            .map(|t| t as f64 / ticks_per_s)
            .map_err(|e| format!("field {}: {e}", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// Median and range of a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }
}

/// One fio run of one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub pattern: String,
    pub target: String,
    pub rep: u32,
    pub result: FioResult,
    /// CPU seconds the target's server processes used during the run (blockvol agents
    /// and nbdkit; none for the local file).
    pub server_cpu_s: Option<f64>,
    /// Why the run failed (fio's message, e.g. an I/O error); the run is then left out
    /// of the summary and listed in the report.
    #[serde(default)]
    pub error: Option<String>,
}

/// Summary of one pattern on one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub iops: Spread,
    pub mib_s: Spread,
    /// Medians over repetitions of p50, p99, p99.9 (microseconds).
    pub clat_us: [f64; 3],
    pub sync_us: [f64; 3],
    /// Server CPU seconds per million I/Os (median over repetitions).
    pub cpu_s_per_million_ios: Option<f64>,
}

/// Medians over the samples of each (pattern, target).
pub fn summarize(samples: &[Sample]) -> BTreeMap<String, BTreeMap<String, Cell>> {
    let mut groups: BTreeMap<(String, String), Vec<&Sample>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.error.is_none()) {
        groups
            .entry((s.pattern.clone(), s.target.clone()))
            .or_default()
            .push(s);
    }
    let mut out: BTreeMap<String, BTreeMap<String, Cell>> = BTreeMap::new();
    for ((p, t), v) in groups {
        let col = |f: &dyn Fn(&Sample) -> f64| -> Spread {
            Spread::of(&v.iter().map(|s| f(s)).collect::<Vec<_>>()).unwrap_or_default()
        };
        let med = |f: &dyn Fn(&Sample) -> f64| col(f).median;
        let cpu: Vec<f64> = v
            .iter()
            .filter_map(|s| {
                let cpu = s.server_cpu_s?;
                (s.result.ios > 0).then(|| cpu * 1e6 / s.result.ios as f64)
            })
            .collect();
        let cell = Cell {
            iops: col(&|s| s.result.iops),
            mib_s: col(&|s| s.result.mib_s),
            clat_us: [
                med(&|s| s.result.clat_us[0]),
                med(&|s| s.result.clat_us[1]),
                med(&|s| s.result.clat_us[2]),
            ],
            sync_us: [
                med(&|s| s.result.sync_us[0]),
                med(&|s| s.result.sync_us[1]),
                med(&|s| s.result.sync_us[2]),
            ],
            cpu_s_per_million_ios: Spread::of(&cpu).map(|s| s.median),
        };
        out.entry(p).or_default().insert(t, cell);
    }
    out
}

/// A ratio of two medians for one pattern (higher is better for throughput rows; for
/// the latency row it is the ratio of IOPS too, i.e. inverse mean latency).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratio {
    pub pattern: String,
    pub name: String,
    pub value: f64,
}

/// blockvol/nbdkit and blockvol/local for every blockvol target, RF3/RF1 for each RF3.
pub fn ratios(summary: &BTreeMap<String, BTreeMap<String, Cell>>) -> Vec<Ratio> {
    let mut out = Vec::new();
    for (p, cells) in summary {
        let iops = |t: &str| cells.get(t).map(|c| c.iops.median).filter(|v| *v > 0.0);
        for (t, c) in cells.iter().filter(|(t, _)| t.starts_with("rf")) {
            for base in ["nbdkit", "local"] {
                if let Some(b) = iops(base) {
                    out.push(Ratio {
                        pattern: p.clone(),
                        name: format!("{t}/{base}"),
                        value: c.iops.median / b,
                    });
                }
            }
            if let Some(b) = iops("rf1").filter(|_| t.starts_with("rf3")) {
                out.push(Ratio {
                    pattern: p.clone(),
                    name: format!("{t}/rf1"),
                    value: c.iops.median / b,
                });
            }
        }
    }
    out
}

/// Facts about the machine a report was measured on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub disk: String,
    pub filesystem: String,
    /// 1-minute load average before and after the run.
    pub load_before: f64,
    pub load_after: f64,
}

/// Settings of the run, as recorded in the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSettings {
    pub mode: String,
    pub reps: u32,
    pub runtime_s: u32,
    pub ramp_s: u32,
    pub size_mib: u64,
    pub targets: Vec<String>,
    pub patterns: Vec<String>,
    pub agent_build: String,
}

/// The whole report written to `<out>/<timestamp>.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub started_utc: String,
    pub finished_utc: String,
    pub machine: Machine,
    pub settings: RunSettings,
    pub samples: Vec<Sample>,
    pub summary: BTreeMap<String, BTreeMap<String, Cell>>,
    pub ratios: Vec<Ratio>,
    /// fio through a real block device with ext4 on it (absent: row not run).
    #[serde(default)]
    pub ext4: Option<Ext4Rows>,
    #[serde(default)]
    pub failover: Option<FailoverRows>,
    #[serde(default)]
    pub rebuild: Option<RebuildRows>,
    /// Where the agents spent CPU during one row (`--perf`).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// Many volumes on one cluster: time to Ready, idle cost, mass failover, deletion.
    #[serde(default)]
    pub scale: Option<crate::scale::ScaleRows>,
    /// Rows not run, each with the reason.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Every target of the run that was missed, in words (empty: all met or none run).
    #[serde(default)]
    pub targets_missed: Vec<String>,
}

impl Report {
    /// The markdown rendering: machine, per-pattern table, ratios, CPU per I/O.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(md, "# blockvol benchmark {}\n", self.started_utc);
        let _ = writeln!(
            md,
            "Machine: {} CPUs ({}), kernel {}, disk {} ({}); load average {:.1} before, {:.1} after.  ",
            m.cpus, m.cpu_model, m.kernel, m.disk, m.filesystem, m.load_before, m.load_after
        );
        let _ = writeln!(
            md,
            "Mode {}: {} repetitions × {} s (+{} s ramp), {} MiB per target, targets interleaved; \
             agent build: {}.\n",
            s.mode, s.reps, s.runtime_s, s.ramp_s, s.size_mib, s.agent_build
        );
        if !self.samples.is_empty() {
            self.fio_markdown(&mut md);
        }
        if let Some(e) = &self.ext4 {
            e.markdown(&mut md);
        }
        if let Some(f) = &self.failover {
            f.markdown(&mut md);
        }
        if let Some(r) = &self.rebuild {
            r.markdown(&mut md);
        }
        if let Some(p) = &self.profile {
            p.markdown(&mut md);
        }
        if let Some(s) = &self.scale {
            s.markdown(&mut md);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(md, "\nRows not run:\n");
            for s in &self.skipped {
                let _ = writeln!(md, "- {s}");
            }
        }
        if !self.targets_missed.is_empty() {
            let _ = writeln!(md, "\n**Targets missed:**\n");
            for t in &self.targets_missed {
                let _ = writeln!(md, "- {t}");
            }
        }
        md
    }

    /// The fio matrix: per-pattern table, ratios, failed runs, CPU per I/O.
    fn fio_markdown(&self, md: &mut String) {
        let s = &self.settings;
        let _ = writeln!(
            md,
            "| pattern | target | IOPS median | IOPS min–max | MiB/s | p50 µs | p99 µs | p99.9 µs | fsync p50/p99/p99.9 µs |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for p in PATTERNS {
            let Some(cells) = self.summary.get(p.name) else {
                continue;
            };
            for t in &s.targets {
                let Some(c) = cells.get(t) else { continue };
                let sync = if c.sync_us[0] > 0.0 {
                    format!(
                        "{:.0}/{:.0}/{:.0}",
                        c.sync_us[0], c.sync_us[1], c.sync_us[2]
                    )
                } else {
                    "—".into()
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0}–{:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
                    p.name,
                    t,
                    c.iops.median,
                    c.iops.min,
                    c.iops.max,
                    c.mib_s.median,
                    c.clat_us[0],
                    c.clat_us[1],
                    c.clat_us[2],
                    sync
                );
            }
        }
        let _ = writeln!(md, "\nRatios of median IOPS:\n");
        let names: Vec<String> = {
            let mut n: Vec<String> = self.ratios.iter().map(|r| r.name.clone()).collect();
            n.sort();
            n.dedup();
            n
        };
        let _ = write!(md, "| pattern |");
        for n in &names {
            let _ = write!(md, " {n} |");
        }
        let _ = write!(md, "\n|---|");
        for _ in &names {
            let _ = write!(md, "---:|");
        }
        let _ = writeln!(md);
        for p in PATTERNS {
            if !self.summary.contains_key(p.name) {
                continue;
            }
            let _ = write!(md, "| {} |", p.name);
            for n in &names {
                match self
                    .ratios
                    .iter()
                    .find(|r| r.pattern == p.name && &r.name == n)
                {
                    Some(r) => {
                        let _ = write!(md, " {:.2} |", r.value);
                    }
                    None => {
                        let _ = write!(md, " — |");
                    }
                }
            }
            let _ = writeln!(md);
        }
        let failed: Vec<&Sample> = self.samples.iter().filter(|s| s.error.is_some()).collect();
        if !failed.is_empty() {
            let _ = writeln!(md, "\nFailed runs (left out of the medians above):\n");
            for s in failed {
                let msg = s.error.as_deref().unwrap_or_default();
                // fio's own message, without the command line in front of it.
                let first = msg.lines().find(|l| l.contains("error")).unwrap_or(msg);
                let short = first.rsplit_once("): ").map_or(first, |(_, r)| r);
                let _ = writeln!(
                    md,
                    "- {} on {} (rep {}): {}",
                    s.pattern,
                    s.target,
                    s.rep,
                    short.trim()
                );
            }
        }
        let cpu_rows: Vec<(String, String, f64)> = self
            .summary
            .iter()
            .flat_map(|(p, cells)| {
                cells.iter().filter_map(move |(t, c)| {
                    let v = c.cpu_s_per_million_ios?;
                    p.starts_with("randwrite-4k")
                        .then(|| (p.clone(), t.clone(), v))
                })
            })
            .collect();
        if !cpu_rows.is_empty() {
            let _ = writeln!(
                md,
                "\nServer CPU seconds per million 4 KiB writes (all agent processes of the \
                 cluster for blockvol targets, from /proc/<pid>/stat):\n"
            );
            let _ = writeln!(md, "| pattern | target | CPU s / 10⁶ writes |");
            let _ = writeln!(md, "|---|---|---:|");
            for (p, t, v) in cpu_rows {
                let _ = writeln!(md, "| {p} | {t} | {v:.1} |");
            }
        }
    }

    /// Fills `targets_missed` from the new rows' results.
    pub fn judge_targets(&mut self) {
        let mut missed = Vec::new();
        if let Some(f) = &self.failover {
            missed.extend(f.missed());
        }
        if let Some(r) = &self.rebuild {
            missed.extend(r.missed());
        }
        if let Some(s) = &self.scale {
            missed.extend(s.missed());
        }
        self.targets_missed = missed;
    }
}

/// The same fio jobs (psync, O_DIRECT, on a file in an ext4 filesystem) on an RF3
/// volume attached as a block device and on a loop device over an image file on the
/// same disk. Targets: `rf3-ext4`, `local-ext4`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ext4Rows {
    /// How the RF3 device was made (e.g. "Attach: FUSE + loop").
    pub device: String,
    /// What the local baseline is.
    pub local: String,
    pub file_size_mib: u64,
    pub samples: Vec<Sample>,
    pub summary: BTreeMap<String, BTreeMap<String, Cell>>,
    /// `rf3-ext4/local-ext4` per job, ratio of median IOPS.
    pub ratios: Vec<Ratio>,
}

/// The fio jobs of the ext4 rows (psync, O_DIRECT; besides file, size and time).
pub const EXT4_JOBS: &[Pattern] = &[
    Pattern {
        name: "ext4-randwrite-4k-fsync32",
        summary: "4 KiB random write, psync, fsync every 32 writes",
        args: &["--rw=randwrite", "--bs=4k", "--fsync=32"],
        latency_row: false,
    },
    Pattern {
        name: "ext4-seqwrite-1m",
        summary: "1 MiB sequential write, psync",
        args: &["--rw=write", "--bs=1M"],
        latency_row: false,
    },
    Pattern {
        name: "ext4-seqread-1m",
        summary: "1 MiB sequential read, psync",
        args: &["--rw=read", "--bs=1M"],
        latency_row: false,
    },
];

impl Ext4Rows {
    /// Summary and `rf3-ext4/local-ext4` ratios from the samples.
    pub fn summarize(&mut self) {
        self.summary = summarize(&self.samples);
        self.ratios = self
            .summary
            .iter()
            .filter_map(|(p, cells)| {
                let rf3 = cells.get("rf3-ext4")?.iops.median;
                let local = cells.get("local-ext4")?.iops.median;
                (local > 0.0).then(|| Ratio {
                    pattern: p.clone(),
                    name: "rf3-ext4/local-ext4".into(),
                    value: rf3 / local,
                })
            })
            .collect();
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Through a block device with ext4\n\nRF3 volume: {}. Local: {}. fio psync, \
             O_DIRECT, on a {} MiB file in the mounted filesystem; targets interleaved.\n",
            self.device, self.local, self.file_size_mib
        );
        let _ = writeln!(
            md,
            "| job | rf3-ext4 IOPS (min–max) | MiB/s | local-ext4 IOPS (min–max) | MiB/s | RF3/local |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for j in EXT4_JOBS {
            let Some(cells) = self.summary.get(j.name) else {
                continue;
            };
            let cell = |t: &str| {
                cells
                    .get(t)
                    .map_or(("—".to_string(), "—".to_string()), |c| {
                        (
                            format!("{:.0} ({:.0}–{:.0})", c.iops.median, c.iops.min, c.iops.max),
                            format!("{:.1}", c.mib_s.median),
                        )
                    })
            };
            let (ri, rm) = cell("rf3-ext4");
            let (li, lm) = cell("local-ext4");
            let ratio = self
                .ratios
                .iter()
                .find(|r| r.pattern == j.name)
                .map_or("—".to_string(), |r| format!("{:.2}", r.value));
            let _ = writeln!(md, "| {} | {ri} | {rm} | {li} | {lm} | {ratio} |", j.name);
        }
        for s in self.samples.iter().filter(|s| s.error.is_some()) {
            let _ = writeln!(
                md,
                "\n- failed: {} on {} (rep {}): {}",
                s.pattern,
                s.target,
                s.rep,
                s.error.as_deref().unwrap_or_default()
            );
        }
    }
}

/// Failover target: median time from the SIGKILL of the primary's agent to the first
/// acknowledged write after it.
pub const FAILOVER_P50_TARGET_S: f64 = 5.0;
/// Failover target: the slowest trial.
pub const FAILOVER_MAX_TARGET_S: f64 = 10.0;
/// Rebuild target: rebuild rate against the disk's sequential write rate.
pub const REBUILD_RATIO_TARGET: f64 = 0.5;

/// One failover trial.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailoverTrial {
    pub trial: u32,
    pub killed_node: String,
    pub new_primary_node: String,
    /// SIGKILL to the first write sent after it and acknowledged with its flush.
    pub seconds: Option<f64>,
    /// Writes acknowledged and flushed during the trial.
    pub writes_durable: u64,
    /// Durable writes read back intact after the trial (all trials so far).
    pub writes_verified: u64,
    /// Durable writes missing, stale, torn or misplaced after the trial.
    pub lost: u64,
    pub error: Option<String>,
}

/// Failover under a writer: the writer goes through the forwarding export of a node
/// without a replica, so its connection survives the primary's death.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailoverRows {
    pub lease_duration_s: u32,
    pub writer: String,
    pub trials: Vec<FailoverTrial>,
    pub seconds: Option<Spread>,
    /// Median (p50) of the trials that recovered.
    pub p50_s: Option<f64>,
    pub max_s: Option<f64>,
    pub writes_durable: u64,
    pub lost: u64,
}

impl FailoverRows {
    /// p50/max over the trials that recovered; durable and lost totals.
    pub fn summarize(&mut self) {
        let s: Vec<f64> = self.trials.iter().filter_map(|t| t.seconds).collect();
        self.seconds = Spread::of(&s);
        self.p50_s = self.seconds.map(|s| s.median);
        self.max_s = self.seconds.map(|s| s.max);
        self.writes_durable = self.trials.iter().map(|t| t.writes_durable).sum();
        self.lost = self.trials.iter().map(|t| t.lost).max().unwrap_or(0);
    }

    /// The failover targets missed, in words.
    pub fn missed(&self) -> Vec<String> {
        let mut out = Vec::new();
        let failed = self.trials.iter().filter(|t| t.seconds.is_none()).count();
        if failed > 0 {
            out.push(format!(
                "failover: {failed} of {} trials never wrote again (see the trial table)",
                self.trials.len()
            ));
        }
        match self.p50_s {
            Some(p) if p > FAILOVER_P50_TARGET_S => out.push(format!(
                "failover p50 {p:.2} s > target {FAILOVER_P50_TARGET_S} s"
            )),
            None if !self.trials.is_empty() => {
                out.push("failover: no trial recovered, p50 unknown".into())
            }
            _ => {}
        }
        if let Some(m) = self.max_s.filter(|m| *m > FAILOVER_MAX_TARGET_S) {
            out.push(format!(
                "failover max {m:.2} s > target {FAILOVER_MAX_TARGET_S} s"
            ));
        }
        if self.lost > 0 {
            out.push(format!(
                "failover: {} acknowledged writes LOST (must be 0)",
                self.lost
            ));
        }
        out
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Failover under a writer\n\nRF3 syncAll volume; {}. Each trial SIGKILLs the \
             primary's agent and measures the time to the first write sent after the kill and \
             acknowledged with its FLUSH (agent Lease {} s); then the ledger of every flushed \
             write is read back, the killed agent restarted and three replicas in sync awaited. \
             Targets: p50 ≤ {FAILOVER_P50_TARGET_S} s, max ≤ {FAILOVER_MAX_TARGET_S} s, 0 lost.\n",
            self.writer, self.lease_duration_s
        );
        let fmt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            md,
            "Result: p50 {} s, max {} s over {} trials; {} writes flushed during the trials, {} lost.\n",
            fmt(self.p50_s),
            fmt(self.max_s),
            self.trials.len(),
            self.writes_durable,
            self.lost
        );
        let _ = writeln!(
            md,
            "| trial | killed | new primary | kill → write s | flushed writes | verified | lost | error |"
        );
        let _ = writeln!(md, "|---:|---|---|---:|---:|---:|---:|---|");
        for t in &self.trials {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                t.trial,
                t.killed_node,
                t.new_primary_node,
                fmt(t.seconds),
                t.writes_durable,
                t.writes_verified,
                t.lost,
                t.error.as_deref().unwrap_or("")
            );
        }
    }
}

/// One rebuild of a replica.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebuildRun {
    pub size_mib: u64,
    pub concurrent_writes: bool,
    /// "rebuild started" to "rebuild finished" in the rebuilt replica's log.
    pub seconds: Option<f64>,
    pub mib_s: Option<f64>,
    /// Rebuild rate over the disk's sequential write rate.
    pub ratio_to_disk: Option<f64>,
    /// IOPS the concurrent writer got during the rebuild.
    pub client_iops: Option<f64>,
    pub error: Option<String>,
}

/// Rebuild rate against the disk's sequential write rate measured in the same run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebuildRows {
    pub replicas: u8,
    /// fio sequential write (1 MiB, O_DIRECT, libaio QD4) on a local file, MiB/s.
    pub disk_seq_write_mib_s: f64,
    pub disk_job: String,
    pub writer_job: String,
    pub runs: Vec<RebuildRun>,
}

impl RebuildRows {
    /// Fills each run's rate and ratio from its seconds.
    pub fn summarize(&mut self) {
        let disk = self.disk_seq_write_mib_s;
        for r in &mut self.runs {
            r.mib_s = r
                .seconds
                .filter(|s| *s > 0.0)
                .map(|s| r.size_mib as f64 / s);
            r.ratio_to_disk = r.mib_s.filter(|_| disk > 0.0).map(|m| m / disk);
        }
    }

    pub fn missed(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter_map(|r| {
                let what = format!(
                    "rebuild of {} MiB {}",
                    r.size_mib,
                    if r.concurrent_writes {
                        "with client writes"
                    } else {
                        "idle"
                    }
                );
                match r.ratio_to_disk {
                    Some(x) if x < REBUILD_RATIO_TARGET => Some(format!(
                        "{what}: {x:.2}× disk < target {REBUILD_RATIO_TARGET}×"
                    )),
                    Some(_) => None,
                    None => Some(format!(
                        "{what}: not measured ({})",
                        r.error.as_deref().unwrap_or("no rate")
                    )),
                }
            })
            .collect()
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Rebuild\n\nA replica of an RF{} volume filled end to end is made to need a \
             rebuild (its agent is killed until the primary gives up its WAL, then restarted); \
             the time is from \"rebuild started\" to \"rebuild finished\" in its log. Disk: \
             {} = {:.0} MiB/s. Concurrent writes: {}. Target: rebuild ≥ {REBUILD_RATIO_TARGET}× disk.\n",
            self.replicas, self.disk_job, self.disk_seq_write_mib_s, self.writer_job
        );
        let _ = writeln!(
            md,
            "| size MiB | client writes | seconds | MiB/s | rebuild/disk | client IOPS | note |"
        );
        let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---|");
        let fmt = |v: Option<f64>, p: usize| v.map_or("—".to_string(), |v| format!("{v:.p$}"));
        for r in &self.runs {
            let note = match (&r.error, r.ratio_to_disk) {
                (Some(e), _) => e.clone(),
                (None, Some(x)) if x < REBUILD_RATIO_TARGET => "TARGET MISSED".into(),
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.size_mib,
                if r.concurrent_writes { "yes" } else { "no" },
                fmt(r.seconds, 2),
                fmt(r.mib_s, 0),
                fmt(r.ratio_to_disk, 2),
                fmt(r.client_iops, 0),
                note
            );
        }
    }
}

/// One line of `perf report`: percentages of samples with the symbol on the stack
/// (children) and at the top of it (self).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    pub children_pct: f64,
    pub self_pct: f64,
    pub symbol: String,
}

/// The agents' CPU profile during one row (`perf record -e cpu-clock -g`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Profile {
    pub row: String,
    pub command: String,
    pub samples_file: String,
    /// Top entries by children percentage.
    pub by_children: Vec<ProfileEntry>,
    /// Top entries by self percentage.
    pub by_self: Vec<ProfileEntry>,
}

/// Entries of `perf report --stdio --children --sort symbol -g none` output: lines
/// `  45.23%     1.10%  [.] symbol` (comments and blank lines skipped).
pub fn parse_perf_report(text: &str) -> Vec<ProfileEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut rest = l.trim();
            let mut pct = Vec::new();
            while let Some((tok, tail)) = rest.split_once(char::is_whitespace) {
                let Some(v) = tok.strip_suffix('%').and_then(|v| v.parse::<f64>().ok()) else {
                    break;
                };
                pct.push(v);
                rest = tail.trim_start();
            }
            // Columns are padded with runs of spaces; a symbol has single spaces at most
            // (`<T as Trait>::f`), and perf may append `-` columns after it.
            let symbol = rest
                .strip_prefix("[.] ")
                .or_else(|| rest.strip_prefix("[k] "))
                .unwrap_or(rest)
                .split("  ")
                .next()
                .unwrap_or_default()
                .trim();
            match (pct.as_slice(), symbol.is_empty()) {
                (&[children, own], false) => Some(ProfileEntry {
                    children_pct: children,
                    self_pct: own,
                    symbol: symbol.to_string(),
                }),
                _ => None,
            }
        })
        .collect()
}

impl Profile {
    /// Keeps the `top` entries by children and by self percentage.
    pub fn from_report(row: &str, command: &str, file: &str, text: &str, top: usize) -> Profile {
        let all = parse_perf_report(text);
        let pick = |key: fn(&ProfileEntry) -> f64| {
            let mut v = all.clone();
            v.sort_by(|a, b| key(b).total_cmp(&key(a)));
            v.truncate(top);
            v
        };
        Profile {
            row: row.into(),
            command: command.into(),
            samples_file: file.into(),
            by_children: pick(|e| e.children_pct),
            by_self: pick(|e| e.self_pct),
        }
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Where the time goes ({})\n\n`{}` on every agent process during one extra \
             run of the row (samples: `{}`; no flame graph: it would need another tool).\n",
            self.row, self.command, self.samples_file
        );
        for (title, list) in [
            ("by self", &self.by_self),
            ("by children (self + callees)", &self.by_children),
        ] {
            let _ = writeln!(md, "Top functions {title}:\n");
            let _ = writeln!(md, "| children % | self % | function |");
            let _ = writeln!(md, "|---:|---:|---|");
            for e in list {
                let _ = writeln!(
                    md,
                    "| {:.2} | {:.2} | `{}` |",
                    e.children_pct,
                    e.self_pct,
                    e.symbol.replace('|', "\\|")
                );
            }
            let _ = writeln!(md);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"fio: connected to NBD server
{
  "jobs": [{
    "read": {"iops": 0.0, "bw_bytes": 0, "total_ios": 0, "clat_ns": {"percentile": {}}},
    "write": {"iops": 1000.5, "bw_bytes": 4098048, "total_ios": 8004,
              "clat_ns": {"percentile": {"50.000000": 500000, "99.000000": 2000000, "99.900000": 9000000}}},
    "sync": {"total_ios": 250, "lat_ns": {"percentile": {"50.000000": 1000000, "99.000000": 3000000, "99.900000": 4000000}}}
  }]
}"#;

    #[test]
    fn fio_json_after_a_banner_parses_with_latencies_in_microseconds() {
        let r = parse_fio(FIO).expect("parses");
        assert_eq!(r.iops, 1000.5);
        assert!((r.mib_s - 3.908).abs() < 0.01, "{}", r.mib_s);
        assert_eq!(r.ios, 8004);
        assert_eq!(r.clat_us, [500.0, 2000.0, 9000.0]);
        assert_eq!(r.sync_us, [1000.0, 3000.0, 4000.0]);
    }

    #[test]
    fn fio_output_without_json_is_an_error_naming_the_text() {
        let e = parse_fio("fio: failed to connect").expect_err("no json");
        assert!(e.to_string().contains("failed to connect"), "{e}");
        assert!(matches!(
            parse_fio("{\"jobs\": []}"),
            Err(BenchError::FioField(_))
        ));
    }

    #[test]
    fn proc_stat_with_spaces_in_the_name_gives_utime_plus_stime() {
        let stat = "42 (blockvol agent) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_seconds_from_stat(stat, 100.0), Ok(3.0));
        assert!(cpu_seconds_from_stat("42 (x) S 1", 100.0).is_err());
        assert!(cpu_seconds_from_stat("garbage", 100.0).is_err());
        let own = cpu_seconds(std::process::id()).expect("own stat");
        assert!(own >= 0.0);
    }

    #[test]
    fn spread_takes_the_median_of_odd_and_even_sample_counts() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("some");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).expect("some").median, 2.5);
    }

    fn sample(pattern: &str, target: &str, iops: f64, cpu: Option<f64>) -> Sample {
        Sample {
            pattern: pattern.into(),
            target: target.into(),
            rep: 1,
            result: FioResult {
                iops,
                ios: (iops * 10.0) as u64,
                ..FioResult::default()
            },
            server_cpu_s: cpu,
            error: None,
        }
    }

    #[test]
    fn ratios_compare_medians_against_each_baseline_and_rf1() {
        let p = "randwrite-4k-qd16-fsync32";
        let samples = vec![
            sample(p, "nbdkit", 100.0, Some(1.0)),
            sample(p, "nbdkit", 300.0, Some(1.0)),
            sample(p, "local", 400.0, None),
            sample(p, "rf1", 200.0, Some(2.0)),
            sample(p, "rf3-sync", 50.0, Some(3.0)),
        ];
        let mut samples = samples;
        samples.push(Sample {
            error: Some(
                "fio [\"--rw=write\"] failed (exit status: 1): fio: io_u error on file bench: \
                 Input/output error"
                    .into(),
            ),
            ..sample(p, "rf1", 1.0, None)
        });
        let summary = summarize(&samples);
        assert_eq!(summary[p]["nbdkit"].iops.median, 200.0);
        // 2 CPU s for 2000 writes = 1000 s per million.
        assert_eq!(summary[p]["rf1"].cpu_s_per_million_ios, Some(1000.0));
        assert_eq!(summary[p]["local"].cpu_s_per_million_ios, None);
        let r = ratios(&summary);
        let get = |n: &str| r.iter().find(|x| x.name == n).map(|x| x.value);
        assert_eq!(get("rf1/nbdkit"), Some(1.0));
        assert_eq!(get("rf1/local"), Some(0.5));
        assert_eq!(get("rf3-sync/rf1"), Some(0.25));
        assert_eq!(get("rf1/rf1"), None);
        let report = Report {
            started_utc: "t0".into(),
            finished_utc: "t1".into(),
            machine: Machine::default(),
            settings: RunSettings {
                targets: vec![
                    "nbdkit".into(),
                    "local".into(),
                    "rf1".into(),
                    "rf3-sync".into(),
                ],
                ..RunSettings::default()
            },
            samples,
            summary,
            ratios: r,
            ..Report::default()
        };
        let md = report.markdown();
        assert!(
            md.contains("| randwrite-4k-qd16-fsync32 | rf1 | 200 |"),
            "{md}"
        );
        assert!(md.contains("rf3-sync/rf1"), "{md}");
        assert!(
            md.contains("- randwrite-4k-qd16-fsync32 on rf1 (rep 1): fio: io_u error"),
            "{md}"
        );
        assert!(
            md.contains("| randwrite-4k-qd16-fsync32 | rf1 | 1000.0 |"),
            "{md}"
        );
    }

    #[test]
    fn perf_report_lines_give_children_and_self_per_symbol() {
        let text = "# Children      Self  Symbol\n# ........  ........  ......\n#\n\
                    \x20   42.50%     0.00%  [.] tokio::runtime::task::raw::poll\n\
                    \x20   12.25%    12.25%  [k] copy_user_enhanced_fast_string      -  -\n\
                    \x20    5.00%     0.10%  [.] <engine::Wal as engine::Log>::append  -\n\
                    \x20    3.00%     1.50%  [.] engine::wal::Wal::append\n\
                    \n   not a line\n";
        let all = parse_perf_report(text);
        assert_eq!(all.len(), 4, "{all:?}");
        assert_eq!(all[1].symbol, "copy_user_enhanced_fast_string");
        assert_eq!(all[2].symbol, "<engine::Wal as engine::Log>::append");
        assert_eq!((all[3].children_pct, all[3].self_pct), (3.0, 1.5));
        let p = Profile::from_report("row", "perf record", "f", text, 2);
        assert_eq!(p.by_children[0].symbol, "tokio::runtime::task::raw::poll");
        assert_eq!(p.by_self[0].symbol, "copy_user_enhanced_fast_string");
        assert_eq!(p.by_self.len(), 2);
    }

    fn trial(seconds: Option<f64>, lost: u64) -> FailoverTrial {
        FailoverTrial {
            seconds,
            writes_durable: 10,
            lost,
            ..FailoverTrial::default()
        }
    }

    #[test]
    fn failover_targets_are_judged_on_p50_max_losses_and_stuck_trials() {
        let mut f = FailoverRows {
            trials: vec![
                trial(Some(3.0), 0),
                trial(Some(4.0), 0),
                trial(Some(4.5), 0),
            ],
            ..FailoverRows::default()
        };
        f.summarize();
        assert_eq!(
            (f.p50_s, f.max_s, f.writes_durable),
            (Some(4.0), Some(4.5), 30)
        );
        assert!(f.missed().is_empty(), "{:?}", f.missed());
        f.trials.push(trial(Some(12.0), 0));
        f.trials.push(trial(None, 2));
        f.summarize();
        let m = f.missed().join("\n");
        assert!(m.contains("1 of 5 trials never wrote again"), "{m}");
        assert!(m.contains("max 12.00 s > target 10 s"), "{m}");
        assert!(m.contains("2 acknowledged writes LOST"), "{m}");
        assert!(!m.contains("p50"), "p50 4.25 s meets the target: {m}");
    }

    #[test]
    fn rebuild_rate_is_compared_with_the_disk_and_a_slow_one_is_called_out() {
        let mut r = RebuildRows {
            replicas: 2,
            disk_seq_write_mib_s: 400.0,
            runs: vec![
                RebuildRun {
                    size_mib: 1024,
                    seconds: Some(4.0),
                    ..RebuildRun::default()
                },
                RebuildRun {
                    size_mib: 1024,
                    concurrent_writes: true,
                    seconds: Some(8.0),
                    ..RebuildRun::default()
                },
                RebuildRun {
                    size_mib: 4096,
                    error: Some("timed out".into()),
                    ..RebuildRun::default()
                },
            ],
            ..RebuildRows::default()
        };
        r.summarize();
        assert_eq!(r.runs[0].mib_s, Some(256.0));
        assert_eq!(r.runs[0].ratio_to_disk, Some(0.64));
        assert_eq!(r.runs[1].ratio_to_disk, Some(0.32));
        let m = r.missed();
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].contains("1024 MiB with client writes: 0.32× disk"),
            "{m:?}"
        );
        assert!(
            m[1].contains("4096 MiB idle: not measured (timed out)"),
            "{m:?}"
        );
        let mut report = Report {
            rebuild: Some(r),
            failover: Some(FailoverRows {
                trials: vec![trial(Some(2.0), 0)],
                ..FailoverRows::default()
            }),
            skipped: vec!["perf: not asked for (--perf)".into()],
            ..Report::default()
        };
        report.failover.as_mut().expect("set").summarize();
        report.judge_targets();
        let md = report.markdown();
        assert!(md.contains("**Targets missed:**"), "{md}");
        assert!(md.contains("TARGET MISSED"), "{md}");
        assert!(
            md.contains("Result: p50 2.00 s, max 2.00 s over 1 trials"),
            "{md}"
        );
        assert!(md.contains("- perf: not asked for"), "{md}");
    }

    #[test]
    fn ext4_rows_compare_the_rf3_device_with_the_local_one() {
        let p = "ext4-seqwrite-1m";
        let mut e = Ext4Rows {
            samples: vec![
                sample(p, "rf3-ext4", 100.0, None),
                sample(p, "local-ext4", 400.0, None),
            ],
            ..Ext4Rows::default()
        };
        e.summarize();
        assert_eq!(e.ratios.len(), 1);
        assert_eq!(e.ratios[0].value, 0.25);
        let mut md = String::new();
        e.markdown(&mut md);
        assert!(md.contains("| ext4-seqwrite-1m | 100 (100–100) |"), "{md}");
        assert!(md.contains("| 0.25 |"), "{md}");
    }

    #[test]
    fn unknown_pattern_names_the_known_ones() {
        let e = pattern("randwrite").expect_err("unknown");
        assert!(e.to_string().contains("seqread-1m-qd4"), "{e}");
        assert_eq!(
            pattern("seqwrite-1m-qd4").expect("known").name,
            "seqwrite-1m-qd4"
        );
    }
}
