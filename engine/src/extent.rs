//! File layout and extent I/O. The file is `[superblock A | superblock B | circular WAL |
//! extent]`; the extent is a flat array addressed by `LBA × block_size` at a fixed,
//! block-aligned offset, so growing the volume only grows the file's tail.

use crate::disk::Disk;
use crate::superblock::WAL_OFFSET;

/// Largest single I/O the engine issues when copying or zeroing ranges.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;

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

/// Writes `len` zero bytes at `offset`, in bounded chunks (the portable way to zero a
/// range; `Disk::write_zeroes` may deallocate instead).
pub fn write_zeroes_by_writing<D: Disk + ?Sized>(
    disk: &D,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let zeros = vec![0u8; COPY_CHUNK_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        disk.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Copies `len` bytes from `src` to `dst` on the same disk (see [`Disk::copy_within`]).
pub fn copy_range(disk: &dyn Disk, src: u64, dst: u64, len: u64) -> std::io::Result<()> {
    disk.copy_within(src, dst, len)
}

/// The portable copy behind [`Disk::copy_within`]: through a user buffer, in chunks.
pub fn copy_by_reading<D: Disk + ?Sized>(
    disk: &D,
    src: u64,
    dst: u64,
    len: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], src + done)?;
        disk.write_at(&buf[..n], dst + done)?;
        done += n as u64;
    }
    Ok(())
}
