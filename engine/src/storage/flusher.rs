//! The flusher: moves WAL data into the extent and frees WAL space.
//!
//! One cycle: under the append lock, take the head LSN H and a copy of the dirty map
//! (every run in it has LSN <= H); make the WAL durable up to H; persist `copied_lsn` H
//! in the superblock; copy each run into the extent; sync; drop runs <= H from the dirty
//! map; persist the superblock with checkpoint H and the new tail; only then let writers
//! reuse the freed space. Copying only durable entries means a crash can never leave
//! extent blocks newer than the WAL that explains them; persisting `copied_lsn` first
//! means that after a crash between the copy and the checkpoint, the volume knows the
//! extent may hold entries past its checkpoint (a truncation below them must repair
//! those blocks first, see `Volume::truncate_after`); persisting the tail before reuse
//! means recovery never starts from overwritten records. The tail stops at the
//! retention floor, and nothing is copied while a base image pins the extent.
//!
//! H is capped by the extent limit (the retention floor a primary last set, persisted in
//! the superblock): the extent never holds an entry some member may lack, so a primary
//! demoted later drops its unreplicated suffix with a plain truncation. Behind the
//! checkpoint the tail also keeps a bounded WAL history (`wal_history_ms`,
//! `wal_history_bytes_max`), on every volume and whatever its role, so that a replica
//! promoted later can catch up members behind it from its own WAL instead of rebuilding
//! them. History is the first thing freed: it never leaves the needed entries above the
//! soft watermark, never exceeds half of it, and is dropped whenever a writer waits for
//! space. Recovery replays only entries past the checkpoint; history entries are indexed
//! (readable, epochs known) but never reapplied.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::storage::dirty_map::DirtyMap;
use crate::storage::volume::{Inner, WalState, lock, read, write};
use crate::types::{Epoch, Lsn, WalPos};

