//! I/O shell: tokio TCP transport driving the sans-IO cores over real volumes. A
//! `ReceiverServer` is the node's data port (many volumes multiplexed by volume ID on each
//! authenticated connection); a primary driver runs one `PrimaryCore` per volume over the node's
//! `Transport` (one data and one control connection per peer, shared by all volumes). Every connection authenticates (HMAC challenge-response)
//! before any volume message is read; a malformed frame closes that connection with a logged
//! reason and nothing from it is applied. A well-formed message for a volume the receiver
//! does not host ends only that volume's session (`UnknownVolume`): the shared connection
//! and the other volumes on it carry on. Queues are bounded; a full send queue ends the
//! session (the core recovers by catch-up) instead of growing memory.
//!
//! The append observer hands entries to the driver without blocking the writer; if its
//! queue is full the driver re-reads the missing entries from the WAL, in order. Entries
//! the WAL recycled before they were re-read are reported to the core
//! (`Input::AppendsLost`), which escalates every replica to a rebuild; a FLUSH is
//! requested at the volume's head, so it is never acknowledged for entries that were not
//! shipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ConnId;
use super::forward::{
    FORWARD_IN_FLIGHT_MAX, ForwardConn, ForwardFences, ForwardHandler, ForwardOutcome,
    ForwardSource,
};
use super::plan::RecoveryEvent;
use super::primary::{
    Action, FlushId, Input, Peer, PrimaryConfig, PrimaryCore, RecoveryBytes, ReplicaState, Report,
};
use super::receiver::{ReceiverAction, ReceiverConfig, ReceiverCore, ReceiverInput};
use super::storage::ReplicaLog;
use super::types::{Epoch, Generation, Lsn, ReplicaId, VolumeId, WalEntry};
use super::volume_log::VolumeLog;
use super::wire::{
    Body, ClientAuth, ErrorCode, ForwardMsg, ForwardStatus, FrameDecoder, Message, NONCE_BYTES,
    ServerAuth, VolumeMsg, WireConfig, WireError, encode_frame,
};
use crate::storage::volume::Volume;

/// Transport settings (units last). `Debug` redacts the cluster secret so a logged
/// config cannot leak it.
#[derive(Clone)]
pub struct NetConfig {
    /// This node's name, sent in the hello.
    pub node_name: String,
    /// Shared cluster secret for peer authentication.
    pub cluster_secret: Vec<u8>,
    pub wire: WireConfig,
    pub dial_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    /// Frames queued per connection before the session is ended.
    pub send_queue_frames_max: usize,
    /// Appended entries queued between the volume and the driver before it falls back to
    /// re-reading the WAL.
    pub append_queue_entries_max: usize,
    pub tick_interval_ms: u64,
    /// Recovery events kept for inspection.
    pub events_kept_max: usize,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("node_name", &self.node_name)
            .field(
                "cluster_secret",
                &format_args!("<{} bytes redacted>", self.cluster_secret.len()),
            )
            .field("wire", &self.wire)
            .field("dial_timeout_ms", &self.dial_timeout_ms)
            .field("auth_timeout_ms", &self.auth_timeout_ms)
            .field("send_queue_frames_max", &self.send_queue_frames_max)
            .field("append_queue_entries_max", &self.append_queue_entries_max)
            .field("tick_interval_ms", &self.tick_interval_ms)
            .field("events_kept_max", &self.events_kept_max)
            .finish()
    }
}

impl NetConfig {
    pub fn new(node_name: &str, cluster_secret: &[u8]) -> Self {
        Self {
            node_name: node_name.to_string(),
            cluster_secret: cluster_secret.to_vec(),
            wire: WireConfig::default(),
            dial_timeout_ms: 3_000,
            auth_timeout_ms: 3_000,
            send_queue_frames_max: 65_536,
            append_queue_entries_max: 65_536,
            tick_interval_ms: 10,
            events_kept_max: 4096,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out during {0}")]
    Timeout(&'static str),
}

fn nonce() -> [u8; NONCE_BYTES] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; NONCE_BYTES];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut out))
        .is_ok();
    if !ok {
        // Uniqueness is what matters for a nonce; mix time, pid and a counter.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        out[..16].copy_from_slice(&t.to_le_bytes());
        out[16..24].copy_from_slice(&c.to_le_bytes());
        out[24..28].copy_from_slice(&std::process::id().to_le_bytes());
    }
    out
}

pub(crate) async fn write_msg(w: &mut OwnedWriteHalf, m: &Message) -> Result<(), NetError> {
    w.write_all(&encode_frame(m)).await?;
    Ok(())
}

pub(crate) struct FrameReader {
    r: OwnedReadHalf,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(r: OwnedReadHalf, cfg: WireConfig) -> Self {
        Self {
            r,
            dec: FrameDecoder::new(cfg),
            buf: vec![0u8; 64 * 1024],
        }
    }
    pub(crate) async fn next(&mut self) -> Result<Message, NetError> {
        loop {
            if let Some(m) = self.dec.next_message()? {
                return Ok(m);
            }
            let n = self.r.read(&mut self.buf).await?;
            if n == 0 {
                return Err(if self.dec.buffered_bytes() > 0 {
                    NetError::Wire(WireError::Truncated {
                        field: "frame cut by end of stream",
                    })
                } else {
                    NetError::Closed
                });
            }
            self.dec.feed(&self.buf[..n]);
        }
    }
}

