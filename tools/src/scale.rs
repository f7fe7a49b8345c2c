//! The scale rows' results and their judgement: for each volume count, how long N RF3
//! volumes created at once take to become Ready, what the idle cluster costs (CPU per
//! component, agent memory per hosted replica, API requests by verb and resource), how
//! fast the primaries of a killed agent are promoted, and how long deleting them all
//! takes. Every target is judged met or missed with the measured value, so a report
//! never shows a number without saying whether it is good enough.
//!
//! The rows are run by `tools::scale_rows`; this module does no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Target: every volume Ready (all replicas in sync) this long after the creates began.
pub const READY_ALL_TARGET_S: f64 = 300.0;
/// Target: CPU of the API server, the operator and every agent together while idle,
/// in CPU milliseconds per second (0.3 of a core).
pub const IDLE_CPU_TARGET_MS_PER_S: f64 = 300.0;
/// Target: agent memory per hosted replica beyond the agent's RSS without volumes.
pub const RSS_PER_REPLICA_TARGET_MIB: f64 = 0.5;
/// Target: median time from the SIGKILL to a volume's new primary serving.
pub const MASS_FAILOVER_P50_TARGET_S: f64 = 5.0;
/// Target: the slowest volume's time from the SIGKILL to its new primary serving.
pub const MASS_FAILOVER_MAX_TARGET_S: f64 = 10.0;
/// Target: idle API requests per second at the largest count are at most this factor
/// of those at the smallest count, plus [`API_RATE_SLACK_PER_S`].
pub const API_RATE_GROWTH_MAX: f64 = 1.1;
/// Allowance for requests that do not depend on the volume count but fall unevenly into
/// two windows (Lease renewals, node registration, watch restarts), per second.
pub const API_RATE_SLACK_PER_S: f64 = 4.0;

/// The `p`-th percentile (0 < p ≤ 100) by nearest rank: the smallest sample with at
/// least p % of the samples at or below it. `None` for no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// Percentiles of a set of durations, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
    pub count: usize,
}

impl Percentiles {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Percentiles> {
        Some(Percentiles {
            p50: percentile(samples, 50.0)?,
            p90: percentile(samples, 90.0)?,
            max: percentile(samples, 100.0)?,
            count: samples.len(),
        })
    }
}

/// How the scale rows were run, as recorded in the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleSettings {
    pub replicas: u8,
    /// Size of every volume (its WAL is as large, the agent's floor being 1 MiB).
    pub volume_size: String,
    pub agents: usize,
    pub agent_lease_duration_s: u32,
    pub agent_status_interval_ms: u64,
    pub agent_registration_interval_ms: u64,
    pub operator_resync_interval_ms: u64,
    pub idle_window_s: u64,
    /// How often readiness and promotions are polled (their resolution).
    pub poll_interval_ms: u64,
    /// Volumes of the killed agent the lost-write checker writes to.
    pub checker_sample: usize,
    /// A row stops when the work directory's filesystem has less free space.
    pub disk_free_min_gib: f64,
}

/// Time until the volumes were Ready, from the first create.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadyTimes {
    /// Until every create was accepted by the API server.
    pub created_s: f64,
    /// Until half, nine in ten, and all of them were Ready (absent: never reached).
    pub half_s: Option<f64>,
    pub p90_s: Option<f64>,
    pub all_s: Option<f64>,
    /// Ready at the end of the wait.
    pub ready: usize,
}

/// What the idle cluster cost over a window after every volume was Ready.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleCost {
    pub window_s: f64,
    /// CPU milliseconds per second by component (`kube-apiserver`, `etcd`, `operator`,
    /// `agent node-1`, …), from /proc/<pid>/stat utime + stime.
    pub cpu_ms_per_s: BTreeMap<String, f64>,
    /// kube-apiserver, the operator and every agent together.
    pub judged_cpu_ms_per_s: f64,
    /// Agent RSS at the end of the window, and before any volume existed, by node.
    pub agent_rss_mib: BTreeMap<String, f64>,
    pub agent_rss_empty_mib: BTreeMap<String, f64>,
    /// Replicas each agent hosts.
    pub agent_replicas: BTreeMap<String, usize>,
    /// (RSS − RSS without volumes) / hosted replicas, over all agents.
    pub rss_per_replica_mib: Option<f64>,
    /// API requests per second by `VERB resource`, from `apiserver_request_total`.
    pub api_requests_per_s: BTreeMap<String, f64>,
    pub api_total_per_s: f64,
}

