//! A volume: one file holding a superblock pair, a circular WAL and an extent. Writes
//! append a WAL record and update the dirty map; `flush` makes everything appended so
//! far durable with one shared fdatasync (group commit); a background flusher copies WAL
//! data into the extent and advances the checkpoint and the WAL tail.
//!
//! Guarantees: LSNs are dense and assigned in WAL order, also under concurrent writers;
//! a flushed entry survives any crash; an entry that did not fully reach the disk is
//! never applied; the durable LSN only moves forward (except by an explicit truncation
//! or rebuild) and only after a sync; WAL space is reused only after the superblock that
//! releases it is durable, and never for entries at or above the retention floor. A
//! bounded WAL history behind the checkpoint is kept while no writer needs its space
//! (see the flusher). A failed fsync, WAL append write or extent write is fail-stop: the
//! volume refuses all IO until reopened and says why in `failure()`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::storage::dirty_map::{DirtyMap, Source};
use crate::storage::disk::{Disk, FileDisk};
use crate::storage::group_commit::GroupCommit;
use crate::storage::layout::Layout;
use crate::storage::recovery::{self, IndexEntry};
use crate::storage::superblock::{
    self, FLAG_REBUILD_IN_PROGRESS, SUPERBLOCK_SLOT_SIZE, Superblock,
};
use crate::storage::wal::{self, EntryKind, EntryRef, RECORD_OVERHEAD, RecordHeader, WalEntry};
use crate::types::{DurabilityMode, Epoch, Lba, Lsn, WalPos};

/// Geometry and identity of a new volume.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size_bytes: u64,
    pub block_size: u32,
    pub wal_size_bytes: u64,
    pub durability: DurabilityMode,
    pub epoch: Epoch,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size_bytes: 64 << 20,
            block_size: 4096,
            wal_size_bytes: 64 << 20,
            durability: DurabilityMode::SyncAll,
            epoch: Epoch(0),
        }
    }
}

/// Runtime settings of an open volume (not persisted).
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// How often the flusher runs when nobody kicks it.
    pub flush_interval_ms: u64,
    /// How long a writer waits for WAL space without any being freed before failing with
    /// `WalFull`. The wait restarts whenever the flusher frees space, so a writer behind a
    /// slow but moving WAL waits as long as it takes. On a replicated primary this must
    /// exceed the replication `barrier_timeout_ms`: a stuck replica pins the WAL until
    /// its barrier times out and its retention budget escalates it to NeedsRebuild.
    pub wal_full_timeout_ms: u64,
    /// WAL fill level (percent) above which every append kicks the flusher.
    pub wal_soft_watermark_pct: u8,
    /// WAL fill level (percent) above which writers wait for the flusher.
    pub wal_hard_watermark_pct: u8,
    /// Batching window before a group-commit leader syncs (0 = sync at once).
    pub group_commit_max_delay_us: u64,
    /// Largest data payload of one WAL entry; longer writes become several entries.
    /// Capped at 1/8 of the WAL.
    pub max_entry_bytes: u64,
    /// WAL history: the flusher keeps entries behind the checkpoint that are younger than
    /// this (ms), so that this volume, once promoted, can catch up members that are a
    /// little behind it instead of rebuilding them. 0 keeps no history.
    pub wal_history_ms: u64,
    /// Most WAL bytes the history may occupy. It never holds more than half the soft
    /// watermark, nor more than leaves the entries still needed (unflushed or below the
    /// retention floor) under the soft watermark: history is the first thing freed when
    /// writers need space, so it never makes them wait. 0 keeps no history.
    pub wal_history_bytes_max: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            flush_interval_ms: 100,
            wal_full_timeout_ms: 10_000,
            wal_soft_watermark_pct: 70,
            wal_hard_watermark_pct: 90,
            group_commit_max_delay_us: 0,
            max_entry_bytes: 1 << 20,
            wal_history_ms: 300_000,
            wal_history_bytes_max: 64 << 20,
        }
    }
}

impl VolumeConfig {
    fn validate(&self) -> Result<()> {
        if self.flush_interval_ms == 0 {
            return Err(Error::invalid("flush_interval_ms", "must be at least 1"));
        }
        if !(1..=100).contains(&self.wal_hard_watermark_pct) {
            return Err(Error::invalid(
                "wal_hard_watermark_pct",
                format!("{} (allowed 1..=100)", self.wal_hard_watermark_pct),
            ));
        }
        if self.wal_soft_watermark_pct > self.wal_hard_watermark_pct {
            return Err(Error::invalid(
                "wal_soft_watermark_pct",
                format!(
                    "{} (must not exceed wal_hard_watermark_pct {})",
                    self.wal_soft_watermark_pct, self.wal_hard_watermark_pct
                ),
            ));
        }
        if self.max_entry_bytes == 0 {
            return Err(Error::invalid("max_entry_bytes", "must be positive"));
        }
        Ok(())
    }
}

/// Counters for tests, benchmarks and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// fdatasync calls made by group commit.
    pub group_commit_syncs: u64,
    /// Flusher cycles that moved the checkpoint or the tail.
    pub flusher_cycles: u64,
    pub wal_used_bytes: u64,
    pub wal_size_bytes: u64,
    pub dirty_runs: u64,
}

/// Callback run for every appended entry, in LSN order, under the append lock.
pub type AppendObserver = Arc<dyn Fn(&WalEntry) + Send + Sync>;

/// Append-side state, guarded by the append lock.
pub(crate) struct WalState {
    pub(crate) head_lsn: u64,
    pub(crate) head_pos: u64,
    pub(crate) tail_pos: u64,
    pub(crate) tail_lsn: u64,
    pub(crate) index: VecDeque<IndexEntry>,
    pub(crate) rebuilding: bool,
    /// Generation new records are written with (mirrors the persisted superblock).
    pub(crate) wal_gen: u64,
    /// WAL space before this position may be reused: the lower of the tails in the two
    /// superblock copies (and never above `tail_pos`). Waiting for both copies means
    /// falling back to the older copy after a torn superblock write never starts
    /// recovery from overwritten records.
    pub(crate) free_from: u64,
    /// Writers waiting for WAL space right now.
    pub(crate) waiting_writers: u32,
}

impl WalState {
    pub(crate) fn used(&self) -> u64 {
        self.head_pos - self.tail_pos
    }

    /// Bytes not yet reusable by appends.
    pub(crate) fn occupied(&self) -> u64 {
        self.head_pos - self.free_from
    }

    /// Records that a superblock write made `prev_tail` (the tail in the copy that was
    /// not overwritten) the older of the two persisted tails.
    pub(crate) fn note_persisted(&mut self, prev_tail: u64) {
        self.free_from = self.free_from.max(prev_tail.min(self.tail_pos));
        debug_assert!(
            self.free_from <= self.tail_pos && self.tail_pos <= self.head_pos,
            "WAL positions are ordered: free_from {} <= tail {} <= head {}",
            self.free_from,
            self.tail_pos,
            self.head_pos
        );
    }

    pub(crate) fn entry(&self, lsn: u64) -> Option<&IndexEntry> {
        let first = self.index.front()?.lsn;
        let i = usize::try_from(lsn.checked_sub(first)?).ok()?;
        self.index.get(i)
    }
}

pub(crate) struct FlusherCtl {
    pub(crate) kick: bool,
    pub(crate) shutdown: bool,
    pub(crate) base_pins: u64,
}

