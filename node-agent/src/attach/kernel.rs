//! Attach through the kernel NBD driver: the agent dials its own export socket, does
//! the fixed-newstyle handshake (NBD_OPT_GO) itself, and hands the negotiated sockets
//! to the kernel with NBD_CMD_CONNECT over generic netlink; no helper process stays
//! behind. Per volume, `STATE_DIR/<volume>/state.json` records the socket, device
//! index and size, so detach works after an agent restart.
//!
//! When the agent restarts, the kernel keeps the device and holds its requests for
//! `dead_conn_timeout_s`; [`KernelNbdAttacher::reconnect_all`] (and any attach of an
//! attached volume) hands it freshly negotiated sockets with NBD_CMD_RECONFIGURE,
//! which replaces dead connections and ignores the rest. The size changes online with
//! [`KernelNbdAttacher::resize`]. Devices are tagged with the backend identifier
//! `blockvol/<volume>` (/sys/block/nbdN/backend), so a device whose state record was
//! lost to a crash is found again, and a recycled index is never taken for ours.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::genl::GenlError;
use super::nbd_genl::{ConnectRequest, NbdControl, NbdNetlink, ReconfigureRequest};
use super::sys;
use super::{
    Attacher, Attachment, Error, Result, create_state_dir, recorded_attachments,
    validate_volume_name,
};
use crate::frontend::nbd::client::{Connection, ExportInfo};
use crate::frontend::nbd::proto::TFLAG_CAN_MULTI_CONN;

/// Whether the kernel NBD driver is loaded (module present or a device node exists).
pub fn kernel_nbd_available() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Settings of the kernel NBD attacher. Every wait has a bound.
#[derive(Debug, Clone)]
pub struct KernelNbdConfig {
    /// Directory for per-volume state; must survive agent restarts.
    pub state_dir: PathBuf,
    /// Sockets per device (used only when the export allows multi-conn).
    pub connections: u32,
    /// Logical block size of the device: a power of two from 512 to 4096, and a
    /// multiple of the export's minimum block size.
    pub block_size_bytes: u32,
    /// How long one request may take before the kernel fails it.
    pub request_timeout_s: u64,
    /// How long the kernel holds requests while all connections are dead (agent
    /// restart) before it fails them.
    pub dead_conn_timeout_s: u64,
    /// Bound of each socket read and write during the handshake.
    pub handshake_timeout_ms: u64,
    /// Bound of each netlink reply.
    pub netlink_timeout_ms: u64,
    /// Time udev/devtmpfs has to create /dev/nbdN after CONNECT.
    pub device_timeout_ms: u64,
    /// Pause between attempts to reach an export while reconnecting after a restart.
    pub reconnect_interval_ms: u64,
    /// Where the device nodes appear (`/dev`).
    pub dev_dir: PathBuf,
    /// Where the kernel describes block devices (`/sys/block`).
    pub sys_block_dir: PathBuf,
}

impl KernelNbdConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            connections: 2,
            block_size_bytes: 4096,
            request_timeout_s: 60,
            dead_conn_timeout_s: 120,
            handshake_timeout_ms: 10_000,
            netlink_timeout_ms: 5_000,
            device_timeout_ms: 5_000,
            reconnect_interval_ms: 200,
            dev_dir: PathBuf::from("/dev"),
            sys_block_dir: PathBuf::from("/sys/block"),
        }
    }

    fn validate(&self) -> Result<()> {
        let b = self.block_size_bytes;
        if !(b.is_power_of_two() && (512..=4096).contains(&b)) {
            return Err(Error::Unsupported(format!(
                "kernel nbd block size {b} is invalid: use a power of two from 512 to 4096"
            )));
        }
        if self.connections == 0 {
            return Err(Error::Unsupported(
                "kernel nbd needs at least one connection per device".into(),
            ));
        }
        Ok(())
    }
}

