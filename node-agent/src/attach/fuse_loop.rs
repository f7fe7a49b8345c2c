//! Attach through a FUSE file and a loop device: the attach proxy (this binary's
//! `attach-proxy` subcommand, see [`super::proxy`]) serves the volume as the file
//! `mnt/disk` on its own FUSE mount, and a loop device (direct I/O, so no second page
//! cache) turns that file into a block device. Per volume, `STATE_DIR/<volume>/` holds
//! the mount point, the proxy's control socket and log, and `state.json` (socket, proxy
//! PID, loop device); teardown runs in the only safe order: loop device → FUSE mount →
//! proxy process. The proxy re-dials the agent when it restarts, so a device outlives
//! an agent restart, and grows its file on request, so a device grows while mounted
//! ([`FuseLoopAttacher::resize`](super::Attacher::resize)).
//!
//! Attachments made by earlier versions (an `nbdfuse` process serving `mnt/nbd`) are
//! still found and torn down.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::launcher::{Identities, ProxyHost};
use super::sys;
use super::{
    Attacher, Attachment, Error, Result, create_state_dir, recorded_attachments,
    validate_volume_name,
};

/// Settings of the FUSE + loop attacher. Timeouts bound every wait on an external
/// process.
#[derive(Clone)]
pub struct FuseLoopConfig {
    /// Directory for per-volume state and mount points; must survive agent restarts.
    pub state_dir: PathBuf,
    pub losetup_program: String,
    pub fusermount_program: String,
    /// Logical sector size of the loop device; must be a multiple of the export's
    /// minimum block size so the kernel never sends a request the server rejects.
    pub sector_size_bytes: u32,
    /// Time the attach proxy has to reach the agent and mount.
    pub ready_timeout_ms: u64,
    /// Time the attach proxy has to exit after SIGTERM before it gets SIGKILL.
    pub stop_timeout_ms: u64,
    /// Time the kernel has to release a loop device after `losetup -d`. The release
    /// writes the device's last dirty pages through the attach proxy to the primary, so
    /// it can take as long as a failover pause (Lease expiry plus a promoted primary's
    /// member-proof wait), not just a local page-cache flush.
    pub loop_release_timeout_ms: u64,
    /// Where the attach proxies, which serve the volume files, run.
    pub proxies: Arc<dyn ProxyHost>,
}