pub(crate) struct Inner {
    pub(crate) disk: Box<dyn Disk>,
    pub(crate) layout: Layout,
    pub(crate) cfg: VolumeConfig,
    pub(crate) max_entry_bytes: u64,
    pub(crate) size_bytes: AtomicU64,
    pub(crate) wal: Mutex<WalState>,
    pub(crate) space_cv: Condvar,
    pub(crate) map: RwLock<DirtyMap>,
    /// Held (read) while WAL bytes are read outside the append lock; held (write) while
    /// the tail moves, so freed space is never reused under a reader.
    pub(crate) reclaim: RwLock<()>,
    pub(crate) sb: Mutex<Superblock>,
    pub(crate) gc: GroupCommit,
    pub(crate) head_lsn: AtomicU64,
    pub(crate) checkpoint_lsn: AtomicU64,
    pub(crate) retained_start: AtomicU64,
    pub(crate) epoch: AtomicU64,
    /// 0 = no floor.
    pub(crate) retention_floor: AtomicU64,
    /// 0 = no limit; see `Superblock::extent_limit_lsn`.
    pub(crate) extent_limit: AtomicU64,
    pub(crate) flusher_cycles: AtomicU64,
    /// (LSN, when): every entry up to LSN existed at that instant. The flusher adds one
    /// per cycle and frees history entries older than `wal_history_ms` by them.
    pub(crate) history_marks: Mutex<VecDeque<(u64, Instant)>>,
    /// Serializes flusher cycles with truncation, rebuild and base pinning.
    pub(crate) flush_cycle: Mutex<()>,
    pub(crate) ctl: Mutex<FlusherCtl>,
    pub(crate) ctl_cv: Condvar,
    pub(crate) observer: RwLock<Option<AppendObserver>>,
    pub(crate) expand_lock: Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// An open volume. All methods take `&self` and may be called from many threads.
pub struct Volume {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
    /// The persisted epoch found when this volume was opened from disk; `None` for a
    /// volume created by this process (it holds no entries yet). See
    /// [`Volume::may_begin_primary_term`].
    reopened_at: Option<Epoch>,
}

/// A consistent image of the extent as of `checkpoint()`, for rebuilding a replica.
/// While any `BaseImage` is alive the flusher does not touch the extent (writes keep
/// landing in the WAL; if the WAL fills, writers wait and then fail with `WalFull`), so
/// every block read through it is the state at the checkpoint. Entries after the
/// checkpoint stay in the WAL while pinned; set a retention floor before dropping the
/// image if the tail will be needed afterwards.
pub struct BaseImage {
    inner: Arc<Inner>,
    checkpoint: Lsn,
}

impl Volume {
    /// Formats `disk` as a new volume and opens it.
    pub fn create(disk: Box<dyn Disk>, opts: CreateOptions, cfg: VolumeConfig) -> Result<Volume> {
        cfg.validate()?;
        superblock::validate_geometry(opts.size_bytes, opts.block_size, opts.wal_size_bytes)
            .map_err(|reason| Error::invalid("CreateOptions", reason))?;
        let layout = Layout::new(opts.block_size, opts.wal_size_bytes);
        let what = disk.describe();
        let fresh = disk.is_empty().map_err(|e| Error::io(&what, e))?;
        disk.set_len(layout.disk_len(opts.size_bytes))
            .map_err(|e| Error::io(&what, e))?;
        if fresh {
            // Every client flush syncs WAL writes; on allocated blocks those syncs never
            // wait for a filesystem journal commit, from the first lap on.
            disk.preallocate(layout.wal_offset, layout.wal_size)
                .map_err(|e| Error::io(&what, e))?;
        } else {
            // Old records from whatever used this disk before must not look like ours.
            disk.write_zeroes(layout.wal_offset, layout.wal_size)
                .map_err(|e| Error::io(&what, e))?;
        }
        let mut sb = Superblock {
            flags: 0,
            seq: 0,
            uuid: crate::random::unique_bytes(),
            volume_size: opts.size_bytes,
            block_size: opts.block_size,
            durability: opts.durability,
            wal_offset: layout.wal_offset,
            wal_size: layout.wal_size,
            extent_offset: layout.extent_offset,
            checkpoint_lsn: Lsn(0),
            copied_lsn: Lsn(0),
            extent_limit_lsn: Lsn(0),
            wal_tail_pos: WalPos(0),
            wal_tail_lsn: Lsn(1),
            wal_gen: 1,
            wal_tail_gen: 1,
            checkpoint_epoch: superblock::UNKNOWN_EPOCH,
            epoch: opts.epoch,
            prepared_size: 0,
            expand_epoch: 0,
        };
        for seq in 0..2 {
            sb.seq = seq;
            disk.write_at(&sb.encode(), Superblock::slot_offset(sb.slot()))
                .map_err(|e| Error::io(&what, e))?;
        }
        disk.sync().map_err(|e| Error::io(&what, e))?;
        tracing::info!(file = %what, size_bytes = opts.size_bytes, block_size = opts.block_size,
            wal_size_bytes = opts.wal_size_bytes, "created volume");
        let mut v = Volume::open(disk, cfg)?;
        // Nothing was ever appended to it: it may serve as primary at any epoch.
        v.reopened_at = None;
        Ok(v)
    }

    /// Opens an existing volume, replaying the WAL after the checkpoint.
    pub fn open(disk: Box<dyn Disk>, cfg: VolumeConfig) -> Result<Volume> {
        cfg.validate()?;
        let what = disk.describe();
        let io = |e| Error::io(&what, e);
        let disk_len = disk.len().map_err(io)?;
        let mut a = vec![0u8; superblock::ENCODED_LEN];
        let mut b = vec![0u8; superblock::ENCODED_LEN];
        if disk_len >= 2 * SUPERBLOCK_SLOT_SIZE {
            disk.read_at(&mut a, 0).map_err(io)?;
            disk.read_at(&mut b, SUPERBLOCK_SLOT_SIZE).map_err(io)?;
        }
        let mut sb = superblock::choose(&what, &a, &b)?;
        let layout = Layout {
            block_size: sb.block_size,
            wal_offset: sb.wal_offset,
            wal_size: sb.wal_size,
            extent_offset: sb.extent_offset,
        };
        if sb.prepared_size != 0 {
            tracing::warn!(file = %what, prepared_size = sb.prepared_size,
                "discarding an expansion interrupted by a crash");
            sb.prepared_size = 0;
        }
        let need = layout.disk_len(sb.volume_size);
        if disk_len < need {
            return Err(Error::corrupt(
                what,
                format!("file is {disk_len} bytes but the superblock needs {need}"),
            ));
        }
        let rebuilding = sb.flags & FLAG_REBUILD_IN_PROGRESS != 0;
        let rec = recovery::recover(&*disk, &layout, &sb)?;
        tracing::info!(file = %what, checkpoint = sb.checkpoint_lsn.0, head = rec.head_lsn,
            replayed = rec.map.len(), stop = %rec.stop_reason, rebuilding, "recovered WAL");

        let checkpoint = sb.checkpoint_lsn.0;
        let head = rec.head_lsn;
        let max_entry_bytes = cfg
            .max_entry_bytes
            .min(layout.wal_size / 8)
            .max(u64::from(sb.block_size))
            / u64::from(sb.block_size)
            * u64::from(sb.block_size);
        let inner = Arc::new(Inner {
            layout,
            max_entry_bytes,
            size_bytes: AtomicU64::new(sb.volume_size),
            wal: Mutex::new(WalState {
                head_lsn: head,
                head_pos: rec.head_pos,
                tail_pos: rec.tail_pos,
                tail_lsn: rec.tail_lsn,
                index: rec.index,
                rebuilding,
                wal_gen: 0,
                free_from: rec.tail_pos,
                waiting_writers: 0,
            }),
            space_cv: Condvar::new(),
            map: RwLock::new(rec.map),
            reclaim: RwLock::new(()),
            gc: GroupCommit::new(0, Duration::from_micros(cfg.group_commit_max_delay_us)),
            head_lsn: AtomicU64::new(head),
            checkpoint_lsn: AtomicU64::new(checkpoint),
            retained_start: AtomicU64::new(rec.tail_lsn),
            epoch: AtomicU64::new(sb.epoch.0),
            retention_floor: AtomicU64::new(0),
            extent_limit: AtomicU64::new(sb.extent_limit_lsn.0),
            flusher_cycles: AtomicU64::new(0),
            // What was recovered counts as written now: its age is unknown.
            history_marks: Mutex::new(VecDeque::from([(head, Instant::now())])),
            flush_cycle: Mutex::new(()),
            ctl: Mutex::new(FlusherCtl {
                kick: false,
                shutdown: false,
                base_pins: 0,
            }),
            ctl_cv: Condvar::new(),
            observer: RwLock::new(None),
            expand_lock: Mutex::new(()),
            sb: Mutex::new(sb),
            disk,
            cfg,
        });
        {
            // Everything found is part of the chain; make it durable (it may be only in
            // the page cache after a process kill), then start a new WAL generation so
            // stale records beyond the head can never join the chain.
            let mut st = lock(&inner.wal);
            inner.zero_slot_at(st.head_pos, st.occupied())?;
            let tail = (st.tail_pos, st.tail_lsn);
            let tail_gen = st.entry(st.tail_lsn).map(|e| e.wal_gen);
            let prev = inner.persist(|sb| {
                sb.wal_gen += 1;
                sb.wal_tail_pos = WalPos(tail.0);
                sb.wal_tail_lsn = Lsn(tail.1);
                sb.wal_tail_gen = tail_gen.unwrap_or(sb.wal_gen);
            })?;
            st.note_persisted(prev);
            st.wal_gen = lock(&inner.sb).wal_gen;
            drop(st);
            inner.gc.reset_durable(head);
        }
        let worker = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("blockvol-flusher".into())
            .spawn(move || worker.flusher_loop())
            .map_err(|e| Error::io("spawning the flusher thread", e))?;
        let reopened_at = Some(Epoch(inner.epoch.load(Ordering::Acquire)));
        Ok(Volume {
            inner,
            flusher: Some(flusher),
            reopened_at,
        })
    }

