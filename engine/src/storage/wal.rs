//! WAL entries and their on-disk records.
//!
//! A [`WalEntry`] is the unit of replication: `encode()` gives the bytes a primary ships
//! and `decode()` parses them back, bounding every length and checking the CRC32C, so
//! bytes from a peer or a disk can never cause a panic or an oversized allocation.
//!
//! On disk each entry is wrapped in a record that adds the WAL generation (see
//! `Superblock::wal_gen`) and a record CRC binding that generation to the entry's CRC.
//! Records never straddle the end of the ring: a PADDING record (or, when fewer than
//! `RECORD_OVERHEAD` bytes remain, nothing) fills the rest of the lap and the next
//! record starts at physical offset 0.
//!
//! Entry layout (little-endian):
//! ```text
//! 0  4 magic "BVWE"   4 1 version   5 1 kind   6 2 flags (0)
//! 8  8 lsn           16 8 epoch    24 8 lba    32 4 blocks   36 4 data_len
//! 40 N data          40+N 4 crc32c over [0, 40+N)
//! ```
//! Record layout: `magic "BVWR" u32 | reserved u32 | record_len u64 | wal_gen u64 |
//! entry (44+N) | crc32c(first 24 bytes ++ entry crc) u32`.

use crate::types::{Epoch, Lba, Lsn};

/// Entry header length (before data).
pub const ENTRY_HEADER_LEN: usize = 40;
/// Entry overhead: header plus CRC.
pub const ENTRY_OVERHEAD: usize = ENTRY_HEADER_LEN + 4;
/// Record prefix length.
pub const RECORD_PREFIX_LEN: usize = 24;
/// Record overhead: prefix, entry overhead, record CRC. Also the size of a PADDING
/// record and the smallest record there is.
pub const RECORD_OVERHEAD: usize = RECORD_PREFIX_LEN + ENTRY_OVERHEAD + 4;
/// Largest data payload `decode` accepts in one entry.
pub const MAX_ENTRY_DATA_BYTES: usize = 64 << 20;
/// Smallest WAL region accepted at create.
pub const MIN_WAL_SIZE: u64 = 64 * 1024;

const ENTRY_MAGIC: &[u8; 4] = b"BVWE";
const RECORD_MAGIC: &[u8; 4] = b"BVWR";
const ENTRY_VERSION: u8 = 1;

/// What an entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// `data` holds `blocks` blocks for `lba..lba+blocks`.
    Write,
    /// The range was discarded; it reads as zeros.
    Trim,
    /// The range was zeroed.
    Zero,
    /// Filler at the end of the ring; carries no data and no LSN of its own.
    Padding,
}

impl EntryKind {
    fn code(self) -> u8 {
        match self {
            EntryKind::Write => 1,
            EntryKind::Trim => 2,
            EntryKind::Zero => 3,
            EntryKind::Padding => 0xFF,
        }
    }

    fn from_code(c: u8) -> Option<EntryKind> {
        match c {
            1 => Some(EntryKind::Write),
            2 => Some(EntryKind::Trim),
            3 => Some(EntryKind::Zero),
            0xFF => Some(EntryKind::Padding),
            _ => None,
        }
    }
}

/// One self-describing WAL entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalEntry {
    pub lsn: Lsn,
    /// Epoch of the primary that created the entry.
    pub epoch: Epoch,
    pub kind: EntryKind,
    pub lba: Lba,
    /// Number of blocks the entry covers.
    pub blocks: u32,
    /// WRITE: `blocks * block_size` bytes; empty for every other kind.
    pub data: Vec<u8>,
}

/// An entry whose data is borrowed: what the local append path encodes, so a client's
/// buffer goes into the WAL record without an intermediate owned copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryRef<'a> {
    pub lsn: Lsn,
    pub epoch: Epoch,
    pub kind: EntryKind,
    pub lba: Lba,
    pub blocks: u32,
    pub data: &'a [u8],
}

