//! File layout. The file is `[superblock A | superblock B | circular WAL | extent]`; the
//! extent is a flat array addressed by `LBA × block_size` at a fixed, block-aligned
//! offset, so growing the volume only grows the file's tail.

use crate::storage::superblock::WAL_OFFSET;

/// Byte offsets of the regions of one volume file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u32,
    pub wal_offset: u64,
    pub wal_size: u64,
    pub extent_offset: u64,
}

impl Layout {
    /// The layout for a new volume.
    pub fn new(block_size: u32, wal_size: u64) -> Layout {
        let align = u64::from(block_size).max(4096);
        let wal_end = WAL_OFFSET + wal_size;
        Layout {
            block_size,
            wal_offset: WAL_OFFSET,
            wal_size,
            extent_offset: wal_end.div_ceil(align) * align,
        }
    }

    /// Block size as u64.
    pub fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }

    /// File offset of logical WAL position `pos`.
    pub fn wal_phys(&self, pos: u64) -> u64 {
        self.wal_offset + pos % self.wal_size
    }

    /// Bytes from logical position `pos` to the end of its lap.
    pub fn lap_remaining(&self, pos: u64) -> u64 {
        self.wal_size - pos % self.wal_size
    }

    /// File offset of block `lba` in the extent.
    pub fn extent_off(&self, lba: u64) -> u64 {
        self.extent_offset + lba * self.bs()
    }

    /// File length needed for a volume of `volume_size` bytes.
    pub fn disk_len(&self, volume_size: u64) -> u64 {
        self.extent_offset + volume_size
    }
}