    /// Creates a volume in a new sparse file at `path` (truncating any existing file).
    pub fn create_file(path: &Path, opts: CreateOptions, cfg: VolumeConfig) -> Result<Volume> {
        let disk = FileDisk::create(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        Volume::create(Box::new(disk), opts, cfg)
    }

    /// Opens the volume file at `path`.
    pub fn open_file(path: &Path, cfg: VolumeConfig) -> Result<Volume> {
        let disk = FileDisk::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        Volume::open(Box::new(disk), cfg)
    }

    /// Appends a WRITE; `data` is a whole number of blocks inside the volume. Returns
    /// the LSN of the (last) entry. Not durable until `flush`. Writes longer than
    /// `max_entry_bytes` become several entries; like a disk, a multi-entry write is
    /// not atomic (after an error or a crash a prefix of it may have landed).
    pub fn write(&self, lba: Lba, data: &[u8]) -> Result<Lsn> {
        let i = &self.inner;
        let bs = i.layout.bs();
        i.check_blocks("data", lba, data.len())?;
        let mut last = Lsn(0);
        let mut block = lba.0;
        for chunk in data.chunks(i.max_entry_bytes as usize) {
            let blocks = chunk.len() as u64 / bs;
            last = i.append_local(EntryKind::Write, block, blocks as u32, chunk)?;
            block += blocks;
        }
        Ok(last)
    }

    /// Like [`Volume::write`], but never waits for WAL space: returns `Ok(None)`, having
    /// written nothing, when the write would have to wait for the flusher or needs more
    /// than one entry. For callers that must not block for long (an async task), which
    /// then retry with `write` where blocking is fine.
    pub fn try_write(&self, lba: Lba, data: &[u8]) -> Result<Option<Lsn>> {
        let i = &self.inner;
        let blocks = i.check_blocks("data", lba, data.len())?;
        if data.len() as u64 > i.max_entry_bytes {
            return Ok(None);
        }
        let mut st = i.lock_for_append()?;
        if !i.has_space(&st, wal::record_len_for(data.len()))? {
            return Ok(None);
        }
        let entry = EntryRef {
            lsn: Lsn(st.head_lsn + 1),
            epoch: Epoch(i.epoch.load(Ordering::Acquire)),
            kind: EntryKind::Write,
            lba,
            blocks: blocks as u32,
            data,
        };
        i.append_locked(&mut st, entry, None)?;
        Ok(Some(entry.lsn))
    }

    /// Whether an append with `data_len` bytes of data would proceed now without waiting
    /// for the flusher. Exact for a caller that is the volume's only appender (a
    /// replica's connection); only a hint otherwise.
    pub fn has_room_for(&self, data_len: usize) -> bool {
        let i = &self.inner;
        let st = lock(&i.wal);
        matches!(i.has_space(&st, wal::record_len_for(data_len)), Ok(true))
    }

    /// A write that is durable when it returns.
    pub fn write_fua(&self, lba: Lba, data: &[u8]) -> Result<Lsn> {
        let lsn = self.write(lba, data)?;
        self.inner.sync_to(lsn.0)?;
        Ok(lsn)
    }

    /// Reads whole blocks: newest data from the WAL where dirty, else from the extent.
    /// Trimmed, zeroed and never-written blocks read as zeros.
    pub fn read(&self, lba: Lba, buf: &mut [u8]) -> Result<()> {
        let i = &self.inner;
        let bs = i.layout.bs();
        let blocks = i.check_blocks("buf", lba, buf.len())?;
        i.gc.check()?;
        let what = || format!("read of {}", i.disk.describe());
        let map = read(&i.map);
        let mut cursor = lba.0;
        let end = lba.0 + blocks;
        let slice = |s: u64, e: u64| -> std::ops::Range<usize> {
            ((s - lba.0) * bs) as usize..((e - lba.0) * bs) as usize
        };
        for run in map.lookup(lba.0, end) {
            if cursor < run.start {
                let r = slice(cursor, run.start);
                i.disk
                    .read_at(&mut buf[r], i.layout.extent_off(cursor))
                    .map_err(|e| Error::io(what(), e))?;
            }
            let r = slice(run.start, run.end);
            match run.src {
                Source::Wal { data_pos } => i
                    .disk
                    .read_at(&mut buf[r], i.layout.wal_phys(data_pos))
                    .map_err(|e| Error::io(what(), e))?,
                Source::Zero => buf[r].fill(0),
            }
            cursor = run.end;
        }
        if cursor < end {
            let r = slice(cursor, end);
            i.disk
                .read_at(&mut buf[r], i.layout.extent_off(cursor))
                .map_err(|e| Error::io(what(), e))?;
        }
        Ok(())
    }

    /// Discards `blocks` blocks from `lba`; they read as zeros afterwards.
    pub fn trim(&self, lba: Lba, blocks: u64) -> Result<Lsn> {
        self.inner.append_range(EntryKind::Trim, lba.0, blocks)
    }

    /// Zeroes `blocks` blocks from `lba`.
    pub fn write_zeroes(&self, lba: Lba, blocks: u64) -> Result<Lsn> {
        self.inner.append_range(EntryKind::Zero, lba.0, blocks)
    }

    /// Makes everything appended before the call durable and returns the durable LSN.
    /// Concurrent callers share one fdatasync.
    pub fn flush(&self) -> Result<Lsn> {
        let target = self.inner.head_lsn.load(Ordering::Acquire);
        self.inner.sync_to(target).map(Lsn)
    }

    /// Runs one flusher cycle now: copies durable WAL data to the extent and advances
    /// the checkpoint and the tail. Returns the checkpoint LSN.
    pub fn checkpoint(&self) -> Result<Lsn> {
        self.inner.flush_cycle()?;
        Ok(self.checkpoint_lsn())
    }

    /// Grows the volume to `new_size_bytes` (a multiple of the block size).
    pub fn expand(&self, new_size_bytes: u64) -> Result<()> {
        let i = &self.inner;
        let _g = lock(&i.expand_lock);
        i.gc.check()?;
        let cur = i.size_bytes.load(Ordering::Acquire);
        let bs = i.layout.bs();
        if new_size_bytes < cur || !new_size_bytes.is_multiple_of(bs) {
            return Err(Error::invalid(
                "new_size_bytes",
                format!(
                    "{new_size_bytes} (must be a multiple of block size {bs} and at least the current size {cur})"
                ),
            ));
        }
        if new_size_bytes == cur {
            return Ok(());
        }
        i.layout
            .extent_offset
            .checked_add(new_size_bytes)
            .ok_or_else(|| Error::invalid("new_size_bytes", "file size overflows"))?;
        i.persist(|sb| sb.prepared_size = new_size_bytes)?;
        i.disk
            .set_len(i.layout.disk_len(new_size_bytes))
            .map_err(|e| Error::io(i.disk.describe(), e))?;
        i.persist(|sb| {
            sb.volume_size = new_size_bytes;
            sb.prepared_size = 0;
            sb.expand_epoch += 1;
        })?;
        i.size_bytes.store(new_size_bytes, Ordering::Release);
        tracing::info!(file = %i.disk.describe(), new_size_bytes, "expanded volume");
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes.load(Ordering::Acquire)
    }

    pub fn block_size(&self) -> u32 {
        self.inner.layout.block_size
    }

    /// The durability mode recorded at create.
    pub fn durability(&self) -> DurabilityMode {
        lock(&self.inner.sb).durability
    }

    /// The volume's identity, generated at create.
    pub fn uuid(&self) -> [u8; 16] {
        lock(&self.inner.sb).uuid
    }

    /// Last appended LSN.
    pub fn head_lsn(&self) -> Lsn {
        Lsn(self.inner.head_lsn.load(Ordering::Acquire))
    }

    /// Why the volume failed, if it did: after a failed fsync, WAL append write or extent
    /// write it refuses all IO until reopened (fail-stop), whether or not a caller has
    /// asked for IO since.
    pub fn failure(&self) -> Option<String> {
        self.inner.gc.failed()
    }

    /// Last LSN known durable (flushedLSN).
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.inner.gc.durable())
    }

