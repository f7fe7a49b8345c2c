//! `ReplicaLog` over the engine's `Volume`: the adapter the I/O shell uses so the sans-IO
//! cores drive real storage. It maps the volume's errors onto the replication contract and
//! reads base images block by block from a pinned `BaseImage`; the volume answers the epoch
//! of any retained entry and of its checkpoint entry (persisted), which the handshake's
//! log-matching check needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::storage::{AppendOutcome, BaseChunk, BaseKind, BasePin, ReplicaLog};
use super::types::{Epoch, Lba, Lsn, WalEntry};
use super::{Error, Result};
use crate::storage::volume::{BaseImage, Volume};

/// A `Volume` seen as a replication log.
pub struct VolumeLog {
    vol: Arc<Volume>,
    pins: BTreeMap<u64, BaseImage>,
    next_pin: u64,
}

impl std::fmt::Debug for VolumeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeLog")
            .field("head", &self.vol.head_lsn())
            .field("durable", &self.vol.durable_lsn())
            .field("pins", &self.pins.len())
            .finish()
    }
}

fn map(e: crate::Error) -> Error {
    match e {
        crate::Error::LsnGap { expected, got } => Error::Gap { expected, got },
        crate::Error::WalRecycled {
            from,
            retained_start,
        } => Error::Recycled {
            from,
            retained_start,
        },
        crate::Error::TruncationUnsafe { lsn, checkpoint } => {
            Error::TruncateBelowCheckpoint { lsn, checkpoint }
        }
        // Refused like a truncation below the checkpoint: the primary rebuilds the replica.
        crate::Error::TruncationNeedsRebuild { lsn, copied, .. } => {
            Error::TruncateBelowCheckpoint {
                lsn,
                checkpoint: copied,
            }
        }
        // Entries are checked against the volume size before anything is written: past
        // the end means this replica has not grown yet (an expansion in progress).
        crate::Error::OutOfRange { reason } => Error::BeyondSize(reason),
        other => Error::Storage(other.to_string()),
    }
}

impl VolumeLog {
    /// Ends the primary term's WAL retention (see [`Volume::release_retention_floor`]).
    pub(crate) fn release_retention_floor(&self) {
        self.vol.release_retention_floor();
    }