impl EntryRef<'_> {
    /// An owned copy (for observers that keep the entry).
    pub fn to_entry(self) -> WalEntry {
        WalEntry {
            lsn: self.lsn,
            epoch: self.epoch,
            kind: self.kind,
            lba: self.lba,
            blocks: self.blocks,
            data: self.data.to_vec(),
        }
    }

    /// Appends the entry header (everything before the data) to `out`.
    fn encode_header_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(ENTRY_MAGIC);
        out.push(ENTRY_VERSION);
        out.push(self.kind.code());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.lsn.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.lba.0.to_le_bytes());
        out.extend_from_slice(&self.blocks.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
    }

    /// Appends the encoded entry to `out`; returns the entry CRC.
    fn encode_into(&self, out: &mut Vec<u8>) -> u32 {
        let start = out.len();
        self.encode_header_into(out);
        out.extend_from_slice(self.data);
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        crc
    }
}

/// A WAL record in three pieces: `head` (record prefix and entry header), the entry's
/// data (borrowed, not copied) and `tail` (entry CRC and record CRC). Written with one
/// vectored write, the bytes are exactly those of [`encode_record`].
pub(crate) struct RecordParts {
    pub head: Vec<u8>,
    pub tail: [u8; 8],
}

/// The pieces of the record for a non-PADDING `entry` in generation `wal_gen`.
pub(crate) fn encode_record_parts(entry: EntryRef<'_>, wal_gen: u64) -> RecordParts {
    debug_assert!(
        entry.kind != EntryKind::Padding,
        "PADDING records are built by encode_record"
    );
    let record_len = record_len_for(entry.data.len());
    let mut head = Vec::with_capacity(RECORD_PREFIX_LEN + ENTRY_HEADER_LEN);
    head.extend_from_slice(RECORD_MAGIC);
    head.extend_from_slice(&[0, 0, 0, 0]);
    head.extend_from_slice(&record_len.to_le_bytes());
    head.extend_from_slice(&wal_gen.to_le_bytes());
    entry.encode_header_into(&mut head);
    let entry_crc = crc32c::crc32c_append(crc32c::crc32c(&head[RECORD_PREFIX_LEN..]), entry.data);
    let mut tail = [0u8; 8];
    tail[..4].copy_from_slice(&entry_crc.to_le_bytes());
    tail[4..].copy_from_slice(&record_crc(&head[..RECORD_PREFIX_LEN], entry_crc).to_le_bytes());
    RecordParts { head, tail }
}

impl<'a> From<&'a WalEntry> for EntryRef<'a> {
    fn from(e: &'a WalEntry) -> Self {
        EntryRef {
            lsn: e.lsn,
            epoch: e.epoch,
            kind: e.kind,
            lba: e.lba,
            blocks: e.blocks,
            data: &e.data,
        }
    }
}

/// Why bytes did not decode as an entry or record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported entry version {0}")]
    BadVersion(u8),
    #[error("unknown entry kind {0:#04x}")]
    BadKind(u8),
    #[error("data_len {0} exceeds the {MAX_ENTRY_DATA_BYTES} byte limit")]
    TooLong(u64),
    #[error("inconsistent entry: {0}")]
    Inconsistent(&'static str),
    #[error("checksum mismatch")]
    BadChecksum,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The parsed fixed header of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub lsn: Lsn,
    pub epoch: Epoch,
    pub kind: EntryKind,
    pub lba: Lba,
    pub blocks: u32,
    pub data_len: usize,
}

impl EntryHeader {
    /// Total encoded entry length.
    pub fn entry_len(&self) -> usize {
        ENTRY_OVERHEAD + self.data_len
    }

