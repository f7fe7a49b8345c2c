//! Serves an engine `Volume` over NBD. The server has already checked range and
//! block alignment, so byte offsets convert to block addresses exactly; the engine's
//! flush is volume-wide (one WAL, group commit), which makes multi-conn safe.

use engine::{Lba, Volume};

use super::backend::{BackendError, BlockBackend};

fn map_err(e: engine::Error) -> BackendError {
    match e {
        engine::Error::InvalidArgument { .. } | engine::Error::OutOfRange { .. } => {
            BackendError::Invalid(e.to_string())
        }
        // WAL exhaustion, I/O errors, a failed, closed or rebuilding volume: the client
        // can only be told the operation did not happen.
        other => BackendError::Io(other.to_string()),
    }
}

/// Converts a byte offset/length pair to (first block, block count).
fn blocks(v: &Volume, offset: u64, length: u64) -> Result<(Lba, u64), BackendError> {
    let bs = u64::from(v.block_size());
    if !offset.is_multiple_of(bs) || !length.is_multiple_of(bs) {
        return Err(BackendError::Invalid(format!(
            "range {offset}+{length} is not aligned to the {bs}-byte block size"
        )));
    }
    Ok((Lba(offset / bs), length / bs))
}

impl BlockBackend for Volume {
    fn size_bytes(&self) -> u64 {
        Volume::size_bytes(self)
    }
    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let (lba, _) = blocks(self, offset, buf.len() as u64)?;
        Volume::read(self, lba, buf).map_err(map_err)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let (lba, _) = blocks(self, offset, data.len() as u64)?;
        Volume::write(self, lba, data).map(drop).map_err(map_err)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let (lba, _) = blocks(self, offset, data.len() as u64)?;
        Volume::write_fua(self, lba, data)
            .map(drop)
            .map_err(map_err)
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        let lba = match blocks(self, offset, data.len() as u64) {
            Ok((lba, _)) => lba,
            Err(e) => return Some(Err(e)),
        };
        match Volume::try_write(self, lba, data) {
            Ok(Some(_)) => Some(Ok(())),
            Ok(None) => None,
            Err(e) => Some(Err(map_err(e))),
        }
    }
    fn runs_inline(&self) -> bool {
        true
    }
    fn flush(&self) -> Result<(), BackendError> {
        Volume::flush(self).map(drop).map_err(map_err)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let (lba, n) = blocks(self, offset, length)?;
        Volume::trim(self, lba, n).map(drop).map_err(map_err)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let (lba, n) = blocks(self, offset, length)?;
        Volume::write_zeroes(self, lba, n)
            .map(drop)
            .map_err(map_err)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
    fn resize(&self, new_size_bytes: u64) -> Result<(), BackendError> {
        Volume::expand(self, new_size_bytes).map_err(map_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{CreateOptions, VolumeConfig};

    #[test]
    fn engine_volume_serves_reads_writes_zeroes_and_resize_through_the_trait() {
        let d = tempfile::tempdir().expect("tempdir");
        let opts = CreateOptions {
            size_bytes: 4 << 20,
            wal_size_bytes: 4 << 20,
            ..CreateOptions::default()
        };
        let v = Volume::create_file(&d.path().join("v.img"), opts, VolumeConfig::default())
            .expect("create");
        let b: &dyn BlockBackend = &v;
        assert_eq!(b.block_size(), 4096);
        b.write(8192, &[3u8; 8192]).expect("write");
        b.write_fua(0, &[4u8; 4096]).expect("fua");
        b.flush().expect("flush");
        let mut buf = vec![0u8; 16384];
        b.read(0, &mut buf).expect("read");
        assert!(buf[..4096].iter().all(|&x| x == 4));
        assert!(buf[4096..8192].iter().all(|&x| x == 0));
        assert!(buf[8192..].iter().all(|&x| x == 3));
        b.write_zeroes(8192, 4096).expect("zero");
        b.read(8192, &mut buf[..4096]).expect("read");
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(matches!(
            b.write(100, &[0u8; 4096]),
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            b.write(4 << 20, &[0u8; 4096]),
            Err(BackendError::Invalid(_))
        ));
        b.resize(8 << 20).expect("expand");
        assert_eq!(b.size_bytes(), 8 << 20);
        assert!(b.resize(4 << 20).is_err());
    }
}