pub(crate) async fn client_handshake(
    stream: TcpStream,
    cfg: &NetConfig,
) -> Result<(FrameReader, OwnedWriteHalf), NetError> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, cfg.wire);
    let fut = async {
        let (mut auth, hello) = ClientAuth::start(&cfg.cluster_secret, &cfg.node_name, nonce());
        write_msg(&mut w, &hello).await?;
        while !auth.is_authenticated() {
            let m = reader.next().await?;
            if let Some(reply) = auth.on_message(&m)? {
                write_msg(&mut w, &reply).await?;
            }
        }
        Ok::<(), NetError>(())
    };
    tokio::time::timeout(Duration::from_millis(cfg.auth_timeout_ms), fut)
        .await
        .map_err(|_| NetError::Timeout("authentication"))??;
    Ok((reader, w))
}

async fn server_handshake(
    stream: TcpStream,
    cfg: &NetConfig,
) -> Result<(FrameReader, OwnedWriteHalf, String), NetError> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, cfg.wire);
    let fut = async {
        let mut auth = ServerAuth::new(&cfg.cluster_secret, &cfg.node_name, nonce());
        while !auth.is_authenticated() {
            let m = reader.next().await?;
            if let Some(reply) = auth.on_message(&m)? {
                write_msg(&mut w, &reply).await?;
            }
        }
        Ok::<String, NetError>(auth.peer().unwrap_or_default().to_string())
    };
    let peer = tokio::time::timeout(Duration::from_millis(cfg.auth_timeout_ms), fut)
        .await
        .map_err(|_| NetError::Timeout("authentication"))??;
    Ok((reader, w, peer))
}

/// How long `ReceiverServer::shutdown` waits for connection tasks to finish.
const SHUTDOWN_WAIT_MS: u64 = 5_000;

pub(crate) fn spawn_writer<T: Into<Message> + Send + 'static>(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<T>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut w, &m.into()).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    })
}

// ----- receiver side ----------------------------------------------------------------------

struct Hosted {
    core: ReceiverCore,
    log: VolumeLog,
    /// When the last heartbeat from a primary arrived: every answer to it was sent
    /// later, so a primary's member proof resting on this replica is never newer.
    last_heartbeat: Option<Instant>,
}

struct ConnEntry {
    tx: mpsc::Sender<Message>,
    reader: Option<tokio::task::AbortHandle>,
}

struct ServerShared {
    cfg: NetConfig,
    start: Instant,
    volumes: Mutex<HashMap<VolumeId, Arc<Mutex<Hosted>>>>,
    conns: Mutex<HashMap<ConnId, ConnEntry>>,
    next_conn: AtomicU64,
    rejected: Mutex<VecDeque<String>>,
    /// Executes forwarded block IO for local primaries; without one, every forwarded
    /// request is answered `NotPrimary`.
    forward: Mutex<Option<Arc<dyn ForwardHandler>>>,
    /// Orders and cancels forwarded requests across a node's connections.
    forward_fences: Arc<ForwardFences>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServerShared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn reject(&self, reason: String) {
        tracing::warn!(node = %self.cfg.node_name, %reason, "replication connection closed");
        let mut r = lock(&self.rejected);
        if r.len() >= self.cfg.events_kept_max {
            r.pop_front();
        }
        r.push_back(reason);
    }

    fn close(&self, conn: ConnId) {
        if let Some(e) = lock(&self.conns).remove(&conn)
            && let Some(a) = e.reader
        {
            a.abort();
        }
    }

    fn route(&self, actions: Vec<ReceiverAction>) {
        for a in actions {
            match a {
                ReceiverAction::Send { conn, msg } => {
                    let full = match lock(&self.conns).get(&conn) {
                        Some(e) => e.tx.try_send(Message::Volume(msg)).is_err(),
                        None => false,
                    };
                    if full {
                        self.reject(format!("send queue of connection {} overflowed", conn.0));
                        self.close(conn);
                    }
                }
                ReceiverAction::Close { conn, reason } => {
                    self.reject(reason);
                    self.close(conn);
                }
            }
        }
    }

    /// A message for a volume not hosted here ends that volume's session only: a request
    /// that awaits an answer (handshake, truncation, rebuild start, barrier, heartbeat) is
    /// answered `UnknownVolume`, and the primary retries the session later. Entries and
    /// base blocks are dropped without an answer (they belong to a session that will
    /// hear `UnknownVolume` at its next barrier or heartbeat), so a primary streaming
    /// to a volume that was just removed here cannot make this side queue one error per
    /// entry. The connection stays open for every other volume on it.
    fn unknown_volume(&self, conn: ConnId, node: &str, msg: VolumeMsg) {
        let awaits_answer = matches!(
            msg.body,
            Body::ResumeRequest { .. }
                | Body::Truncate { .. }
                | Body::RebuildStart { .. }
                | Body::BarrierRequest { .. }
                | Body::Heartbeat { .. }
        );
        if !awaits_answer {
            return;
        }
        tracing::debug!(node = %self.cfg.node_name, peer = %node, volume = %msg.volume, "message for a volume not hosted here; answering UnknownVolume");
        let reply = VolumeMsg {
            volume: msg.volume.clone(),
            // No epoch is known here for this volume; echoing the sender's keeps the
            // answer from fencing it or looking stale.
            epoch: msg.epoch,
            body: Body::Error {
                code: ErrorCode::UnknownVolume,
                current_epoch: Epoch(0),
                detail: format!(
                    "volume {} is not hosted on {}",
                    msg.volume, self.cfg.node_name
                ),
            },
        };
        self.route(vec![ReceiverAction::Send { conn, msg: reply }]);
    }