impl Inner {
    /// Body of the flusher thread: a cycle every `flush_interval_ms`, or sooner when
    /// kicked, until shutdown.
    pub(crate) fn flusher_loop(&self) {
        let interval = Duration::from_millis(self.cfg.flush_interval_ms);
        loop {
            {
                let mut c = lock(&self.ctl);
                if !c.shutdown && !c.kick {
                    c = self
                        .ctl_cv
                        .wait_timeout(c, interval)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if c.shutdown {
                    break;
                }
                c.kick = false;
            }
            if self.gc.failed().is_some() {
                continue;
            }
            if let Err(e) = self.flush_cycle() {
                tracing::warn!(file = %self.disk.describe(), error = %e, "flusher cycle failed");
                // Writers waiting for space must learn about the failure now, not at
                // their timeout.
                drop(lock(&self.wal));
                self.space_cv.notify_all();
            }
        }
    }

    /// One flusher cycle (see the module docs). A no-op while a base image is pinned,
    /// during a rebuild, or when there is nothing to move.
    pub(crate) fn flush_cycle(&self) -> Result<()> {
        let _cycle = lock(&self.flush_cycle);
        self.gc.check()?;
        if lock(&self.ctl).base_pins > 0 {
            return Ok(());
        }
        let checkpoint = self.checkpoint_lsn.load(Ordering::Acquire);
        let floor = self.retention_floor.load(Ordering::Acquire);
        let limit = self.extent_limit.load(Ordering::Acquire);
        let now = Instant::now();
        let new_tail = |st: &WalState, h: u64| {
            let mut keep = h + 1;
            if floor != 0 {
                keep = keep.min(floor);
            }
            self.history_start(st, keep, now).max(st.tail_lsn)
        };
        let (h, runs) = {
            let st = lock(&self.wal);
            if st.rebuilding {
                return Ok(());
            }
            {
                let mut marks = lock(&self.history_marks);
                if marks.back().is_none_or(|m| m.0 < st.head_lsn) {
                    marks.push_back((st.head_lsn, now));
                }
            }
            // The extent limit (a primary's retention floor: the lowest LSN every
            // member has made durable) caps the checkpoint, so a primary that is
            // demoted later can drop an unreplicated suffix without repairing its
            // extent.
            let h = if limit != 0 {
                st.head_lsn.min(limit).max(checkpoint)
            } else {
                st.head_lsn
            };
            // Nothing to copy, the tail cannot move, and both superblock copies
            // already agree on the tail.
            if h == checkpoint && new_tail(&st, h) == st.tail_lsn && st.free_from == st.tail_pos {
                return Ok(());
            }
            let runs = if h == st.head_lsn {
                read(&self.map).runs()
            } else {
                // The dirty map keeps only the newest entry per block; the entries up to
                // the cap are replayed from the index instead.
                let mut m = DirtyMap::new(self.layout.block_size);
                for e in st.index.iter().filter(|e| e.lsn > checkpoint && e.lsn <= h) {
                    e.apply(&mut m);
                }
                m.runs()
            };
            (h, runs)
        };
        debug_assert!(h >= checkpoint, "the checkpoint never moves backwards");
        if h > checkpoint {
            self.sync_to(h)?;
            if lock(&self.sb).copied_lsn.0 < h {
                let prev_tail = self.persist(|sb| sb.copied_lsn = Lsn(h))?;
                lock(&self.wal).note_persisted(prev_tail);
            }
            // Only durable entries reach the extent, and only once `copied_lsn` says so.
            debug_assert!(
                self.gc.durable() >= h,
                "the flusher copies only durable entries"
            );
            debug_assert!(
                lock(&self.sb).copied_lsn.0 >= h,
                "copied_lsn is persisted before the copy"
            );
            debug_assert!(
                runs.iter().all(|r| r.lsn <= h),
                "a cycle copies only entries up to H"
            );
            let copied = self.write_extent_runs(runs.iter().map(|r| (r.start, r.end, r.src)));
            if let Err(e) = copied {
                let err = self.io_err(e);
                self.gc
                    .poison(format!("flusher failed to write the extent: {err}"));
                return Err(err);
            }
            write(&self.map).remove_up_to(h);
        }
        let (tail_pos, tail_lsn, tail_gen, ck_epoch) = {
            let st = lock(&self.wal);
            let t = new_tail(&st, h);
            debug_assert!(
                t <= (h + 1).max(st.tail_lsn) && (floor == 0 || t <= floor.max(st.tail_lsn)),
                "the tail never passes the checkpoint or the retention floor"
            );
            let ck_epoch = st.entry(h).map(|e| Epoch(e.epoch));
            match st.entry(t) {
                Some(e) => (e.pos, t, e.wal_gen, ck_epoch),
                None => (st.head_pos, t, st.wal_gen, ck_epoch),
            }
        };
        let prev_tail = self.persist(|sb| {
            sb.checkpoint_lsn = Lsn(h);
            sb.extent_limit_lsn = Lsn(limit);
            sb.wal_tail_pos = WalPos(tail_pos);
            sb.wal_tail_lsn = Lsn(tail_lsn);
            sb.wal_tail_gen = tail_gen;
            if let Some(e) = ck_epoch {
                sb.checkpoint_epoch = e;
            }
        })?;
        {
            let _reclaim = write(&self.reclaim);
            let mut st = lock(&self.wal);
            while st.index.front().is_some_and(|e| e.lsn < tail_lsn) {
                st.index.pop_front();
            }
            st.tail_pos = tail_pos;
            st.tail_lsn = tail_lsn;
            st.note_persisted(prev_tail);
            self.checkpoint_lsn.store(h, Ordering::Release);
            self.retained_start.store(tail_lsn, Ordering::Release);
            lock(&self.history_marks).retain(|m| m.0 >= tail_lsn);
        }
        self.space_cv.notify_all();
        // The copy just overwritten still holds the old tail, so the freed space is not
        // reusable yet; write the other copy too, so writers get it now rather than
        // one cycle later.
        let lagging = {
            let st = lock(&self.wal);
            st.free_from < st.tail_pos
        };
        if lagging {
            let prev_tail = self.persist(|_| {})?;
            lock(&self.wal).note_persisted(prev_tail);
            self.space_cv.notify_all();
        }
        self.flusher_cycles.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(checkpoint = h, tail_lsn, "flusher cycle done");
        Ok(())
    }

    /// The lowest LSN the WAL history keeps when everything from `keep` on is kept
    /// anyway (unflushed, or at or above the retention floor): entries younger than
    /// `wal_history_ms`, within `wal_history_bytes_max`, at most half the soft
    /// watermark, never more than leaves the kept entries under the soft watermark, and
    /// none at all while a writer waits for space: history is the first thing freed.
    fn history_start(&self, st: &WalState, keep: u64, now: Instant) -> u64 {
        let cfg = &self.cfg;
        if cfg.wal_history_ms == 0 || cfg.wal_history_bytes_max == 0 || st.waiting_writers > 0 {
            return keep;
        }
        let budget = Duration::from_millis(cfg.wal_history_ms);
        let mut start = st.tail_lsn;
        for &(lsn, at) in lock(&self.history_marks).iter() {
            if now.saturating_duration_since(at) <= budget {
                break;
            }
            start = start.max(lsn + 1);
        }
        if start >= keep {
            return keep;
        }
        let soft = self.layout.wal_size * u64::from(cfg.wal_soft_watermark_pct) / 100;
        let keep_pos = st.entry(keep).map_or(st.head_pos, |e| e.pos);
        let needed = st.head_pos - keep_pos;
        let allowed = cfg
            .wal_history_bytes_max
            .min(soft / 2)
            .min(soft.saturating_sub(needed));
        let i = st
            .index
            .partition_point(|e| e.lsn < start || keep_pos.saturating_sub(e.pos) > allowed);
        st.index.get(i).map_or(keep, |e| e.lsn.min(keep))
    }
}