/// The lost-write checker on one volume of the killed agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SampleCheck {
    pub volume: String,
    /// Writes acknowledged and covered by an acknowledged flush before the kill broke
    /// the connection.
    pub writes_durable: u64,
    pub writes_verified: u64,
    pub lost: u64,
    pub error: Option<String>,
}

/// SIGKILL of the agent holding the most primaries, and the promotions that follow.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MassFailover {
    pub killed_node: String,
    /// Volumes whose primary was on the killed node.
    pub primaries: usize,
    /// SIGKILL to a new primary recorded in the volume's status (a higher epoch, another
    /// node) and that replica reporting Serving at that epoch, per promoted volume.
    pub seconds: Option<Percentiles>,
    /// Volumes without a serving new primary when the wait ended.
    pub not_promoted: Vec<String>,
    pub checks: Vec<SampleCheck>,
}

impl MassFailover {
    pub fn lost(&self) -> u64 {
        self.checks.iter().map(|c| c.lost).sum()
    }
}

/// One volume count on a fresh cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleRow {
    pub volumes: usize,
    /// 1-minute load average and CPUs (`nproc`) when the row started: what else ran.
    pub load_avg_1m: f64,
    pub nproc: usize,
    /// Free space of the work directory's filesystem at the start and the lowest seen.
    pub disk_free_gib_start: f64,
    pub disk_free_gib_min: f64,
    pub ready: Option<ReadyTimes>,
    pub idle: Option<IdleCost>,
    pub failover: Option<MassFailover>,
    /// From the first delete until no volume object was left.
    pub delete_s: Option<f64>,
    /// Why the row stopped early or failed (a checker failure included).
    pub error: Option<String>,
}

/// One target's verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Verdict {
    fn new(target: impl Into<String>, measured: impl Into<String>, met: bool) -> Verdict {
        Verdict {
            target: target.into(),
            measured: measured.into(),
            met,
        }
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("—".to_string(), |v| format!("{v:.1}"))
}

impl ScaleRow {
    /// Every target this row measured, met or missed. A step that did not run judges
    /// nothing; one that ran without an answer is missed.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let n = self.volumes;
        let mut out = Vec::new();
        if let Some(r) = &self.ready {
            let measured = match r.all_s {
                Some(s) => format!("{s:.1} s"),
                None => format!("{} of {n} Ready when the wait ended", r.ready),
            };
            out.push(Verdict::new(
                format!("{n} volumes: all Ready ≤ {READY_ALL_TARGET_S} s"),
                measured,
                r.all_s.is_some_and(|s| s <= READY_ALL_TARGET_S),
            ));
        }
        if let Some(i) = &self.idle {
            out.push(Verdict::new(
                format!(
                    "{n} volumes idle: apiserver + operator + agents ≤ {IDLE_CPU_TARGET_MS_PER_S} CPU ms/s"
                ),
                format!("{:.0} CPU ms/s", i.judged_cpu_ms_per_s),
                i.judged_cpu_ms_per_s <= IDLE_CPU_TARGET_MS_PER_S,
            ));
            out.push(Verdict::new(
                format!(
                    "{n} volumes idle: agent RSS per hosted replica ≤ {RSS_PER_REPLICA_TARGET_MIB} MiB"
                ),
                i.rss_per_replica_mib
                    .map_or("unknown".into(), |m| format!("{m:.3} MiB")),
                i.rss_per_replica_mib
                    .is_some_and(|m| m <= RSS_PER_REPLICA_TARGET_MIB),
            ));
        }
        if let Some(f) = &self.failover {
            let p = f.seconds;
            let all = f.not_promoted.is_empty() && p.is_some_and(|p| p.count == f.primaries);
            out.push(Verdict::new(
                format!("{n} volumes: every primary of the killed agent promoted"),
                format!("{} of {} promoted", p.map_or(0, |p| p.count), f.primaries),
                all,
            ));
            out.push(Verdict::new(
                format!("{n} volumes: promotion p50 ≤ {MASS_FAILOVER_P50_TARGET_S} s"),
                format!("{} s", secs(p.map(|p| p.p50))),
                p.is_some_and(|p| p.p50 <= MASS_FAILOVER_P50_TARGET_S),
            ));
            out.push(Verdict::new(
                format!("{n} volumes: promotion max ≤ {MASS_FAILOVER_MAX_TARGET_S} s"),
                format!("{} s", secs(p.map(|p| p.max))),
                all && p.is_some_and(|p| p.max <= MASS_FAILOVER_MAX_TARGET_S),
            ));
            let failed = f.checks.iter().filter(|c| c.error.is_some()).count();
            out.push(Verdict::new(
                format!("{n} volumes: lost-write checker finds 0 lost"),
                format!(
                    "{} lost over {} volumes ({} durable writes){}",
                    f.lost(),
                    f.checks.len(),
                    f.checks.iter().map(|c| c.writes_durable).sum::<u64>(),
                    if failed > 0 {
                        format!(", {failed} checker runs FAILED")
                    } else {
                        String::new()
                    }
                ),
                f.lost() == 0 && failed == 0 && !f.checks.is_empty(),
            ));
        }
        out
    }
}