/// The backend identifier a volume's device carries.
pub fn backend_identifier(volume: &str) -> String {
    format!("blockvol/{volume}")
}

/// Negotiated connections to one export, ready for the kernel.
#[derive(Debug)]
pub struct Negotiated {
    pub info: ExportInfo,
    pub streams: Vec<UnixStream>,
}

impl Negotiated {
    pub fn fds(&self) -> Vec<u32> {
        self.streams
            .iter()
            .map(|s| s.as_raw_fd().unsigned_abs())
            .collect()
    }
}

/// Dials `socket` and negotiates `volume` (fixed newstyle, NBD_OPT_GO) on up to
/// `connections` sockets: one unless the export advertises multi-conn, because the
/// kernel refuses several connections to an export without it.
pub fn negotiate(
    socket: &Path,
    volume: &str,
    connections: u32,
    timeout: Duration,
) -> Result<Negotiated> {
    let handshake = |source| Error::Handshake {
        volume: volume.into(),
        socket: socket.into(),
        source,
    };
    let first = Connection::connect(socket, volume, timeout).map_err(handshake)?;
    let info = first.info();
    let wanted = if info.transmission_flags & TFLAG_CAN_MULTI_CONN != 0 {
        connections.max(1)
    } else {
        1
    };
    let io = |source| Error::Io {
        path: socket.into(),
        source,
    };
    let mut streams = vec![first.into_stream().map_err(io)?];
    for _ in 1..wanted {
        let c = Connection::connect(socket, volume, timeout).map_err(handshake)?;
        if c.info() != info {
            return Err(Error::Unsupported(format!(
                "export {volume:?} changed geometry between connections ({:?} then {:?}); retry",
                info,
                c.info()
            )));
        }
        streams.push(c.into_stream().map_err(io)?);
    }
    Ok(Negotiated { info, streams })
}

