//! Crash recovery: walk the WAL from the superblock's tail and rebuild the in-memory
//! index and dirty map. The walk accepts a record only if it is complete (both CRCs),
//! carries exactly the next LSN, and does not step back to an older WAL generation; it
//! stops at the first record that fails, so nothing torn or stale is ever applied and
//! everything that was synced (an unbroken chain from the tail) is found.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::storage::dirty_map::{DirtyMap, Source};
use crate::storage::disk::Disk;
use crate::storage::layout::Layout;
use crate::storage::superblock::Superblock;
use crate::storage::wal::{
    ENTRY_HEADER_LEN, EntryKind, RECORD_DATA_OFFSET, RECORD_OVERHEAD, RECORD_PREFIX_LEN,
    RecordHeader,
};

/// Where one retained entry lives in the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub lsn: u64,
    /// Logical position of the record.
    pub pos: u64,
    /// Ring bytes of the record.
    pub len: u64,
    pub kind: EntryKind,
    pub lba: u64,
    pub blocks: u32,
    /// Generation the record was written in.
    pub wal_gen: u64,
    /// Epoch the entry carries.
    pub epoch: u64,
}

impl IndexEntry {
    /// Replays this entry into a dirty map.
    pub(crate) fn apply(&self, map: &mut DirtyMap) {
        let src = match self.kind {
            EntryKind::Write => Source::Wal {
                data_pos: self.pos + RECORD_DATA_OFFSET,
            },
            _ => Source::Zero,
        };
        map.insert(self.lba, self.lba + u64::from(self.blocks), self.lsn, src);
    }
}

/// What the WAL walk found.
pub(crate) struct Recovered {
    pub index: VecDeque<IndexEntry>,
    pub map: DirtyMap,
    pub head_lsn: u64,
    pub head_pos: u64,
    pub tail_pos: u64,
    pub tail_lsn: u64,
    /// Why the walk stopped (for the log).
    pub stop_reason: String,
}

const HEADER_PROBE: usize = RECORD_PREFIX_LEN + ENTRY_HEADER_LEN;

/// Walks the WAL described by `sb`.
pub(crate) fn recover(disk: &dyn Disk, layout: &Layout, sb: &Superblock) -> Result<Recovered> {
    let wal = layout.wal_size;
    let bs = layout.bs();
    let volume_blocks = sb.volume_size / bs;
    let checkpoint = sb.checkpoint_lsn.0;
    let mut index = VecDeque::new();
    let mut map = DirtyMap::new(layout.block_size);
    let mut pos = sb.wal_tail_pos.0;
    let end_limit = pos + wal;
    let mut expected = sb.wal_tail_lsn.0;
    let mut last_gen = sb.wal_tail_gen;
    let mut header = [0u8; HEADER_PROBE];
    let mut record = Vec::new();
    let read_err = |e| Error::io(format!("WAL of {}", disk.describe()), e);

    let stop_reason = loop {
        let rem = layout.lap_remaining(pos);
        if rem < RECORD_OVERHEAD as u64 {
            // Too little room for any record: the writer wrapped implicitly.
            pos += rem;
            if pos >= end_limit {
                break "walked the whole WAL".to_string();
            }
            continue;
        }
        if pos + RECORD_OVERHEAD as u64 > end_limit {
            break "walked the whole WAL".to_string();
        }
        disk.read_at(&mut header, layout.wal_phys(pos))
            .map_err(read_err)?;
        let h = match RecordHeader::parse(&header) {
            Ok(h) => h,
            Err(e) => break format!("record at {pos}: {e}"),
        };
        if h.wal_gen < last_gen || h.wal_gen > sb.wal_gen {
            break format!(
                "record at {pos}: generation {} outside {last_gen}..={}",
                h.wal_gen, sb.wal_gen
            );
        }
        if h.entry.lsn.0 != expected {
            break format!(
                "record at {pos}: LSN {} where {expected} was expected",
                h.entry.lsn
            );
        }
        let written = h.written_len();
        if written as u64 > rem || pos + written as u64 > end_limit {
            break format!("record at {pos}: {written} bytes do not fit in the lap");
        }
        if h.entry.kind == EntryKind::Padding && h.record_len != rem {
            break format!(
                "padding at {pos}: covers {} bytes but {rem} remain in the lap",
                h.record_len
            );
        }
        record.resize(written, 0);
        disk.read_at(&mut record, layout.wal_phys(pos))
            .map_err(read_err)?;
        if let Err(e) = h.verify(&record) {
            break format!("record at {pos} (LSN {expected}): {e}");
        }
        last_gen = h.wal_gen;
        if h.entry.kind == EntryKind::Padding {
            pos += rem;
            continue;
        }
        let e = &h.entry;
        let end_block = e.lba.0.checked_add(u64::from(e.blocks));
        if end_block.is_none_or(|end| end > volume_blocks)
            || (e.kind == EntryKind::Write && e.data_len as u64 != u64::from(e.blocks) * bs)
        {
            break format!(
                "record at {pos} (LSN {expected}): range {}+{} or data length {} invalid for this volume",
                e.lba, e.blocks, e.data_len
            );
        }
        let ie = IndexEntry {
            lsn: expected,
            pos,
            len: written as u64,
            kind: e.kind,
            lba: e.lba.0,
            blocks: e.blocks,
            wal_gen: h.wal_gen,
            epoch: e.epoch.0,
        };
        if ie.lsn > checkpoint {
            ie.apply(&mut map);
        }
        index.push_back(ie);
        expected += 1;
        pos += written as u64;
    };

    let mut rec = Recovered {
        index,
        map,
        head_lsn: expected - 1,
        head_pos: pos,
        tail_pos: sb.wal_tail_pos.0,
        tail_lsn: sb.wal_tail_lsn.0,
        stop_reason,
    };
    if rec.index.is_empty() {
        // Nothing retained: the tail is the head. Any padding the walk crossed belongs
        // to an older generation and must not be where the next walk starts.
        rec.tail_pos = rec.head_pos;
    }
    if rec.head_lsn < checkpoint {
        // The retained entries below the checkpoint are damaged. Their data is in the
        // extent already; only their history for catch-up is lost.
        tracing::warn!(
            file = %disk.describe(),
            found_up_to = rec.head_lsn,
            checkpoint,
            reason = %rec.stop_reason,
            "WAL history below the checkpoint is unreadable; dropping it"
        );
        rec.index.clear();
        rec.head_lsn = checkpoint;
        rec.tail_pos = rec.head_pos;
        rec.tail_lsn = checkpoint + 1;
    }
    Ok(rec)
}
