//! Recovery planner and executors. The planner classifies a reconnecting replica from the
//! primary's retained history (zero gap, catch-up, rebuild), acquires the pins the recovery
//! needs and returns a plan that binds its targets; executors consume the plan without
//! re-deriving anything, and every exit path releases every pin (logged as
//! `exec_resources_released`).

use super::retention::{HoldId, Pinner};
use super::storage::{BaseKind, BasePin, ReplicaLog};
use super::types::{Epoch, Lsn, ReplicaId};
use super::wire::Body;
use super::{Error, Result};

/// The primary's retained history at handshake time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedHistory {
    pub epoch: Epoch,
    pub head: Lsn,
    pub retained_start: Lsn,
    pub checkpoint: Lsn,
    pub checkpoint_trusted: bool,
}

impl RetainedHistory {
    pub fn from_log(log: &dyn ReplicaLog, epoch: Epoch) -> Self {
        Self {
            epoch,
            head: log.head_lsn(),
            retained_start: log.retained_start(),
            checkpoint: log.checkpoint_lsn(),
            checkpoint_trusted: log.checkpoint_trusted(),
        }
    }
}

/// What the replica said in the reconnect handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeReply {
    /// Durable R.
    pub flushed: Lsn,
    /// Epoch of the replica's entry at R (log-matching check).
    pub flushed_epoch: Epoch,
    /// Highest LSN received (may exceed R by unsynced entries).
    pub received: Lsn,
    pub checkpoint: Lsn,
    pub replica_epoch: Epoch,
}

/// Drop the replica's entries after `after`; it verifies its entry there has `expect_epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub after: Lsn,
    pub expect_epoch: Epoch,
}

/// Handshake classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The replica knows a newer epoch: this primary is stale.
    Fenced {
        replica_epoch: Epoch,
    },
    /// Nothing to copy; a barrier grants InSync.
    ZeroGap {
        from: Lsn,
        truncate: Option<Truncation>,
    },
    /// Replay (from, target] with a frozen target.
    CatchUp {
        from: Lsn,
        target: Lsn,
        truncate: Option<Truncation>,
    },
    NeedsRebuild {
        reason: &'static str,
    },
}

/// Classifies a handshake. The matrix: R = H zero gap; S <= R+1 <= H catch-up over
/// (R, H] with H frozen; R+1 < S rebuild; R > H truncate the suffix when the replica can
/// (its checkpoint is not past H) - those entries were never acknowledged, because every ack
/// needed this primary's history - otherwise rebuild. Before any reuse of the replica's
/// prefix, its entry at the resume point must carry the same epoch as ours (log matching),
/// and unsynced entries above R are truncated since they may come from an older primary.
/// When our entry there is newer than the replica's (a demoted primary's unreplicated
/// suffix), the replica is truncated where the two histories part and caught up from
/// there (see `resume_below_divergence`).
pub fn classify_handshake(
    h: &HandshakeReply,
    hist: &RetainedHistory,
    epoch_at: &dyn Fn(Lsn) -> Option<Epoch>,
    catchup_entries_max: u64,
) -> Outcome {
    if h.replica_epoch > hist.epoch {
        return Outcome::Fenced {
            replica_epoch: h.replica_epoch,
        };
    }
    let r = h.flushed;
    if r > hist.head && epoch_at(hist.head).is_some_and(|e| e > h.flushed_epoch) {
        // Our entry at our head is newer than anything the replica has: its suffix
        // diverged further down.
        return resume_below_divergence(h, hist, epoch_at, catchup_entries_max);
    }
    if r > hist.head {
        if h.checkpoint > hist.head {
            return Outcome::NeedsRebuild {
                reason: "replica ahead of primary and its suffix is already in its extent",
            };
        }
        let Some(e) = epoch_at(hist.head) else {
            return Outcome::NeedsRebuild {
                reason: "replica ahead of primary and head epoch unknown",
            };
        };
        return Outcome::ZeroGap {
            from: hist.head,
            truncate: Some(Truncation {
                after: hist.head,
                expect_epoch: e,
            }),
        };
    }
    if r.next() < hist.retained_start {
        return Outcome::NeedsRebuild {
            reason: "replica needs WAL older than the retained start",
        };
    }
    match epoch_at(r) {
        Some(e) if e == h.flushed_epoch => {}
        Some(e) if e > h.flushed_epoch => {
            return resume_below_divergence(h, hist, epoch_at, catchup_entries_max);
        }
        Some(_) => {
            return Outcome::NeedsRebuild {
                reason: "replica history diverged (epoch at its flushed LSN differs)",
            };
        }
        None => {
            return Outcome::NeedsRebuild {
                reason: "cannot verify the replica's history at its flushed LSN",
            };
        }
    }
    let truncate = (h.received > r).then_some(Truncation {
        after: r,
        expect_epoch: h.flushed_epoch,
    });
    resume_from(r, truncate, hist, catchup_entries_max)
}