/// Checks that the kernel can serve `info` with `block_size_bytes` blocks.
pub fn check_geometry(volume: &str, info: &ExportInfo, block_size_bytes: u32) -> Result<()> {
    if info.size_bytes == 0 {
        return Err(Error::Unsupported(format!("export {volume:?} has size 0")));
    }
    if !block_size_bytes.is_multiple_of(info.block_size.max(1)) {
        return Err(Error::Unsupported(format!(
            "export {volume:?} needs {}-byte blocks, which the device block size {} is not a \
             multiple of; raise the kernel attacher's block size",
            info.block_size, block_size_bytes
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    volume: String,
    socket: PathBuf,
    /// Absent between writing the record and the kernel's CONNECT reply.
    index: Option<u32>,
    size_bytes: u64,
}

/// What the kernel has at a recorded index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceState {
    /// Configured and carrying our backend identifier (or a kernel without one).
    Ours,
    /// No configured device at that index.
    Gone,
    /// Configured by someone else.
    Foreign,
}

/// Opens a connection to the driver (a netlink socket, or a test double).
pub type OpenControl = Box<dyn Fn() -> Result<Box<dyn NbdControl>, GenlError> + Send + Sync>;

/// See the module docs. One attacher per state directory; operations are serialized.
pub struct KernelNbdAttacher {
    config: KernelNbdConfig,
    ops: Mutex<()>,
    open_control: OpenControl,
}

impl KernelNbdAttacher {
    /// The attacher over the kernel's generic netlink interface.
    pub fn new(config: KernelNbdConfig) -> Result<Self> {
        let timeout = Duration::from_millis(config.netlink_timeout_ms);
        Self::with_control(
            config,
            Box::new(move || Ok(Box::new(NbdNetlink::open(timeout)?) as Box<dyn NbdControl>)),
        )
    }

    /// The attacher over another implementation of the driver's operations.
    pub fn with_control(config: KernelNbdConfig, open_control: OpenControl) -> Result<Self> {
        config.validate()?;
        create_state_dir(&config.state_dir)?;
        Ok(Self {
            config,
            ops: Mutex::new(()),
            open_control,
        })
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.state_dir.join(volume)
    }
    fn state_file(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("state.json")
    }

    fn netlink(&self) -> Result<Box<dyn NbdControl>> {
        Ok((self.open_control)()?)
    }

    /// The device node of index `index`.
    pub fn device_path(&self, index: u32) -> PathBuf {
        self.config.dev_dir.join(format!("nbd{index}"))
    }

    fn sys_dir(&self, index: u32) -> PathBuf {
        self.config.sys_block_dir.join(format!("nbd{index}"))
    }

    fn read_backend(&self, index: u32) -> Option<String> {
        fs::read_to_string(self.sys_dir(index).join("backend"))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_owned())
    }

    fn read_state(&self, volume: &str) -> Result<Option<State>> {
        super::read_state_file(&self.state_file(volume))
    }

    fn write_state(&self, state: &State) -> Result<()> {
        let dir = self.volume_dir(&state.volume);
        fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir, source })?;
        super::write_state_file(&self.state_file(&state.volume), state)
    }

    fn remove_state(&self, volume: &str) -> Result<()> {
        let dir = self.volume_dir(volume);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path: dir, source }),
        }
    }

    fn device_state(
        &self,
        nl: &mut dyn NbdControl,
        index: u32,
        volume: &str,
    ) -> Result<DeviceState> {
        let configured = nl
            .status(Some(index))?
            .iter()
            .any(|d| d.index == index && d.connected);
        if !configured {
            return Ok(DeviceState::Gone);
        }
        Ok(match self.read_backend(index) {
            Some(b) if !b.is_empty() && b != backend_identifier(volume) => DeviceState::Foreign,
            _ => DeviceState::Ours,
        })
    }

    /// The configured device carrying `volume`'s backend identifier, if any.
    fn find_by_backend(&self, volume: &str) -> Option<u32> {
        let want = backend_identifier(volume);
        let entries = fs::read_dir(&self.config.sys_block_dir).ok()?;
        entries.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            (self.read_backend(index).as_deref() == Some(want.as_str())).then_some(index)
        })
    }

    /// Hands freshly negotiated sockets to device `index` (replacing dead connections;
    /// the kernel ignores extras) and applies a size change of the export.
    fn reconnect(&self, nl: &mut dyn NbdControl, state: &State, index: u32) -> Result<State> {
        let neg = negotiate(
            &state.socket,
            &state.volume,
            self.config.connections,
            Duration::from_millis(self.config.handshake_timeout_ms),
        )?;
        check_geometry(&state.volume, &neg.info, self.config.block_size_bytes)?;
        let new_size = neg.info.size_bytes;
        nl.reconfigure(&ReconfigureRequest {
            index,
            size_bytes: (new_size != state.size_bytes).then_some(new_size),
            socket_fds: neg.fds(),
            ..Default::default()
        })?;
        // Our copies of the fds close here; the kernel holds its own references.
        drop(neg);
        let next = State {
            index: Some(index),
            size_bytes: new_size,
            ..state.clone()
        };
        if next != *state {
            self.write_state(&next)?;
        }
        Ok(next)
    }

    fn connect_new(&self, nl: &mut dyn NbdControl, volume: &str, socket: &Path) -> Result<PathBuf> {
        let neg = negotiate(
            socket,
            volume,
            self.config.connections,
            Duration::from_millis(self.config.handshake_timeout_ms),
        )?;
        check_geometry(volume, &neg.info, self.config.block_size_bytes)?;
        let bs = u64::from(self.config.block_size_bytes);
        if !neg.info.size_bytes.is_multiple_of(bs) {
            warn!(
                volume,
                size_bytes = neg.info.size_bytes,
                block_size_bytes = bs,
                "attach: export size is not a multiple of the block size; the tail is not exposed"
            );
        }
        let mut state = State {
            volume: volume.into(),
            socket: socket.into(),
            index: None,
            size_bytes: neg.info.size_bytes,
        };
        self.write_state(&state)?;
        let index = nl.connect(&ConnectRequest {
            index: None,
            size_bytes: neg.info.size_bytes,
            block_size_bytes: bs,
            server_flags: u64::from(neg.info.transmission_flags),
            timeout_s: self.config.request_timeout_s,
            dead_conn_timeout_s: self.config.dead_conn_timeout_s,
            client_flags: 0,
            socket_fds: neg.fds(),
            backend_identifier: Some(backend_identifier(volume)),
        })?;
        let connections = neg.streams.len();
        drop(neg);
        state.index = Some(index);
        self.write_state(&state)?;
        let dev = self.device_path(index);
        if !sys::wait_until(self.config.device_timeout_ms, || dev.exists()) {
            return Err(Error::Timeout {
                what: format!("device node {} for volume {volume}", dev.display()),
                timeout_ms: self.config.device_timeout_ms,
                detail: "; is devtmpfs mounted on /dev?".into(),
            });
        }
        info!(volume, device = %dev.display(), connections, "attach: kernel nbd device connected");
        Ok(dev)
    }

    /// Changes the size of `volume`'s device online (NBD_CMD_RECONFIGURE with
    /// NBD_ATTR_SIZE_BYTES). The export must already serve the new size.
    pub fn resize_to(&self, volume: &str, size_bytes: u64) -> Result<()> {
        validate_volume_name(volume)?;
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let not_attached = || Error::NotAttached {
            volume: volume.into(),
        };
        let state = self.read_state(volume)?.ok_or_else(not_attached)?;
        let index = state.index.ok_or_else(not_attached)?;
        let mut nl = self.netlink()?;
        if self.device_state(nl.as_mut(), index, volume)? != DeviceState::Ours {
            return Err(not_attached());
        }
        nl.reconfigure(&ReconfigureRequest {
            index,
            size_bytes: Some(size_bytes),
            ..Default::default()
        })?;
        self.write_state(&State {
            size_bytes,
            ..state
        })?;
        info!(volume, size_bytes, "attach: kernel nbd device resized");
        Ok(())
    }

    /// After an agent restart: gives every recorded device new connections, retrying
    /// each until its export is served again or `dead_conn_timeout_s` passes (after
    /// that the kernel has failed the held requests anyway). Returns how many devices
    /// were reconnected.
    pub fn reconnect_all(&self) -> usize {
        let attachments = match self.list() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "attach: cannot list kernel nbd devices to reconnect");
                return 0;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(self.config.dead_conn_timeout_s);
        // Rounds over every pending device, so one export that never returns does not
        // hold the others up.
        let mut pending: Vec<(String, Option<Error>)> = attachments
            .into_iter()
            .filter(|a| a.device.is_some())
            .map(|a| (a.volume, None))
            .collect();
        let mut done = 0;
        loop {
            pending.retain_mut(|(volume, last)| match self.reconnect_volume(volume) {
                Ok(revived) => {
                    if revived {
                        info!(volume = %volume, "attach: kernel nbd device reconnected");
                        done += 1;
                    }
                    false
                }
                Err(e) => {
                    *last = Some(e);
                    true
                }
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(self.config.reconnect_interval_ms));
        }
        for (volume, last) in pending {
            let error = last.map(|e| e.to_string()).unwrap_or_default();
            warn!(
                volume,
                error,
                "attach: kernel nbd device not reconnected; its IO fails until the volume is attached again"
            );
        }
        done
    }

    /// `Ok(false)` when there is nothing to reconnect (record or device gone).
    fn reconnect_volume(&self, volume: &str) -> Result<bool> {
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = self.read_state(volume)? else {
            return Ok(false);
        };
        let Some(index) = state.index else {
            return Ok(false);
        };
        let mut nl = self.netlink()?;
        if self.device_state(nl.as_mut(), index, volume)? != DeviceState::Ours {
            return Ok(false);
        }
        self.reconnect(nl.as_mut(), &state, index)?;
        Ok(true)
    }
}

