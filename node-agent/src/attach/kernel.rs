//! Attach through the kernel NBD driver. Only detection is implemented: the netlink
//! configuration path (NBD_CMD_CONNECT with the unix socket fd) is not written yet, so
//! every operation reports `Unsupported` with the reason, and callers use
//! `FuseLoopAttacher` instead.

use std::path::{Path, PathBuf};

use super::{Attacher, Attachment, Error, Result};

/// Whether the kernel NBD driver is loaded (module present or a device node exists).
pub fn kernel_nbd_available() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Kernel NBD attacher; see the module docs for what works.
#[derive(Debug, Default)]
pub struct KernelNbdAttacher;

impl KernelNbdAttacher {
    pub fn new() -> Self {
        Self
    }

    fn unsupported(&self) -> Error {
        if kernel_nbd_available() {
            Error::Unsupported(
                "the kernel nbd driver is present, but attaching through it (netlink) is not \
                 implemented in this build; use the FUSE + loop attacher"
                    .into(),
            )
        } else {
            Error::Unsupported(
                "the kernel nbd driver is not loaded (no /sys/module/nbd, no /dev/nbd0); \
                 use the FUSE + loop attacher"
                    .into(),
            )
        }
    }
}

impl Attacher for KernelNbdAttacher {
    fn attach(&self, _volume: &str, _socket: &Path) -> Result<PathBuf> {
        Err(self.unsupported())
    }
    fn detach(&self, _volume: &str) -> Result<()> {
        Err(self.unsupported())
    }
    fn list(&self) -> Result<Vec<Attachment>> {
        Err(self.unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_attacher_reports_unsupported_with_the_reason() {
        let err = KernelNbdAttacher::new()
            .attach("v", Path::new("/tmp/none.sock"))
            .expect_err("kernel attach is not implemented");
        let Error::Unsupported(msg) = err else {
            panic!("expected Unsupported, got {err:?}");
        };
        if kernel_nbd_available() {
            assert!(msg.contains("not implemented"), "{msg}");
        } else {
            assert!(msg.contains("not loaded"), "{msg}");
        }
    }
}
