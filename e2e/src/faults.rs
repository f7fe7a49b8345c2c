//! Fault injection for scenario tests: seeded choices, trial counts from the environment,
//! loopback partitions with iptables, a TCP relay whose port can be partitioned, and a
//! TCP proxy that delays, rate-limits or cuts a link.
//!
//! Guarantees: every iptables rule added here carries the guard's comment tag and is
//! removed when its guard drops (also when the test panics), so nothing outlives a test.
//! Rules only ever match the guard's own ports on the loopback interface.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// Errors of the fault tools, each naming what was attempted.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("{var}={value:?} is not a whole number")]
    BadEnv { var: String, value: String },
    #[error("iptables {args:?}: {reason}")]
    Iptables { args: Vec<String>, reason: String },
    #[error("{command}: {reason}")]
    Command { command: String, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay {what}: {source}")]
    Relay {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = FaultError> = std::result::Result<T, E>;

/// A whole number from the environment, or `default` when the variable is unset.
pub fn env_u64(var: &str, default: u64) -> Result<u64> {
    match std::env::var(var) {
        Ok(v) => v.trim().parse().map_err(|_| FaultError::BadEnv {
            var: var.into(),
            value: v,
        }),
        Err(_) => Ok(default),
    }
}

use testkit::Task;

fn iptables(args: &[String]) -> Result<String> {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| FaultError::Iptables {
            args: args.to_vec(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FaultError::Iptables {
            args: args.to_vec(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rules currently in the filter table that carry `tag` in their comment.
pub fn rules_tagged(tag: &str) -> Result<Vec<String>> {
    Ok(iptables(&["-S".into()])?
        .lines()
        .filter(|l| l.contains(tag))
        .map(str::to_string)
        .collect())
}

/// Drops every TCP packet to or from the given loopback ports while it lives: the
/// listeners on those ports become unreachable and their open connections stall, like
/// a network partition of one host. The rules go into OUTPUT on `lo` (every loopback
/// packet passes there) and are deleted on drop.
pub struct PortPartition {
    tag: String,
    rules: Vec<Vec<String>>,
}

impl PortPartition {
    /// Installs the rules; `tag` names the test so leftovers are attributable.
    pub fn new(tag: &str, ports: &[u16]) -> Result<PortPartition> {
        let mut p = PortPartition {
            tag: tag.to_string(),
            rules: Vec::new(),
        };
        for port in ports {
            for dir in ["--dport", "--sport"] {
                let rule: Vec<String> = [
                    "OUTPUT",
                    "-o",
                    "lo",
                    "-p",
                    "tcp",
                    dir,
                    &port.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    tag,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let mut add = vec!["-I".to_string()];
                add.extend(rule.iter().cloned());
                // On failure `p` drops here and removes the rules already added.
                iptables(&add)?;
                p.rules.push(rule);
            }
        }
        tracing::info!(tag, ?ports, "partition installed");
        Ok(p)
    }

    /// Removes the rules now (idempotent); the first failure is returned after trying all.
    pub fn heal(&mut self) -> Result<()> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let mut first = None;
        for rule in self.rules.drain(..) {
            let mut del = vec!["-D".to_string()];
            del.extend(rule);
            if let Err(e) = iptables(&del) {
                tracing::warn!(error = %e, "removing a partition rule");
                first.get_or_insert(e);
            }
        }
        tracing::info!(tag = %self.tag, "partition healed");
        first.map_or(Ok(()), Err)
    }
}

impl Drop for PortPartition {
    fn drop(&mut self) {
        let _ = self.heal();
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| FaultError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FaultError::Command {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A small ext4 filesystem in an image file, attached to a loop device and mounted on
/// `mountpoint`, so a data directory can run out of space for real. No blocks are
/// reserved for root (the agents run as root here). Dropping it unmounts it and
/// detaches the loop device; stop every process using it first.
pub struct LoopFs {
    mountpoint: std::path::PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopFs {
    pub fn mount(
        image: &std::path::Path,
        size_mib: u64,
        mountpoint: &std::path::Path,
    ) -> Result<LoopFs> {
        let io = |what, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| FaultError::Io { what, path, source }
        };
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(io("creating the image", image))?;
        std::fs::create_dir_all(mountpoint).map_err(io("creating the mountpoint", mountpoint))?;
        let img = image.display().to_string();
        run("mkfs.ext4", &["-q", "-F", "-m", "0", &img])?;
        let mut fs = LoopFs {
            mountpoint: mountpoint.to_path_buf(),
            device: None,
            mounted: false,
        };
        fs.device = Some(run("losetup", &["-f", "--show", &img])?);
        let dev = fs.device.clone().unwrap_or_default();
        run("mount", &[&dev, &mountpoint.display().to_string()])?;
        fs.mounted = true;
        tracing::info!(device = %dev, mountpoint = %mountpoint.display(), size_mib, "loop filesystem mounted");
        Ok(fs)
    }

    /// Writes a filler file until the filesystem is full, so the next allocation fails
    /// with ENOSPC. Returns the bytes written.
    pub fn fill(&self) -> Result<u64> {
        use std::io::Write;
        let path = self.mountpoint.join("filler");
        let mut f = std::fs::File::create(&path).map_err(|source| FaultError::Io {
            what: "creating",
            path: path.clone(),
            source,
        })?;
        let mut written = 0u64;
        for chunk in [1usize << 20, 4096] {
            let buf = vec![0xf1u8; chunk];
            while f.write_all(&buf).is_ok() {
                written += chunk as u64;
            }
        }
        let _ = f.sync_all();
        tracing::info!(mountpoint = %self.mountpoint.display(), written, "filesystem filled");
        Ok(written)
    }

    /// Unmounts and detaches now (idempotent).
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            run("umount", &[&self.mountpoint.display().to_string()])?;
            self.mounted = false;
        }
        if let Some(dev) = self.device.take() {
            run("losetup", &["-d", &dev])?;
        }
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %e, mountpoint = %self.mountpoint.display(), "removing the loop filesystem");
        }
    }
}

/// A TCP relay on a fresh loopback port forwarding to `target`. Pointing one client at
/// its own relay gives that client a port of its own, so a [`PortPartition`] of the relay
/// port cuts exactly that client off (agents all reach the API server from 127.0.0.1).
/// The relay task stops when this is dropped.
/// A listener on a free loopback port, and its address.
async fn bind_loopback() -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| FaultError::Relay {
            what: "binding 127.0.0.1:0",
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| FaultError::Relay {
        what: "reading the local address",
        source,
    })?;
    Ok((listener, addr))
}

pub struct TcpRelay {
    addr: SocketAddr,
    _task: Task,
}

impl TcpRelay {
    pub async fn start(target: SocketAddr) -> Result<TcpRelay> {
        let (listener, addr) = bind_loopback().await?;
        let task = Task::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(TcpRelay { addr, _task: task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The shape of one direction of a [`ShapedProxy`] link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkShape {
    /// One-way delay added to every byte.
    pub delay: std::time::Duration,
    /// Bandwidth cap in bytes per second; `None` for no cap.
    pub bytes_per_s: Option<u64>,
}

/// Largest chunk a proxy direction reads and schedules at once.
const PROXY_CHUNK_BYTES: usize = 16 << 10;
/// Chunks in flight per direction before the reader waits (bounds the proxy's memory
/// like a socket buffer: 256 × 16 KiB).
const PROXY_QUEUE_CHUNKS: usize = 256;

#[derive(Debug, Default)]
struct ProxyState {
    /// Client → target.
    forward: LinkShape,
    /// Target → client.
    backward: LinkShape,
    target: Option<SocketAddr>,
    cut: bool,
}

/// A userspace TCP proxy on a fresh loopback port that adds a per-direction delay and
/// bandwidth cap (the kernel here has no netem), and can cut its link: cutting closes
/// every proxied connection and refuses new ones until restored. Shapes apply to bytes
/// read after the change. The proxy stops when this is dropped.
///
/// Each direction is a reader that stamps chunks with their arrival time and a writer
/// that sends a chunk once `arrival + delay` has passed and the previous chunk has
/// left at the capped rate, so a link both delays and serialises like a slow WAN hop.
pub struct ShapedProxy {
    addr: SocketAddr,
    state: Arc<std::sync::Mutex<ProxyState>>,
    cut_tx: tokio::sync::watch::Sender<u64>,
    _task: Task,
}

impl ShapedProxy {
    /// Starts the proxy; without a target it refuses connections until
    /// [`set_target`](Self::set_target).
    pub async fn start(target: Option<SocketAddr>) -> Result<ShapedProxy> {
        let (listener, addr) = bind_loopback().await?;
        let state = Arc::new(std::sync::Mutex::new(ProxyState {
            target,
            ..ProxyState::default()
        }));
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(0u64);
        let st = state.clone();
        let task = Task::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let (target, cut) = {
                    let s = st.lock().unwrap_or_else(|e| e.into_inner());
                    (s.target, s.cut)
                };
                let Some(target) = target.filter(|_| !cut) else {
                    drop(inbound);
                    continue;
                };
                let st = st.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                conns.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let fwd = shaped_copy(ir, ow, st.clone(), true);
                    let bwd = shaped_copy(or, iw, st, false);
                    tokio::select! {
                        _ = async { tokio::join!(fwd, bwd) } => {}
                        _ = cut_rx.changed() => {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(ShapedProxy {
            addr,
            state,
            cut_tx,
            _task: task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn with<R>(&self, f: impl FnOnce(&mut ProxyState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_target(&self, target: SocketAddr) {
        self.with(|s| s.target = Some(target));
    }

    /// Shapes client → target (`forward`) and target → client (`backward`).
    pub fn shape(&self, forward: LinkShape, backward: LinkShape) {
        self.with(|s| {
            s.forward = forward;
            s.backward = backward;
        });
        tracing::info!(addr = %self.addr, ?forward, ?backward, "proxy link shaped");
    }

    /// Closes every proxied connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.with(|s| s.cut = true);
        self.cut_tx.send_modify(|g| *g += 1);
        tracing::info!(addr = %self.addr, "proxy link cut");
    }

    pub fn restore(&self) {
        self.with(|s| s.cut = false);
        tracing::info!(addr = %self.addr, "proxy link restored");
    }
}

/// Copies one direction, delaying and rate-limiting by the current shape.
async fn shaped_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<std::sync::Mutex<ProxyState>>,
    forward: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(Instant, LinkShape, Vec<u8>)>(PROXY_QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; PROXY_CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let shape = {
                let s = state.lock().unwrap_or_else(|e| e.into_inner());
                if forward { s.forward } else { s.backward }
            };
            if tx
                .send((Instant::now(), shape, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        // When the link is free again after the previous chunk's serialisation.
        let mut link_free = Instant::now();
        while let Some((arrived, shape, chunk)) = rx.recv().await {
            let serialise = shape.bytes_per_s.map_or(std::time::Duration::ZERO, |r| {
                std::time::Duration::from_secs_f64(chunk.len() as f64 / r.max(1) as f64)
            });
            let start = link_free.max(arrived);
            link_free = start + serialise;
            tokio::time::sleep_until(link_free + shape.delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_u64_names_the_variable_on_bad_input() {
        let var = "BLOCKVOL_FAULTS_TEST_BAD_NUMBER";
        // SAFETY: this test alone uses this variable name.
        unsafe { std::env::set_var(var, "ten") };
        let e = env_u64(var, 1).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains("ten"), "{e}");
        assert_eq!(env_u64("BLOCKVOL_FAULTS_TEST_UNSET", 4).unwrap(), 4);
    }

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    }

    /// Sends `len` bytes through `addr` and reads them back; returns the elapsed time.
    async fn round_trip(addr: SocketAddr, len: usize) -> std::io::Result<std::time::Duration> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = std::time::Instant::now();
        let s = TcpStream::connect(addr).await?;
        let (mut r, mut w) = s.into_split();
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|()| w) });
        let mut back = vec![0u8; len];
        r.read_exact(&mut back).await?;
        let _w = writer.await.expect("writer task")?;
        assert_eq!(
            back, data,
            "the proxy must pass bytes unchanged and in order"
        );
        Ok(start.elapsed())
    }

    #[tokio::test]
    async fn shaped_proxy_delays_caps_and_cuts() {
        let proxy = ShapedProxy::start(Some(echo().await)).await.unwrap();
        // Unshaped it just relays.
        round_trip(proxy.addr(), 1000).await.unwrap();

        // Delay: a round trip takes at least both one-way delays.
        let delay = std::time::Duration::from_millis(60);
        let d = LinkShape {
            delay,
            bytes_per_s: None,
        };
        proxy.shape(d, d);
        let t = round_trip(proxy.addr(), 100).await.unwrap();
        assert!(
            t >= 2 * delay,
            "round trip {t:?} under the added {:?}",
            2 * delay
        );

        // Bandwidth: 256 KiB at 512 KiB/s cannot arrive in under half a second.
        let cap = LinkShape {
            delay: std::time::Duration::ZERO,
            bytes_per_s: Some(512 << 10),
        };
        proxy.shape(cap, LinkShape::default());
        let t = round_trip(proxy.addr(), 256 << 10).await.unwrap();
        assert!(
            t >= std::time::Duration::from_millis(500),
            "256 KiB in {t:?}"
        );

        // Cut: an open connection is closed, new ones are refused; restore heals.
        proxy.shape(LinkShape::default(), LinkShape::default());
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.cut();
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), open.read(&mut b))
            .await
            .expect("the cut closes the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "read after the cut: {n:?}");
        assert!(
            round_trip(proxy.addr(), 10).await.is_err(),
            "a new connection through a cut link must fail"
        );
        proxy.restore();
        round_trip(proxy.addr(), 1000).await.unwrap();
    }
}