impl Attacher for KernelNbdAttacher {
    fn attach(&self, volume: &str, socket: &Path) -> Result<PathBuf> {
        validate_volume_name(volume)?;
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut nl = self.netlink()?;
        let recorded = self.read_state(volume)?;
        let mut index = recorded.as_ref().and_then(|s| s.index);
        if index.is_none() {
            // A crash between CONNECT and the state write leaves a tagged device.
            index = self.find_by_backend(volume);
        }
        if let Some(index) = index {
            match self.device_state(nl.as_mut(), index, volume)? {
                DeviceState::Ours => {
                    let state = recorded.unwrap_or_else(|| State {
                        volume: volume.into(),
                        socket: socket.into(),
                        index: Some(index),
                        size_bytes: 0,
                    });
                    if state.socket != socket {
                        return Err(Error::AttachedElsewhere {
                            volume: volume.into(),
                            socket: state.socket,
                        });
                    }
                    self.reconnect(nl.as_mut(), &state, index)?;
                    return Ok(self.device_path(index));
                }
                DeviceState::Foreign => warn!(
                    volume,
                    index,
                    "attach: recorded nbd device now belongs to another backend; attaching anew"
                ),
                DeviceState::Gone => {}
            }
        }
        self.connect_new(nl.as_mut(), volume, socket)
    }