    fn step(&self, hosted: &Arc<Mutex<Hosted>>, input: ReceiverInput) {
        let now = self.now_ms();
        // An entry that fits in the WAL is one page-cache write: it runs inline, since
        // `block_in_place` would hand this worker's queue to another thread per entry.
        // Anything that may fsync (a barrier, an entry completing one), wait for WAL
        // space, or read the log for a rebuild runs in `block_in_place`.
        let mut h = lock(hosted);
        if let ReceiverInput::Received { msg, .. } = &input
            && matches!(msg.body, Body::Heartbeat { .. })
        {
            h.last_heartbeat = Some(Instant::now());
        }
        let inline = match &input {
            ReceiverInput::Received { msg, .. } => match &msg.body {
                Body::Entry(e) => {
                    !h.core.barriers_pending() && h.log.volume().has_room_for(e.data.len())
                }
                _ => false,
            },
            _ => false,
        };
        let actions = if inline {
            let Hosted { core, log, .. } = &mut *h;
            core.step(now, input, log)
        } else {
            drop(h);
            tokio::task::block_in_place(|| {
                let mut h = lock(hosted);
                let Hosted { core, log, .. } = &mut *h;
                core.step(now, input, log)
            })
        };
        self.route(actions);
    }
}

/// The node's replication data port.
pub struct ReceiverServer {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    tasks: Vec<JoinHandle<()>>,
}

impl ReceiverServer {
    /// Binds and starts accepting. The bound address is canonical (`local_addr`).
    pub async fn bind(addr: SocketAddr, cfg: NetConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let tick = cfg.tick_interval_ms.max(1);
        let shared = Arc::new(ServerShared {
            cfg,
            start: Instant::now(),
            volumes: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            rejected: Mutex::new(VecDeque::new()),
            forward: Mutex::new(None),
            forward_fences: ForwardFences::new(),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move { serve_conn(s, stream, peer).await });
            }
        });
        let s = shared.clone();
        let ticker = tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(tick));
            loop {
                iv.tick().await;
                let vols: Vec<Arc<Mutex<Hosted>>> = lock(&s.volumes).values().cloned().collect();
                for v in vols {
                    s.step(&v, ReceiverInput::Tick);
                }
            }
        });
        Ok(Self {
            addr,
            shared,
            tasks: vec![accept, ticker],
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `vol` as a replica of volume `id`.
    pub fn host(&self, id: VolumeId, vol: Arc<Volume>, cfg: ReceiverConfig) {
        let hosted = Hosted {
            core: ReceiverCore::new(id.clone(), cfg),
            log: VolumeLog::new(vol),
            last_heartbeat: None,
        };
        lock(&self.shared.volumes).insert(id, Arc::new(Mutex::new(hosted)));
    }

    /// Stops serving volume `id` (it became primary here, or was deleted). Messages for it
    /// that arrive later are answered like those for any unknown volume (`UnknownVolume`,
    /// connection kept). Returns whether it was hosted.
    pub fn unhost(&self, id: &VolumeId) -> bool {
        lock(&self.shared.volumes).remove(id).is_some()
    }

    /// When a heartbeat for volume `id` last arrived here (`None` if none did, or it is
    /// not hosted). A replica promoted to primary waits until the member-proof window
    /// has passed since then, so the old primary's proof has run out before it serves.
    pub fn last_heartbeat(&self, id: &VolumeId) -> Option<Instant> {
        let hosted = lock(&self.shared.volumes).get(id).cloned()?;
        lock(&hosted).last_heartbeat
    }

    /// Installs the executor of forwarded block IO (see [`ForwardHandler`]).
    pub fn set_forward_handler(&self, handler: Arc<dyn ForwardHandler>) {
        *lock(&self.shared.forward) = Some(handler);
    }

    /// Whether volume `id` is served here.
    pub fn is_hosted(&self, id: &VolumeId) -> bool {
        lock(&self.shared.volumes).contains_key(id)
    }

    /// Why the replica of volume `id` stopped accepting entries (a failed append or
    /// fsync), if it did; the agent reports it so the operator can drop the member.
    pub fn storage_failure(&self, id: &VolumeId) -> Option<String> {
        let hosted = lock(&self.shared.volumes).get(id).cloned()?;
        // The core is locked while it appends or fsyncs; a status report must not wait
        // behind a stalled disk, so a busy core reads as "no failure known yet".
        let h = match hosted.try_lock() {
            Ok(h) => h,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        h.core.failed().map(str::to_string)
    }

    /// Reasons connections were closed for (most recent last).
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.shared.rejected).iter().cloned().collect()
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Stops accepting, closes every connection, and returns once the listening socket is
    /// released (so the address can be bound again) and the connection tasks have let go
    /// of the hosted volumes (so their files can be reopened), or after
    /// `SHUTDOWN_WAIT_MS` if a connection is still stuck in its handshake.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let shared = self.shared.clone();
        // Drop closes the connections and forgets the volumes; a reader task may still be
        // inside a step (holding its volume) until that step returns.
        drop(self);
        let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_WAIT_MS);
        while Arc::strong_count(&shared) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for ReceiverServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let conns: Vec<ConnId> = lock(&self.shared.conns).keys().copied().collect();
        for c in conns {
            self.shared.close(c);
        }
        lock(&self.shared.volumes).clear();
    }
}