impl FuseLoopConfig {
    pub fn new(state_dir: impl Into<PathBuf>, proxies: Arc<dyn ProxyHost>) -> Self {
        Self {
            state_dir: state_dir.into(),
            losetup_program: "losetup".into(),
            fusermount_program: "fusermount3".into(),
            sector_size_bytes: 4096,
            ready_timeout_ms: 10_000,
            stop_timeout_ms: 5_000,
            loop_release_timeout_ms: 30_000,
            proxies,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    volume: String,
    socket: PathBuf,
    /// Only in state files of earlier versions, which served the file with nbdfuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbdfuse_pid: Option<u32>,
    loop_device: Option<PathBuf>,
    /// Absent in state files written before the proxy existed.
    #[serde(default)]
    proxy_pid: Option<u32>,
}

/// See the module docs. One attacher per state directory; operations are serialized.
pub struct FuseLoopAttacher {
    config: FuseLoopConfig,
    ops: Mutex<()>,
}

impl FuseLoopAttacher {
    pub fn new(config: FuseLoopConfig) -> Result<Self> {
        create_state_dir(&config.state_dir)?;
        Ok(Self {
            config,
            ops: Mutex::new(()),
        })
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.state_dir.join(volume)
    }
    fn mount_dir(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("mnt")
    }
    fn image_file(&self, volume: &str) -> PathBuf {
        self.mount_dir(volume).join(super::fuse_export::DISK_FILE)
    }
    /// The file nbdfuse served in earlier versions.
    fn legacy_image_file(&self, volume: &str) -> PathBuf {
        self.mount_dir(volume).join("nbd")
    }
    fn state_file(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("state.json")
    }
    fn control_socket(&self, volume: &str) -> PathBuf {
        super::proxy::control_socket_in(&self.volume_dir(volume))
    }

    fn read_state(&self, volume: &str) -> Result<Option<State>> {
        super::read_state_file(&self.state_file(volume))
    }

    fn write_state(&self, state: &State) -> Result<()> {
        super::write_state_file(&self.state_file(&state.volume), state)
    }

    fn nbdfuse_alive(&self, volume: &str, pid: u32) -> bool {
        let mnt = self.mount_dir(volume);
        sys::process_matches(pid, &["nbdfuse", &mnt.to_string_lossy()])
    }

    /// How the volume's proxy shows in /proc: by the mount point it serves, which
    /// identifies it whichever version started it.
    fn proxy_identities(&self, volume: &str) -> Identities {
        let mnt = self.mount_dir(volume).to_string_lossy().into_owned();
        vec![
            vec!["attach-proxy".into(), mnt],
            vec!["attach-proxy".into(), self.legacy_proxy_socket(volume)],
        ]
    }

    fn proxy_alive(&self, volume: &str, pid: u32) -> bool {
        self.config
            .proxies
            .ended(volume, pid, &self.proxy_identities(volume))
            .is_none()
    }
    /// The socket an earlier version's proxy listened on for nbdfuse.
    fn legacy_proxy_socket(&self, volume: &str) -> String {
        self.volume_dir(volume)
            .join("proxy.sock")
            .to_string_lossy()
            .into_owned()
    }

    /// Whether the recorded attachment is complete and still in place.
    fn healthy_device(&self, state: &State) -> Option<PathBuf> {
        let dev = state.loop_device.clone()?;
        let pid = state.proxy_pid?;
        let ok = state.nbdfuse_pid.is_none()
            && self.proxy_alive(&state.volume, pid)
            && sys::is_mount_point(&self.mount_dir(&state.volume))
            && sys::loop_devices_backed_by(&self.image_file(&state.volume)).contains(&dev);
        ok.then_some(dev)
    }

    /// Starts the attach proxy serving `volume` from the agent's `socket` and waits
    /// until its volume file and control socket are up; returns its PID.
    fn start_proxy(&self, volume: &str, socket: &Path) -> Result<u32> {
        let dir = self.volume_dir(volume);
        let mnt = self.mount_dir(volume);
        fs::create_dir_all(&mnt).map_err(|source| Error::Io {
            path: mnt.clone(),
            source,
        })?;
        let control = self.control_socket(volume);
        let _ = fs::remove_file(&control);
        let log_path = dir.join("proxy.log");
        let args = vec![
            format!("--mount={}", mnt.display()),
            format!("--control={}", control.display()),
            format!("--upstream={}", socket.display()),
            format!("--export={volume}"),
        ];
        let pid = self.config.proxies.start(volume, &args, &log_path)?;
        // Recorded before waiting, so a crash from here on still leaves a trail to clean.
        self.write_state(&State {
            volume: volume.into(),
            socket: socket.into(),
            nbdfuse_pid: None,
            loop_device: None,
            proxy_pid: Some(pid),
        })?;
        let image = self.image_file(volume);
        let identities = self.proxy_identities(volume);
        let mut exited = None;
        let became_ready = sys::wait_until(self.config.ready_timeout_ms, || {
            if sys::is_mount_point(&mnt)
                && image.exists()
                && std::os::unix::net::UnixStream::connect(&control).is_ok()
            {
                return true;
            }
            exited = self.config.proxies.ended(volume, pid, &identities);
            exited.is_some()
        });
        let log_text = || {
            fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if let Some(status) = exited {
            return Err(Error::Command {
                command: format!("attach proxy {}", args.join(" ")),
                status,
                stderr: log_text(),
            });
        }
        if !became_ready {
            return Err(Error::Timeout {
                what: format!("attach proxy serving {}", image.display()),
                timeout_ms: self.config.ready_timeout_ms,
                detail: format!("; log: {}", log_text()),
            });
        }
        Ok(pid)
    }

    fn stop_proxy(&self, volume: &str, pid: Option<u32>) {
        self.config.proxies.stop(
            volume,
            pid,
            &self.proxy_identities(volume),
            self.config.stop_timeout_ms,
        );
    }

    /// Stops an nbdfuse an earlier version started for `volume`, if it still runs.
    fn stop_nbdfuse(&self, volume: &str, pid: Option<u32>) {
        // Only signal it if it is still that nbdfuse; without a usable PID, look for it
        // by its mount point.
        let mnt = self.mount_dir(volume);
        let pid = pid
            .filter(|&p| self.nbdfuse_alive(volume, p))
            .or_else(|| sys::find_process(&["nbdfuse", &mnt.to_string_lossy()]));
        let Some(pid) = pid else { return };
        sys::signal(pid, Signal::TERM);
        if !sys::wait_until(self.config.stop_timeout_ms, || {
            !self.nbdfuse_alive(volume, pid)
        }) {
            warn!(volume, pid, "attach: nbdfuse ignored SIGTERM, killing");
            sys::signal(pid, Signal::KILL);
            sys::wait_until(self.config.stop_timeout_ms, || {
                !self.nbdfuse_alive(volume, pid)
            });
        }
    }

    /// Removes whatever exists of an attachment, in teardown order. Refuses while the
    /// block device is mounted or has holders, leaving everything in place.
    fn teardown(&self, volume: &str, state: Option<&State>) -> Result<()> {
        let images = [self.image_file(volume), self.legacy_image_file(volume)];
        let loop_devices = || -> Vec<PathBuf> {
            images
                .iter()
                .flat_map(|i| sys::loop_devices_backed_by(i))
                .collect()
        };
        // Found through sysfs, not the state file: a crash may have happened between
        // `losetup` and recording its result.
        let devices = loop_devices();
        for dev in &devices {
            if let Some(mp) = sys::dev_numbers(dev).and_then(|n| sys::mounted_at(&n)) {
                return Err(Error::Busy {
                    volume: volume.into(),
                    device: dev.clone(),
                    reason: format!("mounted at {}", mp.display()),
                });
            }
            if sys::has_holders(dev) {
                return Err(Error::Busy {
                    volume: volume.into(),
                    device: dev.clone(),
                    reason: "another block device is stacked on it".into(),
                });
            }
        }
        for dev in &devices {
            let dev_str = dev.to_string_lossy();
            sys::run(&self.config.losetup_program, &["-d", &dev_str])?;
        }
        // losetup -d only schedules the release; the FUSE file stays open until it happens.
        if !sys::wait_until(self.config.loop_release_timeout_ms, || {
            loop_devices().is_empty()
        }) {
            return Err(Error::Timeout {
                what: format!("release of loop device(s) {devices:?}"),
                timeout_ms: self.config.loop_release_timeout_ms,
                detail: String::new(),
            });
        }
        let mnt = self.mount_dir(volume);
        if sys::is_mount_point(&mnt) {
            let mnt_str = mnt.to_string_lossy();
            sys::run(&self.config.fusermount_program, &["-u", &mnt_str])?;
        }
        // The proxy exits by itself once its mount is gone; this reaps it (or stops one
        // that hangs). An earlier version's nbdfuse goes before its proxy.
        self.stop_nbdfuse(volume, state.and_then(|s| s.nbdfuse_pid));
        self.stop_proxy(volume, state.and_then(|s| s.proxy_pid));
        let dir = self.volume_dir(volume);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path: dir, source }),
        }
    }
}