    pub fn new(vol: Arc<Volume>) -> Self {
        Self {
            vol,
            pins: BTreeMap::new(),
            next_pin: 0,
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    fn block_count(&self) -> u64 {
        self.vol.size_bytes() / u64::from(self.vol.block_size().max(1))
    }
}

impl ReplicaLog for VolumeLog {
    fn epoch(&self) -> Epoch {
        self.vol.epoch()
    }
    fn set_epoch(&mut self, epoch: Epoch) -> Result<()> {
        self.vol.set_epoch(epoch).map_err(map)
    }
    fn may_begin_primary_term(&self, epoch: Epoch) -> bool {
        self.vol.may_begin_primary_term(epoch)
    }
    fn head_lsn(&self) -> Lsn {
        self.vol.head_lsn()
    }
    fn durable_lsn(&self) -> Lsn {
        if self.vol.is_rebuilding() {
            Lsn(0)
        } else {
            self.vol.durable_lsn()
        }
    }
    fn checkpoint_lsn(&self) -> Lsn {
        self.vol.checkpoint_lsn()
    }
    fn checkpoint_trusted(&self) -> bool {
        // The superblock pair is checksummed; only an unfinished rebuild makes it unusable.
        !self.vol.is_rebuilding()
    }
    fn retained_start(&self) -> Lsn {
        self.vol.retained_start()
    }
    fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        if lsn == Lsn(0) {
            return Some(Epoch(0));
        }
        self.vol.entry_epoch(lsn)
    }
    fn scan_from(&self, from: Lsn, max: usize) -> Result<Vec<WalEntry>> {
        self.vol.scan_from(from, max).map_err(map)
    }
    fn append_replicated(&mut self, entry: &WalEntry) -> Result<AppendOutcome> {
        if entry.lsn <= self.vol.head_lsn() {
            return Ok(AppendOutcome::Duplicate);
        }
        self.vol.append_replicated(entry).map_err(map)?;
        Ok(AppendOutcome::Appended)
    }
    fn truncate_after(&mut self, lsn: Lsn) -> Result<()> {
        self.vol.truncate_after(lsn).map_err(map)
    }
    fn sync(&mut self) -> Result<Lsn> {
        if self.vol.is_rebuilding() {
            // Base blocks become durable in finish_rebuild; nothing to report before.
            return Ok(Lsn(0));
        }
        self.vol.flush().map_err(|e| match e {
            crate::Error::Io { .. } | crate::Error::Failed { .. } => Error::FsyncFailed,
            other => map(other),
        })
    }
    fn set_retention_floor(&mut self, floor: Option<Lsn>) {
        self.vol.set_retention_floor(floor);
    }
    fn pin_base(&mut self, kind: BaseKind) -> Result<BasePin> {
        if kind == BaseKind::FullBase {
            // A full base is the whole extent as of a fresh checkpoint.
            self.vol.flush().map_err(map)?;
            self.vol.checkpoint().map_err(map)?;
        }
        let img = self.vol.base_snapshot().map_err(map)?;
        let base_lsn = img.checkpoint();
        // The entry at the checkpoint may be recycled; the current epoch then stands in,
        // which can only cause a later handshake to ask for another rebuild.
        let base_epoch = self.epoch_at(base_lsn).unwrap_or_else(|| self.vol.epoch());
        self.next_pin += 1;
        let pin = BasePin {
            id: self.next_pin,
            kind,
            base_lsn,
            base_epoch,
        };
        self.pins.insert(pin.id, img);
        Ok(pin)
    }
    fn read_base(&self, pin: &BasePin, cursor: u64, max: usize) -> Result<BaseChunk> {
        let img = self
            .pins
            .get(&pin.id)
            .ok_or(Error::UnknownBasePin(pin.id))?;
        let bs = self.vol.block_size() as usize;
        let total = Lba(self.block_count());
        let max = max.max(1);
        let mut out = Vec::with_capacity(max.min(4096));
        let mut at = Lba(cursor);
        // Only the runs the extent holds data for: the replica cleared its extent when
        // the rebuild started, so every block skipped reads as zeros there too.
        while out.len() < max {
            let Some((start, stop)) = img.next_allocated(at, total).map_err(map)? else {
                return Ok((out, None));
            };
            let stop = Lba(stop.0.min(start.0 + (max - out.len()) as u64));
            let mut buf = vec![0u8; (stop.0 - start.0) as usize * bs];
            img.read(start, &mut buf).map_err(map)?;
            for (k, chunk) in buf.chunks_exact(bs).enumerate() {
                out.push((Lba(start.0 + k as u64), chunk.to_vec()));
            }
            at = stop;
        }
        // More may follow; the next call finds out.
        Ok((out, (at < total).then_some(at.0)))
    }
    fn base_bytes(&self, pin: &BasePin) -> Result<u64> {
        let img = self
            .pins
            .get(&pin.id)
            .ok_or(Error::UnknownBasePin(pin.id))?;
        img.allocated_bytes().map_err(map)
    }
    fn release_base(&mut self, pin: &BasePin) {
        self.pins.remove(&pin.id);
    }
    fn begin_rebuild(&mut self) -> Result<()> {
        self.vol.begin_rebuild().map_err(map)
    }
    fn install_base_block(&mut self, lba: Lba, data: &[u8]) -> Result<()> {
        self.vol.install_base_block(lba, data).map_err(map)
    }
    fn finish_rebuild(&mut self, base_lsn: Lsn, base_epoch: Epoch) -> Result<()> {
        self.vol
            .finish_rebuild_with_epoch(base_lsn, base_epoch)
            .map_err(map)
    }
    fn rebuilding(&self) -> bool {
        self.vol.is_rebuilding()
    }
}