    /// Last LSN in the extent and recorded in the superblock.
    pub fn checkpoint_lsn(&self) -> Lsn {
        Lsn(self.inner.checkpoint_lsn.load(Ordering::Acquire))
    }

    /// Oldest LSN still readable from the WAL (`scan_from` accepts it). Equals
    /// `head_lsn + 1` when nothing is retained.
    pub fn retained_start(&self) -> Lsn {
        Lsn(self.inner.retained_start.load(Ordering::Acquire))
    }

    /// The flusher never frees WAL entries with LSN >= `floor`, and never copies entries
    /// above it into the extent (the extent limit, persisted with the next checkpoint and
    /// restored on open until replicated entries arrive or a truncation or rebuild
    /// replaces the history). `None` removes both.
    pub fn set_retention_floor(&self, floor: Option<Lsn>) {
        let v = floor.map(|l| l.0.max(1)).unwrap_or(0);
        self.inner.retention_floor.store(v, Ordering::Release);
        self.inner.extent_limit.store(v, Ordering::Release);
        self.inner.kick();
    }

    /// Ends a primary term's WAL retention: the flusher may free the WAL past the old
    /// floor again. The extent limit stays until replicated entries arrive or a
    /// truncation or rebuild replaces the history, so a demoted primary can still drop
    /// an unreplicated suffix without repairing its extent.
    pub fn release_retention_floor(&self) {
        self.inner.retention_floor.store(0, Ordering::Release);
        self.inner.kick();
    }

    /// The LSN the flusher copies no further than, if any (see `set_retention_floor`).
    pub fn extent_limit(&self) -> Option<Lsn> {
        match self.inner.extent_limit.load(Ordering::Acquire) {
            0 => None,
            v => Some(Lsn(v)),
        }
    }

    /// The current retention floor.
    pub fn retention_floor(&self) -> Option<Lsn> {
        match self.inner.retention_floor.load(Ordering::Acquire) {
            0 => None,
            v => Some(Lsn(v)),
        }
    }