    fn detach(&self, volume: &str) -> Result<()> {
        validate_volume_name(volume)?;
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = self.read_state(volume)?;
        let index = match recorded.as_ref().and_then(|s| s.index) {
            Some(i) => Some(i),
            None => self.find_by_backend(volume),
        };
        if let Some(index) = index {
            let dev = self.device_path(index);
            let sys_dir = self.sys_dir(index);
            if let Ok(numbers) = fs::read_to_string(sys_dir.join("dev")) {
                let numbers = numbers.trim();
                if let Some(mp) = sys::mounted_at(numbers) {
                    return Err(Error::Busy {
                        volume: volume.into(),
                        device: dev,
                        reason: format!("mounted at {}", mp.display()),
                    });
                }
                if fs::read_dir(sys_dir.join("holders")).is_ok_and(|mut d| d.next().is_some()) {
                    return Err(Error::Busy {
                        volume: volume.into(),
                        device: dev,
                        reason: "another block device is stacked on it".into(),
                    });
                }
            }
            let mut nl = self.netlink()?;
            match self.device_state(nl.as_mut(), index, volume)? {
                DeviceState::Ours => {
                    nl.disconnect(index)?;
                    info!(volume, device = %dev.display(), "attach: kernel nbd device disconnected");
                }
                DeviceState::Foreign => warn!(
                    volume,
                    index, "attach: recorded nbd device belongs to another backend; left alone"
                ),
                DeviceState::Gone => {}
            }
        }
        self.remove_state(volume)
    }

    /// Reads the export's current size with a fresh handshake, hands it to the driver
    /// and returns the device's size as the kernel then reports it.
    fn resize(&self, volume: &str) -> Result<u64> {
        validate_volume_name(volume)?;
        let state = self.read_state(volume)?.ok_or_else(|| Error::NotAttached {
            volume: volume.into(),
        })?;
        let neg = negotiate(
            &state.socket,
            volume,
            1,
            Duration::from_millis(self.config.handshake_timeout_ms),
        )?;
        drop(neg.streams);
        self.resize_to(volume, neg.info.size_bytes)?;
        let device = self.device_path(state.index.unwrap_or_default());
        sys::block_device_size(&device).map_err(|source| Error::Io {
            path: device,
            source,
        })
    }

