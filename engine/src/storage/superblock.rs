//! The superblock: volume geometry plus the durable recovery anchor (checkpoint LSN,
//! WAL tail, WAL generation, epoch). Two copies live in two 4 KiB slots; each update
//! writes the slot holding the older copy and syncs, so a torn superblock write always
//! leaves the previous copy intact. On open the valid copy with the highest sequence
//! number wins.
//!
//! Format versions: 1 is the original layout; 2 appends `copied_lsn`; 3 appends
//! `extent_limit_lsn`. This build writes version 3 and reads all three (a version 1 copy
//! has `copied_lsn` = its checkpoint, which is exact: version 1 flushers left nothing past
//! the checkpoint that a later truncation could expose, except in the crash window
//! version 2 closes; versions 1 and 2 have no extent limit).

use crate::error::{Error, Result};
use crate::types::{DurabilityMode, Epoch, Lsn, WalPos};

/// Bytes reserved for each superblock copy.
pub const SUPERBLOCK_SLOT_SIZE: u64 = 4096;
/// Number of superblock copies.
pub const SUPERBLOCK_COPIES: u64 = 2;
/// Where the WAL region starts: right after both superblock copies.
pub const WAL_OFFSET: u64 = SUPERBLOCK_SLOT_SIZE * SUPERBLOCK_COPIES;

const MAGIC: &[u8; 8] = b"BLKVOLSB";
const VERSION: u32 = 3;
/// Oldest format version this build still reads.
const VERSION_MIN: u32 = 1;
/// Length of an encoded version 1 superblock including its CRC.
const ENCODED_LEN_V1: usize = 8 + 4 + 4 + 8 + 16 + 8 + 4 + 4 + 8 * 12 + 4;
/// Length of an encoded version 2 superblock including its CRC.
const ENCODED_LEN_V2: usize = ENCODED_LEN_V1 + 8;
/// Length of the encoded superblock (current version) including its CRC.
pub const ENCODED_LEN: usize = ENCODED_LEN_V2 + 8;

/// Flag: a rebuild began and has not finished; the extent is not a consistent image.
pub const FLAG_REBUILD_IN_PROGRESS: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_REBUILD_IN_PROGRESS;

/// `checkpoint_epoch` value meaning "not known" (a new volume, or a rebuild finished
/// without one).
pub const UNKNOWN_EPOCH: Epoch = Epoch(u64::MAX);

/// Upper bound for LSNs, WAL positions and generations in a valid superblock.
pub const MAX_COUNTER: u64 = 1 << 62;

/// Smallest and largest supported block sizes.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 65536;

/// One decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    /// Incremented by every write; the higher valid copy wins.
    pub seq: u64,
    pub uuid: [u8; 16],
    pub volume_size: u64,
    pub block_size: u32,
    pub durability: DurabilityMode,
    pub wal_offset: u64,
    pub wal_size: u64,
    pub extent_offset: u64,
    /// Every entry with LSN <= this is in the extent and the extent is synced.
    pub checkpoint_lsn: Lsn,
    /// No entry above this LSN was ever copied into the extent (>= `checkpoint_lsn`). A
    /// flusher cycle persists its target here before it copies, so after a crash inside
    /// the cycle the extent may hold entries in (checkpoint, copied]; truncating below
    /// it must first restore the blocks those entries wrote.
    pub copied_lsn: Lsn,
    /// The flusher copies no entry above this LSN into the extent (0: no limit). It is
    /// the WAL retention floor in force when the copy was written - on a replicated
    /// primary the lowest LSN every member has made durable - and it survives a restart,
    /// so a primary that comes back (as a primary or a replica) keeps its extent behind
    /// what its members have until it receives replicated entries or is truncated.
    pub extent_limit_lsn: Lsn,
    /// Logical position of the oldest retained WAL record.
    pub wal_tail_pos: WalPos,
    /// LSN of the record at `wal_tail_pos` (the oldest retained LSN).
    pub wal_tail_lsn: Lsn,
    /// WAL generation: bumped (and persisted) on every open, truncation and rebuild
    /// before anything is appended; records carry it, and a chain of records may never
    /// step back to an older generation. That keeps stale records left behind a torn
    /// or truncated head from ever being replayed.
    pub wal_gen: u64,
    /// Lowest generation the record at the tail may carry: the walk starts from it,
    /// so a stale record left at an empty tail by an older generation is never taken
    /// for the first record.
    pub wal_tail_gen: u64,
    /// Epoch of the entry at `checkpoint_lsn`, kept so the history's last point can be
    /// proven after the WAL recycled that entry; `UNKNOWN_EPOCH` when not known.
    pub checkpoint_epoch: Epoch,
    pub epoch: Epoch,
    /// Non-zero while an expansion to this size is in progress.
    pub prepared_size: u64,
    /// Number of completed expansions.
    pub expand_epoch: u64,
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let s = self
            .b
            .get(self.at..self.at + N)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take::<4>()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take::<8>()?))
    }
}