async fn serve_conn(s: Arc<ServerShared>, stream: TcpStream, peer: SocketAddr) {
    let (mut reader, w, node) = match server_handshake(stream, &s.cfg).await {
        Ok(x) => x,
        Err(e) => {
            s.reject(format!("peer {peer} failed authentication: {e}"));
            return;
        }
    };
    let conn = ConnId(s.next_conn.fetch_add(1, Ordering::Relaxed) + 1);
    let (tx, rx) = mpsc::channel(s.cfg.send_queue_frames_max.max(1));
    let writer = spawn_writer(w, rx);
    lock(&s.conns).insert(conn, ConnEntry { tx, reader: None });
    tracing::debug!(%peer, node = %node, conn = conn.0, "replication peer authenticated");
    let s2 = s.clone();
    let forward_slots = Arc::new(tokio::sync::Semaphore::new(FORWARD_IN_FLIGHT_MAX));
    // The fence of this connection's forwarded requests (see `forward`): closing the
    // connection cancels every request of it not yet admitted to its volume.
    let fconn = ForwardConn::new(conn.0);
    let fconn_reader = fconn.clone();
    let task = tokio::spawn(async move {
        let fconn = fconn_reader;
        let close_fence = fconn.closes_on_drop();
        loop {
            match reader.next().await {
                Ok(Message::Forward(ForwardMsg::Request {
                    id,
                    volume,
                    epoch,
                    op,
                    attachment,
                })) => {
                    // Bounded: at most FORWARD_IN_FLIGHT_MAX requests run per connection;
                    // the reader waits (TCP backpressure) beyond that.
                    let Ok(permit) = forward_slots.clone().acquire_owned().await else {
                        break;
                    };
                    let handler = lock(&s2.forward).clone();
                    let tx = lock(&s2.conns).get(&conn).map(|e| e.tx.clone());
                    let Some(tx) = tx else { break };
                    let fences = s2.forward_fences.clone();
                    let fconn = fconn.clone();
                    let node = node.clone();
                    tokio::spawn(async move {
                        // Requests this node sent on its older connections for this volume
                        // finish (or are cancelled) before this one runs.
                        fences.arrive(&fconn, &node, &volume, attachment).await;
                        let from = ForwardSource::connection(&node, fences, fconn, volume.clone())
                            .with_attachment(attachment);
                        let outcome = match handler {
                            // The fence's own reason (closed, superseded, stale attachment).
                            Some(_) if !from.is_current() => ForwardOutcome::failed(
                                ForwardStatus::Io,
                                from.admit().err().unwrap_or_else(|| {
                                    "cancelled: the forward connection was closed or superseded"
                                        .into()
                                }),
                            ),
                            Some(h) => tokio::task::spawn_blocking(move || {
                                h.handle(&from, &volume, epoch, op)
                            })
                            .await
                            .unwrap_or_else(|e| {
                                ForwardOutcome::failed(
                                    ForwardStatus::Io,
                                    format!("forward handler failed: {e}"),
                                )
                            }),
                            None => ForwardOutcome::failed(
                                ForwardStatus::NotPrimary,
                                "this agent serves no forwarded IO".into(),
                            ),
                        };
                        let _ = tx.send(Message::Forward(outcome.into_reply(id))).await;
                        drop(permit);
                    });
                }
                Ok(Message::Forward(ForwardMsg::Reply { .. })) => {
                    s2.reject(format!("peer {peer} sent a forward reply to the data port"));
                    break;
                }
                Ok(Message::Volume(msg)) => {
                    let hosted = lock(&s2.volumes).get(&msg.volume).cloned();
                    match hosted {
                        Some(h) => s2.step(&h, ReceiverInput::Received { conn, msg }),
                        None => s2.unknown_volume(conn, &node, msg),
                    }
                }
                Ok(Message::Auth(_)) => {
                    s2.reject(format!(
                        "peer {peer} sent an authentication message after authenticating"
                    ));
                    break;
                }
                Err(NetError::Closed) => break,
                Err(e) => {
                    s2.reject(format!("peer {peer}: {e}"));
                    break;
                }
            }
        }
        drop(close_fence);
        s2.close(conn);
        let vols: Vec<Arc<Mutex<Hosted>>> = lock(&s2.volumes).values().cloned().collect();
        for v in vols {
            s2.step(&v, ReceiverInput::ConnectionLost(conn));
        }
    });
    if let Some(e) = lock(&s.conns).get_mut(&conn) {
        e.reader = Some(task.abort_handle());
    }
    let _ = task.await;
    writer.abort();
}

// ----- primary side -----------------------------------------------------------------------

