//! The node's replication data port: a `ReceiverServer` hosts replicas, many volumes
//! multiplexed by volume ID on each authenticated connection. A well-formed message for a
//! volume the receiver does not host ends only that volume's session (`UnknownVolume`):
//! the shared connection and the other volumes on it carry on. The same connections carry
//! forwarded block IO (`Message::Forward`), handed to the node's `ForwardHandler` behind
//! the fences of `forward::fence`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::auth::server_handshake;
use super::config::NetConfig;
use super::framing::{NetError, spawn_writer};
use super::lock;
use crate::forward::fence::{ForwardConn, ForwardFences, ForwardSource};
use crate::forward::protocol::{FORWARD_IN_FLIGHT_MAX, ForwardHandler, ForwardOutcome};
use crate::replication::receiver::{
    ReceiverAction, ReceiverConfig, ReceiverCore, ReceiverInput, step_blocking,
};
use crate::replication::types::{Epoch, VolumeId};
use crate::replication::volume_log::VolumeLog;
use crate::replication::wire::{Body, ErrorCode, ForwardMsg, ForwardStatus, Message, VolumeMsg};
use crate::replication::{ConnId, RebuildProgress};
use crate::storage::volume::Volume;

/// How long `ReceiverServer::shutdown` waits for connection tasks to finish.
const SHUTDOWN_WAIT_MS: u64 = 5_000;

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
    /// Each hosted volume's rebuild progress after its last step, readable without
    /// waiting for a core busy on the disk.
    rebuilds: Mutex<HashMap<VolumeId, RebuildProgress>>,
    conns: Mutex<HashMap<ConnId, ConnEntry>>,
    next_conn: AtomicU64,
    rejected: Mutex<VecDeque<String>>,
    /// Executes forwarded block IO for local primaries; without one, every forwarded
    /// request is answered `NotPrimary`.
    forward: Mutex<Option<Arc<dyn ForwardHandler>>>,
    /// Orders and cancels forwarded requests across a node's connections.
    forward_fences: Arc<ForwardFences>,
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
                // Performed by `step_blocking` before the actions are routed.
                ReceiverAction::Sync { .. } => {}
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
        let step = |h: &mut Hosted| {
            let Hosted { core, log, .. } = h;
            let actions = step_blocking(core, now, input, log);
            (actions, core.volume().clone(), core.rebuild_progress())
        };
        let (actions, volume, progress) = if inline {
            step(&mut h)
        } else {
            drop(h);
            tokio::task::block_in_place(|| step(&mut lock(hosted)))
        };
        {
            let mut rebuilds = lock(&self.rebuilds);
            match progress {
                Some(p) => rebuilds.insert(volume, p),
                None => rebuilds.remove(&volume),
            };
        }
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
            rebuilds: Mutex::new(HashMap::new()),
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
        lock(&self.shared.rebuilds).remove(id);
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

    /// How far the base copy of a rebuild of volume `id` is, as of the last message
    /// handled (see `ReceiverCore::rebuild_progress`).
    pub fn rebuild_progress(&self, id: &VolumeId) -> Option<RebuildProgress> {
        if !lock(&self.shared.volumes).contains_key(id) {
            return None;
        }
        lock(&self.shared.rebuilds).get(id).copied()
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
