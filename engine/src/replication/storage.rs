//! The narrow storage contract the replication core needs (`ReplicaLog`), and an in-memory
//! implementation with power loss and fsync-failure injection used by unit tests and the
//! deterministic simulation. The real volume gets an adapter implementing the same trait.

use std::collections::BTreeMap;

use super::types::{EntryKind, Epoch, Lba, Lsn, WalEntry};
use super::{Error, Result};

/// Which base image a rebuild copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// The extent at the trusted checkpoint C (the WAL tail after C is replayed on top).
    Snapshot,
    /// The whole current extent image (no checkpoint needed).
    FullBase,
}

/// A pinned base image: it stays readable until released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasePin {
    pub id: u64,
    pub kind: BaseKind,
    /// Every entry up to and including this LSN is reflected in the base.
    pub base_lsn: Lsn,
    /// Epoch of the entry at `base_lsn` (the log-matching point for later handshakes).
    pub base_epoch: Epoch,
}

/// Base blocks read in one call, and the cursor to continue from (None = done).
pub type BaseChunk = (Vec<(Lba, Vec<u8>)>, Option<u64>);

/// Result of appending a replicated entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Appended,
    /// LSN at or below head: already have it, skipped.
    Duplicate,
}

/// Storage as the replication protocol sees it. Contract:
/// - LSNs are dense; `append_replicated` accepts exactly head+1 and skips <= head.
/// - `durable_lsn` only covers entries made durable by `sync` (or the flusher), and is 0
///   while a rebuild is unfinished (base blocks first, then the tail after it finished).
/// - `set_epoch` is durable before it returns.
/// - `truncate_after(l)` fails if `l` is below the checkpoint (those entries are in the
///   extent already).
/// - `epoch_at(l)` answers for 0, for the last checkpoint/base point, and for any entry
///   still in the log; `None` otherwise.
/// - `may_begin_primary_term(e)` is false for every epoch at or below the one the log
///   was reopened at after a crash or restart: no (epoch, LSN) is ever issued twice.
pub trait ReplicaLog {
    fn epoch(&self) -> Epoch;
    fn set_epoch(&mut self, epoch: Epoch) -> Result<()>;
    /// Whether a primary may start appending at `epoch` on this log. A log reopened
    /// after a crash may have lost entries it issued (and shipped) at its persisted epoch
    /// E; issuing their LSNs again at E would give one (epoch, LSN) two contents, which
    /// log matching cannot detect. So only epochs above E are allowed; the control plane
    /// supplies one (see [`crate::Volume::may_begin_primary_term`]).
    fn may_begin_primary_term(&self, epoch: Epoch) -> bool;
    fn head_lsn(&self) -> Lsn;
    fn durable_lsn(&self) -> Lsn;
    fn checkpoint_lsn(&self) -> Lsn;
    /// Whether the checkpoint's extent image can serve as a rebuild base.
    fn checkpoint_trusted(&self) -> bool;
    /// First LSN `scan_from` can still return (entries below were recycled).
    fn retained_start(&self) -> Lsn;
    fn epoch_at(&self, lsn: Lsn) -> Option<Epoch>;
    fn scan_from(&self, from: Lsn, max: usize) -> Result<Vec<WalEntry>>;
    fn append_replicated(&mut self, entry: &WalEntry) -> Result<AppendOutcome>;
    fn truncate_after(&mut self, lsn: Lsn) -> Result<()>;
    /// fsync; returns the durable LSN afterwards.
    fn sync(&mut self) -> Result<Lsn>;
    /// Entries at or above the floor must not be recycled.
    fn set_retention_floor(&mut self, floor: Option<Lsn>);
    fn pin_base(&mut self, kind: BaseKind) -> Result<BasePin>;
    /// Reads base blocks from `cursor`; returns the blocks and the next cursor (None = done).
    fn read_base(&self, pin: &BasePin, cursor: u64, max: usize) -> Result<BaseChunk>;
    /// Bytes of the blocks `read_base` will return for `pin` in total (blocks that
    /// read as zeros because nothing was ever written there are not shipped).
    fn base_bytes(&self, pin: &BasePin) -> Result<u64>;
    fn release_base(&mut self, pin: &BasePin);
    /// Discards all content and starts a rebuild; appends are refused until it finishes
    /// and a crash leaves an empty log marked as rebuilding.
    fn begin_rebuild(&mut self) -> Result<()>;
    fn install_base_block(&mut self, lba: Lba, data: &[u8]) -> Result<()>;
    /// Makes the base image durable as of `base_lsn` (whose entry had `base_epoch`) and
    /// ends the rebuild; the WAL tail is then appended from `base_lsn + 1`.
    fn finish_rebuild(&mut self, base_lsn: Lsn, base_epoch: Epoch) -> Result<()>;
    fn rebuilding(&self) -> bool;
}