enum Cmd {
    Input(Input),
    Attach(ConnId, Arc<SharedLink>),
    Flush(oneshot::Sender<Result<Lsn, String>>),
    Snapshot(oneshot::Sender<PrimarySnapshot>),
}

/// What the driver reports when asked.
#[derive(Debug, Clone, Default)]
pub struct PrimarySnapshot {
    pub replicas: BTreeMap<ReplicaId, (ReplicaState, Lsn)>,
    pub holds: usize,
    pub retention_floor: Option<Lsn>,
    pub head: Lsn,
    pub acked_high: Lsn,
    pub fenced: Option<Epoch>,
    pub events: Vec<RecoveryEvent>,
    pub reports: Vec<Report>,
    /// Bytes each replica was sent by catch-ups and rebuilds since this primary started.
    pub recovery_bytes: BTreeMap<ReplicaId, RecoveryBytes>,
}

/// Lets a flush skip the driver while the gate needs only the local fsync (no peers):
/// at RF1 a flush is then one group-committed fdatasync on the caller's thread instead
/// of a round trip through the driver task and the blocking pool.
///
/// Protocol (all SeqCst, so each side sees the other's write): a flusher checks `open`,
/// fsyncs, raises `acked`, and acknowledges only if `open` still holds; otherwise it
/// asks the driver. Before any input that could add a member the driver closes `open`
/// and feeds `acked` to the core (`Input::AckedLocally`), so a member is only granted
/// InSync once it holds everything acknowledged this way; after each step it reopens
/// `open` if `PrimaryCore::gate_is_local_only` holds.
#[derive(Default)]
struct LocalGate {
    open: AtomicBool,
    acked: AtomicU64,
}

/// The driver's latest member proof (see `PrimaryCore::member_proof_ms`), readable
/// without a round trip to the driver: IO checks it on every request.
struct MemberProof {
    start: Instant,
    /// Proof time in the driver's milliseconds plus one; 0 while there is none.
    at_ms_plus_one: AtomicU64,
}

impl MemberProof {
    fn publish(&self, proof_ms: Option<u64>) {
        self.at_ms_plus_one.store(
            proof_ms.map_or(0, |m| m.saturating_add(1)),
            Ordering::Release,
        );
    }

    fn age(&self) -> Option<Duration> {
        let v = self.at_ms_plus_one.load(Ordering::Acquire);
        let at = self.start + Duration::from_millis(v.checked_sub(1)?);
        Some(Instant::now().saturating_duration_since(at))
    }
}

/// Handle to a running primary driver.
pub struct PrimaryHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
    vol: Arc<Volume>,
    reports: tokio::sync::Mutex<mpsc::Receiver<Report>>,
    local_gate: Arc<LocalGate>,
    proof: Arc<MemberProof>,
}

impl PrimaryHandle {
    /// How old the member proof is: every committed in-sync member answered a heartbeat
    /// at this primary's epoch that was sent that long ago. `None` while some member has
    /// not answered (or the primary is fenced or failed). With no other committed
    /// member the proof is always fresh.
    pub fn member_proof_age(&self) -> Option<Duration> {
        self.proof.age()
    }

    /// Group-committed flush: resolves with the acked LSN, or the reason it failed.
    pub async fn flush(&self) -> Result<Lsn, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .map_err(|_| "replication driver stopped".to_string())?;
        rx.await
            .map_err(|_| "replication driver stopped".to_string())?
    }

    /// Blocking flush for a primary whose gate is local-only (no peers, nothing
    /// committed): fsyncs the volume on the calling thread. `None` means the driver must
    /// decide (peers exist, the gate changed meanwhile, or the fsync failed and the
    /// driver must see the failure); call [`PrimaryHandle::flush`] then. Never call it
    /// on a runtime worker: it blocks for an fdatasync.
    pub fn try_flush_local(&self) -> Option<Lsn> {
        let g = &self.local_gate;
        if !g.open.load(Ordering::SeqCst) {
            return None;
        }
        let lsn = self.vol.flush().ok()?;
        g.acked.fetch_max(lsn.0, Ordering::SeqCst);
        g.open.load(Ordering::SeqCst).then_some(lsn)
    }

    pub fn assign_peers(&self, peers: Vec<Peer>) {
        let _ = self.tx.send(Cmd::Input(Input::PeersAssigned(peers)));
    }

    pub fn commit_in_sync_set(&self, generation: Generation, members: Vec<ReplicaId>) {
        let _ = self.tx.send(Cmd::Input(Input::InSyncSetCommitted {
            generation,
            members,
        }));
    }

    pub fn request_rebuild(&self, id: ReplicaId) {
        let _ = self.tx.send(Cmd::Input(Input::RebuildRequested(id)));
    }

    /// The control plane re-asserted this primary at a newer epoch (persists it first).
    pub fn change_epoch(&self, e: Epoch) -> Result<(), String> {
        self.vol.set_epoch(e).map_err(|x| x.to_string())?;
        let _ = self.tx.send(Cmd::Input(Input::EpochChanged(e)));
        Ok(())
    }

    /// Next report for the control plane (state changes, unreachable or in-sync members,
    /// NeedsRebuild, fencing). `None` once the driver stopped.
    pub async fn next_report(&self) -> Option<Report> {
        self.reports.lock().await.recv().await
    }

    pub async fn snapshot(&self) -> Option<PrimarySnapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Snapshot(tx)).ok()?;
        rx.await.ok()
    }

    /// Stops the driver and lets go of the volume.
    pub fn stop(self) {
        self.halt();
    }

    /// Stops the driver now, also while other holders of the handle (connections still
    /// draining on a removed export) keep it: nothing is shipped or retained on the
    /// volume's behalf after this.
    pub fn halt(&self) {
        self.vol.set_append_observer(None);
        self.task.abort();
    }
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Driver {
    /// The term ends with the driver: the WAL it held for lagging peers is free again.
    /// This runs after its last step, so no floor set by a step outlives the term.
    fn drop(&mut self) {
        self.log.release_retention_floor();
    }
}