/// A replica whose entries at its flushed LSN are older than ours there (typically a
/// demoted primary with a suffix it never replicated): its log and ours share a prefix up
/// to some LSN `d`, and the best candidate is the highest retained `d <= min(R, H)` whose
/// epoch here is not newer than the replica's epoch at R (epochs never decrease along a
/// log). The replica drops everything after `d` only if its own entry at `d` carries the
/// same epoch (it refuses otherwise, and is rebuilt), then catches up over (d, H]. Entries
/// with one epoch all come from that epoch's single primary, so equal (LSN, epoch) means
/// equal entry. Its extent must not hold anything past `d` (checkpoint <= d).
fn resume_below_divergence(
    h: &HandshakeReply,
    hist: &RetainedHistory,
    epoch_at: &dyn Fn(Lsn) -> Option<Epoch>,
    catchup_entries_max: u64,
) -> Outcome {
    let shared = |l: Lsn| epoch_at(l).is_some_and(|e| e <= h.flushed_epoch);
    let mut lo = Lsn(hist.retained_start.0.saturating_sub(1));
    if epoch_at(lo).is_none() {
        lo = hist.retained_start;
    }
    let mut hi = h.flushed.min(hist.head);
    if lo > hi || !shared(lo) {
        return Outcome::NeedsRebuild {
            reason: "replica history diverged before the retained start",
        };
    }
    // Invariant: shared(lo); the answer is in [lo, hi].
    while lo < hi {
        let mid = Lsn(lo.0 + (hi.0 - lo.0).div_ceil(2));
        if shared(mid) {
            lo = mid;
        } else {
            hi = Lsn(mid.0 - 1);
        }
    }
    let d = lo;
    if h.checkpoint > d {
        return Outcome::NeedsRebuild {
            reason: "replica history diverged and its diverged entries are in its extent",
        };
    }
    let Some(expect_epoch) = epoch_at(d) else {
        return Outcome::NeedsRebuild {
            reason: "cannot verify the replica's history at the divergence point",
        };
    };
    let truncate = Some(Truncation {
        after: d,
        expect_epoch,
    });
    resume_from(d, truncate, hist, catchup_entries_max)
}

/// The outcome for a replica whose log matches ours up to `from` (after dropping what
/// `truncate` names): nothing to send when `from` is our head, else a catch-up over
/// (from, head] unless that range exceeds `catchup_entries_max`.
fn resume_from(
    from: Lsn,
    truncate: Option<Truncation>,
    hist: &RetainedHistory,
    catchup_entries_max: u64,
) -> Outcome {
    if from == hist.head {
        return Outcome::ZeroGap { from, truncate };
    }
    if hist.head.0 - from.0 > catchup_entries_max {
        return Outcome::NeedsRebuild {
            reason: "catch-up range exceeds catchup_entries_max",
        };
    }
    Outcome::CatchUp {
        from,
        target: hist.head,
        truncate,
    }
}

/// Structured recovery log entry kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    SessionStarted,
    HandshakeClassified(String),
    PlanCreated(String),
    PinFailed(String),
    CatchUpProgress { flushed: Lsn, target: Lsn },
    SessionCompleted,
    SessionInvalidated { reason: String },
    ExecResourcesReleased { holds: usize, base_pins: usize },
    EscalatedNeedsRebuild { reason: String },
    StateChanged { from: String, to: String },
}