type Blocks = BTreeMap<Lba, Vec<u8>>;
type PinnedBase = (BasePin, Vec<(Lba, Vec<u8>)>);

fn apply(state: &mut Blocks, e: &WalEntry) {
    match e.kind {
        EntryKind::Write => {
            let blocks = e.blocks.max(1) as usize;
            let bs = (e.data.len() / blocks).max(1);
            for (i, chunk) in e.data.chunks(bs).enumerate() {
                state.insert(Lba(e.lba.0 + i as u64), chunk.to_vec());
            }
        }
        EntryKind::Trim | EntryKind::Zero => {
            let end = Lba(e.lba.0.saturating_add(u64::from(e.blocks)));
            let doomed: Vec<Lba> = state.range(e.lba..end).map(|(k, _)| *k).collect();
            for k in doomed {
                state.remove(&k);
            }
        }
        EntryKind::Padding => {}
    }
}

/// In-memory `ReplicaLog`. Keeps every entry since its origin (the last rebuild base) so
/// tests can audit history; `retained_start` models what a real WAL would still hold.
#[derive(Debug, Clone, Default)]
pub struct MemLog {
    epoch: Epoch,
    origin: Lsn,
    origin_epoch: Epoch,
    origin_state: Blocks,
    entries: Vec<WalEntry>,
    durable: Lsn,
    checkpoint: Lsn,
    retained_start: Lsn,
    floor: Option<Lsn>,
    rebuilding: bool,
    /// The epoch persisted at the last `power_loss` (the log's reopen), if any.
    reopened_at: Option<Epoch>,
    rebuild_state: Blocks,
    pins: BTreeMap<u64, PinnedBase>,
    next_pin: u64,
    /// Fault injection: the next `sync` fails.
    pub fail_next_sync: bool,
    /// Fault injection: `pin_base` fails.
    pub fail_pin_base: bool,
    /// Modelled extent ahead of the checkpoint: after a power loss inside a flusher
    /// cycle, the blocks entries in (checkpoint, copied] wrote (`None` = zeros), which the
    /// extent holds although the checkpoint does not cover them. Empty, with `copied` =
    /// checkpoint, while the extent is exactly the checkpoint's state.
    ahead: BTreeMap<Lba, Option<Vec<u8>>>,
    copied: Lsn,
    /// Test-only: truncate without restoring the blocks in `ahead` (lets the simulation
    /// prove its checker catches resurrected writes). Never set in production.
    pub test_knob_skip_extent_repair: bool,
    /// WAL history the flusher keeps behind the checkpoint, in entries (the stand-in for
    /// the volume's time and byte budgets); kept across power loss and rebuilds.
    pub history_entries: u64,
    /// Mirrors the volume's extent limit: the retention floor last set, which caps the
    /// checkpoint; it survives a power loss and is cleared by replicated appends.
    extent_limit: Option<Lsn>,
    /// Test-only: no extent limit (the flusher copies up to the durable point, as before
    /// the limit existed), so crashed flusher cycles leave primaries' extents ahead for
    /// the simulation's checker to prove itself on. Never set in production.
    pub test_knob_no_extent_limit: bool,
}