/// Outbound links of one node, shared by every primary volume on it: one data and one
/// control connection per peer address, multiplexing volumes by volume ID. The data
/// connection carries everything whose order matters (handshake, truncation, entries,
/// rebuild, barriers - a barrier must not overtake the entries and truncations before it);
/// the control connection carries heartbeats, so liveness is not judged behind a data
/// backlog.
pub struct Transport {
    cfg: NetConfig,
    slots: Mutex<HashMap<SocketAddr, LinkSlot>>,
}

/// One peer's link, dialed at most once at a time.
type LinkSlot = Arc<tokio::sync::Mutex<Option<Arc<SharedLink>>>>;

impl Transport {
    pub fn new(cfg: NetConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Live links (connection pairs) to peers.
    pub fn links(&self) -> usize {
        let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .map(|g| g.as_ref().is_some_and(|l| l.alive()))
                    .unwrap_or(true)
            })
            .count()
    }

    async fn link(&self, addr: SocketAddr) -> Result<Arc<SharedLink>, NetError> {
        let slot = lock(&self.slots).entry(addr).or_default().clone();
        let mut g = slot.lock().await;
        if let Some(l) = g.as_ref()
            && l.alive()
        {
            return Ok(l.clone());
        }
        let l = SharedLink::dial(addr, &self.cfg).await?;
        *g = Some(l.clone());
        Ok(l)
    }
}

struct Sub {
    conn: ConnId,
    tx: mpsc::UnboundedSender<Cmd>,
}

