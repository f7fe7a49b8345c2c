//! Test backends that change a few operations of a memory image: a test implements
//! [`MemOverlay`] with the image and only the operations it changes, and serves
//! `Overlay(its_backend)`; every other operation goes to the image.

use std::ops::Deref;

use node_agent::frontend::nbd::{BackendError, BlockBackend, MemBackend};

/// A memory image with some operations replaced. Each default is the image's own,
/// except that an overlay runs nothing inline (no `try_write`, `runs_inline` false, as
/// for any backend) unless it says so: its replaced operations may block.
pub trait MemOverlay: Send + Sync + 'static {
    fn mem(&self) -> &MemBackend;

    fn size_bytes(&self) -> u64 {
        self.mem().size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.mem().block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.mem().read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.mem().write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.mem().write_fua(offset, data)
    }
    fn try_write(&self, _offset: u64, _data: &[u8]) -> Option<Result<(), BackendError>> {
        None
    }
    fn runs_inline(&self) -> bool {
        false
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.mem().flush()
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.mem().trim(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.mem().write_zeroes(offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        self.mem().flush_is_volume_wide()
    }
}

/// Serves a [`MemOverlay`] as a block backend; derefs to it so the test reads its state.
pub struct Overlay<T>(pub T);

impl<T> Deref for Overlay<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: MemOverlay> BlockBackend for Overlay<T> {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.0.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.0.write_fua(offset, data)
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        self.0.try_write(offset, data)
    }
    fn runs_inline(&self) -> bool {
        self.0.runs_inline()
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.0.trim(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.0.write_zeroes(offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        self.0.flush_is_volume_wide()
    }
}