impl Superblock {
    /// Encodes into exactly `ENCODED_LEN` bytes (the CRC32C is the last 4).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ENCODED_LEN);
        b.extend_from_slice(MAGIC);
        put_u32(&mut b, VERSION);
        put_u32(&mut b, self.flags);
        put_u64(&mut b, self.seq);
        b.extend_from_slice(&self.uuid);
        put_u64(&mut b, self.volume_size);
        put_u32(&mut b, self.block_size);
        b.extend_from_slice(&[self.durability.to_u8(), 0, 0, 0]);
        put_u64(&mut b, self.wal_offset);
        put_u64(&mut b, self.wal_size);
        put_u64(&mut b, self.extent_offset);
        put_u64(&mut b, self.checkpoint_lsn.0);
        put_u64(&mut b, self.wal_tail_pos.0);
        put_u64(&mut b, self.wal_tail_lsn.0);
        put_u64(&mut b, self.wal_gen);
        put_u64(&mut b, self.epoch.0);
        put_u64(&mut b, self.prepared_size);
        put_u64(&mut b, self.expand_epoch);
        put_u64(&mut b, self.wal_tail_gen);
        put_u64(&mut b, self.checkpoint_epoch.0);
        put_u64(&mut b, self.copied_lsn.0);
        put_u64(&mut b, self.extent_limit_lsn.0);
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, crc);
        debug_assert_eq!(b.len(), ENCODED_LEN);
        b
    }

    /// Decodes and validates one copy (any supported version). The error text says what
    /// is wrong; it never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, String> {
        let head = bytes
            .get(..12)
            .ok_or_else(|| format!("only {} bytes, need {ENCODED_LEN}", bytes.len()))?;
        if &head[..8] != MAGIC {
            return Err("bad magic (not a blockvol superblock, or never written)".into());
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        let len = match version {
            1 => ENCODED_LEN_V1,
            2 => ENCODED_LEN_V2,
            VERSION => ENCODED_LEN,
            _ => {
                return Err(format!(
                    "unsupported version {version} (supported: {VERSION_MIN}..={VERSION})"
                ));
            }
        };
        let body = bytes
            .get(..len)
            .ok_or_else(|| format!("only {} bytes, need {len}", bytes.len()))?;
        let (data, crc_bytes) = body.split_at(len - 4);
        let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let actual = crc32c::crc32c(data);
        if stored != actual {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
            ));
        }
        let mut r = Reader { b: data, at: 12 };
        let flags = r.u32()?;
        let seq = r.u64()?;
        let uuid = r.take::<16>()?;
        let volume_size = r.u64()?;
        let block_size = r.u32()?;
        let [dm, _, _, _] = r.take::<4>()?;
        let mut sb = Superblock {
            flags,
            seq,
            uuid,
            volume_size,
            block_size,
            durability: DurabilityMode::from_u8(dm)
                .ok_or_else(|| format!("unknown durability mode {dm} (allowed 0..=1)"))?,
            wal_offset: r.u64()?,
            wal_size: r.u64()?,
            extent_offset: r.u64()?,
            checkpoint_lsn: Lsn(r.u64()?),
            copied_lsn: Lsn(0),
            extent_limit_lsn: Lsn(0),
            wal_tail_pos: WalPos(r.u64()?),
            wal_tail_lsn: Lsn(r.u64()?),
            wal_gen: r.u64()?,
            epoch: Epoch(r.u64()?),
            prepared_size: r.u64()?,
            expand_epoch: r.u64()?,
            wal_tail_gen: r.u64()?,
            checkpoint_epoch: Epoch(r.u64()?),
        };
        sb.copied_lsn = if version >= 2 {
            Lsn(r.u64()?)
        } else {
            sb.checkpoint_lsn
        };
        if version >= 3 {
            sb.extent_limit_lsn = Lsn(r.u64()?);
        }
        sb.validate()?;
        Ok(sb)
    }

    /// Checks the invariants every written superblock satisfies.
    pub fn validate(&self) -> Result<(), String> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(format!("unknown flags {:#x}", self.flags & !KNOWN_FLAGS));
        }
        validate_geometry(self.volume_size, self.block_size, self.wal_size)?;
        if self.wal_offset != WAL_OFFSET {
            return Err(format!(
                "wal_offset {} (must be {WAL_OFFSET})",
                self.wal_offset
            ));
        }
        let wal_end = self
            .wal_offset
            .checked_add(self.wal_size)
            .ok_or("wal_offset + wal_size overflows")?;
        if self.extent_offset < wal_end
            || !self
                .extent_offset
                .is_multiple_of(u64::from(self.block_size))
        {
            return Err(format!(
                "extent_offset {} overlaps the WAL (ends at {wal_end}) or is not block aligned",
                self.extent_offset
            ));
        }
        if self.extent_offset.checked_add(self.volume_size).is_none() {
            return Err("extent_offset + volume_size overflows".into());
        }
        // Counters this large cannot come from real use; rejecting them keeps every
        // later `+ 1` and position sum far from overflow.
        for (name, v) in [
            ("checkpoint_lsn", self.checkpoint_lsn.0),
            ("copied_lsn", self.copied_lsn.0),
            ("extent_limit_lsn", self.extent_limit_lsn.0),
            ("wal_tail_lsn", self.wal_tail_lsn.0),
            ("wal_tail_pos", self.wal_tail_pos.0),
            ("wal_gen", self.wal_gen),
        ] {
            if v > MAX_COUNTER {
                return Err(format!(
                    "{name} {v} is implausibly large (max {MAX_COUNTER})"
                ));
            }
        }
        if self.wal_tail_lsn.0 == 0 || self.wal_tail_lsn.0 > self.checkpoint_lsn.0 + 1 {
            return Err(format!(
                "wal_tail_lsn {} outside 1..={} (checkpoint + 1)",
                self.wal_tail_lsn,
                self.checkpoint_lsn.0 + 1
            ));
        }
        if self.copied_lsn < self.checkpoint_lsn {
            return Err(format!(
                "copied_lsn {} below checkpoint_lsn {}",
                self.copied_lsn, self.checkpoint_lsn
            ));
        }
        if self.wal_tail_gen > self.wal_gen {
            return Err(format!(
                "wal_tail_gen {} above wal_gen {}",
                self.wal_tail_gen, self.wal_gen
            ));
        }
        if self.prepared_size != 0
            && (self.prepared_size <= self.volume_size
                || !self
                    .prepared_size
                    .is_multiple_of(u64::from(self.block_size)))
        {
            return Err(format!(
                "prepared_size {} is not a block-aligned size above volume_size {}",
                self.prepared_size, self.volume_size
            ));
        }
        Ok(())
    }

    /// File offset of superblock copy `slot` (0 or 1).
    pub fn slot_offset(slot: u64) -> u64 {
        (slot % SUPERBLOCK_COPIES) * SUPERBLOCK_SLOT_SIZE
    }

    /// The slot this superblock's sequence number is written to. Consecutive sequence
    /// numbers alternate slots, so an update always overwrites the older copy.
    pub fn slot(&self) -> u64 {
        self.seq % SUPERBLOCK_COPIES
    }
}

