//! Attach without the kernel NBD driver: `nbdfuse` exposes the export as a file on a
//! FUSE mount, and a loop device (direct I/O, so no second page cache) turns that file
//! into a block device. Per volume, `STATE_DIR/<volume>/` holds the mount point, the
//! nbdfuse log and `state.json` (socket, nbdfuse PID, loop device); teardown runs in
//! the only safe order: loop device → FUSE mount → nbdfuse process → attach proxy.
//!
//! With a proxy command configured, nbdfuse does not dial the agent's socket itself but
//! an attach proxy (`proxy.sock` in the volume's directory) that re-dials the agent
//! when it restarts (see [`super::proxy`]), so a device outlives an agent restart.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::sys;
use super::{Attacher, Attachment, Error, Result, validate_volume_name};

/// Settings of the FUSE + loop attacher. Timeouts bound every wait on an external
/// process.
#[derive(Debug, Clone)]
pub struct FuseLoopConfig {
    /// Directory for per-volume state and mount points; must survive agent restarts.
    pub state_dir: PathBuf,
    pub nbdfuse_program: String,
    pub losetup_program: String,
    pub fusermount_program: String,
    /// Logical sector size of the loop device; must be a multiple of the export's
    /// minimum block size so the kernel never sends a request the server rejects.
    pub sector_size_bytes: u32,
    /// NBD connections nbdfuse opens (multi-conn).
    pub nbdfuse_connections: u32,
    /// Time nbdfuse has to connect and mount.
    pub ready_timeout_ms: u64,
    /// Time nbdfuse has to exit after SIGTERM before it gets SIGKILL.
    pub stop_timeout_ms: u64,
    /// Time the kernel has to release a loop device after `losetup -d`.
    pub loop_release_timeout_ms: u64,
    /// How to start the attach proxy; `None` connects nbdfuse to the agent directly
    /// (the device then dies with the agent process).
    pub proxy: Option<ProxyCommand>,
}

/// The program and leading arguments that start an attach proxy; the attacher appends
/// `--listen`, `--upstream` and `--export`.
#[derive(Debug, Clone)]
pub struct ProxyCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl ProxyCommand {
    /// The running agent binary's own `attach-proxy` subcommand.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(ProxyCommand {
            program: std::env::current_exe()?,
            args: vec!["attach-proxy".into()],
        })
    }
}

impl FuseLoopConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            nbdfuse_program: "nbdfuse".into(),
            losetup_program: "losetup".into(),
            fusermount_program: "fusermount3".into(),
            sector_size_bytes: 4096,
            nbdfuse_connections: 4,
            ready_timeout_ms: 10_000,
            stop_timeout_ms: 5_000,
            loop_release_timeout_ms: 5_000,
            proxy: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    volume: String,
    socket: PathBuf,
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
    /// nbdfuse processes started by this instance, kept so they can be reaped.
    children: Mutex<HashMap<String, Child>>,
    /// Attach proxies started by this instance, kept so they can be reaped.
    proxies: Mutex<HashMap<String, Child>>,
}

impl FuseLoopAttacher {
    pub fn new(config: FuseLoopConfig) -> Result<Self> {
        fs::create_dir_all(&config.state_dir).map_err(|source| Error::Io {
            path: config.state_dir.clone(),
            source,
        })?;
        Ok(Self {
            config,
            ops: Mutex::new(()),
            children: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
        })
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.state_dir.join(volume)
    }
    fn mount_dir(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("mnt")
    }
    fn image_file(&self, volume: &str) -> PathBuf {
        self.mount_dir(volume).join("nbd")
    }
    fn state_file(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("state.json")
    }
    fn proxy_socket(&self, volume: &str) -> PathBuf {
        super::proxy::socket_in(&self.volume_dir(volume))
    }