impl EventKind {
    /// Stable snake_case name for logs and assertions.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SessionStarted => "session_started",
            EventKind::HandshakeClassified(_) => "handshake_classified",
            EventKind::PlanCreated(_) => "plan_created",
            EventKind::PinFailed(_) => "pin_failed",
            EventKind::CatchUpProgress { .. } => "catchup_progress",
            EventKind::SessionCompleted => "session_completed",
            EventKind::SessionInvalidated { .. } => "session_invalidated",
            EventKind::ExecResourcesReleased { .. } => "exec_resources_released",
            EventKind::EscalatedNeedsRebuild { .. } => "escalated_needs_rebuild",
            EventKind::StateChanged { .. } => "state_changed",
        }
    }
}

/// One structured recovery log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryEvent {
    pub at_ms: u64,
    pub replica: ReplicaId,
    pub session: u64,
    pub kind: EventKind,
}

/// What a plan does, with its targets bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanKind {
    CatchUp { from: Lsn, target: Lsn },
    Rebuild { base: BasePin, target: Lsn },
}

/// A recovery plan: bound targets plus the pins it owns. Only `release_plan` ends it.
#[derive(Debug)]
#[must_use = "a plan owns pins; pass it to an executor or release_plan"]
pub struct RecoveryPlan {
    replica: ReplicaId,
    session: u64,
    kind: PlanKind,
    holds: Vec<HoldId>,
    base_pin: Option<BasePin>,
}

impl RecoveryPlan {
    pub fn replica(&self) -> &ReplicaId {
        &self.replica
    }
    pub fn session(&self) -> u64 {
        self.session
    }
    pub fn kind(&self) -> &PlanKind {
        &self.kind
    }
    pub fn holds(&self) -> &[HoldId] {
        &self.holds
    }
}

/// Plans a catch-up over (from, target]: holds WAL from `from` (entry `from` kept for the
/// log-matching check).
pub fn plan_catch_up(
    replica: &ReplicaId,
    session: u64,
    from: Lsn,
    target: Lsn,
    pinner: &mut Pinner,
    log: &dyn ReplicaLog,
) -> Result<RecoveryPlan> {
    let hold = pinner.hold_wal(replica, from, log.retained_start())?;
    Ok(RecoveryPlan {
        replica: replica.clone(),
        session,
        kind: PlanKind::CatchUp { from, target },
        holds: vec![hold],
        base_pin: None,
    })
}

/// Plans a rebuild: a trusted checkpoint snapshot plus its WAL tail when the tail is still
/// retained, otherwise the full base. Target = head now (frozen).
pub fn plan_rebuild(
    replica: &ReplicaId,
    session: u64,
    pinner: &mut Pinner,
    log: &mut dyn ReplicaLog,
) -> Result<RecoveryPlan> {
    let checkpoint = log.checkpoint_lsn();
    let snapshot_ok = log.checkpoint_trusted()
        && checkpoint > Lsn(0)
        && log.retained_start() <= checkpoint.next();
    let target = log.head_lsn();
    let (base, h, target) = if snapshot_ok {
        let base = log.pin_base(BaseKind::Snapshot)?;
        match pinner.hold_snapshot(replica, base.base_lsn, log.retained_start()) {
            Ok(h) => (base, h, target),
            Err(e) => {
                log.release_base(&base);
                return Err(e);
            }
        }
    } else {
        let base = log.pin_base(BaseKind::FullBase)?;
        let h = pinner.hold_full_base(replica);
        let target = target.max(base.base_lsn);
        (base, h, target)
    };
    Ok(RecoveryPlan {
        replica: replica.clone(),
        session,
        kind: PlanKind::Rebuild {
            base: base.clone(),
            target,
        },
        holds: vec![h],
        base_pin: Some(base),
    })
}

/// Releases every pin a plan owns and logs it.
pub fn release_plan(
    plan: RecoveryPlan,
    pinner: &mut Pinner,
    log: &mut dyn ReplicaLog,
    now_ms: u64,
    events: &mut Vec<RecoveryEvent>,
) {
    let mut holds = 0;
    for h in &plan.holds {
        if pinner.release(*h) {
            holds += 1;
        }
    }
    let mut base_pins = 0;
    if let Some(b) = &plan.base_pin {
        log.release_base(b);
        base_pins = 1;
    }
    events.push(RecoveryEvent {
        at_ms: now_ms,
        replica: plan.replica.clone(),
        session: plan.session,
        kind: EventKind::ExecResourcesReleased { holds, base_pins },
    });
}