impl MemLog {
    pub fn new() -> Self {
        Self {
            retained_start: Lsn(1),
            ..Default::default()
        }
    }

    /// Local write on a primary: assigns the next LSN at the current epoch. A write's
    /// `data` is `blocks` equal blocks; trims and zeroes carry none.
    pub fn append_local(
        &mut self,
        kind: EntryKind,
        lba: Lba,
        blocks: u32,
        data: Vec<u8>,
    ) -> Result<WalEntry> {
        if self.rebuilding {
            return Err(Error::Storage("volume is being rebuilt".into()));
        }
        let e = WalEntry {
            lsn: self.head_lsn().next(),
            epoch: self.epoch,
            kind,
            lba,
            blocks,
            data,
        };
        self.entries.push(e.clone());
        Ok(e)
    }

    /// The entry at `lsn`, if it is in this log's history (sim auditing).
    pub fn entry_at(&self, lsn: Lsn) -> Option<&WalEntry> {
        if lsn <= self.origin {
            return None;
        }
        let idx = usize::try_from(lsn.0 - self.origin.0 - 1).ok()?;
        self.entries.get(idx)
    }

    /// LSN below which this log has no entries (rebuild base or 0).
    pub fn origin(&self) -> Lsn {
        self.origin
    }

    /// Power loss: everything not durable is gone; an unfinished rebuild leaves nothing.
    pub fn power_loss(&mut self) {
        self.reopened_at = Some(self.epoch);
        if self.rebuilding {
            let (epoch, knob) = (self.epoch, self.test_knob_skip_extent_repair);
            let (history, no_limit) = (self.history_entries, self.test_knob_no_extent_limit);
            *self = MemLog::new();
            self.epoch = epoch;
            self.reopened_at = Some(epoch);
            self.test_knob_skip_extent_repair = knob;
            self.history_entries = history;
            self.test_knob_no_extent_limit = no_limit;
            return;
        }
        let keep = usize::try_from(self.durable.0 - self.origin.0).unwrap_or(usize::MAX);
        self.entries.truncate(keep);
        self.pins.clear();
    }

    /// Power loss inside a flusher cycle: the cycle had made the log durable up to its
    /// head, copied every entry past the checkpoint into the extent and synced it, but
    /// not yet persisted the new checkpoint.
    pub fn power_loss_inside_flush_cycle(&mut self) {
        if !self.rebuilding {
            self.durable = self.head_lsn();
        }
        let to = self.checkpoint_target();
        if !self.rebuilding && to > self.checkpoint {
            let from = self.checkpoint;
            let copied: Vec<WalEntry> = self
                .entries
                .iter()
                .filter(|e| e.lsn > from && e.lsn <= to)
                .cloned()
                .collect();
            for e in &copied {
                apply_ahead(&mut self.ahead, e);
            }
            self.copied = self.copied.max(to);
        }
        self.power_loss();
    }

    /// Highest LSN the modelled extent may hold (>= the checkpoint after a completed
    /// flusher cycle; higher after a power loss inside one).
    pub fn copied_lsn(&self) -> Lsn {
        self.copied.max(self.checkpoint)
    }

    /// What a volume reads: the extent (the checkpoint's state, with the blocks in
    /// `ahead` over it) with every entry after the checkpoint over that. Equals
    /// `state_at(head)` unless a truncation resurrected dropped writes.
    pub fn visible_state(&self) -> BTreeMap<Lba, Vec<u8>> {
        let mut s = self.state_at(self.checkpoint);
        for (lba, v) in &self.ahead {
            match v {
                Some(d) => s.insert(*lba, d.clone()),
                None => s.remove(lba),
            };
        }
        for e in self.entries.iter().filter(|e| e.lsn > self.checkpoint) {
            apply(&mut s, e);
        }
        s
    }