    fn read_state(&self, volume: &str) -> Result<Option<State>> {
        let path = self.state_file(volume);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::State {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// Replaces the state file atomically (write temp, fsync, rename).
    fn write_state(&self, state: &State) -> Result<()> {
        let path = self.state_file(&state.volume);
        let tmp = path.with_extension("json.tmp");
        let io = |source, p: &Path| Error::Io {
            path: p.to_path_buf(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        {
            use std::io::Write;
            let mut f = fs::File::create(&tmp).map_err(|e| io(e, &tmp))?;
            f.write_all(&bytes).map_err(|e| io(e, &tmp))?;
            f.sync_all().map_err(|e| io(e, &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(|e| io(e, &path))
    }

    fn nbdfuse_alive(&self, volume: &str, pid: u32) -> bool {
        let mnt = self.mount_dir(volume);
        sys::process_matches(pid, &["nbdfuse", &mnt.to_string_lossy()])
    }

    fn proxy_alive(&self, volume: &str, pid: u32) -> bool {
        let sock = self.proxy_socket(volume);
        sys::process_matches(pid, &["attach-proxy", &sock.to_string_lossy()])
    }

    /// Whether the recorded attachment is complete and still in place.
    fn healthy_device(&self, state: &State) -> Option<PathBuf> {
        let dev = state.loop_device.clone()?;
        let pid = state.nbdfuse_pid?;
        let proxy_ok = match (&self.config.proxy, state.proxy_pid) {
            (None, _) => true,
            (Some(_), Some(p)) => self.proxy_alive(&state.volume, p),
            (Some(_), None) => false,
        };
        let ok = proxy_ok
            && self.nbdfuse_alive(&state.volume, pid)
            && sys::is_mount_point(&self.mount_dir(&state.volume))
            && sys::loop_devices_backed_by(&self.image_file(&state.volume)).contains(&dev);
        ok.then_some(dev)
    }

    /// Starts the attach proxy for `volume` in front of `socket` and waits until it
    /// listens; returns its PID and socket.
    fn start_proxy(
        &self,
        cmd: &ProxyCommand,
        volume: &str,
        socket: &Path,
    ) -> Result<(u32, PathBuf)> {
        let dir = self.volume_dir(volume);
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let listen = self.proxy_socket(volume);
        let _ = fs::remove_file(&listen);
        let log_path = dir.join("proxy.log");
        let io = |source| Error::Io {
            path: log_path.clone(),
            source,
        };
        let log = fs::File::create(&log_path).map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .arg(format!("--listen={}", listen.display()))
            .arg(format!("--upstream={}", socket.display()))
            .arg(format!("--export={volume}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group, like nbdfuse: it must outlive the agent.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let program = cmd.program.display().to_string();
        let child = c.spawn().map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        self.write_state(&State {
            volume: volume.into(),
            socket: socket.into(),
            nbdfuse_pid: None,
            loop_device: None,
            proxy_pid: Some(pid),
        })?;
        self.await_ready(
            child,
            &self.proxies,
            volume,
            &log_path,
            || format!("{program} {}", cmd.args.join(" ")),
            || format!("attach proxy listening on {}", listen.display()),
            || std::os::unix::net::UnixStream::connect(&listen).is_ok(),
        )?;
        Ok((pid, listen))
    }

    /// Waits until a helper process we spawned (nbdfuse, the attach proxy) is `ready`,
    /// failing with its log if it exits first or with a timeout. Unless it exited, the
    /// child is kept in `children` under `volume` either way, so a detach stops it.
    #[allow(clippy::too_many_arguments)]
    fn await_ready(
        &self,
        mut child: Child,
        children: &Mutex<HashMap<String, Child>>,
        volume: &str,
        log_path: &Path,
        command: impl FnOnce() -> String,
        what: impl FnOnce() -> String,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let mut exited = None;
        let became_ready = sys::wait_until(self.config.ready_timeout_ms, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            ready()
        });
        let log_text = || {
            fs::read_to_string(log_path)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if let Some(status) = exited {
            return Err(Error::Command {
                command: command(),
                status: status.to_string(),
                stderr: log_text(),
            });
        }
        children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(volume.into(), child);
        if !became_ready {
            return Err(Error::Timeout {
                what: what(),
                timeout_ms: self.config.ready_timeout_ms,
                detail: format!("; log: {}", log_text()),
            });
        }
        Ok(())
    }

    fn stop_proxy(&self, volume: &str, pid: Option<u32>) {
        let child = self
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(volume);
        let sock = self.proxy_socket(volume);
        let pid = match child {
            Some(mut child) => {
                sys::signal(child.id(), libc::SIGTERM);
                if !sys::wait_until(self.config.stop_timeout_ms, || {
                    matches!(child.try_wait(), Ok(Some(_)) | Err(_))
                }) {
                    warn!(
                        volume,
                        pid = child.id(),
                        "attach: proxy ignored SIGTERM, killing"
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return;
            }
            // Started by an earlier agent: signal it only if it is still that proxy.
            None => pid
                .filter(|&p| self.proxy_alive(volume, p))
                .or_else(|| sys::find_process(&["attach-proxy", &sock.to_string_lossy()])),
        };
        let Some(pid) = pid else { return };
        sys::signal(pid, libc::SIGTERM);
        if !sys::wait_until(self.config.stop_timeout_ms, || {
            !self.proxy_alive(volume, pid)
        }) {
            warn!(volume, pid, "attach: proxy ignored SIGTERM, killing");
            sys::signal(pid, libc::SIGKILL);
            sys::wait_until(self.config.stop_timeout_ms, || {
                !self.proxy_alive(volume, pid)
            });
        }
    }

    /// Starts nbdfuse on the export `volume` served at `dial` (the agent's socket or
    /// the proxy's); the state file records `socket`, the agent's.
    fn start_nbdfuse(
        &self,
        volume: &str,
        socket: &Path,
        dial: &Path,
        proxy_pid: Option<u32>,
    ) -> Result<u32> {
        let dir = self.volume_dir(volume);
        let mnt = self.mount_dir(volume);
        let pidfile = dir.join("nbdfuse.pid");
        let _ = fs::remove_file(&pidfile);
        fs::create_dir_all(&mnt).map_err(|source| Error::Io {
            path: mnt.clone(),
            source,
        })?;
        let log_path = dir.join("nbdfuse.log");
        let log = fs::File::create(&log_path).map_err(|source| Error::Io {
            path: log_path.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| Error::Io {
            path: log_path.clone(),
            source,
        })?;
        let uri = nbd_unix_uri(volume, dial);
        let mut cmd = Command::new(&self.config.nbdfuse_program);
        cmd.arg("-C")
            .arg(self.config.nbdfuse_connections.to_string())
            .arg("-P")
            .arg(&pidfile)
            .arg(&mnt)
            .arg(&uri)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group: signals aimed at the agent's group (Ctrl-C, a
        // supervisor stopping the agent) must not take attached devices down.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            program: self.config.nbdfuse_program.clone(),
            source,
        })?;
        let pid = child.id();
        // Recorded before waiting, so a crash from here on still leaves a trail to clean.
        self.write_state(&State {
            volume: volume.into(),
            socket: socket.into(),
            nbdfuse_pid: Some(pid),
            loop_device: None,
            proxy_pid,
        })?;
        self.await_ready(
            child,
            &self.children,
            volume,
            &log_path,
            || format!("{} {} {}", self.config.nbdfuse_program, mnt.display(), uri),
            || format!("nbdfuse mounting {}", mnt.display()),
            || pidfile.exists() && self.image_file(volume).exists(),
        )?;
        Ok(pid)
    }

    fn stop_nbdfuse(&self, volume: &str, pid: Option<u32>) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(volume);
        match child {
            Some(mut child) => {
                // Ours: signal, wait (reaping it), escalate.
                sys::signal(child.id(), libc::SIGTERM);
                let gone = sys::wait_until(self.config.stop_timeout_ms, || {
                    matches!(child.try_wait(), Ok(Some(_)) | Err(_))
                });
                if !gone {
                    warn!(
                        volume,
                        pid = child.id(),
                        "attach: nbdfuse ignored SIGTERM, killing"
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            None => {
                // Started by an earlier agent: only signal it if it is still that nbdfuse;
                // without a usable PID, look for it by its mount point.
                let mnt = self.mount_dir(volume);
                let pid = pid
                    .filter(|&p| self.nbdfuse_alive(volume, p))
                    .or_else(|| sys::find_process(&["nbdfuse", &mnt.to_string_lossy()]));
                let Some(pid) = pid else { return };
                sys::signal(pid, libc::SIGTERM);
                if !sys::wait_until(self.config.stop_timeout_ms, || {
                    !self.nbdfuse_alive(volume, pid)
                }) {
                    warn!(volume, pid, "attach: nbdfuse ignored SIGTERM, killing");
                    sys::signal(pid, libc::SIGKILL);
                    sys::wait_until(self.config.stop_timeout_ms, || {
                        !self.nbdfuse_alive(volume, pid)
                    });
                }
            }
        }
    }

    /// Removes whatever exists of an attachment, in teardown order. Refuses while the
    /// block device is mounted or has holders, leaving everything in place.
    fn teardown(&self, volume: &str, state: Option<&State>) -> Result<()> {
        let image = self.image_file(volume);
        // Found through sysfs, not the state file: a crash may have happened between
        // `losetup` and recording its result.
        let devices = sys::loop_devices_backed_by(&image);
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
            sys::loop_devices_backed_by(&image).is_empty()
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
        self.stop_nbdfuse(volume, state.and_then(|s| s.nbdfuse_pid));
        // Also without a configured proxy: an earlier agent may have run with one.
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
            let (proxy_pid, dial) = match &self.config.proxy {
                Some(cmd) => {
                    let (pid, listen) = self.start_proxy(cmd, volume, socket)?;
                    (Some(pid), listen)
                }
                None => (None, socket.to_path_buf()),
            };
            let pid = self.start_nbdfuse(volume, socket, &dial, proxy_pid)?;
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
                nbdfuse_pid: Some(pid),
                loop_device: Some(dev.clone()),
                proxy_pid,
            })?;
            Ok(dev)
        })();
        match result {
            Ok(dev) => {
                info!(volume, device = %dev.display(), "attach: attached via nbdfuse + loop");
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
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_volume_name(&name).is_err() {
                continue;
            }
            if let Some(s) = self.read_state(&name)? {
                out.push(Attachment {
                    volume: s.volume,
                    socket: s.socket,
                    device: s.loop_device,
                });
            }
        }
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        Ok(out)
    }
}

/// `nbd+unix:///VOLUME?socket=PATH`, percent-encoding the socket path where needed.
fn nbd_unix_uri(volume: &str, socket: &Path) -> String {
    let mut enc = String::new();
    for b in socket.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            enc.push(char::from(b));
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("nbd+unix:///{volume}?socket={enc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_uri_escapes_socket_path_characters() {
        assert_eq!(
            nbd_unix_uri("vol-1", Path::new("/run/a b&c.sock")),
            "nbd+unix:///vol-1?socket=/run/a%20b%26c.sock"
        );
    }

    #[test]
    fn detach_of_unknown_volume_succeeds_and_list_is_empty() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = FuseLoopAttacher::new(FuseLoopConfig::new(d.path())).expect("attacher");
        a.detach("never-attached").expect("detach");
        assert_eq!(a.list().expect("list"), Vec::new());
        assert!(matches!(
            a.attach("../x", Path::new("/tmp/s")),
            Err(Error::InvalidVolumeName { .. })
        ));
    }

    #[test]
    fn unreadable_state_file_fails_list_but_not_detach() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = FuseLoopAttacher::new(FuseLoopConfig::new(d.path())).expect("attacher");
        fs::create_dir_all(d.path().join("v")).expect("mkdir");
        fs::write(d.path().join("v/state.json"), b"{not json").expect("write");
        assert!(matches!(a.list(), Err(Error::State { .. })));
        a.detach("v")
            .expect("detach proceeds without the state file");
        assert!(!d.path().join("v").exists());
    }
}