struct SharedLink {
    data: mpsc::Sender<VolumeMsg>,
    ctrl: mpsc::Sender<VolumeMsg>,
    subs: Mutex<HashMap<VolumeId, Sub>>,
    alive: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl SharedLink {
    async fn dial(addr: SocketAddr, cfg: &NetConfig) -> Result<Arc<SharedLink>, NetError> {
        let open = |cfg: NetConfig| async move {
            let stream = tokio::time::timeout(
                Duration::from_millis(cfg.dial_timeout_ms),
                TcpStream::connect(addr),
            )
            .await
            .map_err(|_| NetError::Timeout("dial"))??;
            client_handshake(stream, &cfg).await
        };
        let (data_r, data_w) = open(cfg.clone()).await?;
        let (ctrl_r, ctrl_w) = open(cfg.clone()).await?;
        let (dtx, drx) = mpsc::channel(cfg.send_queue_frames_max.max(1));
        let (ctx, crx) = mpsc::channel(cfg.send_queue_frames_max.max(1));
        let link = Arc::new(SharedLink {
            data: dtx,
            ctrl: ctx,
            subs: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![
            spawn_writer(data_w, drx).abort_handle(),
            spawn_writer(ctrl_w, crx).abort_handle(),
        ];
        for mut reader in [data_r, ctrl_r] {
            let l = link.clone();
            tasks.push(
                tokio::spawn(async move {
                    loop {
                        match reader.next().await {
                            Ok(Message::Volume(msg)) => l.route(msg),
                            Ok(Message::Auth(_) | Message::Forward(_)) => break,
                            Err(e) => {
                                if !matches!(e, NetError::Closed) {
                                    tracing::warn!(%addr, error = %e, "replica link closed");
                                }
                                break;
                            }
                        }
                    }
                    l.fail();
                })
                .abort_handle(),
            );
        }
        lock(&link.tasks).extend(tasks);
        Ok(link)
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    fn route(&self, msg: VolumeMsg) {
        if let Some(sub) = lock(&self.subs).get(&msg.volume) {
            let conn = sub.conn;
            let _ = sub.tx.send(Cmd::Input(Input::Received { conn, msg }));
        }
    }

    /// Routes `volume`'s messages to this session; false if the link already died.
    fn subscribe(&self, volume: VolumeId, conn: ConnId, tx: mpsc::UnboundedSender<Cmd>) -> bool {
        let mut subs = lock(&self.subs);
        // Checked under the lock `fail` drains, so a session is never left on a dead link.
        if !self.alive() {
            return false;
        }
        subs.insert(volume, Sub { conn, tx });
        true
    }

    fn unsubscribe(&self, volume: &VolumeId, conn: ConnId) {
        let mut subs = lock(&self.subs);
        if subs.get(volume).is_some_and(|s| s.conn == conn) {
            subs.remove(volume);
        }
    }

    /// Queues a message; false if the link cannot take it.
    fn send(&self, msg: VolumeMsg) -> bool {
        let q = match msg.body {
            super::wire::Body::Heartbeat { .. } => &self.ctrl,
            _ => &self.data,
        };
        self.alive() && q.try_send(msg).is_ok()
    }

    /// Ends the link and every session riding on it.
    fn fail(&self) {
        let subs: Vec<Sub> = {
            let mut g = lock(&self.subs);
            if !self.alive.swap(false, Ordering::AcqRel) {
                return;
            }
            g.drain().map(|(_, s)| s).collect()
        };
        for s in subs {
            let _ = s.tx.send(Cmd::Input(Input::ConnectionLost(s.conn)));
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

struct Driver {
    core: PrimaryCore,
    log: VolumeLog,
    cfg: NetConfig,
    start: Instant,
    tx: mpsc::UnboundedSender<Cmd>,
    conns: HashMap<ConnId, Arc<SharedLink>>,
    transport: Arc<Transport>,
    volume: VolumeId,
    flushes: HashMap<FlushId, oneshot::Sender<Result<Lsn, String>>>,
    next_flush: u64,
    events: VecDeque<RecoveryEvent>,
    reports: VecDeque<Report>,
    report_tx: mpsc::Sender<Report>,
    overflow: Arc<AtomicBool>,
    local_gate: Arc<LocalGate>,
    proof: Arc<MemberProof>,
}

/// Starts the primary driver for `vol` (at `epoch`, already persisted) and attaches the
/// volume's append observer to it.
#[allow(clippy::too_many_arguments)]
pub fn spawn_primary(
    vol: Arc<Volume>,
    volume: VolumeId,
    self_id: ReplicaId,
    pcfg: PrimaryConfig,
    generation: Generation,
    committed: Vec<ReplicaId>,
    peers: Vec<Peer>,
    transport: Arc<Transport>,
) -> PrimaryHandle {
    let cfg = transport.cfg.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let (report_tx, report_rx) = mpsc::channel::<Report>(cfg.events_kept_max.max(1));
    let (atx, mut arx) = mpsc::channel::<WalEntry>(cfg.append_queue_entries_max.max(1));
    let overflow = Arc::new(AtomicBool::new(false));
    let ov = overflow.clone();
    vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
        if atx.try_send(e.clone()).is_err() {
            ov.store(true, Ordering::Release);
        }
    })));
    let pcfg = pcfg.fit_to_wal(vol.stats().wal_size_bytes);
    let log = VolumeLog::new(vol.clone());
    let epoch = vol.epoch();
    let core = PrimaryCore::new(
        volume.clone(),
        self_id,
        epoch,
        pcfg,
        generation,
        committed,
        &log,
    );
    let local_gate = Arc::new(LocalGate::default());
    let start = Instant::now();
    let proof = Arc::new(MemberProof {
        start,
        at_ms_plus_one: AtomicU64::new(0),
    });
    let mut d = Driver {
        core,
        log,
        cfg,
        start,
        tx: tx.clone(),
        conns: HashMap::new(),
        transport,
        volume,
        flushes: HashMap::new(),
        next_flush: 0,
        events: VecDeque::new(),
        reports: VecDeque::new(),
        report_tx,
        overflow,
        local_gate: local_gate.clone(),
        proof: proof.clone(),
    };
    let task = tokio::spawn(async move {
        d.step(Input::PeersAssigned(peers));
        let mut iv = tokio::time::interval(Duration::from_millis(d.cfg.tick_interval_ms.max(1)));
        loop {
            tokio::select! {
                biased;
                e = arx.recv() => match e {
                    Some(e) => d.step(Input::Appended(e)),
                    None => break,
                },
                c = rx.recv() => match c {
                    Some(c) => d.on_cmd(c),
                    None => break,
                },
                _ = iv.tick() => {
                    d.resync();
                    d.step(Input::Tick);
                }
            }
        }
    });
    PrimaryHandle {
        tx,
        task,
        vol,
        reports: tokio::sync::Mutex::new(report_rx),
        local_gate,
        proof,
    }
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Feeds entries the observer could not queue, re-read from the WAL in order. Entries
    /// already recycled are reported as lost (the core escalates every replica and
    /// resumes after them); any other read error is retried at the next tick.
    fn resync(&mut self) {
        if !self.overflow.swap(false, Ordering::AcqRel) && self.log.head_lsn() <= self.core.head() {
            return;
        }
        loop {
            let head = self.core.head();
            let from = head.next();
            if from > self.log.head_lsn() {
                break;
            }
            match self.log.scan_from(from, 1024) {
                Ok(batch) if !batch.is_empty() => {
                    for e in batch {
                        self.step(Input::Appended(e));
                    }
                }
                Ok(_) => break,
                Err(super::Error::Recycled { retained_start, .. }) => {
                    self.step(Input::AppendsLost {
                        resume_after: Lsn(retained_start.0.saturating_sub(1)),
                    });
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, %from, error = %e, "re-reading appended entries failed; retrying");
                    break;
                }
            }
            if self.core.head() <= head {
                // Fenced, failed, or nothing moved: stop rather than spin.
                break;
            }
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Input(i) => self.step(i),
            Cmd::Attach(conn, link) => {
                self.conns.insert(conn, link);
            }
            Cmd::Flush(reply) => {
                self.resync();
                self.next_flush += 1;
                let id = FlushId(self.next_flush);
                self.flushes.insert(id, reply);
                self.step(Input::FlushRequested(id));
            }
            Cmd::Snapshot(reply) => {
                let mut snap = PrimarySnapshot {
                    holds: self.core.pinner().len(),
                    retention_floor: self.core.retention_floor(),
                    head: self.core.head(),
                    acked_high: self.core.acked_high(),
                    fenced: self.core.fenced(),
                    events: self.events.iter().cloned().collect(),
                    reports: self.reports.iter().cloned().collect(),
                    recovery_bytes: self.core.recovery_bytes().clone(),
                    ..PrimarySnapshot::default()
                };
                for (id, st, fl) in self.core.replicas() {
                    snap.replicas.insert(id, (st, fl));
                }
                let _ = reply.send(snap);
            }
        }
    }

    fn step(&mut self, input: Input) {
        // Appends, local fsync results and flush requests cannot add a member; every
        // other input might, so it first closes the local gate and absorbs its acks
        // (see `LocalGate`).
        if !matches!(
            input,
            Input::Appended(_) | Input::LocalFsyncDone { .. } | Input::FlushRequested(_)
        ) {
            self.local_gate.open.store(false, Ordering::SeqCst);
            let acked = Lsn(self.local_gate.acked.load(Ordering::SeqCst));
            if acked > self.core.acked_high() {
                self.step_core(Input::AckedLocally { lsn: acked });
            }
        }
        self.step_core(input);
        let local_only = self.core.gate_is_local_only();
        self.local_gate.open.store(local_only, Ordering::SeqCst);
        self.proof.publish(self.core.member_proof_ms());
    }

    fn step_core(&mut self, input: Input) {
        let now = self.now_ms();
        // These inputs only queue sends and update counters: no log read, no sync. They
        // run inline; `block_in_place` would hand this worker's queue to another thread
        // on every append.
        let actions = if matches!(
            input,
            Input::Appended(_)
                | Input::FlushRequested(_)
                | Input::LocalFsyncDone { .. }
                | Input::AckedLocally { .. }
        ) {
            self.core.step(now, input, &mut self.log)
        } else {
            tokio::task::block_in_place(|| self.core.step(now, input, &mut self.log))
        };
        // Before any reply goes out: a flush acknowledged by this step is checked
        // against the proof this step established (a commit that left the primary alone
        // in its set), not the one before it.
        self.proof.publish(self.core.member_proof_ms());
        for e in self.core.take_events() {
            if self.events.len() >= self.cfg.events_kept_max {
                self.events.pop_front();
            }
            self.events.push_back(e);
        }
        for a in actions {
            self.act(a);
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Connect {
                conn,
                endpoint,
                replica,
            } => {
                let transport = self.transport.clone();
                let tx = self.tx.clone();
                let volume = self.volume.clone();
                tokio::spawn(async move {
                    match transport.link(endpoint.addr()).await {
                        Ok(link) if link.subscribe(volume, conn, tx.clone()) => {
                            let _ = tx.send(Cmd::Attach(conn, link));
                            let _ = tx.send(Cmd::Input(Input::Connected(conn)));
                        }
                        Ok(_) => {
                            let _ = tx.send(Cmd::Input(Input::ConnectFailed(conn)));
                        }
                        Err(e) => {
                            tracing::warn!(%replica, %endpoint, error = %e, "replica connection failed");
                            let _ = tx.send(Cmd::Input(Input::ConnectFailed(conn)));
                        }
                    }
                });
            }
            Action::Send { conn, msg } => {
                if let Some(link) = self.conns.get(&conn)
                    && !link.send(msg)
                {
                    // A full or dead link ends every session on it; each hears ConnectionLost.
                    link.fail();
                    self.close(conn);
                    let _ = self.tx.send(Cmd::Input(Input::ConnectionLost(conn)));
                }
            }
            Action::Close { conn, reason } => {
                tracing::debug!(conn = conn.0, %reason, "closing replica connection");
                self.close(conn);
            }
            Action::LocalFsync { .. } => {
                let vol = self.log.volume().clone();
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let input = match vol.flush() {
                        Ok(d) => Input::LocalFsyncDone { durable: d },
                        Err(e) => {
                            tracing::error!(error = %e, "local flush failed");
                            Input::LocalFsyncFailed
                        }
                    };
                    let _ = tx.send(Cmd::Input(input));
                });
            }
            Action::FlushAcked { id, lsn } => {
                if let Some(r) = self.flushes.remove(&id) {
                    let _ = r.send(Ok(lsn));
                }
            }
            Action::FlushFailed { id, reason } => {
                if let Some(r) = self.flushes.remove(&id) {
                    let _ = r.send(Err(reason));
                }
            }
            Action::Report(r) => {
                tracing::info!(report = ?r, "replication report");
                if self.reports.len() >= self.cfg.events_kept_max {
                    self.reports.pop_front();
                }
                self.reports.push_back(r.clone());
                if self.report_tx.try_send(r).is_err() {
                    tracing::debug!(
                        "report queue full or unread; dropping a report (status stays in snapshots)"
                    );
                }
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(link) = self.conns.remove(&conn) {
            link.unsubscribe(&self.volume, conn);
        }
    }
}
