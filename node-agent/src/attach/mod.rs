//! Turns a volume's NBD export (on the agent's unix socket) into a kernel block device
//! that `mkfs` and `mount` accept. Attach and detach are idempotent and keep their
//! state on disk, so an agent restarted with devices in use can still detach them.

pub mod fuse_export;
mod fuse_loop;
pub mod genl;
pub mod kernel;
pub mod launcher;
pub mod nbd_genl;
pub mod proxy;
pub mod select;
mod sys;

use std::path::{Path, PathBuf};

pub use fuse_loop::{FuseLoopAttacher, FuseLoopConfig};
pub use kernel::{KernelNbdAttacher, KernelNbdConfig, kernel_nbd_available};
pub use launcher::{LauncherClient, LocalProxies, ProxyCommand, ProxyHost};
pub use select::{AttachMode, open_attacher};

/// Errors of the attach layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume name {name:?} is invalid: {reason}")]
    InvalidVolumeName { name: String, reason: String },
    #[error("unsupported on this host: {0}")]
    Unsupported(String),
    #[error("volume {volume} device {device} is busy: {reason}")]
    Busy {
        volume: String,
        device: PathBuf,
        reason: String,
    },
    #[error("volume {volume} is already attached through socket {socket}")]
    AttachedElsewhere { volume: String, socket: PathBuf },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: {reason}")]
    Launcher { volume: String, reason: String },
    #[error("{what} did not happen within {timeout_ms} ms{detail}")]
    Timeout {
        what: String,
        timeout_ms: u64,
        detail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is unreadable: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("kernel nbd: {0}")]
    Netlink(#[from] genl::GenlError),
    #[error("volume {volume}: NBD handshake on {socket}: {source}")]
    Handshake {
        volume: String,
        socket: PathBuf,
        #[source]
        source: crate::frontend::nbd::client::ClientError,
    },
    #[error("volume {volume} has no attached device on this node")]
    NotAttached { volume: String },
    #[error("volume {volume}: growing device {device} failed: {reason}")]
    Resize {
        volume: String,
        device: PathBuf,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One attached volume as recorded by an attacher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub volume: String,
    pub socket: PathBuf,
    /// The block device, once attach got that far.
    pub device: Option<PathBuf>,
}

/// Makes and removes block devices for volumes. Implementations are blocking (they run
/// external programs); call them from a blocking context.
///
/// Guarantees: `attach` of an attached volume returns its existing device; `detach` of
/// a volume that is not attached succeeds; both clean up partial work from a crash.
pub trait Attacher: Send + Sync {
    /// Attaches the export named `volume` served on the unix socket `socket` and returns
    /// the block device path.
    fn attach(&self, volume: &str, socket: &Path) -> Result<PathBuf>;
    /// Removes the block device of `volume`. Fails with `Busy` while it is mounted.
    fn detach(&self, volume: &str) -> Result<()>;
    /// The volumes this attacher has attached (also those from before a restart).
    fn list(&self) -> Result<Vec<Attachment>>;
    /// Grows the attached device of `volume` to the export's current size (after the
    /// volume grew) while it stays in use, and returns the device's size in bytes as
    /// the kernel reports it. Fails with `NotAttached` when `volume` has no device.
    fn resize(&self, volume: &str) -> Result<u64> {
        Err(Error::Unsupported(format!(
            "growing the attached device of volume {volume} is not supported by this attacher"
        )))
    }
}

/// Reads a JSON state record; `None` when the file does not exist.
fn read_state_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::State {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces a JSON state record atomically (write a temporary file, fsync, rename), so a
/// crash leaves either the old record or the new one.
fn write_state_file<T: serde::Serialize>(path: &Path, state: &T) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let io = |source, p: &Path| Error::Io {
        path: p.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::State {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, &tmp))?;
    f.write_all(&bytes).map_err(|e| io(e, &tmp))?;
    f.sync_all().map_err(|e| io(e, &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| io(e, path))
}

/// Creates an attacher's state directory (and its parents) if it is missing.
fn create_state_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// The attachments recorded in a state directory listed as `entries`: one for each entry
/// named like a volume for which `recorded` finds a record, sorted by volume.
fn recorded_attachments(
    entries: std::fs::ReadDir,
    mut recorded: impl FnMut(&str) -> Result<Option<Attachment>>,
) -> Result<Vec<Attachment>> {
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if validate_volume_name(&name).is_err() {
            continue;
        }
        out.extend(recorded(&name)?);
    }
    out.sort_by(|a, b| a.volume.cmp(&b.volume));
    Ok(out)
}

/// Volume names become directory names and NBD URI paths, so only a safe alphabet is
/// accepted: ASCII letters, digits, `-`, `_`, `.`; not starting with `.`; ≤ 253 bytes.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 253 {
        "longer than 253 bytes"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        "allowed characters are ASCII letters, digits, '-', '_' and '.'"
    } else {
        return Ok(());
    };
    Err(Error::InvalidVolumeName {
        name: name.chars().take(64).collect(),
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_outside_the_safe_alphabet_are_rejected() {
        for ok in ["pvc-0a1b", "vol_1.data", "A"] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a?x", &"x".repeat(254)] {
            assert!(
                matches!(
                    validate_volume_name(bad),
                    Err(Error::InvalidVolumeName { .. })
                ),
                "{bad}"
            );
        }
    }
}