/// Validates volume geometry shared by create and open.
pub fn validate_geometry(volume_size: u64, block_size: u32, wal_size: u64) -> Result<(), String> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(format!(
            "block_size {block_size} (allowed: a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE})"
        ));
    }
    if volume_size == 0 || !volume_size.is_multiple_of(u64::from(block_size)) {
        return Err(format!(
            "volume_size {volume_size} (must be a positive multiple of block_size {block_size})"
        ));
    }
    if wal_size < crate::storage::wal::MIN_WAL_SIZE
        || !wal_size.is_multiple_of(4096)
        || wal_size > MAX_COUNTER
    {
        return Err(format!(
            "wal_size {wal_size} (must be a multiple of 4096 and at least {})",
            crate::storage::wal::MIN_WAL_SIZE
        ));
    }
    if wal_size < 16 * u64::from(block_size) {
        return Err(format!(
            "wal_size {wal_size} (must hold at least 16 blocks of {block_size} bytes)"
        ));
    }
    Ok(())
}

/// Picks the newest valid copy from the two slot images, or explains why neither is
/// usable (naming `file`).
pub fn choose(file: &str, a: &[u8], b: &[u8]) -> Result<Superblock> {
    match (Superblock::decode(a), Superblock::decode(b)) {
        (Ok(x), Ok(y)) => Ok(if y.seq > x.seq { y } else { x }),
        (Ok(x), Err(e)) => {
            tracing::warn!(file, error = %e, "superblock copy B invalid, using copy A");
            Ok(x)
        }
        (Err(e), Ok(y)) => {
            tracing::warn!(file, error = %e, "superblock copy A invalid, using copy B");
            Ok(y)
        }
        (Err(ea), Err(eb)) => Err(Error::NoValidSuperblock {
            file: file.to_string(),
            copy_a: ea,
            copy_b: eb,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            flags: 0,
            seq: 7,
            uuid: [3; 16],
            volume_size: 1 << 20,
            block_size: 4096,
            durability: DurabilityMode::SyncAll,
            wal_offset: WAL_OFFSET,
            wal_size: 1 << 20,
            extent_offset: WAL_OFFSET + (1 << 20),
            checkpoint_lsn: Lsn(10),
            copied_lsn: Lsn(12),
            extent_limit_lsn: Lsn(11),
            wal_tail_pos: WalPos(12345),
            wal_tail_lsn: Lsn(5),
            wal_gen: 2,
            wal_tail_gen: 1,
            checkpoint_epoch: Epoch(3),
            epoch: Epoch(4),
            prepared_size: 0,
            expand_epoch: 0,
        }
    }

    #[test]
    fn superblock_roundtrips() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    /// A version 1 copy (written by an older build) still opens; its copied bound is its
    /// checkpoint.
    #[test]
    fn version_1_superblock_decodes_with_copied_lsn_at_the_checkpoint() {
        let sb = sample();
        let mut v1 = sb.encode();
        v1.truncate(ENCODED_LEN_V1 - 4);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        v1.resize(ENCODED_LEN, 0xAB);
        let back = Superblock::decode(&v1).unwrap();
        assert_eq!(
            back,
            Superblock {
                copied_lsn: sb.checkpoint_lsn,
                extent_limit_lsn: Lsn(0),
                ..sb
            }
        );
        let mut v9 = v1.clone();
        v9[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(Superblock::decode(&v9).unwrap_err().contains("version 9"));
    }

    #[test]
    fn superblock_with_flipped_bit_is_rejected() {
        let mut b = sample().encode();
        b[40] ^= 0x10;
        let err = Superblock::decode(&b).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn newest_valid_copy_wins_and_corrupt_copy_falls_back() {
        let old = sample();
        let mut new = sample();
        new.seq = 8;
        new.checkpoint_lsn = Lsn(20);
        new.copied_lsn = Lsn(20);
        assert_eq!(choose("f", &old.encode(), &new.encode()).unwrap(), new);
        let mut torn = new.encode();
        torn[60] ^= 1;
        assert_eq!(choose("f", &old.encode(), &torn).unwrap(), old);
        let mut torn_old = old.encode();
        torn_old[9] ^= 1;
        let err = choose("/some/file", &torn_old, &torn)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/some/file"), "{err}");
    }
}
