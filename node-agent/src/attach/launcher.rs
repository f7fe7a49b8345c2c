//! Where attach proxies run. A device attached through FUSE + loop lives exactly as long
//! as its attach proxy (the process serving the volume file), so the proxy must outlive
//! the agent: an agent restart, a crash or a rolling update of the agent must only pause
//! the device.
//!
//! - [`LocalProxies`] starts proxies as children of the calling process, each in its own
//!   process group. That is enough where the agent runs as a plain process (a proxy
//!   survives the agent's death and is found again by PID and command line).
//! - In a container it is not: stopping a container ends every process in it. There the
//!   agent hands the start to the **attach launcher** (`blockvol-agent attach-launcher`),
//!   a small process in a container of its own, updated only on request, that starts
//!   the proxies as its own children ([`LauncherClient`] ↔ [`serve`]). The agent's
//!   container can then stop and start at will; the proxies re-dial its socket.
//!
//! The launcher protocol: one request per connection on a unix socket, a JSON line each
//! way ([`Request`] → [`Reply`]). It only ever starts the launcher's own `attach-proxy`
//! subcommand with the arguments given, writes its log only inside its state directory,
//! and answers for processes by PID and command line, so a recycled PID is never taken
//! for a proxy. The socket lives in a root-only host directory.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::sys;
use super::{Error, Result, validate_volume_name};

/// The program and leading arguments that start an attach proxy; the attacher appends
/// `--mount`, `--control`, `--upstream` and `--export`.
#[derive(Debug, Clone)]
pub struct ProxyCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl ProxyCommand {
    /// The running binary's own `attach-proxy` subcommand.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(ProxyCommand {
            program: std::env::current_exe()?,
            args: vec!["attach-proxy".into()],
        })
    }
}

/// How a proxy is recognised in /proc: every string of one of these lists appears in its
/// command line (the mount point it serves, for example).
pub type Identities = Vec<Vec<String>>;

/// Starts, watches and stops attach proxies (see the module docs).
pub trait ProxyHost: Send + Sync {
    /// Starts a proxy for `volume` with `args` appended to the proxy command, its output
    /// going to `log`; returns its PID.
    fn start(&self, volume: &str, args: &[String], log: &Path) -> Result<u32>;
    /// None while the proxy `pid` of `volume` runs; otherwise how it ended (or why that
    /// is unknown, which counts as ended).
    fn ended(&self, volume: &str, pid: u32, identities: &Identities) -> Option<String>;
    /// Stops the proxy of `volume`: SIGTERM, then SIGKILL after `timeout_ms`. Without a
    /// live `pid`, the proxy is looked for by `identities`.
    fn stop(&self, volume: &str, pid: Option<u32>, identities: &Identities, timeout_ms: u64);
}

/// Proxies as children of this process.
pub struct LocalProxies {
    command: ProxyCommand,
    /// Proxies started by this process, kept so they can be reaped.
    children: Mutex<HashMap<String, Child>>,
}