    /// What a volume reads at one block: `visible_state()` at `lba` without building
    /// the whole state (the simulation reads single blocks often).
    pub fn visible_block(&self, lba: Lba) -> Option<Vec<u8>> {
        let covers = |e: &WalEntry| {
            e.kind != EntryKind::Padding
                && lba >= e.lba
                && lba.0 < e.lba.0.saturating_add(u64::from(e.blocks.max(1)))
        };
        let block = |e: &WalEntry| {
            let mut s = Blocks::new();
            apply(&mut s, e);
            s.remove(&lba)
        };
        let newer = |e: &&WalEntry| e.lsn > self.checkpoint;
        if let Some(e) = self
            .entries
            .iter()
            .rev()
            .take_while(newer)
            .find(|e| covers(e))
        {
            return block(e);
        }
        if let Some(v) = self.ahead.get(&lba) {
            return v.clone();
        }
        match self
            .entries
            .iter()
            .rev()
            .skip_while(newer)
            .find(|e| covers(e))
        {
            Some(e) => block(e),
            None => self.origin_state.get(&lba).cloned(),
        }
    }

    /// Where a flusher cycle moves the checkpoint: the durable point, capped by the
    /// extent limit.
    fn checkpoint_target(&self) -> Lsn {
        let to = match self.extent_limit {
            Some(l) => self.durable.min(l.max(Lsn(1))),
            None => self.durable,
        };
        to.max(self.checkpoint)
    }

    /// The flusher: moves the checkpoint to the durable point (not past the extent
    /// limit) and recycles WAL entries below the checkpoint, the retention floor and the
    /// history.
    pub fn flush_checkpoint(&mut self) {
        if self.rebuilding {
            return;
        }
        self.checkpoint = self.checkpoint_target();
        if self.checkpoint >= self.copied {
            // A completed cycle copies everything up to the checkpoint.
            self.ahead.clear();
            self.copied = self.checkpoint;
        }
        let mut start = self.checkpoint.next();
        if let Some(f) = self.floor {
            start = start.min(f.max(Lsn(1)));
        }
        start = Lsn(start.0.saturating_sub(self.history_entries).max(1));
        self.retained_start = self.retained_start.max(start).max(self.origin.next());
    }

    /// Volume content after applying everything up to `lsn` (sim auditing and bases).
    pub fn state_at(&self, lsn: Lsn) -> BTreeMap<Lba, Vec<u8>> {
        let mut s = self.origin_state.clone();
        for e in &self.entries {
            if e.lsn > lsn {
                break;
            }
            apply(&mut s, e);
        }
        s
    }
}

impl MemLog {
    /// Mirrors `Volume::truncate_after`: a block in `ahead` that only dropped entries
    /// wrote since the checkpoint gets the checkpoint's content back if the retained WAL
    /// knows it (a retained entry at or below the checkpoint wrote it, or the WAL holds
    /// the whole history); otherwise the truncation is refused and nothing changes.
    fn restore_ahead_before_truncation(&mut self, lsn: Lsn) -> Result<()> {
        let written = |from: Lsn, to: Lsn, lba: Lba| {
            self.entries.iter().any(|e| {
                e.lsn > from
                    && e.lsn <= to
                    && lba >= e.lba
                    && lba.0 < e.lba.0.saturating_add(u64::from(e.blocks.max(1)))
            })
        };
        let whole_history = self.origin == Lsn(0) && self.retained_start <= Lsn(1);
        let retained_below = Lsn(self.retained_start.0.saturating_sub(1));
        let mut restore = Vec::new();
        for lba in self.ahead.keys() {
            if written(self.checkpoint, lsn, *lba) {
                continue; // the kept entries still cover it
            }
            if !whole_history && !written(retained_below, self.checkpoint, *lba) {
                return Err(Error::TruncateBelowCheckpoint {
                    lsn,
                    checkpoint: self.copied,
                });
            }
            restore.push(*lba);
        }
        for lba in restore {
            self.ahead.remove(&lba);
        }
        self.copied = lsn;
        Ok(())
    }
}

