//! The storage contract the NBD server exports: a fixed-geometry byte range with
//! blocking I/O. The server validates ranges and alignment before calling, so a backend
//! only sees in-bounds requests whose offset and length are multiples of `block_size`.

use std::sync::RwLock;

/// What went wrong inside a backend; each kind maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The medium failed (disk error, replication barrier failure, ...).
    #[error("I/O error: {0}")]
    Io(String),
    /// The backend has no room for the data (thin provisioning, quota).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The request is invalid for this backend (range, alignment, unsupported resize).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backend refuses writes.
    #[error("read-only: {0}")]
    ReadOnly(String),
}

impl BackendError {
    /// The NBD error value for this failure.
    pub fn nbd_errno(&self) -> u32 {
        use super::proto::{EINVAL, EIO, ENOSPC, EPERM};
        match self {
            BackendError::Io(_) => EIO,
            BackendError::NoSpace(_) => ENOSPC,
            BackendError::Invalid(_) => EINVAL,
            BackendError::ReadOnly(_) => EPERM,
        }
    }
}

/// A block device image served to NBD clients.
///
/// Guarantees required of implementations:
/// - Every method may be called concurrently from several threads.
/// - `write`/`trim`/`write_zeroes` are visible to every later `read` once they return.
/// - `flush` returns only after every write that *returned* before `flush` was called is
///   durable. If that holds for writes made through any handle to the same volume
///   (volume-wide flush), `flush_is_volume_wide` returns true and the server advertises
///   `NBD_FLAG_CAN_MULTI_CONN`.
/// - `write_fua` returns only once its own data is durable.
pub trait BlockBackend: Send + Sync + 'static {
    /// Current size in bytes, a multiple of `block_size`.
    fn size_bytes(&self) -> u64;
    /// Smallest addressable unit in bytes: a power of two between 1 and 65536.
    fn block_size(&self) -> u32;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError>;
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError>;
    /// A `write` that returns at once instead of waiting (for free log space, for
    /// another node): `None` means it would have had to wait and nothing was written,
    /// and the caller then uses `write` where blocking is fine. Only called when
    /// `runs_inline` is true.
    fn try_write(&self, _offset: u64, _data: &[u8]) -> Option<Result<(), BackendError>> {
        None
    }
    /// Whether `read` and `try_write` may run on an async runtime's worker thread: they
    /// cost about a memory copy and never block on a runtime (`Handle::block_on` would
    /// panic there) or wait on another node. The server then runs small requests on
    /// the connection's task instead of handing them to the blocking pool.
    fn runs_inline(&self) -> bool {
        false
    }
    fn flush(&self) -> Result<(), BackendError>;
    /// Discards a range; later reads may return anything until it is written again.
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError>;
    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError>;
    /// Whether `flush` covers writes made through every connection (see trait docs).
    fn flush_is_volume_wide(&self) -> bool;
    /// Grows the device to `new_size_bytes`. Backends that cannot grow say so.
    fn resize(&self, new_size_bytes: u64) -> Result<(), BackendError> {
        Err(BackendError::Invalid(format!(
            "this backend cannot be resized (asked for {new_size_bytes} bytes)"
        )))
    }
}

/// A RAM-only backend for tests and tools: flush is a no-op and trivially volume-wide.
pub struct MemBackend {
    block_size: u32,
    data: RwLock<Vec<u8>>,
}

impl MemBackend {
    /// A zero-filled image. `size_bytes` must be a multiple of `block_size`, and
    /// `block_size` a power of two ≤ 64 KiB.
    pub fn new(size_bytes: u64, block_size: u32) -> Result<Self, BackendError> {
        if !block_size.is_power_of_two() || block_size > 65536 {
            return Err(BackendError::Invalid(format!(
                "block size {block_size} is not a power of two between 1 and 65536"
            )));
        }
        if !size_bytes.is_multiple_of(u64::from(block_size)) {
            return Err(BackendError::Invalid(format!(
                "size {size_bytes} is not a multiple of the block size {block_size}"
            )));
        }
        let len = usize::try_from(size_bytes)
            .map_err(|_| BackendError::NoSpace(format!("{size_bytes} bytes do not fit in RAM")))?;
        Ok(Self {
            block_size,
            data: RwLock::new(vec![0; len]),
        })
    }

    fn range(
        &self,
        offset: u64,
        length: u64,
        len_now: usize,
    ) -> Result<(usize, usize), BackendError> {
        let start = usize::try_from(offset).ok();
        let end = offset
            .checked_add(length)
            .and_then(|e| usize::try_from(e).ok());
        match (start, end) {
            (Some(s), Some(e)) if e <= len_now => Ok((s, e)),
            _ => Err(BackendError::Invalid(format!(
                "range {offset}+{length} is outside the {len_now}-byte image"
            ))),
        }
    }

    fn fill(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, length, d.len())?;
        d[s..e].fill(0);
        Ok(())
    }
}

fn poisoned() -> BackendError {
    BackendError::Io("memory image lock poisoned by a panicked writer".into())
}

impl BlockBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let d = self.data.read().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, buf.len() as u64, d.len())?;
        buf.copy_from_slice(&d[s..e]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, data.len() as u64, d.len())?;
        d[s..e].copy_from_slice(data);
        Ok(())
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        Some(self.write(offset, data))
    }
    fn runs_inline(&self) -> bool {
        true
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.fill(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.fill(offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
    fn resize(&self, new_size_bytes: u64) -> Result<(), BackendError> {
        if !new_size_bytes.is_multiple_of(u64::from(self.block_size)) {
            return Err(BackendError::Invalid(format!(
                "size {new_size_bytes} is not a multiple of the block size {}",
                self.block_size
            )));
        }
        let len = usize::try_from(new_size_bytes).map_err(|_| {
            BackendError::NoSpace(format!("{new_size_bytes} bytes do not fit in RAM"))
        })?;
        let mut d = self.data.write().map_err(|_| poisoned())?;
        if len < d.len() {
            return Err(BackendError::Invalid(format!(
                "shrinking from {} to {len} bytes would drop data",
                d.len()
            )));
        }
        d.resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backend_reads_back_writes_and_zeroes() {
        let b = MemBackend::new(8192, 512).expect("backend");
        b.write(512, &[7u8; 1024]).expect("write");
        let mut buf = vec![0u8; 2048];
        b.read(0, &mut buf).expect("read");
        assert!(buf[..512].iter().all(|&x| x == 0));
        assert!(buf[512..1536].iter().all(|&x| x == 7));
        b.write_zeroes(1024, 512).expect("zero");
        b.read(0, &mut buf).expect("read");
        assert!(buf[1024..1536].iter().all(|&x| x == 0));
        assert!(buf[512..1024].iter().all(|&x| x == 7));
    }

    #[test]
    fn mem_backend_rejects_out_of_range_and_bad_geometry() {
        let b = MemBackend::new(4096, 512).expect("backend");
        assert!(matches!(
            b.write(4096, &[0u8; 512]),
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(b.trim(u64::MAX, 2), Err(BackendError::Invalid(_))));
        assert!(MemBackend::new(1000, 512).is_err());
        assert!(MemBackend::new(4096, 3000).is_err());
        assert!(b.resize(2048).is_err());
        b.resize(8192).expect("grow");
        assert_eq!(b.size_bytes(), 8192);
    }
}