/// Catch-up budget (named bounds, units last).
#[derive(Debug, Clone, Copy)]
pub struct CatchUpBudget {
    pub entries_max: u64,
    pub duration_ms_max: u64,
    pub progress_deadline_ms: u64,
}

/// Executes a catch-up plan step by step: a batch of entries, then a barrier whose reply is
/// the progress signal. Cannot go past the plan's frozen target.
#[derive(Debug)]
pub struct CatchUpExec {
    plan: RecoveryPlan,
    from: Lsn,
    target: Lsn,
    next: Lsn,
    acked: Lsn,
    entries_sent: u64,
    started_ms: u64,
    last_progress_ms: u64,
}

impl CatchUpExec {
    pub fn new(plan: RecoveryPlan, now_ms: u64) -> Result<Self> {
        let PlanKind::CatchUp { from, target } = plan.kind else {
            return Err(Error::Storage(
                "catch-up executor given a rebuild plan".into(),
            ));
        };
        Ok(Self {
            plan,
            from,
            target,
            next: from.next(),
            acked: from,
            entries_sent: 0,
            started_ms: now_ms,
            last_progress_ms: now_ms,
        })
    }
    pub fn target(&self) -> Lsn {
        self.target
    }
    pub fn from(&self) -> Lsn {
        self.from
    }
    pub fn session(&self) -> u64 {
        self.plan.session
    }
    /// Next batch of entries (empty once everything up to the target was sent) and the
    /// barrier LSN to ask for after it.
    pub fn next_batch(&mut self, log: &dyn ReplicaLog, batch_max: u64) -> Result<(Vec<Body>, Lsn)> {
        if self.next > self.target {
            return Ok((Vec::new(), self.target));
        }
        let want = (self.target.0 - self.next.0 + 1).min(batch_max.max(1));
        let entries = log.scan_from(self.next, usize::try_from(want).unwrap_or(usize::MAX))?;
        if entries.is_empty() {
            return Err(Error::Recycled {
                from: self.next,
                retained_start: log.retained_start(),
            });
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            self.next = e.lsn.next();
            out.push(Body::Entry(e));
        }
        self.entries_sent += out.len() as u64;
        Ok((out, Lsn(self.next.0.saturating_sub(1))))
    }
    /// Records durable progress; returns true once the frozen target is durable.
    pub fn on_progress(&mut self, flushed: Lsn, now_ms: u64) -> bool {
        if flushed > self.acked {
            self.acked = flushed.min(self.target);
            self.last_progress_ms = now_ms;
        }
        self.acked >= self.target
    }
    pub fn progress(&self) -> Lsn {
        self.acked
    }
    /// Budget violation, if any.
    pub fn over_budget(&self, b: &CatchUpBudget, now_ms: u64) -> Option<&'static str> {
        if self.entries_sent > b.entries_max {
            return Some("catch-up exceeded catchup_entries_max");
        }
        if now_ms.saturating_sub(self.started_ms) > b.duration_ms_max {
            return Some("catch-up exceeded catchup_duration_ms_max");
        }
        if now_ms.saturating_sub(self.last_progress_ms) > b.progress_deadline_ms {
            return Some("catch-up made no progress within catchup_progress_deadline_ms");
        }
        None
    }
    pub fn into_plan(self) -> RecoveryPlan {
        self.plan
    }
}

/// How far a rebuild's base copy is, in bytes of base blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl RebuildProgress {
    pub fn remaining(&self) -> u64 {
        self.bytes_total.saturating_sub(self.bytes_done)
    }
    /// Whole percent done (100 when there is nothing to copy).
    pub fn percent(&self) -> u8 {
        if self.bytes_total == 0 {
            return 100;
        }
        (self.bytes_done.min(self.bytes_total) * 100 / self.bytes_total) as u8
    }
}