    fn list(&self) -> Result<Vec<Attachment>> {
        let entries = match fs::read_dir(&self.config.state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    path: self.config.state_dir.clone(),
                    source,
                });
            }
        };
        recorded_attachments(entries, |name| {
            Ok(self.read_state(name)?.map(|s| Attachment {
                volume: s.volume,
                socket: s.socket,
                device: s.index.map(|i| self.device_path(i)),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attacher() -> (tempfile::TempDir, KernelNbdAttacher) {
        let dir = tempfile::tempdir().expect("tempdir");
        let a =
            KernelNbdAttacher::new(KernelNbdConfig::new(dir.path().join("k"))).expect("attacher");
        (dir, a)
    }

    #[test]
    fn invalid_block_sizes_and_zero_connections_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bs in [0, 256, 1000, 8192] {
            let c = KernelNbdConfig {
                block_size_bytes: bs,
                ..KernelNbdConfig::new(dir.path())
            };
            let err = KernelNbdAttacher::new(c).err().expect("refused");
            assert!(err.to_string().contains("block size"), "{err}");
        }
        let c = KernelNbdConfig {
            connections: 0,
            ..KernelNbdConfig::new(dir.path())
        };
        assert!(KernelNbdAttacher::new(c).is_err());
    }

    #[test]
    fn geometry_needs_a_nonzero_size_and_a_compatible_block_size() {
        let info = |size_bytes, block_size| ExportInfo {
            size_bytes,
            transmission_flags: 0,
            block_size,
        };
        assert!(check_geometry("v", &info(1 << 20, 512), 4096).is_ok());
        assert!(check_geometry("v", &info(1 << 20, 4096), 4096).is_ok());
        assert!(check_geometry("v", &info(0, 512), 4096).is_err());
        let err = check_geometry("v", &info(1 << 20, 4096), 512).expect_err("too small");
        assert!(err.to_string().contains("block size"), "{err}");
    }

    #[test]
    fn state_round_trips_and_lists_recorded_devices() {
        let (_d, a) = attacher();
        assert!(a.list().expect("empty").is_empty());
        a.write_state(&State {
            volume: "vol-a".into(),
            socket: "/run/nbd.sock".into(),
            index: Some(4),
            size_bytes: 1 << 20,
        })
        .expect("write");
        a.write_state(&State {
            volume: "vol-b".into(),
            socket: "/run/nbd.sock".into(),
            index: None,
            size_bytes: 1 << 20,
        })
        .expect("write");
        let listed = a.list().expect("list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].device.as_deref(), Some(Path::new("/dev/nbd4")));
        assert_eq!(listed[1].device, None);
        let back = a.read_state("vol-a").expect("read").expect("present");
        assert_eq!(back.index, Some(4));
        a.remove_state("vol-a").expect("remove");
        assert!(a.read_state("vol-a").expect("read").is_none());
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let (_d, a) = attacher();
        fs::create_dir_all(a.volume_dir("v")).expect("mkdir");
        fs::write(a.state_file("v"), b"{not json").expect("write");
        let err = a.list().expect_err("corrupt");
        assert!(matches!(err, Error::State { .. }), "{err:?}");
    }

    #[test]
    fn reconnect_gives_up_at_the_deadline_and_keeps_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = KernelNbdAttacher::new(KernelNbdConfig {
            dead_conn_timeout_s: 0,
            ..KernelNbdConfig::new(dir.path())
        })
        .expect("attacher");
        a.write_state(&State {
            volume: "vol-r".into(),
            socket: dir.path().join("absent.sock"),
            index: Some(2),
            size_bytes: 1 << 20,
        })
        .expect("write");
        assert_eq!(a.reconnect_all(), 0);
        assert_eq!(a.list().expect("list").len(), 1, "the record survives");
    }

    #[test]
    fn detach_of_an_unknown_volume_succeeds_without_the_driver() {
        let (_d, a) = attacher();
        a.detach("never-attached").expect("idempotent detach");
        assert!(a.detach("../x").is_err());
    }
}