impl Attacher for FuseLoopAttacher {
    fn attach(&self, volume: &str, socket: &Path) -> Result<PathBuf> {
        validate_volume_name(volume)?;
        let _guard = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.read_state(volume)?;
        if let Some(state) = &state {
            if let Some(dev) = self.healthy_device(state) {
                if state.socket != socket {
                    return Err(Error::AttachedElsewhere {
                        volume: volume.into(),
                        socket: state.socket.clone(),
                    });
                }
                return Ok(dev);
            }
            info!(
                volume,
                "attach: cleaning up an incomplete earlier attachment"
            );
        }
        // Also covers leftovers without a state file (crash before it was written).
        self.teardown(volume, state.as_ref())?;

        let result = (|| {
            let proxy_pid = self.start_proxy(volume, socket)?;
            let image = self.image_file(volume);
            let image_str = image.to_string_lossy();
            let sector = self.config.sector_size_bytes.to_string();
            let dev = sys::run(
                &self.config.losetup_program,
                &[
                    "--direct-io=on",
                    "--sector-size",
                    &sector,
                    "-f",
                    "--show",
                    &image_str,
                ],
            )?;
            let dev = PathBuf::from(dev);
            self.write_state(&State {
                volume: volume.into(),
                socket: socket.into(),
                nbdfuse_pid: None,
                loop_device: Some(dev.clone()),
                proxy_pid: Some(proxy_pid),
            })?;
            Ok(dev)
        })();
        match result {
            Ok(dev) => {
                info!(volume, device = %dev.display(), "attach: attached via FUSE file + loop");
                Ok(dev)
            }
            Err(e) => {
                let state = self.read_state(volume).ok().flatten();
                if let Err(te) = self.teardown(volume, state.as_ref()) {
                    warn!(volume, error = %te, "attach: cleanup after failed attach also failed");
                }
                Err(e)
            }
        }
    }