/// Executes a rebuild plan: RebuildStart, base blocks, BaseDone, then the WAL tail
/// (base_lsn, target]; a barrier after every step paces it and proves progress.
#[derive(Debug)]
pub struct RebuildExec {
    plan: RecoveryPlan,
    base: BasePin,
    target: Lsn,
    started: bool,
    base_cursor: Option<u64>,
    base_blocks_sent: u64,
    /// Bytes of base blocks to ship (known once the transfer started) and shipped.
    base_bytes_total: u64,
    base_bytes_sent: u64,
    tail_next: Lsn,
    done_sent: bool,
    started_ms: u64,
    last_progress_ms: u64,
}

impl RebuildExec {
    pub fn new(plan: RecoveryPlan, now_ms: u64) -> Result<Self> {
        let PlanKind::Rebuild { base, target } = plan.kind.clone() else {
            return Err(Error::Storage(
                "rebuild executor given a catch-up plan".into(),
            ));
        };
        Ok(Self {
            plan,
            tail_next: base.base_lsn.next(),
            base,
            target,
            started: false,
            base_cursor: Some(0),
            base_blocks_sent: 0,
            base_bytes_total: 0,
            base_bytes_sent: 0,
            done_sent: false,
            started_ms: now_ms,
            last_progress_ms: now_ms,
        })
    }
    pub fn target(&self) -> Lsn {
        self.target
    }
    pub fn base_lsn(&self) -> Lsn {
        self.base.base_lsn
    }
    pub fn session(&self) -> u64 {
        self.plan.session
    }
    /// Restarts the transfer from scratch (a new connection: the replica starts over).
    pub fn restart(&mut self, now_ms: u64) {
        self.started = false;
        self.base_cursor = Some(0);
        self.base_blocks_sent = 0;
        self.base_bytes_sent = 0;
        self.tail_next = self.base.base_lsn.next();
        self.done_sent = false;
        self.last_progress_ms = now_ms;
    }
    /// Next step's messages and the barrier LSN to ask for after them: RebuildStart and
    /// the base blocks first, then BaseDone, then the WAL tail (base_lsn, target] - so the
    /// tail, being newer, always wins over the base.
    pub fn next_batch(
        &mut self,
        log: &dyn ReplicaLog,
        blocks_max: usize,
        entries_max: u64,
    ) -> Result<(Vec<Body>, Lsn)> {
        let session = self.plan.session;
        let mut out = Vec::new();
        if !self.started {
            self.base_bytes_total = log.base_bytes(&self.base)?;
            self.started = true;
            out.push(Body::RebuildStart {
                session,
                base_lsn: self.base.base_lsn,
                base_epoch: self.base.base_epoch,
                target: self.target,
                // Stamped with the primary's ReplicaID when the core sends it.
                primary: None,
                // The base skips blocks never written; the replica zeroes them.
                base_bytes: Some(self.base_bytes_total),
            });
        }
        if let Some(cursor) = self.base_cursor {
            let (blocks, next) = log.read_base(&self.base, cursor, blocks_max.max(1))?;
            self.base_blocks_sent += blocks.len() as u64;
            self.base_bytes_sent += blocks.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
            for (lba, data) in blocks {
                out.push(Body::BaseBlock { session, lba, data });
            }
            self.base_cursor = next;
            if next.is_none() {
                self.done_sent = true;
                out.push(Body::BaseDone {
                    session,
                    blocks: self.base_blocks_sent,
                });
                return Ok((out, self.base.base_lsn));
            }
            // The replica has no durable prefix while the base is copied.
            return Ok((out, Lsn(0)));
        }
        if self.tail_next <= self.target {
            let want = (self.target.0 - self.tail_next.0 + 1).min(entries_max.max(1));
            let entries =
                log.scan_from(self.tail_next, usize::try_from(want).unwrap_or(usize::MAX))?;
            if entries.is_empty() {
                return Err(Error::Recycled {
                    from: self.tail_next,
                    retained_start: log.retained_start(),
                });
            }
            for e in entries {
                self.tail_next = e.lsn.next();
                out.push(Body::Entry(e));
            }
        }
        Ok((
            out,
            Lsn(self.tail_next.0.saturating_sub(1)).max(self.base.base_lsn),
        ))
    }
    /// Base bytes shipped so far and in all (0 of 0 until the transfer started; a
    /// reconnect starts the count over, as the replica starts the base over).
    pub fn progress(&self) -> RebuildProgress {
        RebuildProgress {
            bytes_done: self.base_bytes_sent,
            bytes_total: self.base_bytes_total.max(self.base_bytes_sent),
        }
    }
    /// Base installed and the tail up to the target sent.
    pub fn finished(&self) -> bool {
        self.done_sent && self.tail_next > self.target
    }
    pub fn on_progress(&mut self, now_ms: u64) {
        self.last_progress_ms = now_ms;
    }
    pub fn over_budget(&self, progress_deadline_ms: u64, now_ms: u64) -> Option<&'static str> {
        if self.started && now_ms.saturating_sub(self.last_progress_ms) > progress_deadline_ms {
            return Some("rebuild made no progress within rebuild_progress_deadline_ms");
        }
        None
    }
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }
    pub fn into_plan(self) -> RecoveryPlan {
        self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(head: u64, start: u64) -> RetainedHistory {
        RetainedHistory {
            epoch: Epoch(2),
            head: Lsn(head),
            retained_start: Lsn(start),
            checkpoint: Lsn(start.saturating_sub(1)),
            checkpoint_trusted: true,
        }
    }
    fn reply(r: u64, recv: u64) -> HandshakeReply {
        HandshakeReply {
            flushed: Lsn(r),
            flushed_epoch: Epoch(1),
            received: Lsn(recv),
            checkpoint: Lsn(0),
            replica_epoch: Epoch(2),
        }
    }
    fn all_epoch_one(_: Lsn) -> Option<Epoch> {
        Some(Epoch(1))
    }

    #[test]
    fn handshake_r_equals_h_is_zero_gap() {
        let o = classify_handshake(&reply(10, 10), &hist(10, 1), &all_epoch_one, 1000);
        assert_eq!(
            o,
            Outcome::ZeroGap {
                from: Lsn(10),
                truncate: None
            }
        );
    }

    #[test]
    fn handshake_gap_within_retention_catches_up_to_frozen_head() {
        let o = classify_handshake(&reply(4, 4), &hist(10, 5), &all_epoch_one, 1000);
        assert_eq!(
            o,
            Outcome::CatchUp {
                from: Lsn(4),
                target: Lsn(10),
                truncate: None
            }
        );
    }

    #[test]
    fn handshake_gap_beyond_retention_needs_rebuild() {
        let o = classify_handshake(&reply(3, 3), &hist(10, 5), &all_epoch_one, 1000);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }));
    }

    #[test]
    fn handshake_replica_ahead_with_unflushed_extent_truncates_to_head() {
        let o = classify_handshake(&reply(12, 12), &hist(10, 1), &all_epoch_one, 1000);
        assert_eq!(
            o,
            Outcome::ZeroGap {
                from: Lsn(10),
                truncate: Some(Truncation {
                    after: Lsn(10),
                    expect_epoch: Epoch(1)
                })
            }
        );
    }

    #[test]
    fn handshake_replica_ahead_with_suffix_in_extent_needs_rebuild() {
        let mut r = reply(12, 12);
        r.checkpoint = Lsn(11);
        let o = classify_handshake(&r, &hist(10, 1), &all_epoch_one, 1000);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }));
    }

    #[test]
    fn handshake_replica_with_newer_epoch_fences_primary() {
        let mut r = reply(10, 10);
        r.replica_epoch = Epoch(3);
        let o = classify_handshake(&r, &hist(10, 1), &all_epoch_one, 1000);
        assert_eq!(
            o,
            Outcome::Fenced {
                replica_epoch: Epoch(3)
            }
        );
    }

    #[test]
    fn handshake_diverged_history_needs_rebuild() {
        let o = classify_handshake(&reply(6, 6), &hist(10, 1), &|_| Some(Epoch(2)), 1000);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }));
    }

    /// Our log: epoch 1 up to LSN 10, epoch 2 after (we were promoted at 11).
    fn promoted_at_11(l: Lsn) -> Option<Epoch> {
        Some(if l.0 <= 10 { Epoch(1) } else { Epoch(2) })
    }

    #[test]
    fn handshake_demoted_primary_with_unreplicated_suffix_truncates_at_the_divergence() {
        let expected = Outcome::CatchUp {
            from: Lsn(10),
            target: Lsn(20),
            truncate: Some(Truncation {
                after: Lsn(10),
                expect_epoch: Epoch(1),
            }),
        };
        // Behind our head, and ahead of it.
        for r in [12, 25] {
            let mut h = reply(r, r);
            h.checkpoint = Lsn(8);
            let o = classify_handshake(&h, &hist(20, 3), &promoted_at_11, 1000);
            assert_eq!(o, expected, "replica at {r}");
        }
    }

    #[test]
    fn handshake_diverged_suffix_in_the_extent_or_before_the_retained_start_needs_rebuild() {
        let mut h = reply(12, 12);
        h.checkpoint = Lsn(11);
        let o = classify_handshake(&h, &hist(20, 3), &promoted_at_11, 1000);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }), "{o:?}");
        let mut h = reply(12, 12);
        h.checkpoint = Lsn(8);
        let o = classify_handshake(&h, &hist(20, 12), &promoted_at_11, 1000);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }), "{o:?}");
    }

    #[test]
    fn handshake_unsynced_suffix_is_truncated_before_catch_up() {
        let o = classify_handshake(&reply(4, 8), &hist(10, 1), &all_epoch_one, 1000);
        assert_eq!(
            o,
            Outcome::CatchUp {
                from: Lsn(4),
                target: Lsn(10),
                truncate: Some(Truncation {
                    after: Lsn(4),
                    expect_epoch: Epoch(1)
                })
            }
        );
    }

    #[test]
    fn handshake_catch_up_over_entry_budget_needs_rebuild() {
        let o = classify_handshake(&reply(4, 4), &hist(100, 1), &all_epoch_one, 50);
        assert!(matches!(o, Outcome::NeedsRebuild { .. }));
    }

    use crate::replication::storage::MemLog;
    use crate::replication::types::{EntryKind, Lba};

    fn log_with(n: u64) -> MemLog {
        let mut m = MemLog::new();
        m.set_epoch(Epoch(1)).unwrap();
        for i in 0..n {
            m.append_local(EntryKind::Write, Lba(i % 7), 1, vec![i as u8; 8])
                .unwrap();
        }
        m.sync().unwrap();
        m
    }

    fn rid() -> ReplicaId {
        ReplicaId::new("r1").unwrap()
    }

    #[test]
    fn rebuild_plan_binds_its_source_even_if_storage_moves_on() {
        let mut log = log_with(20);
        log.flush_checkpoint();
        for i in 0..5 {
            log.append_local(EntryKind::Write, Lba(i), 1, vec![0xEE; 8])
                .unwrap();
        }
        let mut pinner = Pinner::new();
        let plan = plan_rebuild(&rid(), 7, &mut pinner, &mut log).unwrap();
        log.set_retention_floor(pinner.min_floor());
        let PlanKind::Rebuild { base, target } = plan.kind().clone() else {
            panic!("expected a rebuild plan");
        };
        assert_eq!(base.kind, BaseKind::Snapshot);
        // Storage history changes after planning.
        for i in 0..10 {
            log.append_local(EntryKind::Write, Lba(i), 1, vec![0xFF; 8])
                .unwrap();
        }
        log.sync().unwrap();
        log.flush_checkpoint();
        let mut exec = RebuildExec::new(plan, 0).unwrap();
        let (msgs, _) = exec.next_batch(&log, 1000, 1000).unwrap();
        match &msgs[0] {
            Body::RebuildStart {
                base_lsn,
                target: t,
                ..
            } => {
                assert_eq!(*base_lsn, base.base_lsn);
                assert_eq!(*base_lsn, Lsn(20));
                assert_eq!(*t, target);
                assert_eq!(*t, Lsn(25));
            }
            other => panic!("expected RebuildStart, got {other:?}"),
        }
        // The tail stops at the bound target, not the new head.
        let mut last = Lsn(0);
        while !exec.finished() {
            let (msgs, _) = exec.next_batch(&log, 1000, 3).unwrap();
            for m in msgs {
                if let Body::Entry(e) = m {
                    last = e.lsn;
                }
            }
        }
        assert_eq!(last, Lsn(25));
        let mut events = Vec::new();
        release_plan(exec.into_plan(), &mut pinner, &mut log, 1, &mut events);
        assert!(pinner.is_empty());
        assert_eq!(events[0].kind.name(), "exec_resources_released");
    }

    #[test]
    fn rebuild_without_a_usable_checkpoint_pins_the_full_base() {
        let mut log = log_with(5);
        let mut pinner = Pinner::new();
        let plan = plan_rebuild(&rid(), 1, &mut pinner, &mut log).unwrap();
        let PlanKind::Rebuild { base, target } = plan.kind().clone() else {
            panic!("expected a rebuild plan");
        };
        assert_eq!(base.kind, BaseKind::FullBase);
        assert_eq!(target, Lsn(5));
        assert_eq!(pinner.min_floor(), None, "a full base holds no WAL");
        let mut events = Vec::new();
        release_plan(plan, &mut pinner, &mut log, 0, &mut events);
    }

    #[test]
    fn rebuild_plan_pin_failure_leaves_no_hold() {
        let mut log = log_with(5);
        log.fail_pin_base = true;
        let mut pinner = Pinner::new();
        assert!(plan_rebuild(&rid(), 1, &mut pinner, &mut log).is_err());
        assert!(pinner.is_empty());
    }

    #[test]
    fn executors_refuse_plans_of_the_other_kind() {
        let mut log = log_with(5);
        let mut pinner = Pinner::new();
        let rebuild = plan_rebuild(&rid(), 1, &mut pinner, &mut log).unwrap();
        assert!(CatchUpExec::new(rebuild, 0).is_err());
        let catchup = plan_catch_up(&rid(), 2, Lsn(1), Lsn(5), &mut pinner, &log).unwrap();
        assert!(RebuildExec::new(catchup, 0).is_err());
    }

    #[test]
    fn catch_up_budget_counts_only_entries_it_ships() {
        let log = log_with(60);
        let mut pinner = Pinner::new();
        let b = CatchUpBudget {
            entries_max: 40,
            duration_ms_max: 1_000,
            progress_deadline_ms: 1_000,
        };
        // A replica at 30 needs 30 entries: within a budget of 40 despite its long prefix.
        let plan = plan_catch_up(&rid(), 1, Lsn(30), Lsn(60), &mut pinner, &log).unwrap();
        let mut exec = CatchUpExec::new(plan, 0).unwrap();
        while exec
            .next_batch(&log, 7)
            .map(|(m, _)| !m.is_empty())
            .unwrap()
        {}
        assert_eq!(exec.over_budget(&b, 1), None);
        // From 10 it needs 50: over budget.
        let plan = plan_catch_up(&rid(), 2, Lsn(10), Lsn(60), &mut pinner, &log).unwrap();
        let mut exec = CatchUpExec::new(plan, 0).unwrap();
        while exec
            .next_batch(&log, 7)
            .map(|(m, _)| !m.is_empty())
            .unwrap()
        {}
        assert!(exec.over_budget(&b, 1).is_some());
    }

    #[test]
    fn catch_up_progress_is_capped_at_the_frozen_target() {
        let log = log_with(20);
        let mut pinner = Pinner::new();
        let plan = plan_catch_up(&rid(), 1, Lsn(5), Lsn(10), &mut pinner, &log).unwrap();
        let mut exec = CatchUpExec::new(plan, 0).unwrap();
        assert!(!exec.on_progress(Lsn(8), 1));
        assert!(exec.on_progress(Lsn(19), 2));
        assert_eq!(exec.progress(), Lsn(10));
        let (msgs, barrier) = exec.next_batch(&log, 100).unwrap();
        assert_eq!(msgs.len(), 5, "shipped past the frozen target");
        assert_eq!(barrier, Lsn(10));
    }

    #[test]
    fn catch_up_without_progress_misses_its_deadline() {
        let log = log_with(20);
        let mut pinner = Pinner::new();
        let plan = plan_catch_up(&rid(), 1, Lsn(5), Lsn(10), &mut pinner, &log).unwrap();
        let exec = CatchUpExec::new(plan, 0).unwrap();
        let b = CatchUpBudget {
            entries_max: 100,
            duration_ms_max: 10_000,
            progress_deadline_ms: 50,
        };
        assert_eq!(exec.over_budget(&b, 50), None);
        assert!(exec.over_budget(&b, 51).unwrap().contains("progress"));
    }
}