    /// Up to `max_entries` retained entries from `from` on, in LSN order (catch-up).
    /// Fails with `WalRecycled` if `from < retained_start()`; empty if `from > head`.
    pub fn scan_from(&self, from: Lsn, max_entries: usize) -> Result<Vec<WalEntry>> {
        let i = &self.inner;
        i.gc.check()?;
        let _reclaim = read(&i.reclaim);
        let picked: Vec<IndexEntry> = {
            let st = lock(&i.wal);
            if from.0 < st.tail_lsn {
                return Err(Error::WalRecycled {
                    from,
                    retained_start: Lsn(st.tail_lsn),
                });
            }
            (from.0..=st.head_lsn)
                .take(max_entries)
                .filter_map(|l| st.entry(l).copied())
                .collect()
        };
        let mut out = Vec::with_capacity(picked.len());
        let mut buf = Vec::new();
        for e in picked {
            buf.resize(e.len as usize, 0);
            i.disk
                .read_at(&mut buf, i.layout.wal_phys(e.pos))
                .map_err(|err| Error::io(format!("WAL of {}", i.disk.describe()), err))?;
            let bad = |reason: String| {
                Error::corrupt(
                    format!("WAL record LSN {} of {}", e.lsn, i.disk.describe()),
                    reason,
                )
            };
            let h = RecordHeader::parse(&buf).map_err(|x| bad(x.to_string()))?;
            h.verify(&buf).map_err(|x| bad(x.to_string()))?;
            let (entry, _) =
                WalEntry::decode(&buf[wal::RECORD_PREFIX_LEN..]).map_err(|x| bad(x.to_string()))?;
            if entry.lsn.0 != e.lsn {
                return Err(bad(format!("holds LSN {}", entry.lsn)));
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Replica side: appends an entry shipped by the primary, keeping its LSN and
    /// epoch. `entry.lsn <= head` is a duplicate and is skipped; a gap is an error.
    pub fn append_replicated(&self, entry: &WalEntry) -> Result<()> {
        let i = &self.inner;
        // Entries from a primary: this volume is a replica now, its extent follows its
        // durable WAL again.
        if i.extent_limit.load(Ordering::Acquire) != 0 {
            i.extent_limit.store(0, Ordering::Release);
        }
        let bs = i.layout.bs();
        match entry.kind {
            EntryKind::Padding => {
                return Err(Error::invalid("entry.kind", "PADDING is not replicated"));
            }
            EntryKind::Write => {
                if entry.blocks == 0 || entry.data.len() as u64 != u64::from(entry.blocks) * bs {
                    return Err(Error::invalid(
                        "entry.data",
                        format!(
                            "{} bytes for {} blocks of {bs} bytes",
                            entry.data.len(),
                            entry.blocks
                        ),
                    ));
                }
                if entry.data.len() as u64 > i.layout.wal_size / 4 {
                    return Err(Error::invalid(
                        "entry.data",
                        format!("{} bytes is too large for this WAL", entry.data.len()),
                    ));
                }
            }
            EntryKind::Trim | EntryKind::Zero => {
                if entry.blocks == 0 || !entry.data.is_empty() {
                    return Err(Error::invalid(
                        "entry",
                        "TRIM/ZERO need blocks > 0 and no data",
                    ));
                }
            }
        }
        i.check_range(entry.lba.0, u64::from(entry.blocks))?;
        let mut st = i.lock_for_append()?;
        if entry.lsn.0 <= st.head_lsn {
            return Ok(());
        }
        if entry.lsn.0 != st.head_lsn + 1 {
            return Err(Error::LsnGap {
                expected: Lsn(st.head_lsn + 1),
                got: entry.lsn,
            });
        }
        st = i.wait_for_space(st, wal::record_len_for(entry.data.len()))?;
        i.append_locked(&mut st, EntryRef::from(entry), Some(entry))
    }

    /// Drops WAL entries after `lsn` (a replica's divergent suffix). Fails if the
    /// checkpoint is already past `lsn`. The durable LSN drops to `lsn` if higher.
    ///
    /// After a crash inside a flusher cycle the extent may already hold entries past the
    /// checkpoint (up to `copied_lsn`). Before dropping any of those, every block only
    /// dropped entries wrote since the checkpoint gets its content as of the checkpoint
    /// back (from the newest retained entry at or below it, or zeros while the WAL holds
    /// the whole history), synced before the truncation is persisted, so no dropped write
    /// can ever be read again. If some block's earlier content is no longer in the WAL
    /// the truncation is refused with `TruncationNeedsRebuild` and nothing changes.
    pub fn truncate_after(&self, lsn: Lsn) -> Result<()> {
        self.inner.truncate_after(lsn.0)
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.inner.epoch.load(Ordering::Acquire))
    }

    /// Persists a new epoch (superblock + sync) before returning. Lowering it fails;
    /// setting the same value is a no-op. Entries appended after it returns carry it.
    pub fn set_epoch(&self, e: Epoch) -> Result<()> {
        let i = &self.inner;
        let mut st = lock(&i.wal);
        let cur = i.epoch.load(Ordering::Acquire);
        if e.0 < cur {
            return Err(Error::EpochRegression {
                current: Epoch(cur),
                requested: e,
            });
        }
        if e.0 == cur {
            return Ok(());
        }
        let prev = i.persist(|sb| sb.epoch = e)?;
        st.note_persisted(prev);
        i.epoch.store(e.0, Ordering::Release);
        tracing::info!(file = %i.disk.describe(), epoch = e.0, "epoch persisted");
        Ok(())
    }

    /// Whether this volume may start serving as primary at `epoch`: only at an epoch
    /// above the one persisted when it was opened from disk (any epoch for a volume
    /// created by this process).
    ///
    /// Why: a primary assigns LSNs head+1, head+2, ... at its epoch and ships them before
    /// its own fsync, so a replica may durably hold entries the primary loses in a power
    /// loss. Reopened at the same epoch, the primary would assign those LSNs again to
    /// different data, and log matching (which compares epochs only) could not tell the
    /// two histories apart. Entries at an epoch are appended only after that epoch was
    /// persisted ([`Volume::set_epoch`] syncs first), so a volume opened at persisted epoch
    /// E holds no entry it issued itself at any epoch above E: serving at E + 1 or later
    /// can never reuse an (epoch, LSN) pair. Serving again at E needs a new epoch from the
    /// control plane. Within one open the head moves back only by a truncation or a
    /// rebuild as a replica, which a newer primary (at a newer epoch) asks for, so a term
    /// restarted within one open (after a failed start, say) never reuses an LSN either.
    pub fn may_begin_primary_term(&self, epoch: Epoch) -> bool {
        self.reopened_at.is_none_or(|e| epoch > e)
    }

    /// Installs (or with `None` removes) the callback run for every appended entry,
    /// in LSN order, under the append lock. Keep it short: it delays every writer.
    pub fn set_append_observer(&self, f: Option<AppendObserver>) {
        let _st = lock(&self.inner.wal);
        *write(&self.inner.observer) = f;
    }

    /// Pins the extent at the current checkpoint for a rebuild source (see
    /// [`BaseImage`]).
    pub fn base_snapshot(&self) -> Result<BaseImage> {
        let i = &self.inner;
        i.gc.check()?;
        let _cycle = lock(&i.flush_cycle);
        lock(&i.ctl).base_pins += 1;
        Ok(BaseImage {
            inner: i.clone(),
            checkpoint: Lsn(i.checkpoint_lsn.load(Ordering::Acquire)),
        })
    }

    /// Replica side: starts a rebuild. Discards the WAL and dirty map, persists a
    /// rebuild-in-progress flag (a crash leaves the volume marked, with head,
    /// durable and checkpoint LSN 0), and refuses writes until `finish_rebuild`.
    pub fn begin_rebuild(&self) -> Result<()> {
        self.inner.begin_rebuild()
    }

    /// Whether a rebuild is in progress (also after a crash during one).
    pub fn is_rebuilding(&self) -> bool {
        lock(&self.inner.wal).rebuilding
    }

    /// Replica side: writes base blocks straight into the extent during a rebuild.
    pub fn install_base_block(&self, lba: Lba, data: &[u8]) -> Result<()> {
        let i = &self.inner;
        i.check_blocks("data", lba, data.len())?;
        i.gc.check()?;
        if !lock(&i.wal).rebuilding {
            return Err(Error::invalid(
                "install_base_block",
                "call begin_rebuild first",
            ));
        }
        i.disk
            .write_at(data, i.layout.extent_off(lba.0))
            .map_err(|e| Error::io(i.disk.describe(), e))
    }

    /// Replica side: ends a rebuild whose base image is as of `checkpoint`. Syncs the
    /// extent; afterwards head, durable and checkpoint LSN are `checkpoint` and the
    /// tail is replayed with `append_replicated` from `checkpoint + 1`. The epoch of
    /// the base point is recorded as unknown; see `finish_rebuild_with_epoch`.
    pub fn finish_rebuild(&self, checkpoint: Lsn) -> Result<()> {
        self.inner
            .finish_rebuild(checkpoint.0, superblock::UNKNOWN_EPOCH)
    }

    /// `finish_rebuild`, also persisting `epoch` as the epoch of the entry at
    /// `checkpoint`, so `entry_epoch(checkpoint)` answers it after a restart.
    pub fn finish_rebuild_with_epoch(&self, checkpoint: Lsn, epoch: Epoch) -> Result<()> {
        self.inner.finish_rebuild(checkpoint.0, epoch)
    }

    /// Epoch of the entry at `lsn`, if known: from the WAL while the entry is retained,
    /// or from the superblock for the checkpoint entry after it was recycled.
    pub fn entry_epoch(&self, lsn: Lsn) -> Option<Epoch> {
        let i = &self.inner;
        let st = lock(&i.wal);
        if let Some(e) = st.entry(lsn.0) {
            return Some(Epoch(e.epoch));
        }
        let sb = lock(&i.sb);
        (lsn == sb.checkpoint_lsn && sb.checkpoint_epoch != superblock::UNKNOWN_EPOCH)
            .then_some(sb.checkpoint_epoch)
    }

    /// WAL bytes holding the entries after `lsn`: what a replica whose flushed LSN is
    /// `lsn` still has to receive (replication lag in bytes). `None` once those
    /// entries have left the WAL: that replica needs a rebuild, and no byte count of
    /// the WAL describes its distance.
    pub fn wal_bytes_after(&self, lsn: Lsn) -> Option<u64> {
        let st = lock(&self.inner.wal);
        if lsn.0 >= st.head_lsn {
            return Some(0);
        }
        let next = st.entry(lsn.0 + 1)?;
        Some(st.head_pos.saturating_sub(next.pos))
    }

    /// Counters.
    pub fn stats(&self) -> VolumeStats {
        let i = &self.inner;
        let st = lock(&i.wal);
        VolumeStats {
            group_commit_syncs: i.gc.syncs(),
            flusher_cycles: i.flusher_cycles.load(Ordering::Relaxed),
            wal_used_bytes: st.used(),
            wal_size_bytes: i.layout.wal_size,
            dirty_runs: read(&i.map).len() as u64,
        }
    }

    /// Flushes, checkpoints and stops the flusher.
    pub fn close(mut self) -> Result<()> {
        let r = self.flush().and_then(|_| {
            if lock(&self.inner.ctl).base_pins == 0 {
                self.inner.flush_cycle()
            } else {
                Ok(())
            }
        });
        self.stop_flusher();
        r
    }

    fn stop_flusher(&mut self) {
        {
            let mut c = lock(&self.inner.ctl);
            c.shutdown = true;
        }
        self.inner.ctl_cv.notify_all();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

impl BaseImage {
    /// The LSN the image is consistent at.
    pub fn checkpoint(&self) -> Lsn {
        self.checkpoint
    }

    /// Volume size at the time of reading.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes.load(Ordering::Acquire)
    }

    /// The first run of blocks `[start, stop)` at or after `from` and before `end` that
    /// may hold data, or `None` when every block there reads as zeros (never written,
    /// or trimmed). Blocks outside the runs read as zeros; a run may include some.
    pub fn next_allocated(&self, from: Lba, end: Lba) -> Result<Option<(Lba, Lba)>> {
        let i = &self.inner;
        let bs = i.layout.bs();
        let (lo, hi) = (i.layout.extent_off(from.0), i.layout.extent_off(end.0));
        let run = i
            .disk
            .next_data(lo, hi)
            .map_err(|e| Error::io(i.disk.describe(), e))?;
        Ok(run.map(|(a, b)| {
            // Whole blocks that overlap the range: a partly allocated block may hold data.
            let start = (a - i.layout.extent_offset) / bs;
            let stop = (b - i.layout.extent_offset).div_ceil(bs);
            (Lba(start.max(from.0)), Lba(stop.min(end.0).max(start + 1)))
        }))
    }

    /// Bytes of the runs `next_allocated` reports over the whole volume: what a rebuild
    /// from this image ships.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let bs = self.inner.layout.bs();
        let end = Lba(self.size_bytes() / bs);
        let (mut at, mut total) = (Lba(0), 0u64);
        while let Some((a, b)) = self.next_allocated(at, end)? {
            total += (b.0 - a.0) * bs;
            at = b;
        }
        Ok(total)
    }

    /// Reads whole blocks of the pinned extent.
    pub fn read(&self, lba: Lba, buf: &mut [u8]) -> Result<()> {
        let i = &self.inner;
        i.check_blocks("buf", lba, buf.len())?;
        i.disk
            .read_at(buf, i.layout.extent_off(lba.0))
            .map_err(|e| Error::io(i.disk.describe(), e))
    }
}

impl Drop for BaseImage {
    fn drop(&mut self) {
        let mut c = lock(&self.inner.ctl);
        c.base_pins = c.base_pins.saturating_sub(1);
        c.kick = true;
        drop(c);
        self.inner.ctl_cv.notify_all();
    }
}

impl Inner {
    /// Checks that a buffer of `len` bytes is a positive whole number of blocks inside
    /// the volume starting at `lba`; returns the block count.
    fn check_blocks(&self, field: &'static str, lba: Lba, len: usize) -> Result<u64> {
        let bs = self.layout.bs();
        if len == 0 || !(len as u64).is_multiple_of(bs) {
            return Err(Error::invalid(
                field,
                format!("length {len} is not a positive multiple of block size {bs}"),
            ));
        }
        let blocks = len as u64 / bs;
        self.check_range(lba.0, blocks)?;
        Ok(blocks)
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<()> {
        let total = self.size_bytes.load(Ordering::Acquire) / self.layout.bs();
        match lba.checked_add(blocks) {
            Some(end) if blocks > 0 && end <= total => Ok(()),
            _ => Err(Error::range(format!(
                "blocks {lba}+{blocks} outside the volume's {total} blocks"
            ))),
        }
    }

    pub(crate) fn io_err(&self, e: std::io::Error) -> Error {
        Error::io(self.disk.describe(), e)
    }

    /// Writes each run `[start, end)` of blocks to the extent from its source (copied
    /// from the WAL, or zeros), then syncs the disk.
    pub(crate) fn write_extent_runs(
        &self,
        runs: impl IntoIterator<Item = (u64, u64, Source)>,
    ) -> std::io::Result<()> {
        let layout = self.layout;
        for (start, end, src) in runs {
            let dst = layout.extent_off(start);
            let len = (end - start) * layout.bs();
            match src {
                Source::Wal { data_pos } => {
                    self.disk.copy_within(layout.wal_phys(data_pos), dst, len)?
                }
                Source::Zero => self.disk.write_zeroes(dst, len)?,
            }
        }
        self.disk.sync()
    }

    /// A WAL append's disk write failed (EIO, ENOSPC on a thin device, a dying disk):
    /// fail-stop, like a failed fsync. The disk may have refused this record only, but
    /// a volume that keeps serving on a disk that refuses writes fails every client
    /// write while nothing fails over; a failed volume is reported and replaced.
    fn append_write_failed(&self, e: std::io::Error) -> Error {
        let err = self.io_err(e);
        self.gc.poison(format!("WAL append failed: {err}"));
        err
    }

    fn kick(&self) {
        lock(&self.ctl).kick = true;
        self.ctl_cv.notify_all();
    }

    pub(crate) fn sync_to(&self, target: u64) -> Result<u64> {
        self.gc.sync_to(
            target,
            || self.head_lsn.load(Ordering::Acquire),
            || self.disk.sync(),
        )
    }

    /// Writes the superblock with `f` applied, into the older slot, and syncs.
    /// Returns the WAL tail of the copy left in place (the previous newest).
    pub(crate) fn persist(&self, f: impl FnOnce(&mut Superblock)) -> Result<u64> {
        let mut cur = lock(&self.sb);
        let mut next = cur.clone();
        f(&mut next);
        next.seq = cur.seq + 1;
        let res = self
            .disk
            .write_at(&next.encode(), Superblock::slot_offset(next.slot()))
            .and_then(|()| self.disk.sync());
        match res {
            Ok(()) => {
                let prev_tail = cur.wal_tail_pos.0;
                *cur = next;
                Ok(prev_tail)
            }
            Err(e) => {
                let err = self.io_err(e);
                self.gc.poison(format!("superblock update failed: {err}"));
                Err(err)
            }
        }
    }

    fn lock_for_append(&self) -> Result<MutexGuard<'_, WalState>> {
        self.gc.check()?;
        let st = lock(&self.wal);
        if st.rebuilding {
            return Err(Error::Rebuilding {
                reason: "writes are refused until finish_rebuild".into(),
            });
        }
        Ok(st)
    }

    fn append_range(&self, kind: EntryKind, lba: u64, blocks: u64) -> Result<Lsn> {
        self.check_range(lba, blocks)?;
        let mut last = Lsn(0);
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(u64::from(u32::MAX));
            last = self.append_local(kind, lba + done, n as u32, &[])?;
            done += n;
        }
        Ok(last)
    }

    fn append_local(&self, kind: EntryKind, lba: u64, blocks: u32, data: &[u8]) -> Result<Lsn> {
        let st = self.lock_for_append()?;
        let mut st = self.wait_for_space(st, wal::record_len_for(data.len()))?;
        let entry = EntryRef {
            lsn: Lsn(st.head_lsn + 1),
            epoch: Epoch(self.epoch.load(Ordering::Acquire)),
            kind,
            lba: Lba(lba),
            blocks,
            data,
        };
        self.append_locked(&mut st, entry, None)?;
        Ok(entry.lsn)
    }

    /// Ring bytes an append of `record_len` needs at the current head (including the
    /// rest of the lap when it must wrap).
    fn needed(&self, st: &WalState, record_len: u64) -> u64 {
        let rem = self.layout.lap_remaining(st.head_pos);
        if record_len > rem {
            rem + record_len
        } else {
            record_len
        }
    }

    /// Admission control: returns once the append fits under the hard watermark (or
    /// at all, when the WAL is otherwise empty); waits for the flusher, failing only
    /// after `wal_full_timeout_ms` in which no space was freed.
    fn wait_for_space<'a>(
        &'a self,
        mut st: MutexGuard<'a, WalState>,
        record_len: u64,
    ) -> Result<MutexGuard<'a, WalState>> {
        let timeout = Duration::from_millis(self.cfg.wal_full_timeout_ms);
        let mut deadline = Instant::now() + timeout;
        let mut freed_to = st.free_from;
        loop {
            if self.has_space(&st, record_len)? {
                return Ok(st);
            }
            let need = self.needed(&st, record_len);
            let now = Instant::now();
            if st.free_from > freed_to {
                // Space is being freed: keep waiting, however long the whole wait takes.
                freed_to = st.free_from;
                deadline = now + timeout;
            }
            if now >= deadline {
                tracing::warn!(file = %self.disk.describe(), needed_bytes = need,
                    occupied_bytes = st.occupied(), "WAL full");
                return Err(Error::WalFull {
                    needed_bytes: need,
                    timeout_ms: self.cfg.wal_full_timeout_ms,
                });
            }
            // A waiting writer makes the flusher drop the WAL history first.
            st.waiting_writers += 1;
            st = self
                .space_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.waiting_writers -= 1;
        }
    }

    /// Whether an append of `record_len` fits under the hard watermark now (or at all,
    /// when the WAL is otherwise empty); kicks the flusher past the soft watermark.
    /// Fails if the volume failed or is being rebuilt.
    fn has_space(&self, st: &WalState, record_len: u64) -> Result<bool> {
        if let Some(reason) = self.gc.failed() {
            return Err(Error::Failed { reason });
        }
        if st.rebuilding {
            return Err(Error::Rebuilding {
                reason: "writes are refused until finish_rebuild".into(),
            });
        }
        let wal = self.layout.wal_size;
        let hard = wal * u64::from(self.cfg.wal_hard_watermark_pct) / 100;
        let soft = wal * u64::from(self.cfg.wal_soft_watermark_pct) / 100;
        let after = st.occupied() + self.needed(st, record_len);
        let fits = after <= wal && (after <= hard || st.occupied() == 0);
        if !fits || after > soft {
            self.kick();
        }
        Ok(fits)
    }

    /// Writes `entry` at the head (padding first if it must wrap) and publishes it.
    /// The caller checked the space and that `entry.lsn == head + 1`. `owned` is the
    /// same entry when the caller already has it owned (shipped entries), so the append
    /// observer gets it without a copy; local writes pass `None` and their data is
    /// copied only into the record (and for an observer, if one is set).
    fn append_locked(
        &self,
        st: &mut WalState,
        entry: EntryRef<'_>,
        owned: Option<&WalEntry>,
    ) -> Result<()> {
        let wal_gen = st.wal_gen;
        let record = wal::encode_record_parts(entry, wal_gen);
        let len = wal::record_len_for(entry.data.len());
        debug_assert_eq!(
            entry.lsn.0,
            st.head_lsn + 1,
            "LSNs are dense: an append is the head's successor"
        );
        debug_assert!(
            st.occupied() + self.needed(st, len) <= self.layout.wal_size,
            "an append never overwrites WAL space that is not free yet"
        );
        let rem = self.layout.lap_remaining(st.head_pos);
        let mut pos = st.head_pos;
        if len > rem {
            if rem >= RECORD_OVERHEAD as u64 {
                let pad = WalEntry {
                    lsn: entry.lsn,
                    epoch: entry.epoch,
                    kind: EntryKind::Padding,
                    lba: Lba(0),
                    blocks: 0,
                    data: Vec::new(),
                };
                let rec = wal::encode_record(&pad, wal_gen, Some(rem));
                self.disk
                    .write_at(&rec, self.layout.wal_phys(pos))
                    .map_err(|e| self.append_write_failed(e))?;
            }
            pos += rem;
        }
        debug_assert!(
            self.layout.lap_remaining(pos) >= len,
            "a record never straddles the end of the ring"
        );
        self.disk
            .write_vectored_at(
                &[&record.head, entry.data, &record.tail],
                self.layout.wal_phys(pos),
            )
            .map_err(|e| self.append_write_failed(e))?;
        let ie = IndexEntry {
            lsn: entry.lsn.0,
            pos,
            len,
            kind: entry.kind,
            lba: entry.lba.0,
            blocks: entry.blocks,
            wal_gen,
            epoch: entry.epoch.0,
        };
        ie.apply(&mut write(&self.map));
        st.index.push_back(ie);
        st.head_pos = pos + len;
        st.head_lsn = entry.lsn.0;
        self.head_lsn.store(entry.lsn.0, Ordering::Release);
        if let Some(obs) = read(&self.observer).as_ref() {
            match owned {
                Some(e) => obs(e),
                None => obs(&entry.to_entry()),
            }
        }
        Ok(())
    }

    /// Zeroes the record slot at `head_pos` so nothing stale there can extend the
    /// chain before the next append. Skipped when that slot is not free space
    /// (`occupied` bytes are in use); the generation check covers that case.
    fn zero_slot_at(&self, head_pos: u64, occupied: u64) -> Result<()> {
        let wal = self.layout.wal_size;
        let over = RECORD_OVERHEAD as u64;
        let rem = self.layout.lap_remaining(head_pos);
        let (pos, need) = if rem < over {
            (head_pos + rem, rem + over)
        } else {
            (head_pos, over)
        };
        if occupied + need > wal {
            return Ok(());
        }
        self.disk
            .write_at(&[0u8; RECORD_OVERHEAD], self.layout.wal_phys(pos))
            .map_err(|e| self.io_err(e))
    }

    /// Disk effects first (zero the first dropped slot, bump the generation), memory
    /// after: a failed truncation leaves the in-memory state untouched.
    fn truncate_after(&self, lsn: u64) -> Result<()> {
        let _cycle = lock(&self.flush_cycle);
        let mut st = self.lock_for_append()?;
        if lsn >= st.head_lsn {
            return Ok(());
        }
        let checkpoint = self.checkpoint_lsn.load(Ordering::Acquire);
        if lsn < checkpoint {
            return Err(Error::TruncationUnsafe {
                lsn: Lsn(lsn),
                checkpoint: Lsn(checkpoint),
            });
        }
        let copied = lock(&self.sb).copied_lsn.0;
        if copied > lsn {
            self.restore_extent_before_truncation(&st, lsn, checkpoint, copied)?;
        }
        let new_head_pos = match st.entry(lsn) {
            Some(e) => e.pos + e.len,
            None => st.tail_pos,
        };
        let dropped = st.head_lsn - lsn;
        // The first dropped record must stop the walk even before anything new is
        // appended. Its slot lies inside the dropped range, so zeroing it is always safe.
        let over = RECORD_OVERHEAD as u64;
        let rem = self.layout.lap_remaining(new_head_pos);
        let slot = if rem < over {
            new_head_pos + rem
        } else {
            new_head_pos
        };
        if slot + over <= st.head_pos {
            self.disk
                .write_at(&[0u8; RECORD_OVERHEAD], self.layout.wal_phys(slot))
                .map_err(|e| self.io_err(e))?;
        }
        let empty_tail = lsn < st.tail_lsn;
        let prev = self.persist(|sb| {
            sb.wal_gen += 1;
            if empty_tail {
                sb.wal_tail_gen = sb.wal_gen;
            }
            // Blocks still differing from the checkpoint state are now only ones the
            // kept entries (checkpoint, lsn] wrote.
            if sb.copied_lsn.0 > lsn {
                sb.copied_lsn = Lsn(lsn);
            }
        })?;
        st.note_persisted(prev);
        st.wal_gen = lock(&self.sb).wal_gen;
        while st.index.back().is_some_and(|e| e.lsn > lsn) {
            st.index.pop_back();
        }
        st.head_pos = new_head_pos;
        st.head_lsn = lsn;
        self.head_lsn.store(lsn, Ordering::Release);
        lock(&self.history_marks).retain(|m| m.0 <= lsn);
        {
            let mut map = write(&self.map);
            map.clear();
            for e in st.index.iter().filter(|e| e.lsn > checkpoint) {
                e.apply(&mut map);
            }
        }
        if self.gc.durable() > lsn {
            self.gc.reset_durable(lsn);
        }
        tracing::info!(file = %self.disk.describe(), lsn, dropped, "truncated WAL");
        Ok(())
    }

    /// The extent part of `truncate_after` when the extent may hold entries up to
    /// `copied` > `lsn`: a block written in (lsn, copied] and not in (checkpoint, lsn]
    /// (those stay in the dirty map and are read from the WAL, and recovery replays
    /// them) gets its content as of the checkpoint back, then the extent is synced. The
    /// whole plan is made before anything is written, so a refusal changes nothing; a
    /// crash midway leaves the truncation undone and it is simply asked for again.
    fn restore_extent_before_truncation(
        &self,
        st: &WalState,
        lsn: u64,
        checkpoint: u64,
        copied: u64,
    ) -> Result<()> {
        let bs = self.layout.block_size;
        let (mut base, mut kept, mut dropped) =
            (DirtyMap::new(bs), DirtyMap::new(bs), DirtyMap::new(bs));
        for e in &st.index {
            let map = if e.lsn <= checkpoint {
                &mut base
            } else if e.lsn <= lsn {
                &mut kept
            } else if e.lsn <= copied {
                &mut dropped
            } else {
                continue;
            };
            e.apply(map);
        }
        // Retained from LSN 1: a block no retained entry wrote was never written.
        let whole_history = st.tail_lsn <= 1;
        let mut plan: Vec<(u64, u64, Source)> = Vec::new();
        let mut fill = |start: u64, end: u64| -> Result<()> {
            let mut at = start;
            for r in base.lookup(start, end) {
                if r.start > at {
                    if !whole_history {
                        return Err(Error::TruncationNeedsRebuild {
                            lsn: Lsn(lsn),
                            copied: Lsn(copied),
                            lba: Lba(at),
                        });
                    }
                    plan.push((at, r.start, Source::Zero));
                }
                plan.push((r.start, r.end, r.src));
                at = r.end;
            }
            if at < end {
                if !whole_history {
                    return Err(Error::TruncationNeedsRebuild {
                        lsn: Lsn(lsn),
                        copied: Lsn(copied),
                        lba: Lba(at),
                    });
                }
                plan.push((at, end, Source::Zero));
            }
            Ok(())
        };
        for d in dropped.runs() {
            let mut at = d.start;
            for k in kept.lookup(d.start, d.end) {
                if k.start > at {
                    fill(at, k.start)?;
                }
                at = k.end;
            }
            if at < d.end {
                fill(at, d.end)?;
            }
        }
        if let Err(e) = self.write_extent_runs(plan.iter().copied()) {
            let err = self.io_err(e);
            self.gc.poison(format!(
                "restoring the extent for a truncation failed: {err}"
            ));
            return Err(err);
        }
        tracing::info!(file = %self.disk.describe(), lsn, checkpoint, copied, runs = plan.len(),
            "restored extent blocks written by entries a crashed flusher cycle copied");
        Ok(())
    }

    fn begin_rebuild(&self) -> Result<()> {
        let _cycle = lock(&self.flush_cycle);
        self.gc.check()?;
        let mut st = lock(&self.wal);
        if lock(&self.ctl).base_pins > 0 {
            return Err(Error::invalid(
                "begin_rebuild",
                "a base image of this volume is pinned",
            ));
        }
        let tail_pos = st.head_pos;
        self.zero_slot_at(tail_pos, st.occupied())?;
        let prev = self.persist(|sb| {
            sb.flags |= FLAG_REBUILD_IN_PROGRESS;
            sb.checkpoint_lsn = Lsn(0);
            sb.copied_lsn = Lsn(0);
            sb.extent_limit_lsn = Lsn(0);
            sb.checkpoint_epoch = superblock::UNKNOWN_EPOCH;
            sb.wal_tail_lsn = Lsn(1);
            sb.wal_tail_pos = WalPos(tail_pos);
            sb.wal_gen += 1;
            sb.wal_tail_gen = sb.wal_gen;
        })?;
        st.rebuilding = true;
        st.index.clear();
        st.tail_pos = tail_pos;
        st.tail_lsn = 1;
        st.head_lsn = 0;
        st.note_persisted(prev);
        st.wal_gen = lock(&self.sb).wal_gen;
        self.head_lsn.store(0, Ordering::Release);
        write(&self.map).clear();
        self.checkpoint_lsn.store(0, Ordering::Release);
        self.retained_start.store(1, Ordering::Release);
        self.gc.reset_durable(0);
        lock(&self.history_marks).clear();
        self.extent_limit.store(0, Ordering::Release);
        // A rebuild ships only the blocks the source's extent holds data for: every other
        // block must read as zeros here, whatever this (possibly stale) replica held.
        // The volume is marked rebuilding already (a failure here leaves it so); durable
        // with the sync `finish_rebuild` does before it clears the flag.
        let extent_bytes = self.size_bytes.load(Ordering::Acquire);
        self.disk
            .write_zeroes(self.layout.extent_offset, extent_bytes)
            .map_err(|e| self.io_err(e))?;
        tracing::info!(file = %self.disk.describe(), "rebuild started");
        Ok(())
    }

    fn finish_rebuild(&self, checkpoint: u64, checkpoint_epoch: Epoch) -> Result<()> {
        if checkpoint >= superblock::MAX_COUNTER {
            return Err(Error::invalid(
                "checkpoint",
                format!("{checkpoint} exceeds {}", superblock::MAX_COUNTER),
            ));
        }
        let _cycle = lock(&self.flush_cycle);
        self.gc.check()?;
        let mut st = lock(&self.wal);
        if !st.rebuilding {
            return Err(Error::invalid("finish_rebuild", "no rebuild in progress"));
        }
        self.disk.sync().map_err(|e| {
            let err = self.io_err(e);
            self.gc.poison(format!("sync after rebuild failed: {err}"));
            err
        })?;
        let tail_pos = st.head_pos;
        self.zero_slot_at(tail_pos, st.occupied())?;
        let prev = self.persist(|sb| {
            sb.flags &= !FLAG_REBUILD_IN_PROGRESS;
            sb.checkpoint_lsn = Lsn(checkpoint);
            sb.copied_lsn = Lsn(checkpoint);
            sb.extent_limit_lsn = Lsn(0);
            sb.checkpoint_epoch = checkpoint_epoch;
            sb.wal_tail_lsn = Lsn(checkpoint + 1);
            sb.wal_tail_pos = WalPos(tail_pos);
            sb.wal_gen += 1;
            sb.wal_tail_gen = sb.wal_gen;
        })?;
        st.tail_pos = tail_pos;
        st.tail_lsn = checkpoint + 1;
        st.head_lsn = checkpoint;
        st.note_persisted(prev);
        st.wal_gen = lock(&self.sb).wal_gen;
        st.rebuilding = false;
        self.head_lsn.store(checkpoint, Ordering::Release);
        self.checkpoint_lsn.store(checkpoint, Ordering::Release);
        self.retained_start.store(checkpoint + 1, Ordering::Release);
        self.gc.reset_durable(checkpoint);
        *lock(&self.history_marks) = VecDeque::from([(checkpoint, Instant::now())]);
        tracing::info!(file = %self.disk.describe(), checkpoint, "rebuild finished");
        Ok(())
    }
}