impl LocalProxies {
    pub fn new(command: ProxyCommand) -> Self {
        Self {
            command,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn matches_any(pid: u32, identities: &Identities) -> bool {
    identities.iter().any(|needles| {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        sys::process_matches(pid, &needles)
    })
}

fn find_any(identities: &Identities) -> Option<u32> {
    identities.iter().find_map(|needles| {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        sys::find_process(&needles)
    })
}

impl ProxyHost for LocalProxies {
    fn start(&self, volume: &str, args: &[String], log: &Path) -> Result<u32> {
        let io = |source| Error::Io {
            path: log.to_path_buf(),
            source,
        };
        let out = fs::File::create(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut c = Command::new(&self.command.program);
        c.args(&self.command.args)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Its own process group: signals aimed at the caller's group (Ctrl-C, a
        // supervisor stopping the agent) must not take attached devices down.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let child = c.spawn().map_err(|source| Error::Spawn {
            program: self.command.program.display().to_string(),
            source,
        })?;
        let pid = child.id();
        self.children().insert(volume.into(), child);
        Ok(pid)
    }

    fn ended(&self, volume: &str, pid: u32, identities: &Identities) -> Option<String> {
        let mut children = self.children();
        if let Some(child) = children.get_mut(volume).filter(|c| c.id() == pid) {
            return match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => {
                    children.remove(volume);
                    Some(status.to_string())
                }
                Err(e) => Some(format!("unknown ({e})")),
            };
        }
        drop(children);
        (!matches_any(pid, identities)).then(|| format!("process {pid} is not running"))
    }

    fn stop(&self, volume: &str, pid: Option<u32>, identities: &Identities, timeout_ms: u64) {
        if let Some(mut child) = self.children().remove(volume) {
            sys::signal(child.id(), Signal::TERM);
            if !sys::wait_until(timeout_ms, || {
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
        // Started by an earlier process: signal it only if it is still that proxy.
        let Some(pid) = pid
            .filter(|&p| matches_any(p, identities))
            .or_else(|| find_any(identities))
        else {
            return;
        };
        sys::signal(pid, Signal::TERM);
        if !sys::wait_until(timeout_ms, || !matches_any(pid, identities)) {
            warn!(volume, pid, "attach: proxy ignored SIGTERM, killing");
            sys::signal(pid, Signal::KILL);
            sys::wait_until(timeout_ms, || !matches_any(pid, identities));
        }
    }
}

/// A request to the attach launcher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Start {
        volume: String,
        args: Vec<String>,
        log: PathBuf,
    },
    Ended {
        volume: String,
        pid: u32,
        identities: Identities,
    },
    Stop {
        volume: String,
        pid: Option<u32>,
        identities: Identities,
        timeout_ms: u64,
    },
}

/// The launcher's answer: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Longest request line the launcher reads (a start request is well under 4 KiB).
const REQUEST_BYTES_MAX: u64 = 64 << 10;

/// The agent's side: each call is one connection to the launcher's socket.
pub struct LauncherClient {
    socket: PathBuf,
    /// Bound of every call except stop, which also waits for the proxy to exit.
    timeout_ms: u64,
}

impl LauncherClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout_ms: 10_000,
        }
    }

    fn call(&self, request: &Request, timeout_ms: u64) -> std::result::Result<Reply, String> {
        let unreachable = |e: std::io::Error| {
            format!(
                "attach launcher at {}: {e} (is the blockvol attach pod running on this node?)",
                self.socket.display()
            )
        };
        let mut conn = UnixStream::connect(&self.socket).map_err(unreachable)?;
        let timeout = Some(Duration::from_millis(timeout_ms.max(1)));
        conn.set_read_timeout(timeout).map_err(unreachable)?;
        conn.set_write_timeout(timeout).map_err(unreachable)?;
        let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
        line.push('\n');
        conn.write_all(line.as_bytes()).map_err(unreachable)?;
        let mut answer = String::new();
        BufReader::new(conn)
            .read_line(&mut answer)
            .map_err(unreachable)?;
        serde_json::from_str(&answer).map_err(|e| {
            format!(
                "attach launcher at {} answered {answer:?}: {e}",
                self.socket.display()
            )
        })
    }
}

impl ProxyHost for LauncherClient {
    fn start(&self, volume: &str, args: &[String], log: &Path) -> Result<u32> {
        let request = Request::Start {
            volume: volume.into(),
            args: args.to_vec(),
            log: log.to_path_buf(),
        };
        let failed = |reason: String| Error::Launcher {
            volume: volume.into(),
            reason,
        };
        let reply = self.call(&request, self.timeout_ms).map_err(failed)?;
        match (reply.pid, reply.error) {
            (Some(pid), None) => Ok(pid),
            (_, Some(reason)) => Err(failed(reason)),
            (None, None) => Err(failed("the launcher answered without a PID".into())),
        }
    }

    fn ended(&self, volume: &str, pid: u32, identities: &Identities) -> Option<String> {
        let request = Request::Ended {
            volume: volume.into(),
            pid,
            identities: identities.clone(),
        };
        match self.call(&request, self.timeout_ms) {
            Ok(Reply {
                error: Some(reason),
                ..
            }) => Some(reason),
            Ok(reply) => reply.ended,
            // Proxies are the launcher's children: without it they are gone too.
            Err(reason) => Some(reason),
        }
    }