fn apply_ahead(ahead: &mut BTreeMap<Lba, Option<Vec<u8>>>, e: &WalEntry) {
    match e.kind {
        EntryKind::Write => {
            let blocks = e.blocks.max(1) as usize;
            let bs = (e.data.len() / blocks).max(1);
            for (i, chunk) in e.data.chunks(bs).enumerate() {
                ahead.insert(Lba(e.lba.0 + i as u64), Some(chunk.to_vec()));
            }
        }
        EntryKind::Trim | EntryKind::Zero => {
            for i in 0..u64::from(e.blocks) {
                ahead.insert(Lba(e.lba.0.saturating_add(i)), None);
            }
        }
        EntryKind::Padding => {}
    }
}

impl ReplicaLog for MemLog {
    fn epoch(&self) -> Epoch {
        self.epoch
    }
    fn set_epoch(&mut self, epoch: Epoch) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }
    fn may_begin_primary_term(&self, epoch: Epoch) -> bool {
        self.reopened_at.is_none_or(|e| epoch > e)
    }
    fn head_lsn(&self) -> Lsn {
        Lsn(self.origin.0 + self.entries.len() as u64)
    }
    fn durable_lsn(&self) -> Lsn {
        if self.rebuilding {
            Lsn(0)
        } else {
            self.durable
        }
    }
    fn checkpoint_lsn(&self) -> Lsn {
        self.checkpoint
    }
    fn checkpoint_trusted(&self) -> bool {
        !self.rebuilding
    }
    fn retained_start(&self) -> Lsn {
        self.retained_start
    }
    fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        if lsn == Lsn(0) {
            return Some(Epoch(0));
        }
        if lsn == self.origin {
            return Some(self.origin_epoch);
        }
        self.entry_at(lsn).map(|e| e.epoch)
    }
    fn scan_from(&self, from: Lsn, max: usize) -> Result<Vec<WalEntry>> {
        if from < self.retained_start {
            return Err(Error::Recycled {
                from,
                retained_start: self.retained_start,
            });
        }
        let mut out = Vec::new();
        let mut l = from;
        while out.len() < max {
            match self.entry_at(l) {
                Some(e) => out.push(e.clone()),
                None => break,
            }
            l = l.next();
        }
        Ok(out)
    }
    fn append_replicated(&mut self, entry: &WalEntry) -> Result<AppendOutcome> {
        let head = self.head_lsn();
        if entry.lsn <= head {
            return Ok(AppendOutcome::Duplicate);
        }
        if entry.lsn != head.next() {
            return Err(Error::Gap {
                expected: head.next(),
                got: entry.lsn,
            });
        }
        if self.rebuilding {
            return Err(Error::Storage(
                "appends are refused until the rebuild finishes".into(),
            ));
        }
        self.entries.push(entry.clone());
        self.extent_limit = None;
        Ok(AppendOutcome::Appended)
    }
    fn truncate_after(&mut self, lsn: Lsn) -> Result<()> {
        if lsn < self.checkpoint || lsn < self.origin {
            return Err(Error::TruncateBelowCheckpoint {
                lsn,
                checkpoint: self.checkpoint.max(self.origin),
            });
        }
        if lsn >= self.head_lsn() {
            return Ok(());
        }
        if self.copied > lsn && !self.test_knob_skip_extent_repair {
            self.restore_ahead_before_truncation(lsn)?;
        }
        let keep = usize::try_from(lsn.0 - self.origin.0).unwrap_or(usize::MAX);
        self.entries.truncate(keep);
        self.durable = self.durable.min(lsn);
        Ok(())
    }
    fn sync(&mut self) -> Result<Lsn> {
        if self.fail_next_sync {
            self.fail_next_sync = false;
            return Err(Error::FsyncFailed);
        }
        self.durable = self.head_lsn();
        Ok(self.durable_lsn())
    }
    fn set_retention_floor(&mut self, floor: Option<Lsn>) {
        self.floor = floor;
        if !self.test_knob_no_extent_limit {
            self.extent_limit = floor;
        }
    }
    fn pin_base(&mut self, kind: BaseKind) -> Result<BasePin> {
        if self.fail_pin_base {
            return Err(Error::Storage("base image cannot be pinned".into()));
        }
        if self.rebuilding {
            return Err(Error::Storage("volume is being rebuilt".into()));
        }
        let base_lsn = match kind {
            BaseKind::Snapshot => self.checkpoint,
            BaseKind::FullBase => self.head_lsn(),
        };
        let base_epoch = self
            .epoch_at(base_lsn)
            .ok_or_else(|| Error::Storage(format!("epoch of base LSN {base_lsn} unknown")))?;
        self.next_pin += 1;
        let pin = BasePin {
            id: self.next_pin,
            kind,
            base_lsn,
            base_epoch,
        };
        let blocks: Vec<(Lba, Vec<u8>)> = self.state_at(base_lsn).into_iter().collect();
        self.pins.insert(pin.id, (pin.clone(), blocks));
        Ok(pin)
    }
    fn read_base(&self, pin: &BasePin, cursor: u64, max: usize) -> Result<BaseChunk> {
        let (_, blocks) = self
            .pins
            .get(&pin.id)
            .ok_or(Error::UnknownBasePin(pin.id))?;
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        let chunk: Vec<(Lba, Vec<u8>)> = blocks.iter().skip(start).take(max).cloned().collect();
        let next = start + chunk.len();
        Ok((
            chunk,
            if next < blocks.len() {
                Some(next as u64)
            } else {
                None
            },
        ))
    }
    fn base_bytes(&self, pin: &BasePin) -> Result<u64> {
        let (_, blocks) = self
            .pins
            .get(&pin.id)
            .ok_or(Error::UnknownBasePin(pin.id))?;
        Ok(blocks.iter().map(|(_, d)| d.len() as u64).sum())
    }
    fn release_base(&mut self, pin: &BasePin) {
        self.pins.remove(&pin.id);
    }
    fn begin_rebuild(&mut self) -> Result<()> {
        let knob = self.test_knob_skip_extent_repair;
        let (epoch, history) = (self.epoch, self.history_entries);
        let no_limit = self.test_knob_no_extent_limit;
        *self = MemLog::new();
        self.epoch = epoch;
        self.rebuilding = true;
        self.test_knob_skip_extent_repair = knob;
        self.history_entries = history;
        self.test_knob_no_extent_limit = no_limit;
        Ok(())
    }
    fn install_base_block(&mut self, lba: Lba, data: &[u8]) -> Result<()> {
        if !self.rebuilding {
            return Err(Error::Storage("no rebuild in progress".into()));
        }
        self.rebuild_state.insert(lba, data.to_vec());
        Ok(())
    }
    fn finish_rebuild(&mut self, base_lsn: Lsn, base_epoch: Epoch) -> Result<()> {
        if !self.rebuilding {
            return Err(Error::Storage("no rebuild in progress".into()));
        }
        self.origin_state = std::mem::take(&mut self.rebuild_state);
        self.origin = base_lsn;
        self.origin_epoch = base_epoch;
        self.entries.clear();
        self.durable = base_lsn;
        self.checkpoint = base_lsn;
        self.copied = base_lsn;
        self.retained_start = base_lsn.next();
        self.rebuilding = false;
        Ok(())
    }
    fn rebuilding(&self) -> bool {
        self.rebuilding
    }
}