/// The scale rows of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleRows {
    pub settings: ScaleSettings,
    pub rows: Vec<ScaleRow>,
}

impl ScaleRows {
    /// The keys of one idle map over every row that reached its idle window, each
    /// once, in order: the table's lines for per-component figures.
    fn idle_keys<'a, K>(&'a self, keys: impl Fn(&'a IdleCost) -> K) -> Vec<String>
    where
        K: Iterator<Item = &'a String>,
    {
        self.rows
            .iter()
            .filter_map(|r| r.idle.as_ref())
            .flat_map(keys)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Every target, met or missed: each row's, then the idle API rate of the largest
    /// count against the smallest (it must not grow with the volume count).
    pub fn verdicts(&self) -> Vec<Verdict> {
        let mut out: Vec<Verdict> = self.rows.iter().flat_map(ScaleRow::verdicts).collect();
        let idle: Vec<(usize, f64)> = self
            .rows
            .iter()
            .filter_map(|r| Some((r.volumes, r.idle.as_ref()?.api_total_per_s)))
            .collect();
        let small = idle.iter().min_by_key(|(n, _)| *n);
        let large = idle.iter().max_by_key(|(n, _)| *n);
        if let (Some(&(sn, s)), Some(&(ln, l))) = (small, large)
            && ln > sn
        {
            let allowed = API_RATE_GROWTH_MAX * s + API_RATE_SLACK_PER_S;
            out.push(Verdict::new(
                format!(
                    "idle API requests/s independent of the volume count: {ln} volumes ≤ \
                     {API_RATE_GROWTH_MAX} × {sn} volumes' + {API_RATE_SLACK_PER_S}"
                ),
                format!("{l:.1}/s at {ln} volumes, {s:.1}/s at {sn} (allowed {allowed:.1})"),
                l <= allowed,
            ));
        }
        out
    }

    /// The missed targets and the rows' errors, in words (for the report's list).
    pub fn missed(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .verdicts()
            .into_iter()
            .filter(|v| !v.met)
            .map(|v| format!("scale: {} — measured {}", v.target, v.measured))
            .collect();
        for r in &self.rows {
            if let Some(e) = &r.error {
                out.push(format!("scale {} volumes: {e}", r.volumes));
            }
        }
        out
    }

    /// The "Scale" section of the markdown report.
    pub fn markdown(&self, md: &mut String) {
        let s = &self.settings;
        let _ = writeln!(
            md,
            "\n## Scale\n\nEach count on a fresh local cluster ({} agents, one operator): that many \
             RF{} volumes of {} (WAL as large) created at once; agent Lease {} s, status interval \
             {} ms, registration interval {} ms; operator resync {} ms. Idle cost over {} s once \
             all were Ready; then the agent holding the most primaries is SIGKILLed while the \
             lost-write checker writes to {} of its volumes (read back from the new primaries \
             afterwards); then every volume is deleted. Readiness and promotions are polled \
             every {} ms.\n",
            s.agents,
            s.replicas,
            s.volume_size,
            s.agent_lease_duration_s,
            s.agent_status_interval_ms,
            s.agent_registration_interval_ms,
            s.operator_resync_interval_ms,
            s.idle_window_s,
            s.checker_sample,
            s.poll_interval_ms
        );
        let mut header = "| |".to_string();
        let mut rule = "|---|".to_string();
        for r in &self.rows {
            let _ = write!(header, " {} volumes |", r.volumes);
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        let line = |md: &mut String, label: &str, f: &dyn Fn(&ScaleRow) -> String| {
            let cells: Vec<String> = self.rows.iter().map(f).collect();
            let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
        };
        let dash = || "—".to_string();
        line(md, "load average (1 min) / nproc at start", &|r| {
            format!("{:.2} / {}", r.load_avg_1m, r.nproc)
        });
        line(md, "disk free GiB: start / lowest", &|r| {
            format!("{:.1} / {:.1}", r.disk_free_gib_start, r.disk_free_gib_min)
        });
        line(md, "creates accepted, s", &|r| {
            r.ready
                .as_ref()
                .map_or_else(dash, |t| format!("{:.1}", t.created_s))
        });
        line(md, "50 % Ready, s", &|r| {
            r.ready.as_ref().map_or_else(dash, |t| secs(t.half_s))
        });
        line(md, "90 % Ready, s", &|r| {
            r.ready.as_ref().map_or_else(dash, |t| secs(t.p90_s))
        });
        line(md, "all Ready, s", &|r| {
            r.ready.as_ref().map_or_else(dash, |t| match t.all_s {
                Some(s) => format!("{s:.1}"),
                None => format!("{} Ready, then stopped", t.ready),
            })
        });
        let components = self.idle_keys(|i| i.cpu_ms_per_s.keys());
        for c in &components {
            line(md, &format!("idle CPU ms/s: {c}"), &|r| {
                r.idle
                    .as_ref()
                    .and_then(|i| i.cpu_ms_per_s.get(c))
                    .map_or_else(dash, |v| format!("{v:.1}"))
            });
        }
        line(md, "idle CPU ms/s: apiserver + operator + agents", &|r| {
            r.idle
                .as_ref()
                .map_or_else(dash, |i| format!("{:.1}", i.judged_cpu_ms_per_s))
        });
        let nodes = self.idle_keys(|i| i.agent_rss_mib.keys());
        for n in &nodes {
            line(
                md,
                &format!("agent {n}: RSS MiB (empty → idle), replicas"),
                &|r| {
                    r.idle.as_ref().map_or_else(dash, |i| {
                        format!(
                            "{:.1} → {:.1}, {}",
                            i.agent_rss_empty_mib.get(n).copied().unwrap_or(0.0),
                            i.agent_rss_mib.get(n).copied().unwrap_or(0.0),
                            i.agent_replicas.get(n).copied().unwrap_or(0)
                        )
                    })
                },
            );
        }
        line(md, "agent RSS per hosted replica, MiB", &|r| {
            r.idle
                .as_ref()
                .and_then(|i| i.rss_per_replica_mib)
                .map_or_else(dash, |m| format!("{m:.3}"))
        });
        line(md, "idle API requests/s (all)", &|r| {
            r.idle
                .as_ref()
                .map_or_else(dash, |i| format!("{:.2}", i.api_total_per_s))
        });
        let requests = self.idle_keys(|i| i.api_requests_per_s.keys());
        for q in &requests {
            line(md, &format!("idle API/s: {q}"), &|r| {
                r.idle.as_ref().map_or_else(dash, |i| {
                    i.api_requests_per_s
                        .get(q)
                        .map_or_else(|| "0".into(), |v| format!("{v:.2}"))
                })
            });
        }
        line(md, "failover: killed node, its primaries", &|r| {
            r.failover
                .as_ref()
                .map_or_else(dash, |f| format!("{}, {}", f.killed_node, f.primaries))
        });
        line(md, "failover: promoted", &|r| {
            r.failover
                .as_ref()
                .map_or_else(dash, |f| format!("{}", f.seconds.map_or(0, |p| p.count)))
        });
        for (label, pick) in [
            ("failover p50, s", 0),
            ("failover p90, s", 1),
            ("failover max, s", 2),
        ] {
            line(md, label, &|r| {
                r.failover
                    .as_ref()
                    .and_then(|f| f.seconds)
                    .map_or_else(dash, |p| format!("{:.2}", [p.p50, p.p90, p.max][pick]))
            });
        }
        line(md, "checker: volumes, durable writes, lost", &|r| {
            r.failover.as_ref().map_or_else(dash, |f| {
                format!(
                    "{}, {}, {}",
                    f.checks.len(),
                    f.checks.iter().map(|c| c.writes_durable).sum::<u64>(),
                    f.lost()
                )
            })
        });
        line(md, "delete all, s", &|r| secs(r.delete_s));
        let _ = writeln!(md, "\nTargets:\n");
        for v in self.verdicts() {
            let _ = writeln!(
                md,
                "- {} {} — measured {}",
                if v.met { "MET" } else { "MISSED" },
                v.target,
                v.measured
            );
        }
        for r in &self.rows {
            if let Some(f) = &r.failover {
                for c in f.checks.iter().filter(|c| c.error.is_some()) {
                    let _ = writeln!(
                        md,
                        "- checker on {} ({} volumes): {}",
                        c.volume,
                        r.volumes,
                        c.error.as_deref().unwrap_or("")
                    );
                }
                if !f.not_promoted.is_empty() {
                    let _ = writeln!(
                        md,
                        "- {} volumes: not promoted: {}",
                        r.volumes,
                        f.not_promoted.join(", ")
                    );
                }
            }
            if let Some(e) = &r.error {
                let _ = writeln!(md, "- {} volumes: row failed: {e}", r.volumes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let s = [4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&s, 50.0), Some(5.0));
        assert_eq!(percentile(&s, 90.0), Some(9.0));
        assert_eq!(percentile(&s, 100.0), Some(10.0));
        assert_eq!(percentile(&s, 1.0), Some(1.0));
        assert_eq!(percentile(&[7.5], 50.0), Some(7.5));
        assert_eq!(percentile(&[], 50.0), None);
        let p = Percentiles::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((p.p50, p.p90, p.max, p.count), (2.0, 3.0, 3.0, 3));
    }

    fn failover(seconds: &[f64], primaries: usize, lost: u64) -> MassFailover {
        MassFailover {
            killed_node: "node-2".into(),
            primaries,
            seconds: Percentiles::of(seconds),
            not_promoted: (seconds.len()..primaries)
                .map(|i| format!("v{i}"))
                .collect(),
            checks: vec![SampleCheck {
                volume: "v0".into(),
                writes_durable: 40,
                writes_verified: 40,
                lost,
                error: (lost > 0).then(|| "LOST".into()),
            }],
        }
    }

    fn row(volumes: usize, api_per_s: f64) -> ScaleRow {
        ScaleRow {
            volumes,
            ready: Some(ReadyTimes {
                created_s: 2.0,
                half_s: Some(20.0),
                p90_s: Some(40.0),
                all_s: Some(60.0),
                ready: volumes,
            }),
            idle: Some(IdleCost {
                judged_cpu_ms_per_s: 120.0,
                rss_per_replica_mib: Some(0.2),
                api_total_per_s: api_per_s,
                ..IdleCost::default()
            }),
            failover: Some(failover(&[1.0, 2.0, 3.0], 3, 0)),
            ..ScaleRow::default()
        }
    }

    fn missed(v: &[Verdict]) -> Vec<&str> {
        v.iter()
            .filter(|v| !v.met)
            .map(|v| v.target.as_str())
            .collect()
    }

    #[test]
    fn a_row_within_every_target_misses_none() {
        let v = row(100, 15.0).verdicts();
        assert_eq!(v.len(), 7);
        assert!(missed(&v).is_empty(), "{v:?}");
    }

    #[test]
    fn each_target_is_missed_on_its_own_measurement() {
        let mut r = row(500, 15.0);
        r.ready.as_mut().unwrap().all_s = Some(301.0);
        r.idle.as_mut().unwrap().judged_cpu_ms_per_s = 301.0;
        r.idle.as_mut().unwrap().rss_per_replica_mib = Some(0.51);
        let m = missed(&r.verdicts()).len();
        assert_eq!(m, 3);

        let mut r = row(500, 15.0);
        r.failover = Some(failover(&[1.0, 6.0, 6.0], 3, 0));
        assert_eq!(
            missed(&r.verdicts()),
            vec!["500 volumes: promotion p50 ≤ 5 s"]
        );
        r.failover = Some(failover(&[1.0, 2.0, 11.0], 3, 0));
        assert_eq!(
            missed(&r.verdicts()),
            vec!["500 volumes: promotion max ≤ 10 s"]
        );
    }

    #[test]
    fn a_volume_never_promoted_misses_the_promotion_and_max_targets() {
        let mut r = row(500, 15.0);
        r.failover = Some(failover(&[1.0, 2.0], 3, 0));
        assert_eq!(
            missed(&r.verdicts()),
            vec![
                "500 volumes: every primary of the killed agent promoted",
                "500 volumes: promotion max ≤ 10 s"
            ]
        );
    }

    #[test]
    fn a_lost_write_or_a_failed_checker_is_missed_and_listed() {
        let mut r = row(500, 15.0);
        r.failover = Some(failover(&[1.0], 1, 2));
        assert_eq!(
            missed(&r.verdicts()),
            vec!["500 volumes: lost-write checker finds 0 lost"]
        );
        let rows = ScaleRows {
            rows: vec![r],
            ..ScaleRows::default()
        };
        let mut md = String::new();
        rows.markdown(&mut md);
        assert!(md.contains("- checker on v0 (500 volumes): LOST"), "{md}");
        assert!(
            md.contains("MISSED 500 volumes: lost-write checker"),
            "{md}"
        );
    }

    #[test]
    fn a_row_that_never_got_ready_misses_without_a_number() {
        let mut r = row(500, 15.0);
        r.ready.as_mut().unwrap().all_s = None;
        r.ready.as_mut().unwrap().ready = 420;
        let v = r.verdicts();
        assert!(!v[0].met);
        assert_eq!(v[0].measured, "420 of 500 Ready when the wait ended");
    }

    #[test]
    fn idle_api_rate_is_judged_largest_count_against_smallest() {
        let rows = |small: f64, large: f64| ScaleRows {
            rows: vec![row(100, small), row(500, large)],
            ..ScaleRows::default()
        };
        let judged = |r: ScaleRows| r.verdicts().last().unwrap().met;
        assert!(judged(rows(15.0, 20.5)));
        assert!(!judged(rows(15.0, 21.0)));
        // One row has nothing to compare with.
        let one = ScaleRows {
            rows: vec![row(100, 15.0)],
            ..ScaleRows::default()
        };
        assert_eq!(one.verdicts().len(), 7);
    }

    #[test]
    fn markdown_has_a_column_per_count_and_every_verdict() {
        let mut a = row(100, 15.0);
        a.idle
            .as_mut()
            .unwrap()
            .cpu_ms_per_s
            .insert("etcd".into(), 20.0);
        let rows = ScaleRows {
            rows: vec![a, row(500, 30.0)],
            ..ScaleRows::default()
        };
        let mut md = String::new();
        rows.markdown(&mut md);
        assert!(md.contains("| | 100 volumes | 500 volumes |"), "{md}");
        assert!(md.contains("| idle CPU ms/s: etcd | 20.0 | — |"), "{md}");
        assert!(md.contains("| all Ready, s | 60.0 | 60.0 |"), "{md}");
        assert_eq!(
            md.matches("\n- MET ").count() + md.matches("\n- MISSED ").count(),
            15
        );
        assert!(md.contains("MISSED idle API requests/s"), "{md}");

        // A row that never reached its idle window shows no request counts, not zeros.
        let mut b = row(500, 30.0);
        b.idle = None;
        let mut a = row(100, 15.0);
        a.idle
            .as_mut()
            .unwrap()
            .api_requests_per_s
            .insert("APPLY leases".into(), 4.0);
        let rows = ScaleRows {
            rows: vec![a, b],
            ..ScaleRows::default()
        };
        let mut md = String::new();
        rows.markdown(&mut md);
        assert!(
            md.contains("| idle API/s: APPLY leases | 4.00 | — |"),
            "{md}"
        );
    }
}