    fn stop(&self, volume: &str, pid: Option<u32>, identities: &Identities, timeout_ms: u64) {
        let request = Request::Stop {
            volume: volume.into(),
            pid,
            identities: identities.clone(),
            timeout_ms,
        };
        // SIGTERM, then SIGKILL after timeout_ms, then up to timeout_ms more.
        let bound = timeout_ms.saturating_mul(2) + self.timeout_ms;
        match self.call(&request, bound) {
            Ok(Reply {
                error: Some(reason),
                ..
            })
            | Err(reason) => warn!(volume, %reason, "attach: stopping the proxy failed"),
            Ok(_) => {}
        }
    }
}

/// Settings of `blockvol-agent attach-launcher`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "blockvol-agent attach-launcher",
    about = "Starts and stops attach proxies for the node agent, outside the agent's container"
)]
pub struct LauncherSettings {
    /// The unix socket to listen on (the agent's `--attach-launcher-socket`).
    #[arg(long)]
    pub socket: PathBuf,
    /// The agent's attach state directory (`DATA_DIR/attach`); proxy logs are written
    /// only below it.
    #[arg(long)]
    pub state_dir: PathBuf,
}

/// Runs the launcher until the process is stopped. Proxies it started keep running if
/// it exits by an error, but a container stop ends them with it (see the module docs).
pub fn run(settings: LauncherSettings) -> anyhow::Result<()> {
    fs::create_dir_all(&settings.state_dir)?;
    let state_dir = fs::canonicalize(&settings.state_dir)?;
    if let Some(parent) = settings.socket.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::remove_file(&settings.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = UnixListener::bind(&settings.socket)?;
    fs::set_permissions(
        &settings.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let proxies = Arc::new(LocalProxies::new(ProxyCommand::current_exe()?));
    info!(socket = %settings.socket.display(), state_dir = %state_dir.display(), "attach launcher listening");
    serve(listener, state_dir, proxies);
    Ok(())
}

/// Answers requests on `listener` with `proxies`, a thread per connection.
pub fn serve(listener: UnixListener, state_dir: PathBuf, proxies: Arc<dyn ProxyHost>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "attach launcher: accept failed");
                continue;
            }
        };
        let proxies = proxies.clone();
        let state_dir = state_dir.clone();
        let spawned = std::thread::Builder::new()
            .name("attach-launcher-conn".into())
            .spawn(move || {
                if let Err(e) = answer(conn, &state_dir, proxies.as_ref()) {
                    warn!(error = %e, "attach launcher: request failed");
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "attach launcher: cannot start a connection thread");
        }
    }
}

fn answer(conn: UnixStream, state_dir: &Path, proxies: &dyn ProxyHost) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    std::io::Read::take(BufReader::new(&conn), REQUEST_BYTES_MAX).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(request, state_dir, proxies),
        Err(e) => Reply {
            error: Some(format!("malformed request: {e}")),
            ..Reply::default()
        },
    };
    let mut out = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    out.push('\n');
    (&conn).write_all(out.as_bytes())
}