    fn detach(&self, volume: &str) -> Result<()> {
        validate_volume_name(volume)?;
        let _guard = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let state = match self.read_state(volume) {
            Ok(s) => s,
            Err(e) => {
                // Teardown finds the pieces through /sys and /proc without it.
                warn!(volume, error = %e, "attach: ignoring unreadable state file on detach");
                None
            }
        };
        self.teardown(volume, state.as_ref())?;
        info!(volume, "attach: detached");
        Ok(())
    }

    fn list(&self) -> Result<Vec<Attachment>> {
        let dir = &self.config.state_dir;
        let entries = fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        recorded_attachments(entries, |name| {
            Ok(self.read_state(name)?.map(|s| Attachment {
                volume: s.volume,
                socket: s.socket,
                device: s.loop_device,
            }))
        })
    }

    /// Asks the proxy to re-read the export's size (its control socket), checks the
    /// kernel sees the file at that size, grows the loop device (`losetup -c`) and
    /// reads the device's size back (BLKGETSIZE64).
    fn resize(&self, volume: &str) -> Result<u64> {
        validate_volume_name(volume)?;
        let _guard = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let dev = self
            .read_state(volume)?
            .and_then(|state| self.healthy_device(&state))
            .ok_or_else(|| Error::NotAttached {
                volume: volume.into(),
            })?;
        let failed = |reason: String| Error::Resize {
            volume: volume.into(),
            device: dev.clone(),
            reason,
        };
        let size = super::proxy::request_resize(&self.control_socket(volume))
            .map_err(|e| failed(format!("the attach proxy could not refresh the size: {e}")))?;
        // Attributes are not cached (TTL 0), so this stat asks the proxy and updates
        // the size the kernel holds for the file, which `losetup -c` reads.
        let image = self.image_file(volume);
        let file_size = fs::metadata(&image)
            .map_err(|source| Error::Io {
                path: image.clone(),
                source,
            })?
            .len();
        if file_size != size {
            return Err(failed(format!(
                "the volume file {} shows {file_size} bytes, the export has {size}",
                image.display()
            )));
        }
        let dev_str = dev.to_string_lossy();
        sys::run(&self.config.losetup_program, &["-c", &dev_str])?;
        let sector = u64::from(self.config.sector_size_bytes);
        let expected = size - size % sector;
        let dev_size = sys::block_device_size(&dev).map_err(|source| Error::Io {
            path: dev.clone(),
            source,
        })?;
        if dev_size != expected {
            return Err(failed(format!(
                "after `losetup -c` the device has {dev_size} bytes, expected {expected}"
            )));
        }
        info!(volume, device = %dev.display(), size_bytes = dev_size, "attach: device grown");
        Ok(dev_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> FuseLoopConfig {
        let proxy = super::super::ProxyCommand {
            program: "/nonexistent/blockvol-agent".into(),
            args: vec!["attach-proxy".into()],
        };
        FuseLoopConfig::new(dir, Arc::new(super::super::LocalProxies::new(proxy)))
    }

    #[test]
    fn detach_of_unknown_volume_succeeds_and_list_is_empty() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = FuseLoopAttacher::new(config(d.path())).expect("attacher");
        a.detach("never-attached").expect("detach");
        assert_eq!(a.list().expect("list"), Vec::new());
        assert!(matches!(
            a.attach("../x", Path::new("/tmp/s")),
            Err(Error::InvalidVolumeName { .. })
        ));
        assert!(matches!(
            a.resize("never-attached"),
            Err(Error::NotAttached { volume: v }) if v == "never-attached"
        ));
    }

    #[test]
    fn unreadable_state_file_fails_list_but_not_detach() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = FuseLoopAttacher::new(config(d.path())).expect("attacher");
        fs::create_dir_all(d.path().join("v")).expect("mkdir");
        fs::write(d.path().join("v/state.json"), b"{not json").expect("write");
        assert!(matches!(a.list(), Err(Error::State { .. })));
        a.detach("v")
            .expect("detach proceeds without the state file");
        assert!(!d.path().join("v").exists());
    }
}