    /// Parses and sanity-checks the fixed header (not the CRC).
    pub fn parse(b: &[u8]) -> Result<EntryHeader, DecodeError> {
        let h = b.get(..ENTRY_HEADER_LEN).ok_or(DecodeError::Truncated {
            needed: ENTRY_HEADER_LEN,
            have: b.len(),
        })?;
        if &h[0..4] != ENTRY_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if h[4] != ENTRY_VERSION {
            return Err(DecodeError::BadVersion(h[4]));
        }
        let kind = EntryKind::from_code(h[5]).ok_or(DecodeError::BadKind(h[5]))?;
        if h[6] != 0 || h[7] != 0 {
            return Err(DecodeError::Inconsistent("flags must be zero"));
        }
        let blocks = le_u32(h, 32);
        let data_len = le_u32(h, 36) as usize;
        if data_len > MAX_ENTRY_DATA_BYTES {
            return Err(DecodeError::TooLong(data_len as u64));
        }
        match kind {
            EntryKind::Write
                if blocks == 0 || data_len == 0 || !data_len.is_multiple_of(blocks as usize) =>
            {
                return Err(DecodeError::Inconsistent(
                    "WRITE needs blocks > 0 and data_len a positive multiple of blocks",
                ));
            }
            EntryKind::Trim | EntryKind::Zero if blocks == 0 || data_len != 0 => {
                return Err(DecodeError::Inconsistent(
                    "TRIM/ZERO need blocks > 0 and no data",
                ));
            }
            EntryKind::Padding if blocks != 0 || data_len != 0 => {
                return Err(DecodeError::Inconsistent(
                    "PADDING carries no blocks or data",
                ));
            }
            _ => {}
        }
        Ok(EntryHeader {
            lsn: Lsn(le_u64(h, 8)),
            epoch: Epoch(le_u64(h, 16)),
            kind,
            lba: Lba(le_u64(h, 24)),
            blocks,
            data_len,
        })
    }
}

impl WalEntry {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        ENTRY_OVERHEAD + self.data.len()
    }

    /// Appends the encoded entry to `out`; returns the entry CRC.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> u32 {
        EntryRef::from(self).encode_into(out)
    }

    /// The bytes that go on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Parses one entry from the start of `bytes`; returns it and the bytes consumed.
    /// Never panics; rejects bad magic, unknown kinds, lengths over
    /// `MAX_ENTRY_DATA_BYTES`, inconsistent fields and CRC mismatches.
    pub fn decode(bytes: &[u8]) -> Result<(WalEntry, usize), DecodeError> {
        let h = EntryHeader::parse(bytes)?;
        let len = h.entry_len();
        let body = bytes.get(..len).ok_or(DecodeError::Truncated {
            needed: len,
            have: bytes.len(),
        })?;
        let (covered, crc) = body.split_at(len - 4);
        if crc32c::crc32c(covered) != le_u32(crc, 0) {
            return Err(DecodeError::BadChecksum);
        }
        Ok((
            WalEntry {
                lsn: h.lsn,
                epoch: h.epoch,
                kind: h.kind,
                lba: h.lba,
                blocks: h.blocks,
                data: covered[ENTRY_HEADER_LEN..].to_vec(),
            },
            len,
        ))
    }
}

/// Length of the on-disk record holding an entry with `data_len` data bytes.
pub fn record_len_for(data_len: usize) -> u64 {
    (RECORD_OVERHEAD + data_len) as u64
}

/// Offset of an entry's data inside its record.
pub const RECORD_DATA_OFFSET: u64 = (RECORD_PREFIX_LEN + ENTRY_HEADER_LEN) as u64;

/// Builds the on-disk record for `entry` in generation `gen`. For PADDING,
/// `advance` is the number of ring bytes the record stands for (the rest of the lap);
/// for other kinds pass `None`.
pub fn encode_record(entry: &WalEntry, wal_gen: u64, advance: Option<u64>) -> Vec<u8> {
    encode_record_ref(EntryRef::from(entry), wal_gen, advance)
}

/// [`encode_record`] over a borrowed entry: the data is copied once, into the record.
pub(crate) fn encode_record_ref(
    entry: EntryRef<'_>,
    wal_gen: u64,
    advance: Option<u64>,
) -> Vec<u8> {
    let own_len = record_len_for(entry.data.len());
    // Only PADDING stands for more ring bytes than it writes (the rest of the lap).
    debug_assert!(
        advance.is_none_or(|a| entry.kind == EntryKind::Padding && a >= own_len),
        "only a PADDING record advances past its own length"
    );
    let record_len = advance.unwrap_or(own_len);
    let mut out = Vec::with_capacity(own_len as usize);
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&record_len.to_le_bytes());
    out.extend_from_slice(&wal_gen.to_le_bytes());
    let entry_crc = entry.encode_into(&mut out);
    out.extend_from_slice(&record_crc(&out[..RECORD_PREFIX_LEN], entry_crc).to_le_bytes());
    out
}