/// One request: validated, then carried out by `proxies`.
pub fn handle(request: Request, state_dir: &Path, proxies: &dyn ProxyHost) -> Reply {
    let refused = |reason: String| Reply {
        error: Some(reason),
        ..Reply::default()
    };
    let volume = match &request {
        Request::Start { volume, .. }
        | Request::Ended { volume, .. }
        | Request::Stop { volume, .. } => volume.clone(),
    };
    if let Err(e) = validate_volume_name(&volume) {
        return refused(e.to_string());
    }
    match request {
        Request::Start { args, log, .. } => {
            // The log goes into the volume's own directory under the state directory
            // (made by the agent): nothing else on the host can be written through here.
            let volume_dir = state_dir.join(&volume);
            let in_volume_dir =
                log.parent().and_then(|p| fs::canonicalize(p).ok()) == Some(volume_dir.clone());
            if !in_volume_dir || log.file_name().is_none() {
                return refused(format!(
                    "log {} is not a file in {}",
                    log.display(),
                    volume_dir.display()
                ));
            }
            match proxies.start(&volume, &args, &log) {
                Ok(pid) => {
                    info!(volume, pid, "attach launcher: proxy started");
                    Reply {
                        pid: Some(pid),
                        ..Reply::default()
                    }
                }
                Err(e) => refused(e.to_string()),
            }
        }
        Request::Ended {
            pid, identities, ..
        } => Reply {
            ended: proxies.ended(&volume, pid, &identities),
            ..Reply::default()
        },
        Request::Stop {
            pid,
            identities,
            timeout_ms,
            ..
        } => {
            proxies.stop(&volume, pid, &identities, timeout_ms.min(60_000));
            Reply::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> LocalProxies {
        LocalProxies::new(ProxyCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into(), "attach-proxy".into()],
        })
    }

    fn launcher(proxies: LocalProxies) -> (tempfile::TempDir, LauncherClient) {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("launcher.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let state = fs::canonicalize(dir.path()).expect("canonical");
        fs::create_dir_all(state.join("vol-a")).expect("volume dir");
        std::thread::spawn(move || serve(listener, state, Arc::new(proxies)));
        (dir, LauncherClient::new(socket))
    }

    #[test]
    fn a_launched_proxy_is_watched_and_stopped_through_the_launcher() {
        let (dir, client) = launcher(sh("echo started; exec sleep 600"));
        let log = dir.path().join("vol-a/proxy.log");
        let pid = client
            .start("vol-a", &["--mount=/x/vol-a/mnt".into()], &log)
            .expect("start");
        let identities = vec![vec!["sleep".to_string()]];
        assert!(
            sys::wait_until(10_000, || fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("started"))),
            "the proxy's output goes to its log"
        );
        assert_eq!(client.ended("vol-a", pid, &identities), None);
        client.stop("vol-a", Some(pid), &identities, 2_000);
        let ended = client.ended("vol-a", pid, &identities);
        assert!(ended.is_some(), "still running after stop");
    }

    #[test]
    fn the_launcher_refuses_logs_outside_the_volume_dir_and_bad_names() {
        let (dir, client) = launcher(sh("exec sleep 600"));
        for (volume, log) in [
            ("vol-a", PathBuf::from("/etc/passwd")),
            ("vol-a", dir.path().join("vol-a/../escape.log")),
            ("vol-b", dir.path().join("vol-b/proxy.log")),
            ("../vol-a", dir.path().join("vol-a/proxy.log")),
        ] {
            let e = client
                .start(volume, &[], &log)
                .expect_err("refused")
                .to_string();
            assert!(
                e.contains("is not a file in") || e.contains("invalid"),
                "{volume} {}: {e}",
                log.display()
            );
        }
        assert!(!dir.path().join("escape.log").exists());
    }

    #[test]
    fn an_unreachable_launcher_is_an_error_that_says_what_to_check() {
        let client = LauncherClient::new("/nonexistent/launcher.sock");
        let e = client
            .start("vol-a", &[], Path::new("/nonexistent/vol-a/proxy.log"))
            .expect_err("unreachable")
            .to_string();
        assert!(e.contains("attach pod"), "{e}");
        assert!(
            client
                .ended("vol-a", 1, &vec![vec!["attach-proxy".into()]])
                .is_some()
        );
    }

    #[test]
    fn malformed_requests_get_an_error_line() {
        let (dir, _client) = launcher(sh("exec sleep 600"));
        let mut conn = UnixStream::connect(dir.path().join("launcher.sock")).expect("connect");
        conn.write_all(b"{\"op\":\"format_disk\"}\n")
            .expect("write");
        let mut answer = String::new();
        BufReader::new(conn).read_line(&mut answer).expect("read");
        let reply: Reply = serde_json::from_str(&answer).expect("a reply");
        assert!(
            reply.error.as_deref().unwrap_or("").contains("malformed"),
            "{reply:?}"
        );
    }
}