fn record_crc(prefix: &[u8], entry_crc: u32) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(prefix), &entry_crc.to_le_bytes())
}

/// The parsed prefix and entry header of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Ring bytes this record occupies.
    pub record_len: u64,
    pub wal_gen: u64,
    pub entry: EntryHeader,
}

impl RecordHeader {
    /// Bytes physically written for this record.
    pub fn written_len(&self) -> usize {
        RECORD_OVERHEAD + self.entry.data_len
    }

    /// Parses the first `RECORD_PREFIX_LEN + ENTRY_HEADER_LEN` bytes of a record.
    pub fn parse(b: &[u8]) -> Result<RecordHeader, DecodeError> {
        let p = b.get(..RECORD_PREFIX_LEN).ok_or(DecodeError::Truncated {
            needed: RECORD_PREFIX_LEN,
            have: b.len(),
        })?;
        if &p[0..4] != RECORD_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let record_len = le_u64(p, 8);
        let wal_gen = le_u64(p, 16);
        let entry = EntryHeader::parse(&b[RECORD_PREFIX_LEN..])?;
        let own = (RECORD_OVERHEAD + entry.data_len) as u64;
        if entry.kind == EntryKind::Padding {
            if record_len < own {
                return Err(DecodeError::Inconsistent("padding shorter than a record"));
            }
        } else if record_len != own {
            return Err(DecodeError::Inconsistent(
                "record_len disagrees with data_len",
            ));
        }
        Ok(RecordHeader {
            record_len,
            wal_gen,
            entry,
        })
    }

    /// Verifies both CRCs of a complete record (`b` holds `written_len()` bytes).
    pub fn verify(&self, b: &[u8]) -> Result<(), DecodeError> {
        let n = self.written_len();
        let rec = b.get(..n).ok_or(DecodeError::Truncated {
            needed: n,
            have: b.len(),
        })?;
        let entry = &rec[RECORD_PREFIX_LEN..n - 4];
        let (covered, crc) = entry.split_at(entry.len() - 4);
        let entry_crc = le_u32(crc, 0);
        if crc32c::crc32c(covered) != entry_crc {
            return Err(DecodeError::BadChecksum);
        }
        if record_crc(&rec[..RECORD_PREFIX_LEN], entry_crc) != le_u32(rec, n - 4) {
            return Err(DecodeError::BadChecksum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> WalEntry {
        WalEntry {
            lsn: Lsn(9),
            epoch: Epoch(2),
            kind: EntryKind::Write,
            lba: Lba(17),
            blocks: 2,
            data: (0..1024u32).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn record_parts_are_the_bytes_of_the_whole_record() {
        let e = WalEntry {
            lsn: Lsn(9),
            epoch: Epoch(2),
            kind: EntryKind::Write,
            lba: Lba(77),
            blocks: 2,
            data: (0..8192u32).map(|i| (i * 7) as u8).collect(),
        };
        let parts = encode_record_parts(EntryRef::from(&e), 3);
        let mut joined = parts.head.clone();
        joined.extend_from_slice(&e.data);
        joined.extend_from_slice(&parts.tail);
        assert_eq!(joined, encode_record(&e, 3, None));
    }

    #[test]
    fn entry_roundtrips_and_reports_consumed_length() {
        let e = entry();
        let mut bytes = e.encode();
        bytes.extend_from_slice(b"trailing");
        let (d, n) = WalEntry::decode(&bytes).unwrap();
        assert_eq!(d, e);
        assert_eq!(n, e.encoded_len());
    }

    #[test]
    fn entry_with_any_flipped_bit_is_rejected() {
        let bytes = entry().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(WalEntry::decode(&b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn record_verifies_and_detects_generation_change() {
        let rec = encode_record(&entry(), 5, None);
        let h = RecordHeader::parse(&rec).unwrap();
        assert_eq!(h.wal_gen, 5);
        assert_eq!(h.written_len(), rec.len());
        h.verify(&rec).unwrap();
        let mut b = rec.clone();
        b[16] ^= 1; // generation
        let h2 = RecordHeader::parse(&b).unwrap();
        assert_eq!(h2.verify(&b), Err(DecodeError::BadChecksum));
    }
}
